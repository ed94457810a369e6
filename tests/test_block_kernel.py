"""Learning in blocks of steps (``OnlineAgent.learn_block``, ``block_kernel.online_block_``) gives
the results of the autograd reference step by step, and the same bits however the steps are
split into blocks or replicas into threads (docs/performance.md)."""

from __future__ import annotations

import dataclasses
import io
import random

import pytest
import torch

import contlearn
from contlearn.agents.online import OnlineAgent
from contlearn.backends import kernels
from contlearn.envs import make_stream
from contlearn.loop import engine
from contlearn.loop.engine import SupervisedLoop
from contlearn.running.config import resolve
from contlearn.state import tree_leaves

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="needs a C compiler")

CBP = {"learner.replacement_rate": 0.02, "learner.maturity": 10, "learner.decay": 0.9}
#: noise well above the comparison's tolerance, so that a wrong draw shows
SNP = {"learner.sigma": 1e-3, "learner.shrink": 1e-3}


def _setup(stream: str, learner: str, options: dict, seeds=(0, 1, 2), fast=(True, False)):
    extra = {"examples_per_task": 60} if "mnist" in stream else {}
    cfg = resolve({"stream": stream, "learner": learner, "hidden": "32,24", **extra, **options})
    streams = [make_stream(cfg.stream, cfg.stream_spec, list(seeds)) for _ in fast]
    agents = [
        OnlineAgent(
            streams[0].info, list(seeds), dataclasses.replace(cfg.agent_spec, fast=f), cfg.learner
        )
        for f in fast
    ]
    return streams, agents


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5)


def _compare_states(a: OnlineAgent, b: OnlineAgent, exact: bool) -> None:
    for k in a.parameters():
        if exact:
            assert torch.equal(a.parameters()[k], b.parameters()[k]), k
        else:
            _close(a.parameters()[k].detach(), b.parameters()[k].detach())
    for x, y in zip(tree_leaves(a.learner_state), tree_leaves(b.learner_state), strict=True):
        if x.is_floating_point() and not exact:
            _close(x, y)
        else:
            assert torch.equal(x, y)  # ages, counts, generator states: exactly equal


CASES = [
    ("permuted-mnist", "bp", {}),
    ("permuted-mnist", "l2", {"learner.l2": 1e-2}),
    ("permuted-mnist", "cbp", CBP),
    ("permuted-mnist", "cbp", {**CBP, "learner.l2": 1e-3, "learner.bias_folding": False}),
    ("permuted-mnist", "bp", {"activation": "tanh"}),
    ("permuted-mnist", "bp", {"activation": "sigmoid", "lr": 0.1}),
    ("permuted-mnist", "cbp", {**CBP, "activation": "leaky_relu"}),
    ("label-shuffled-mnist", "bp", {"init": "torch_default"}),
    ("bit-flipping", "bp", {"lr": 1e-3}),
    ("bit-flipping", "cbp", {**CBP, "lr": 1e-3, "activation": "tanh"}),
    # Adam on the block path (issue 21): moments and per-element counts in the kernel's pass
    ("permuted-mnist", "adam", {"lr": 1e-3}),
    ("permuted-mnist", "proper-adam", {"lr": 1e-3, "activation": "tanh"}),
    ("permuted-mnist", "l2", {"optimizer": "adam", "lr": 1e-3, "learner.l2": 1e-2}),
    (
        "permuted-mnist",
        "l2",
        {"optimizer": "adam", "lr": 1e-3, "learner.l2": 1e-3, "learner.decoupled": 1e-3},
    ),
    # decoupled decay alone over Adam (the kernel's loop without the coupled term)
    (
        "permuted-mnist",
        "l2",
        {"optimizer": "adam", "lr": 1e-3, "learner.l2": 0.0, "learner.decoupled": 1e-3},
    ),
    ("permuted-mnist", "cbp", {**CBP, "optimizer": "adam", "lr": 1e-3}),
    ("bit-flipping", "cbp", {**CBP, "optimizer": "adam", "lr": 1e-3, "learner.l2": 1e-3}),
    ("bit-flipping", "proper-adam", {"lr": 1e-3, "activation": "sigmoid"}),
    # shrink-and-perturb with its counter-based noise drawn in the kernel (issue 21)
    ("permuted-mnist", "snp", SNP),
    ("permuted-mnist", "snp", {**SNP, "activation": "tanh"}),
    ("bit-flipping", "snp", {**SNP, "lr": 1e-3}),
    ("bit-flipping", "snp", {**SNP, "lr": 1e-3, "activation": "tanh"}),
]


