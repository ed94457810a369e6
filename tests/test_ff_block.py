"""The Forward-Forward agent's block loop (``ff-block``, contlearn/backends/ff_block.py)
against the autograd reference and the per-step path: predictions, losses, weights and
gradient sums over every embedding, norm, goodness and kernel activation; splits of a block,
threads and replicas run alone give the same bits; negatives are the per-step draws; exact
resume; the backend choice; the checked binding."""

from __future__ import annotations

import io

import pytest
import torch

from contlearn.agents.forward_forward import FFAgent, FFAgentSpec
from contlearn.backends import ff_block
from contlearn.envs.base import StreamInfo
from contlearn.learners import Learner, learner_def
from contlearn.spec import build_spec
from contlearn.state import tree_leaves

IN, C = 12, 4

pytestmark = pytest.mark.skipif(ff_block.library() is None, reason="no compiled kernels")


def make_agent(
    seeds=(0, 1, 2), learner: str = "bp", batch: int = 1, lopts=None, **options
) -> FFAgent:
    info = StreamInfo("test", "classification", (IN,), C, False, len(seeds), "accuracy", batch)
    values = {"hidden": "6,5,4", "optimizer": "sgd", "lr": 0.02, **options}
    lopts = {**FFAgent.learner_defaults.get(learner, {}), **(lopts or {})}
    lspec = build_spec(learner_def(learner).Spec, lopts, "learner.")
    return FFAgent(info, list(seeds), build_spec(FFAgentSpec, values), Learner(learner, lspec))


def data(R: int, T: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, R, 1, IN, generator=g), torch.randint(C, (T, R, 1), generator=g)


def stepwise(agent: FFAgent, obs: torch.Tensor, target: torch.Tensor):
    preds, losses = [], []
    for t in range(obs.shape[0]):
        p = agent.act(obs[t])
        losses.append(agent.observe(obs[t], p, target[t])["loss"])
        preds.append(p)
    return torch.stack(preds), torch.stack(losses)


def blockwise(agent: FFAgent, obs: torch.Tensor, target: torch.Tensor, sizes=(1, 2, 5)):
    preds, losses, t = [], [], 0
    for size in [*sizes, obs.shape[0]]:
        if t >= obs.shape[0]:
            break
        p, m = agent.learn_block(obs[t : t + size], target[t : t + size])
        preds.append(p)
        losses.append(m["loss"])
        t += size
    return torch.cat(preds), torch.cat(losses)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"embed": "append", "norm": "length"},
        {"goodness": "mean", "activation": "tanh"},
        {"activation": "sigmoid", "from_layer": 1, "embed": "append"},
        {"activation": "leaky_relu", "norm": "length", "goodness": "mean", "from_layer": 3},
    ],
)
@pytest.mark.parametrize("learner", ["bp", "l2"])
def test_block_equals_reference_and_step_path(options, learner):
    obs, target = data(3, 12)
    block = make_agent(learner=learner, **options)
    assert block.backend == "ff-block" and block.block_ready(1)
    ref = make_agent(learner=learner, fast=False, **options)
    for agent in (block, ref):
        agent.watch_gradients()
    p_block, l_block = blockwise(block, obs, target)
    p_ref, l_ref = stepwise(ref, obs, target)
    assert p_block.shape == p_ref.shape == (12, 3, 1, C)
    torch.testing.assert_close(p_block, p_ref, rtol=2e-4, atol=1e-4)
    torch.testing.assert_close(l_block, l_ref, rtol=2e-4, atol=1e-5)
    for k in ref.views:
        torch.testing.assert_close(block.views[k], ref.views[k], rtol=1e-4, atol=5e-5)
    a, b = block.update_stats()["grad_magnitude"], ref.update_stats()["grad_magnitude"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-8)
    # the negatives are the per-step path's draws: the generators end in the same state
    for g, h in zip(block.negatives, ref.negatives, strict=True):
        assert torch.equal(g.get_state(), h.get_state())


