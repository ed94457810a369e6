"""PPO's acting kernel (``compiled-acting``, contlearn/backends/ppo_acting.py): the policy's
mean and the action μ + σz of each loop step in one compiled call.

Checked against an independent float64 evaluation of the forward pass and against torch's
float32 path (to float rounding), for its exact bits across replicas, rows and instruction
sets, for its binding's errors and for where the agent uses it.
"""

from __future__ import annotations

import ctypes
import json
import platform
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from contlearn.agents.networks import BatchedMLP
from contlearn.backends import kernels
from contlearn.backends.ppo_acting import (
    COMPILED_ACTING,
    MAX_ROWS,
    CompiledPolicy,
    PolicyActArgs,
)
from contlearn.running.config import resolve

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="no compiled kernels")


def policy(in_dim: int, hidden: tuple[int, ...], out: int, R: int, seed: int = 0) -> BatchedMLP:
    gens = [torch.Generator().manual_seed(seed + r) for r in range(R)]
    net = BatchedMLP(in_dim, hidden, out, "relu", "kaiming_uniform", gens)
    for k, v in net.params.items():  # (biases away from zero, so every unit's sign varies)
        if k.endswith(".bias"):
            v.copy_(torch.randn(v.shape, generator=gens[0]) * 0.3)
    return net


def reference64(net: BatchedMLP, obs, noise, std, t: int) -> torch.Tensor:
    """μ(obs) + σ z in float64: every layer written out, not the network's own forward."""
    h = obs.double()
    for layer in net.layers:
        w = net.params[f"{layer.name}.weight"].double()
        b = net.params[f"{layer.name}.bias"].double()
        h = torch.einsum("rei,rki->rek", h, w) + b.unsqueeze(1)
        if layer.next is not None:
            h = h.clamp_min(0.0)
    return h + std.double().reshape(std.shape[0], 1, -1) * noise[:, t].double()


SHAPES = [  # (R, E, in_dim, hidden, actions): widths below, at and past the 8- and 32-lane blocks
    (1, 1, 105, (256, 256), 8),
    (3, 2, 37, (9, 33), 3),
    (2, 4, 5, (7,), 1),
    (1, 3, 64, (40, 24, 17), 6),
]


@pytest.mark.parametrize("R, E, D, hidden, A", SHAPES)
def test_actions_are_the_forward_pass_to_float_rounding(R, E, D, hidden, A) -> None:
    g = torch.Generator().manual_seed(1)
    net = policy(D, hidden, A, R)
    T = 5
    noise = torch.randn(R, T, E, A, generator=g)
    std = torch.rand(R, 1, A, generator=g) + 0.1
    kernel = CompiledPolicy(net, std, noise)
    for t in range(T):
        obs = torch.randn(R, E, D, generator=g) * 2
        action = kernel.act(obs, t)
        assert action.shape == (R, E, A) and action.dtype == torch.float32
        torch.testing.assert_close(
            action.double(), reference64(net, obs, noise, std, t), rtol=1e-5, atol=1e-5
        )
        with torch.no_grad():
            mean = net.forward(obs)[0]
        torch.testing.assert_close(action, torch.addcmul(mean, noise[:, t], std))


def test_bits_do_not_depend_on_replicas_or_rows() -> None:
    """Replica r's row e gives the same bits computed alone as among R replicas and E rows."""
    g = torch.Generator().manual_seed(2)
    R, E, D, A = 3, 4, 37, 3
    net = policy(D, (33, 9), A, R)
    noise = torch.randn(R, 2, E, A, generator=g)
    std = torch.rand(R, 1, A, generator=g) + 0.1
    obs = torch.randn(R, E, D, generator=g)
    together = CompiledPolicy(net, std, noise).act(obs, 1)
    for r in range(R):
        alone = policy(D, (33, 9), A, 1)
        for k, v in alone.params.items():
            v.copy_(net.params[k][r : r + 1])
        for e in range(E):
            one = CompiledPolicy(alone, std[r : r + 1], noise[r : r + 1, :, e : e + 1].clone())
            assert torch.equal(one.act(obs[r : r + 1, e : e + 1].clone(), 1)[0, 0], together[r, e])


def _build_alone(tmp: Path, flags: list[str]) -> ctypes.CDLL:
    src = Path(kernels.__file__).with_name("policy_act.c")
    lib = tmp / f"act{len(flags)}.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run(
        [
            cc,
            "-O3",
            "-fPIC",
            "-shared",
            "-fno-math-errno",
            "-ffp-contract=off",
            *flags,
            str(src),
            "-lm",
            "-o",
            str(lib),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    found = ctypes.CDLL(str(lib))
    found.cl_policy_act.restype = None
    found.cl_policy_act.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return found


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512")
    or not (shutil.which("cc") or shutil.which("gcc")),
    reason="needs an x86 CPU with AVX2 and a C compiler",
)
def test_the_same_bits_with_and_without_avx2(tmp_path: Path) -> None:
    """The portable loop adds in the AVX2 loop's order: both builds give the same bits."""
    g = torch.Generator().manual_seed(3)
    R, E, D, A = 2, 3, 105, 8
    net = policy(D, (256, 77), A, R)
    noise = torch.randn(R, 1, E, A, generator=g)
    std = torch.rand(R, 1, A, generator=g) + 0.1
    kernel = CompiledPolicy(net, std, noise)
    obs = torch.randn(R, E, D, generator=g)
    outs = []
    for flags in ([], ["-mavx2", "-mfma"]):
        lib = _build_alone(tmp_path, flags)
        out = torch.empty(R, E, A)
        lib.cl_policy_act(ctypes.byref(kernel._args), obs.data_ptr(), 0, out.data_ptr())
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[1], kernel.act(obs, 0))