@pytest.mark.parametrize("stream,learner,options", CASES)
def test_blocks_match_the_autograd_reference_step_by_step(stream, learner, options, monkeypatch):
    from contlearn.learners import regularizers

    # the reference's noise from the numpy definition, not from the kernel's code
    monkeypatch.setattr(regularizers, "_fast_noise", regularizers._reference_noise)
    (blocks, steps), (fast, ref) = _setup(stream, learner, options)
    assert fast.block_ready(blocks.batch_size) and not ref.block_ready(1)
    for agent in (fast, ref):
        agent.watch_gradients()
    done = 0
    while done < 200:
        batch = blocks.next_block(random.Random(done).choice([1, 7, 50]))
        pred, metrics = fast.learn_block(batch.obs, batch.target)
        for t in range(batch.obs.shape[0]):
            step = steps.next()
            assert step.new_task == (batch.new_task and t == 0) and step.task == batch.task
            assert torch.equal(step.obs, batch.obs[t])
            p = ref.act(step.obs)
            _close(pred[t], p)
            _close(metrics["loss"][t], ref.observe(step.obs, p, step.target)["loss"])
        done += batch.obs.shape[0]
    _compare_states(fast, ref, exact=False)
    # the kernel's |δ|·|x| sums against the L1 norms of autograd's gradients
    a, b = (agent.update_stats()["grad_magnitude"] for agent in (fast, ref))
    assert a.keys() == b.keys() == {"hidden1", "hidden2", "output", ""}
    for layer in a:
        _close(a[layer], b[layer])
    if learner == "cbp":
        replaced = fast.diagnostics()["hidden1"]["replacements"]
        assert int(replaced.sum()) > 0, "the test should exercise replacements"
    if "adam" in learner or options.get("optimizer") == "adam":
        assert fast.backend == "block" and fast.step_config.adam is not None
    if learner == "snp":
        assert fast.backend == "block" and int(fast.learner_state.inner[1].count) == done


@pytest.mark.parametrize(
    "learner, options",
    [
        ("adam", {"lr": 1e-3}),
        ("cbp", {**CBP, "optimizer": "adam", "lr": 1e-3}),
        ("snp", SNP),
    ],
)
def test_adam_in_blocks_resumes_from_a_checkpoint_exactly(learner, options):
    """A checkpoint taken between blocks (Adam's moments and counts as the kernel left them;
    shrink-and-perturb's keys and update count) loads with weights_only=True into a fresh
    agent, which then goes on bit for bit with the uninterrupted one."""
    _resume_between_blocks(learner, options, before=(45, 3, 80), after=(17, 60))


def _resume_between_blocks(
    learner: str, options: dict, before: tuple[int, ...], after: tuple[int, ...]
) -> None:
    """Agent a learns blocks of the sizes ``before``; its checkpoint loads with
    weights_only=True into a fresh agent b (whose stream skipped the same examples); both then
    learn blocks of the sizes ``after`` and must agree bit for bit (predictions, losses,
    parameters, learner state), on the block backend."""
    (s1, s2), (a, b) = _setup("permuted-mnist", learner, options, fast=(True, True))
    for n in before:
        x = s1.next_block(n)
        a.learn_block(x.obs, x.target)
        s2.next_block(n)  # (b learns nothing until it loads a's checkpoint)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for n in after:
        x, y = s1.next_block(n), s2.next_block(n)
        pa, la = a.learn_block(x.obs, x.target)
        pb, lb = b.learn_block(y.obs, y.target)
        assert torch.equal(pa, pb) and torch.equal(la["loss"], lb["loss"])
    _compare_states(a, b, exact=True)
    assert a.backend == b.backend == "block"


@pytest.mark.parametrize("learner, options", [("cbp", CBP), ("snp", SNP)])
def test_splitting_into_blocks_or_threads_changes_no_bit(learner, options):
    (s1, s2), (a, b) = _setup("permuted-mnist", learner, options, fast=(True, True))
    rng = random.Random(3)
    a.replica_workers = 1
    a.watch_gradients()
    b.watch_gradients()
    for _ in range(40):
        x = s1.next_block(37)
        pa, la = a.learn_block(x.obs, x.target)
        parts, losses = [], []
        left = x.obs.shape[0]
        while left:
            b.replica_workers = rng.choice([1, 2, 3])
            y = s2.next_block(min(left, rng.choice([1, 2, 9, 64])))
            p, m = b.learn_block(y.obs, y.target)
            parts.append(p)
            losses.append(m["loss"])
            left -= y.obs.shape[0]
        assert torch.equal(pa, torch.cat(parts)) and torch.equal(la["loss"], torch.cat(losses))
    assert torch.equal(a.grad_l1, b.grad_l1) and a.grad_steps == b.grad_steps > 0
    _compare_states(a, b, exact=True)
    assert a.backend == b.backend == "block"
    if learner == "cbp":
        assert int(a.diagnostics()["hidden1"]["replacements"].sum()) > 0