def assert_equal_runs(block: FFAgent, ref: FFAgent, obs, target) -> None:
    """Run ``block`` in blocks and ``ref`` step by step; predictions, losses, weights,
    learner state and gradient sums agree to float rounding."""
    block.watch_gradients()
    ref.watch_gradients()
    p_block, l_block = blockwise(block, obs, target)
    p_ref, l_ref = stepwise(ref, obs, target)
    torch.testing.assert_close(p_block, p_ref, rtol=2e-4, atol=1e-4)
    torch.testing.assert_close(l_block, l_ref, rtol=2e-4, atol=1e-5)
    for k in ref.views:
        torch.testing.assert_close(block.views[k], ref.views[k], rtol=1e-4, atol=5e-5)
    ours, theirs = tree_leaves(block.learner_state), tree_leaves(ref.learner_state)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    a, b = block.update_stats()["grad_magnitude"], ref.update_stats()["grad_magnitude"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    ("options", "learner", "lopts"),
    [
        # Adam between affine maps (FF's default optimizer): moments and counts too
        ({"optimizer": "adam", "lr": 3e-3}, "bp", None),
        (
            {"optimizer": "adam", "lr": 3e-3, "beta1": 0.99, "beta2": 0.99, "embed": "append",
             "goodness": "mean"},
            "bp",
            None,
        ),
        (
            {"optimizer": "adam", "lr": 3e-3, "activation": "tanh", "norm": "length"},
            "l2",
            {"l2": 0.01, "decoupled": 0.001},
        ),
        # S&P's noise drawn in the kernel (keys, update count), L2-Init's anchors
        ({}, "snp", {"shrink": 0.01, "sigma": 0.01}),
        ({"embed": "append", "activation": "tanh"}, "snp", {"shrink": 0.0, "sigma": 0.0}),
        ({}, "l2-init", {"l2_init": 0.05}),
        ({"goodness": "mean", "norm": "length"}, "l2-init", {"l2_init": 0.01}),
    ],
)  # fmt: skip
def test_learner_forms_in_the_block_equal_reference(options, learner, lopts, monkeypatch):
    """Adam, shrink-and-perturb and L2-Init in the kernel against the autograd reference
    stepping through ``learner.update`` (its S&P noise from the numpy definition)."""
    from contlearn.learners import regularizers

    monkeypatch.setattr(regularizers, "_fast_noise", regularizers._reference_noise)
    obs, target = data(3, 10)
    block = make_agent(learner=learner, lopts=lopts, **options)
    ref = make_agent(learner=learner, lopts=lopts, fast=False, **options)
    assert block.backend == "ff-block", block.block_problem
    assert_equal_runs(block, ref, obs, target)