def test_the_binding_refuses_wrong_tensors() -> None:
    net = policy(5, (7,), 2, 2)
    noise, std = torch.randn(2, 3, 1, 2), torch.ones(2, 1, 2)
    kernel = CompiledPolicy(net, std, noise)
    with pytest.raises(TypeError, match="kernel argument obs: dtype float64"):
        kernel.act(torch.zeros(2, 1, 5, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match=r"kernel argument obs: shape \(2, 1, 6\)"):
        kernel.act(torch.zeros(2, 1, 6), 0)
    with pytest.raises(ValueError, match="kernel argument t: step 3"):
        kernel.act(torch.zeros(2, 1, 5), 3)
    with pytest.raises(TypeError, match="kernel argument obs: expected a torch.Tensor"):
        kernel.act([[0.0] * 5], 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="kernel argument noise: dtype float64"):
        CompiledPolicy(net, std, noise.double())
    with pytest.raises(ValueError, match="kernel argument noise: 3 actions"):
        CompiledPolicy(net, std, torch.randn(2, 3, 1, 3))
    with pytest.raises(ValueError, match="kernel argument std"):
        CompiledPolicy(net, torch.ones(1, 1, 2), noise)
    tanh = BatchedMLP(5, (7,), 2, "tanh", "kaiming_uniform", [torch.Generator()] * 2)
    with pytest.raises(ValueError, match="no tanh"):
        CompiledPolicy(tanh, std, noise)
    # a strided view of the observations is copied, not misread
    wide = torch.randn(2, 1, 10)
    assert torch.equal(kernel.act(wide[..., ::2], 1), kernel.act(wide[..., ::2].contiguous(), 1))


def _cfg(**options):
    return resolve({"stream": "slippery-ant", "learner": "bp", **options})


def test_refusals_name_the_reason() -> None:
    from contlearn.agents.ppo_auto import step_config

    def refusal(device: str = "cpu", dtype: str = "float32", **options) -> str | None:
        cfg = _cfg(**options)
        return COMPILED_ACTING.refusal(step_config(cfg.agent_spec, cfg.learner, device, dtype))

    assert refusal() is None
    assert refusal(fast=False) == "fast=false"
    assert "activation tanh" in refusal(activation="tanh")
    assert "float64 on cpu" in refusal(dtype="float64")
    assert "on cuda" in refusal(device="cuda")
    assert "hidden layers" in refusal(hidden=",".join(["4"] * 8))
    assert ctypes.sizeof(PolicyActArgs) == kernels.library().cl_policy_act_args_size()


@pytest.mark.parametrize("copies", [1, MAX_ROWS, MAX_ROWS + 1])
def test_the_agent_acts_in_the_kernel_up_to_max_rows(copies: int) -> None:
    from contlearn.envs.base import StreamInfo

    info = StreamInfo("tiny", "rl", (5,), 2, False, 2, "episode_return")
    cfg = _cfg(hidden="6,5", rollout=4 * copies, minibatch_size=4, epochs=1)
    agent = cfg.agent_cls(info, [0, 1], cfg.agent_spec, cfg.learner)
    try:
        assert agent.backend.endswith("+compiled-acting")
        obs = torch.randn(2, copies, 5)
        action = agent.act(obs)
        compiled = agent._rollout_consts[2]
        assert (compiled is not None) == (copies <= MAX_ROWS)
        with torch.no_grad():
            mean = agent.net.policy.forward(obs)[0]
        want = torch.addcmul(mean, agent.buf["noise"][:, 0], agent._rollout_consts[0])
        torch.testing.assert_close(action, want)
    finally:
        agent.close()


def test_a_run_records_it_and_resumes_exactly(tmp_path) -> None:
    """A Slippery Ant run acts in the kernel (``meta.json`` names it), and one stopped at a
    checkpoint mid-rollout and resumed gives the numbers of the run that went straight on."""
    import contlearn

    config = {
        "rollout": 64,
        "minibatch_size": 16,
        "epochs": 2,
        "hidden": "16,16",
        "checkpoint_every": 100,
        "change_every": 200,
    }
    out = tmp_path / "resumed"
    contlearn.run("slippery-ant", steps=150, config=config, out=out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backend"].endswith("+compiled-acting")
    contlearn.run("slippery-ant", steps=300, config=config, out=out, resume=True)
    full = contlearn.run("slippery-ant", steps=300, config=config, out=tmp_path / "full")
    cols = ["seed", "step", "metric", "layer"]
    a = contlearn.load_runs([out]).drop(columns=["run"]).sort_values(cols)
    b = contlearn.load_runs([full.path]).drop(columns=["run"]).sort_values(cols)
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
    assert a["step"].max() == 300