@pytest.mark.parametrize(
    "stream, options, until",
    [
        ("permuted-mnist", {"examples_per_task": 3000}, 12_500),  # (and a new pass over 10k)
        ("label-shuffled-mnist", {"examples_per_task": 3000}, 12_500),
        ("bit-flipping", {"examples_per_task": 3000, "batch_size": 3}, 4_500),  # (4 flips)
    ],
)
def test_next_block_shows_the_examples_of_next(stream, options, until):
    cfg = resolve({"stream": stream, **options})
    one, many = (make_stream(cfg.stream, cfg.stream_spec, [4, 5]) for _ in range(2))
    rng = random.Random(0)
    while many.step < until:  # four task starts
        block = many.next_block(rng.choice([1, 3, 100, 300]))
        assert 1 <= block.obs.shape[0] <= 300
        for t in range(block.obs.shape[0]):
            batch = one.next()
            assert batch.task == block.task and batch.new_task == (block.new_task and t == 0)
            assert torch.equal(batch.obs, block.obs[t])
            assert torch.equal(batch.target, block.target[t])
        assert one.step == many.step
    assert many.task == 4


def test_runs_learning_in_blocks_match_runs_stepping(tmp_path, monkeypatch):
    config = {"hidden": "16,16", "examples_per_task": 100, "probe_size": 50, **CBP}
    blocks = contlearn.run(
        "permuted-mnist", learner="cbp", seeds=2, tasks=3, config=config, out=tmp_path / "blocks"
    ).metrics()
    monkeypatch.setattr(OnlineAgent, "block_ready", lambda self, batch_size: False)
    steps = contlearn.run(
        "permuted-mnist", learner="cbp", seeds=2, tasks=3, config=config, out=tmp_path / "steps"
    ).metrics()
    a, b = (
        df.sort_values(["seed", "step", "metric", "layer"]).reset_index(drop=True)
        for df in (blocks, steps)
    )
    assert list(a.metric) == list(b.metric) and list(a.step) == list(b.step)
    _close(torch.tensor(a.value.values), torch.tensor(b.value.values))


def test_divergence_inside_a_block_is_reported_at_its_step(tmp_path, monkeypatch):
    (stream,), (agent,) = _setup("permuted-mnist", "bp", {}, seeds=(0, 1), fast=(True,))
    learn = agent.learn_block

    def learn_with_a_nan(obs, target):  # replica 1's loss at step 130 (in a block of 256)
        pred, metrics = learn(obs, target)
        start = stream.step - obs.shape[0]
        if start < 130 <= stream.step:
            metrics["loss"][130 - start - 1, 1] = float("nan")
        return pred, metrics

    monkeypatch.setattr(agent, "learn_block", learn_with_a_nan)
    records = []
    SupervisedLoop(stream, agent, records.append).run(300)
    marks = [(r.step, r.replica) for r in records if r.kind == "diverged"]
    assert marks == [(130, 1)]


def test_without_the_compiled_kernel_agents_step_one_by_one(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", False)  # as without a C compiler
    (_,), (agent,) = _setup("permuted-mnist", "bp", {}, fast=(True,))
    assert not agent.block_ready(1)


@pytest.mark.parametrize(
    "options",
    [
        {"learner": "snp", "credit": "fa"},  # (the kernel's noise: under backprop only)
        {"learner": "snp", "optimizer": "adam"},
        {"optimizer": "adam", "credit": "fa"},  # (Adam: backprop only)
        {"optimizer": "adam", "momentum": 0.9, "learner": "snp"},
        {"learner": "cbp", "learner.rounding": "stochastic"},
        {"learner": "cbp", "optimizer": "adam", "learner.rounding": "stochastic"},
        {"activation": "elu"},
        {"batch_size": 2},
    ],
)
def test_what_the_kernel_does_not_do_steps_one_by_one(options):
    options = dict(options)
    learner = options.pop("learner", "bp")
    (stream,), (agent,) = _setup("permuted-mnist", learner, options, fast=(True,))
    assert not agent.block_ready(stream.batch_size)


def test_block_length_changes_no_bit_of_a_run(tmp_path, monkeypatch):
    config = {"hidden": "16,16", "examples_per_task": 300, "probe_size": 50, **CBP}
    runs = []
    for seconds in (engine.BLOCK_SECONDS, 0.0):  # 0: blocks of one step
        monkeypatch.setattr(engine, "BLOCK_SECONDS", seconds)
        runs.append(
            contlearn.run(
                "permuted-mnist",
                learner="cbp",
                seeds=2,
                tasks=2,
                config=config,
                out=tmp_path / str(seconds),
            ).metrics()
        )
    cols = ["seed", "step", "task", "metric", "layer", "value"]
    a, b = (df[cols].sort_values(cols[:5]).reset_index(drop=True) for df in runs)
    assert a.equals(b)