def test_hand_computed_step():
    """One step of a one-layer network by hand: z_c = W x_c / s + b, G_c = |relu z_c|²."""
    agent = make_agent(seeds=(3,), hidden="3", lr=0.1)
    w, b = agent.views["hidden1.weight"].clone()[0], agent.views["hidden1.bias"].clone()[0]
    obs, target = data(1, 1)
    x, y = obs[0, 0, 0], int(target[0, 0, 0])
    gen = torch.Generator()
    gen.set_state(agent.negatives[0].get_state())
    n = (y + 1 + int(torch.randint(C - 1, (1,), generator=gen))) % C
    theta = 3.0
    rows = []
    for c in range(C):
        e = torch.cat([torch.nn.functional.one_hot(torch.tensor(c), C).float(), x[C:]])
        rows.append(e / (e.pow(2).mean().sqrt() + 1e-8))
    h = [torch.relu(w @ e + b) for e in rows]
    g = [float(v.pow(2).sum()) for v in h]
    sp = torch.nn.functional.softplus
    loss = 0.5 * (sp(torch.tensor(theta - g[y])) + sp(torch.tensor(g[n] - theta)))
    dp = -torch.sigmoid(torch.tensor(theta - g[y])) * h[y] * (h[y] > 0)
    dn = torch.sigmoid(torch.tensor(g[n] - theta)) * h[n] * (h[n] > 0)
    scores, metrics = agent.learn_block(obs, target)
    torch.testing.assert_close(scores[0, 0, 0], torch.tensor(g), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["loss"][0, 0], loss, rtol=1e-5, atol=1e-6)
    want = w - 0.1 * (torch.outer(dp, rows[y]) + torch.outer(dn, rows[n]))
    torch.testing.assert_close(agent.views["hidden1.weight"][0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(agent.views["hidden1.bias"][0], b - 0.1 * (dp + dn))


def test_splits_threads_and_replicas_alone_give_the_same_bits():
    obs, target = data(3, 10)
    whole = make_agent()
    whole.replica_workers = 1
    p_whole, l_whole = whole.learn_block(obs, target)
    split = make_agent()
    split.replica_workers = 3
    p_split, l_split = blockwise(split, obs, target, sizes=(3, 1, 4))
    assert torch.equal(p_whole, p_split) and torch.equal(l_whole["loss"], l_split)
    for k in whole.views:
        assert torch.equal(whole.views[k], split.views[k])
    for r, s in enumerate((0, 1, 2)):
        alone = make_agent(seeds=(s,))
        p, _ = alone.learn_block(obs[:, r : r + 1], target[:, r : r + 1])
        assert torch.equal(p, p_whole[:, r : r + 1])
        for k in alone.views:
            assert torch.equal(alone.views[k], whole.views[k][r : r + 1])


def test_exact_resume_between_blocks():
    obs, target = data(2, 9)
    whole = make_agent(seeds=(4, 7))
    whole.watch_gradients()
    whole.learn_block(obs, target)
    first = make_agent(seeds=(4, 7))
    first.watch_gradients()
    first.learn_block(obs[:4], target[:4])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = make_agent(seeds=(4, 7))
    second.load_state_dict(torch.load(buf, weights_only=True))
    second.learn_block(obs[4:], target[4:])
    for k in whole.views:
        assert torch.equal(whole.views[k], second.views[k])
    a, b = whole.update_stats()["grad_magnitude"], second.update_stats()["grad_magnitude"]
    assert torch.equal(a[""], b[""])


def test_plasticity_probe_reads_the_last_steps_negatives():
    """probe_loss on a block's last batch (passed again as a view, as the engine does) uses
    that step's negatives, as after a per-step observe."""
    obs, target = data(3, 4)
    block, steps = make_agent(), make_agent(fast=False)
    block.learn_block(obs, target)
    stepwise(steps, obs, target)
    view = obs[3]  # (a new view object of the same memory)
    torch.testing.assert_close(
        block.probe_loss(view, target[3]), steps.probe_loss(obs[3], target[3]), rtol=1e-4,
        atol=1e-5,
    )  # fmt: skip
    assert torch.equal(block._last[1], steps._last[1])


@pytest.mark.parametrize(
    ("options", "learner", "backend"),
    [
        ({"optimizer": "adam", "lr": 1e-3}, "redo", "ff-hand"),
        ({"optimizer": "adam", "lr": 1e-3}, "snp", "ff-hand"),
        ({}, "cbp", "ff-fused"),
        ({"predict": "head"}, "bp", "ff-fused"),
        ({"peer_norm": 0.03}, "bp", "ff-fused"),
        ({"activation": "elu"}, "bp", "ff-fused"),
        ({"batch": 2}, "bp", "ff-fused"),
    ],
)
def test_configurations_the_kernel_does_not_compute_keep_the_step_path(options, learner, backend):
    batch = options.pop("batch", 1)
    agent = make_agent(learner=learner, batch=batch, **options)
    assert agent.backend == backend and agent.block_problem
    assert not agent.block_ready(batch)
    obs, target = data(3, 2)
    with pytest.raises(RuntimeError, match="does not learn in blocks"):
        agent.learn_block(obs, target)


def test_no_kernels_no_block(monkeypatch):
    monkeypatch.setattr(ff_block, "library", lambda: None)
    agent = make_agent()
    assert agent.backend == "ff-fused" and agent.block_problem == "no compiled kernels"


def _args(R=2, T=3, D=IN, widths=(5, 4)):
    ws, bs, fan = [], [], D
    for h in widths:
        ws.append(torch.zeros(R, h, fan))
        bs.append(torch.zeros(R, h))
        fan = h
    x = torch.rand(T, R, D)
    y = torch.zeros(T, R, dtype=torch.int64)
    return ws, bs, x, y, torch.ones(T, R, dtype=torch.int64), (5.0, 4.0)


_OPTS = {"classes": C, "alpha": -0.1, "scale": 1.0, "activation": "relu", "append": False,
         "length": False, "mean": False, "first": 0}  # fmt: skip


def test_binding_runs_and_rejects_bad_arguments():
    ws, bs, x, y, n, th = _args()
    strided = ws[0].transpose(1, 2).contiguous().transpose(1, 2)
    scores, loss = ff_block.ff_block_(ws, bs, x, y, n, th, **_OPTS)
    assert scores.shape == (3, 2, C) and loss.shape == (3, 2)
    bad = [
        (TypeError, "x", dict(x=x.double())),
        (ValueError, r"weights\[1\]", dict(ws=[ws[0], torch.zeros(2, 4, 6)])),
        (ValueError, "not contiguous", dict(ws=[strided, ws[1]])),
        (ValueError, "biases", dict(bs=[bs[0], torch.zeros(3, 4)])),
        (ValueError, "class indices", dict(y=torch.full((3, 2), C, dtype=torch.int64))),
        (TypeError, "negatives", dict(n=n.int())),
        (ValueError, "shape", dict(n=n[:2])),
        (ValueError, "first", dict(first=2)),
        (ValueError, "thresholds", dict(th=(1.0,))),
    ]  # fmt: skip
    for error, needle, change in bad:
        args = {"ws": ws, "bs": bs, "x": x, "y": y, "n": n, "th": th, **change}
        opts = {k: change.get(k, v) for k, v in _OPTS.items()}
        with pytest.raises(error, match=needle):
            ff_block.ff_block_(args["ws"], args["bs"], args["x"], args["y"], args["n"],
                               args["th"], **opts)  # fmt: skip


@pytest.mark.slow
def test_runs_take_the_block_and_record_what_the_step_path_records(tmp_path):
    import json

    from contlearn.cli import main
    from contlearn.results.store import load_runs

    common = ["permuted-mnist", "--agent", "ff", "--seeds", "2", "--tasks", "2",
              *["--set", "examples_per_task=40", "--set", "probe_size=30", "--set",
                "optimizer=sgd", "--set", "lr=0.003", "--set", "hidden=32,32"]]  # fmt: skip
    block, ref = tmp_path / "block", tmp_path / "ref"
    assert main(["run", *common, "--out", str(block)]) == 0
    assert main(["run", *common, "--set", "fast=false", "--out", str(ref)]) == 0
    assert json.loads((block / "meta.json").read_text())["backend"] == "ff-block"
    assert json.loads((ref / "meta.json").read_text())["backend"] == "ff-reference"
    keys = ["metric", "layer", "step", "seed"]
    a = load_runs([block]).sort_values(keys).reset_index(drop=True)
    b = load_runs([ref]).sort_values(keys).reset_index(drop=True)
    assert {"accuracy", "goodness_gap", "plasticity", "grad_magnitude"} <= set(a.metric)
    assert list(a.metric) == list(b.metric) and list(a.layer) == list(b.layer)
    # (a near-tie of two labels' goodness may flip one prediction of 40 under float rounding)
    acc = (a.metric == "accuracy").to_numpy()
    assert a.value[acc].to_numpy() == pytest.approx(b.value[acc].to_numpy(), abs=2 / 40 + 1e-9)
    assert a.value[~acc].to_numpy() == pytest.approx(b.value[~acc].to_numpy(), rel=1e-3, abs=1e-4)


def test_binding_refuses_adam_counts_that_differ_within_a_tensor():
    ws, bs, x, y, n, th = _args()

    def fresh(ts):
        return [torch.zeros_like(t) for t in ts]

    counts_w = fresh(ws)
    counts_w[1][0, 0, 0] = 3.0  # (a reset's trace: one element's count differs)
    adam = ff_block.BlockAdam(fresh(ws), fresh(ws), counts_w, fresh(bs), fresh(bs), fresh(bs),
                              1.0, 0.0, 0.9, 0.999, 1e-8, -1e-3, 0.0)  # fmt: skip
    with pytest.raises(ValueError, match="count"):
        ff_block.ff_block_(ws, bs, x, y, n, th, adam=adam, **_OPTS)
    counts_w[1].zero_()
    ff_block.ff_block_(ws, bs, x, y, n, th, adam=adam, **_OPTS)
    assert all(bool((c == 3).all()) for c in counts_w)  # (T = 3 steps counted)
