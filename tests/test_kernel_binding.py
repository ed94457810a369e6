"""The checked binding (issue 21, item 3): every kernel wrapper refuses tensors of the wrong
dtype, shape, layout or device with an error naming the argument, before any pointer reaches C
(a mismatch used to corrupt memory); and the process holds one OpenMP runtime."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from contlearn.backends import block_kernel, kernels

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="needs a C compiler")

R, K, H, B, T, C = 2, 5, 3, 1, 4, 3


def _bad_versions(t: torch.Tensor) -> dict[str, object]:
    """Wrong dtype, wrong shape, non-contiguous, wrong device, not a tensor."""
    other = torch.float64 if t.dtype != torch.float64 else torch.float32
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype) if t.dim() else t
    return {
        "dtype": t.to(other),
        "shape": torch.zeros(*t.shape, 2, dtype=t.dtype),
        "strided": wide[..., ::2] if t.dim() else t,
        "meta": t.to("meta"),
        "list": t.tolist(),
    }


def _expect_error(call: Callable[[dict], object], args: dict, name: str, label: str) -> None:
    """``call`` with ``args[name]`` replaced by each bad version raises an error naming it."""
    for kind, bad in _bad_versions(args[name]).items():
        if kind == "strided" and args[name].dim() == 0:
            continue
        with pytest.raises((TypeError, ValueError)) as err:
            call({**args, name: bad})
        # (a shape that disagrees with the others may be reported on one of the others)
        named = label in str(err.value) or (kind == "shape" and "kernel argument" in str(err.value))
        assert named, (name, kind, str(err.value))


def _layer_args() -> dict:
    return {
        "w": torch.randn(R, K, H),
        "delta": torch.randn(R, B, K),
        "h_in": torch.randn(R, B, H),
    }


@pytest.mark.parametrize("name", ["w", "delta", "h_in"])
def test_layer_update_refuses_bad_tensors(name):
    def call(a):
        return kernels.layer_update_(a["w"], a["delta"], a["h_in"], 0.1, 0.0, True, True)

    args = _layer_args()
    call(args)  # the good arguments run
    if name == "w":
        _expect_error(call, args, name, "kernel argument w")
    else:  # read-only inputs are copied to contiguous: every other mismatch raises
        for kind, bad in _bad_versions(args[name]).items():
            if kind == "strided":
                continue
            with pytest.raises((TypeError, ValueError), match=f"kernel argument {name}"):
                call({**args, name: bad})


@pytest.mark.parametrize("name", ["g", "m", "v", "count"])
def test_adam_direction_refuses_bad_tensors(name):
    def call(a):
        return kernels.adam_direction_(a["g"], a["m"], a["v"], a["count"], 0.9, 0.999, 1e-8)

    args = {n: torch.zeros(R, K, H) for n in ("g", "m", "v", "count")}
    call(args)
    _expect_error(call, args, name, f"kernel argument {name}")


@pytest.mark.parametrize("name", ["age", "f", "u", "u_hat", "carry", "eligible", "table"])
def test_cbp_stats_refuses_bad_tensors(name):
    def call(a):
        return kernels.cbp_stats_(
            a["age"], a["f"], a["u"], a["u_hat"], a["h"], a["out"], a["carry"],
            a["eligible"], 0.9, 10, 0.01, a["table"], True,
        )  # fmt: skip

    args = {
        "age": torch.zeros(R, H, dtype=torch.int64),
        "f": torch.zeros(R, H),
        "u": torch.zeros(R, H),
        "u_hat": torch.zeros(R, H),
        "h": torch.rand(R, B, H),
        "out": torch.rand(R, H),
        "carry": torch.zeros(R, dtype=torch.float64),
        "eligible": torch.zeros(R, dtype=torch.int64),
        "table": 1 - 0.9 ** torch.arange(50, dtype=torch.float32),
    }
    call(args)
    _expect_error(call, args, name, f"kernel argument {name}")


def _block_args(classification: bool = True) -> dict:
    widths = [4, 6, 5, C]
    ws = [torch.randn(R, widths[i + 1], widths[i]) * 0.3 for i in range(3)]
    L = len(ws)
    return {
        "weights": ws,
        "biases": [torch.zeros(R, w.shape[1]) for w in ws],
        "x": torch.randn(T, R, widths[0]),
        "target": torch.randint(C, (T, R)) if classification else torch.randn(T, R, C),
        "out": torch.empty(T, R, C),
        "loss": torch.empty(T, R),
        "start": torch.zeros(R, dtype=torch.int64),
        "events": torch.zeros(R, L - 1, dtype=torch.int64),
        "pending": block_kernel.Pending1.empty(R, widths[1]),
        "grad_l1": torch.zeros(R, L, dtype=torch.float64),
    }


def _block(a: dict, classification: bool = True, **kw) -> None:
    block_kernel.online_block_(
        a["weights"], a["biases"], a["x"], a["target"], classification, -0.01, 0.0, "relu",
        a["out"], a["loss"], a["start"], a["events"], None, a["pending"], 1, a["grad_l1"], **kw,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["x", "target", "out", "loss", "start", "events", "grad_l1"])
def test_online_block_refuses_bad_tensors(name):
    args = _block_args()
    _block(args)
    _expect_error(_block, _block_args(), name, f"kernel argument {name}")


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_online_block_refuses_bad_layers(layer):
    for which in ("weights", "biases"):
        args = _block_args()
        t = args[which][layer]
        for kind, bad in _bad_versions(t).items():
            if kind == "list":
                continue
            tensors = list(args[which])
            tensors[layer] = bad
            with pytest.raises((TypeError, ValueError), match="kernel argument"):
                _block({**args, which: tensors})
        with pytest.raises(ValueError, match="kernel argument"):
            _block({**args, which: args[which][:-1]})  # a layer missing


def test_online_block_refuses_bad_indices_and_pending_state():
    args = _block_args()
    with pytest.raises(ValueError, match="class indices in \\[0, 3\\)"):
        _block({**args, "target": torch.full((T, R), C)})
    with pytest.raises(ValueError, match="kernel argument start"):
        _block({**args, "start": torch.tensor([-1, 0])})
    p = args["pending"]
    with pytest.raises(ValueError, match="pending.step"):
        _block({**args, "pending": p._replace(step=torch.tensor([T, -1]))})
    with pytest.raises(TypeError, match="pending.skip"):
        _block({**args, "pending": p._replace(skip=p.skip.bool())})
    with pytest.raises(ValueError, match="pending.d"):
        _block({**args, "pending": p._replace(d=torch.zeros(R, 7))})
    with pytest.raises(ValueError, match="kernel argument activation"):
        block_kernel.online_block_(
            args["weights"], args["biases"], args["x"], args["target"], True, -0.01, 0.0,
            "gelu", args["out"], args["loss"], args["start"], args["events"], None, p, 1,
        )  # fmt: skip
    # regression targets: float (T, R, C)
    reg = _block_args(classification=False)
    _block(reg, classification=False)
    with pytest.raises(ValueError, match="kernel argument target"):
        _block({**reg, "target": torch.randn(T, R, C + 1)}, classification=False)


def test_online_block_refuses_missing_feedback_and_adam_under_other_rules():
    args = _block_args()
    fa = block_kernel.BlockCredit("fa", (None, None, None))
    with pytest.raises(ValueError, match="credit.feedback\\[1\\]"):
        _block(args, credit=fa)
    bad = block_kernel.BlockCredit("fa", (None, torch.randn(R, 5, 7), torch.randn(R, C, 5)))
    with pytest.raises(ValueError, match="credit.feedback\\[1\\]"):
        _block(args, credit=bad)
    ws = args["weights"]
    adam = block_kernel.BlockAdam(
        *[[torch.zeros_like(w) for w in ws] for _ in range(3)],
        *[[torch.zeros(R, w.shape[1]) for w in ws] for _ in range(3)],
        1.0, 0.0, 0.9, 0.999, 1e-8, -0.01, 0.0,
    )  # fmt: skip
    _block(_block_args(), adam=adam)
    good = block_kernel.BlockCredit("fa", (None, torch.randn(R, 5, 6), torch.randn(R, C, 5)))
    with pytest.raises(ValueError, match="Adam under bp only"):
        _block(_block_args(), credit=good, adam=adam)
    wrong = adam._replace(nu_w=[*adam.nu_w[:2], torch.zeros(R, C, 4)])
    with pytest.raises(ValueError, match="adam.nu_w\\[2\\]"):
        _block(_block_args(), adam=wrong)
    half = adam._replace(count_b=[t.double() for t in adam.count_b])
    with pytest.raises(TypeError, match="adam.count_b\\[0\\]"):
        _block(_block_args(), adam=half)


def test_cbp_replace_refuses_bad_tensors():
    args = _block_args()
    ws, bs = args["weights"], args["biases"]
    hidden = [w.shape[1] for w in ws[:-1]]
    state = block_kernel.CBPKernelState(
        [torch.full((R, h), 50, dtype=torch.int64) for h in hidden],
        [torch.zeros(R, h) for h in hidden],
        [torch.zeros(R, h) for h in hidden],
        [torch.rand(R, h) for h in hidden],
        [torch.zeros(R, dtype=torch.float64) for _ in hidden],
        [torch.zeros(R, dtype=torch.int64) for _ in hidden],
        0.9, 10, 0.01, 1 - 0.9 ** torch.arange(50, dtype=torch.float32), True,
    )  # fmt: skip
    counts = torch.tensor([[1, 0], [0, 1]])
    fresh = [torch.randn(1, 4), torch.randn(1, 6)]
    repl = [torch.zeros(R, dtype=torch.int64) for _ in hidden]
    skip = torch.zeros(R, hidden[0], dtype=torch.uint8)
    block_kernel.cbp_replace_(ws, bs, counts, fresh, state, repl, True, skip)
    assert [int(r.sum()) for r in repl] == [1, 1]
    with pytest.raises(ValueError, match="fresh\\[1\\]"):  # too few fresh rows for the counts
        block_kernel.cbp_replace_(ws, bs, counts, [fresh[0], torch.randn(0, 6)], state, repl,
                                  True, skip)  # fmt: skip
    with pytest.raises(ValueError, match="fresh\\[0\\]"):  # rows of the wrong fan-in
        block_kernel.cbp_replace_(ws, bs, counts, [torch.randn(1, 5), fresh[1]], state, repl,
                                  True, skip)  # fmt: skip
    with pytest.raises(TypeError, match="cbp.age\\[1\\]"):
        block_kernel.cbp_replace_(
            ws, bs, counts, fresh, state._replace(age=[state.age[0], state.age[1].int()]),
            repl, True, skip,
        )  # fmt: skip
    with pytest.raises(ValueError, match="kernel argument skip"):
        block_kernel.cbp_replace_(ws, bs, counts, fresh, state, repl, True, skip[:, :2])
    with pytest.raises(ValueError, match="kernel argument counts"):
        block_kernel.cbp_replace_(ws, bs, -counts, fresh, state, repl, True, skip)


def test_one_openmp_runtime_in_the_process():
    """After torch and a kernel have run (a parallel kernel, so OpenMP is in use), at most one
    OpenMP runtime is mapped: the kernels link the one torch loaded (a fresh process, so no
    other test's state decides it)."""
    code = (
        "import torch\n"
        "from contlearn.backends import kernels\n"
        "w = torch.randn(4, 300, 300)\n"
        "kernels.layer_update_(w, torch.randn(4, 1, 300), torch.randn(4, 1, 300), .1, 0., 1, 1)\n"
        "torch.randn(300, 300) @ torch.randn(300, 300)\n"
        "print(kernels.library() is not None)\n"
        "print('\\n'.join(kernels.openmp_runtimes()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split("\n")
    assert out[0] == "True"
    runtimes = [line for line in out[1:] if line]
    assert len(runtimes) <= 1, runtimes
