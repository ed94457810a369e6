"""L2-Init and ReDo (ReGraMa) learning in blocks (``contlearn/learners/block_forms.py``) give
the autograd reference's results step by step, with ReDo's checks inside blocks and at their
edges, and resume exactly from a checkpoint taken between blocks (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch

from contlearn.backends import kernels, mlp
from contlearn.learners.block_forms import AnchorPlan, anchor_plan, redo_segments
from contlearn.learners.redo import ReDoState
from tests.test_block_kernel import _close, _compare_states, _resume_between_blocks, _setup

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="needs a C compiler")

#: ReDo checking every 30 updates on the last 20: checks at 30, 60, 120 fall on a block's last
#: step, 90, 150, 180 inside blocks; windows open inside blocks (updates 11, 41, ...). (A
#: permuted-MNIST stream's first block is one step: the task's first.)
REDO = {"learner.period": 30, "learner.window": 20, "learner.threshold": 0.5}
BLOCKS = [1, 29, 7, 23, 50, 1, 9, 40, 40]

CASES = [
    ("permuted-mnist", "l2-init", {"learner.l2_init": 1e-2}),
    ("permuted-mnist", "l2-init", {"learner.l2_init": 1e-2, "activation": "tanh"}),
    ("bit-flipping", "l2-init", {"learner.l2_init": 1e-2, "lr": 1e-3}),
    ("permuted-mnist", "redo", REDO),
    ("permuted-mnist", "redo", {**REDO, "activation": "tanh", "learner.l2": 1e-3}),
    ("bit-flipping", "redo", {**REDO, "lr": 1e-3}),
    ("bit-flipping", "redo", {**REDO, "lr": 1e-3, "activation": "tanh"}),
    ("permuted-mnist", "regrama", REDO),
    ("bit-flipping", "regrama", {**REDO, "lr": 1e-3, "activation": "tanh"}),
    # over Adam: the kernel's Adam pass; the resets clear the units' moments and counts
    ("permuted-mnist", "redo", {**REDO, "optimizer": "adam", "lr": 1e-3}),
    ("bit-flipping", "redo", {**REDO, "optimizer": "adam", "lr": 1e-3, "activation": "tanh"}),
    ("permuted-mnist", "regrama", {**REDO, "optimizer": "adam", "lr": 1e-3, "learner.l2": 1e-3}),
]


def _run_against_reference(stream: str, learner: str, options: dict) -> tuple:
    long = {"examples_per_task": 1000} if "mnist" in stream else {}  # (no block cut short)
    (blocks, steps), (fast, ref) = _setup(stream, learner, {**long, **options})
    assert fast.backend == "block" and fast.block_ready(blocks.batch_size)
    for n in BLOCKS:
        batch = blocks.next_block(n)
        assert batch.obs.shape[0] == n
        pred, metrics = fast.learn_block(batch.obs, batch.target)
        for t in range(n):
            step = steps.next()
            assert torch.equal(step.obs, batch.obs[t])
            p = ref.act(step.obs)
            _close(pred[t], p)
            _close(metrics["loss"][t], ref.observe(step.obs, p, step.target)["loss"])
    _compare_states(fast, ref, exact=False)  # anchors, window sums, counts, ages, generators
    return fast, ref


@pytest.mark.parametrize("stream,learner,options", CASES)
def test_blocks_match_the_autograd_reference_step_by_step(stream, learner, options):
    fast, ref = _run_against_reference(stream, learner, options)
    state = fast.learner_state
    if isinstance(state, ReDoState):
        assert int(state.count) == sum(BLOCKS) == int(ref.learner_state.count)
        for layer, replaced in state.stats.replacements.items():
            assert torch.equal(replaced, ref.learner_state.stats.replacements[layer])
        assert int(sum(r.sum() for r in state.stats.replacements.values())) > 0
        # the window after the last check (180) holds updates 191..200: a partial sum
        assert float(state.act_sum["hidden1"].abs().sum()) > 0
    else:
        moved = [(a - fast.parameters()[k]).abs().max() for k, a in state.inner[0].anchor.items()]
        assert all(m > 0 for m in moved)  # (the anchors stay θ₀, the weights moved away)


def test_a_wrong_window_or_a_dropped_anchor_term_fails_the_comparison(monkeypatch):
    """Two mutants of what the block loop computes make the comparison fail."""
    with monkeypatch.context() as m:  # the window starting one update late
        m.setattr(
            mlp,
            "redo_segments",
            lambda count, steps, period, window: redo_segments(count, steps, period, window - 1),
        )
        with pytest.raises(AssertionError):
            _run_against_reference("permuted-mnist", "redo", REDO)
    with monkeypatch.context() as m:  # the anchor's term γ θ₀ dropped
        block_anchor = mlp._block_anchor
        m.setattr(mlp, "_block_anchor", lambda a, p: block_anchor(a, p._replace(anchor_scale=0.0)))
        with pytest.raises(AssertionError):
            _run_against_reference("permuted-mnist", "l2-init", {"learner.l2_init": 1e-2})


@pytest.mark.parametrize(
    "learner, options",
    [
        ("l2-init", {"learner.l2_init": 1e-2}),
        ("redo", REDO),
        ("regrama", REDO),
        ("redo", {**REDO, "optimizer": "adam", "lr": 1e-3}),
    ],
)
def test_a_checkpoint_between_blocks_resumes_bit_for_bit(learner, options):
    """Taken mid-window (after 45 updates), loaded with weights_only=True into a fresh agent,
    which then goes on bit for bit through two more checks."""
    _resume_between_blocks(learner, options, before=(1, 29, 15), after=(17, 28, 40))


@pytest.mark.parametrize(
    "learner, options",
    [
        ("l2-init", {"optimizer": "adam", "lr": 1e-3}),  # (Adam: the reference's arithmetic)
        ("l2-init", {"momentum": 0.9}),
        ("l2-init", {"credit": "fa"}),
        ("redo", {"momentum": 0.9}),  # (SGD with momentum: not affine)
        ("redo", {"credit": "fa"}),
        ("redo", {"activation": "elu"}),
        ("regrama", {"batch_size": 2}),
    ],
)
def test_what_the_block_forms_do_not_cover_runs_elsewhere(learner, options):
    (stream,), (agent,) = _setup("permuted-mnist", learner, options, fast=(True,))
    assert agent.backend != "block" and not agent.block_ready(stream.batch_size)


def test_anchor_plan_composes_the_chain():
    from contlearn.learners import chain, sgd
    from contlearn.learners.regularizers import add_l2, add_l2_init

    # g' = g + 0.1 (θ − θ₀) + 0.01 θ, then u = −0.5 g'
    plan = anchor_plan(chain(add_l2_init(0.1), add_l2(0.01), sgd(0.5)))
    assert plan == pytest.approx(AnchorPlan(-0.5, -0.5 * 0.11, 0.5 * 0.1))
    assert anchor_plan(sgd(0.5)) is None
    assert anchor_plan(chain(add_l2_init(0.1), add_l2_init(0.1), sgd(0.5))) is None


@pytest.mark.parametrize("count", [0, 7, 29, 30, 95])
def test_redo_segments_mark_every_update_as_redo_counts_it(count):
    """Against update-by-update bookkeeping written out (redo.py's rule)."""
    period, window, steps = 30, 20, 100
    pieces = redo_segments(count, steps, period, window)
    assert pieces[0][0] == 0 and pieces[-1][1] == steps
    for (_, e, _, _), (s, _, _, _) in zip(pieces, pieces[1:], strict=False):
        assert e == s
    for first, end, in_window, check in pieces:
        for j in range(first, end):
            n = count + j + 1
            assert in_window == ((n - 1) % period >= period - window)
            assert (n % period == 0) == (check and j == end - 1)


@pytest.mark.parametrize("learner", ["l2-init", "redo"])
def test_runs_learning_in_blocks_match_runs_stepping(tmp_path, monkeypatch, learner):
    """Whole runs (the engine's own blocks, probes, ReDo's checks every 40 updates) against
    the same runs stepping one by one on the hand-written backward."""
    import contlearn
    from contlearn.agents.online import OnlineAgent

    config = {"hidden": "16,16", "examples_per_task": 100, "probe_size": 50}
    if learner == "redo":
        config.update({"learner.period": 40, "learner.window": 25, "learner.threshold": 0.5})

    def run(out: str):
        return contlearn.run(
            "permuted-mnist", learner=learner, seeds=2, tasks=3, config=config, out=tmp_path / out
        ).metrics()

    blocks = run("blocks")
    monkeypatch.setattr(OnlineAgent, "block_ready", lambda self, batch_size: False)
    steps = run("steps")
    a, b = (
        df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True)
        for df in (blocks, steps)
    )
    assert list(a.metric) == list(b.metric) and list(a.step) == list(b.step)
    _close(torch.tensor(a.value.values), torch.tensor(b.value.values))
    if learner == "redo":
        replaced = a[a.metric == "replacements"]
        assert len(replaced) and float(replaced.value.max()) > 0
