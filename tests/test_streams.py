"""Streams: shapes, seeding per replica, task switching, sampling and state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contlearn.envs import make_stream, streams
from contlearn.envs.bit_flipping import ltu_target
from contlearn.running.config import resolve

#: every registered supervised stream of ``examples_per_task`` examples a task, from the
#: registry (a new one is tested without a word; the epoch streams: tests/test_image_streams.py)
STREAMS = [
    n
    for n in streams.names()
    if streams.get(n).kind != "rl"
    and "examples_per_task" in streams.get(n).Spec.__dataclass_fields__
]


@pytest.fixture(autouse=True)
def _generated_image_data(image_data):
    """The CIFAR streams read generated archives (tests/conftest.py: image_data)."""


def _stream(name: str, seeds, **options):
    cfg = resolve({"stream": name, **options})
    return make_stream(name, cfg.stream_spec, seeds)


def _take(stream, n):
    return [stream.next() for _ in range(n)]


@pytest.mark.parametrize("name", STREAMS)
def test_batches_have_replica_and_batch_dims(name):
    s = _stream(name, [0, 1, 2], examples_per_task=20, batch_size=4)
    batch = s.next()
    assert batch.obs.shape[:2] == (3, 4)
    assert batch.obs.shape[2:] == s.info.input_shape
    assert batch.obs.dtype == torch.float32
    assert batch.new_task and batch.task == 0
    assert s.steps_per_task == 5


@pytest.mark.parametrize("name", STREAMS)
def test_replica_in_batch_equals_seed_alone(name):
    batched = _take(_stream(name, [3, 7], examples_per_task=10), 25)
    alone = _take(_stream(name, [7], examples_per_task=10), 25)
    for b, a in zip(batched, alone, strict=True):
        assert torch.equal(b.obs[1], a.obs[0])
        assert torch.equal(b.target[1], a.target[0])
        assert (b.task, b.new_task) == (a.task, a.new_task)


@pytest.mark.parametrize("name", STREAMS)
def test_same_seed_same_data_other_seed_other_data(name):
    a = _take(_stream(name, [1], examples_per_task=10), 12)
    b = _take(_stream(name, [1], examples_per_task=10), 12)
    c = _take(_stream(name, [2], examples_per_task=10), 12)
    assert all(torch.equal(x.obs, y.obs) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x.obs, y.obs) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("name", STREAMS)
def test_tasks_advance_every_steps_per_task(name):
    s = _stream(name, [0], examples_per_task=6, batch_size=2)
    batches = _take(s, 9)
    assert [b.task for b in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [b.new_task for b in batches] == [True, False, False] * 3


def test_permuted_mnist_pixels_are_a_permutation_of_an_mnist_image():
    from contlearn.data.datasets import load_mnist

    images, _ = load_mnist("test")
    s = _stream("permuted-mnist", [0], examples_per_task=10)
    b = s.next()
    idx = int(s.order[0, 0])
    x = (b.obs[0, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(x, images[idx][s.perm[0].numpy()])
    first = s.perm[0].clone()
    _take(s, 10)
    assert not torch.equal(first, s.perm[0])


@pytest.mark.parametrize("name", ["permuted-mnist", "label-shuffled-mnist"])
@pytest.mark.parametrize("shape", [(3, 7), (5, 3, 2)])
def test_mnist_examples_equal_one_flat_gather(name, shape):
    # the previous formula: one gather with a flat (..., R, B, 784) index
    s = _stream(name, [0, 1, 2], examples_per_task=10)
    s.next()
    idx = torch.randint(0, s.num_examples, shape, generator=torch.Generator().manual_seed(0))
    cols = s.perm.unsqueeze(1) if name == "permuted-mnist" else torch.arange(784)
    want = s.images[idx.unsqueeze(-1) * 784 + cols].to(torch.float32).div_(255.0)
    obs, _ = s._examples(idx)
    assert obs.shape == (*shape, 784) and torch.equal(obs, want)


def test_mnist_samples_without_replacement_within_a_pass():
    s = _stream("permuted-mnist", [0, 1], examples_per_task=1000, batch_size=100)
    seen = torch.cat([s._indices(100) for _ in range(100)], dim=1)  # one full pass (10k)
    for r in range(2):
        assert sorted(seen[r].tolist()) == list(range(10_000))
    assert not torch.equal(seen[0], seen[1])


def test_mnist_pass_boundary_inside_a_batch():
    s = _stream("permuted-mnist", [0], examples_per_task=3, batch_size=3)
    s.pos = s.num_examples - 1
    s.order[0] = torch.arange(s.num_examples)
    idx = s._indices(3)
    assert idx.shape == (1, 3) and int(idx[0, 0]) == s.num_examples - 1


def test_label_shuffled_labels_follow_a_per_task_permutation():
    from contlearn.data.datasets import load_mnist

    _, labels = load_mnist("test")
    s = _stream("label-shuffled-mnist", [4], examples_per_task=20, batch_size=5)
    maps = []
    for _ in range(3):
        for _ in range(4):
            b = s.next()
            idx = s.order[0, s.pos - 5 : s.pos]
            assert torch.equal(b.target[0], s.label_map[0][torch.as_tensor(labels[idx])])
        assert sorted(s.label_map[0].tolist()) == list(range(10))
        maps.append(s.label_map[0].clone())
    assert not torch.equal(maps[0], maps[1]) or not torch.equal(maps[1], maps[2])


def test_bit_flipping_target_matches_naive_definition():
    m, H, beta = 6, 8, 0.7
    gen = np.random.default_rng(0)
    w = gen.choice([-1.0, 1.0], size=(H, m + 1))
    v = gen.choice([-1.0, 1.0], size=H)
    bits = gen.integers(0, 2, size=(5, m)).astype(float)
    expected = []
    for x in bits:  # naive per-unit loop
        total = 0.0
        for i in range(H):
            s_neg = sum(1 for j in range(m + 1) if w[i, j] < 0)
            theta = (m + 1) * beta - s_neg
            pre = sum(w[i, j] * xj for j, xj in enumerate([*x, 1.0]))
            total += v[i] * (1.0 if pre > theta else 0.0)
        expected.append(total)
    wt = torch.tensor(w, dtype=torch.float32)[None]
    theta_t = (m + 1) * beta - (wt < 0).sum(-1).float()
    out = ltu_target(
        torch.tensor(bits, dtype=torch.float32)[None],
        wt,
        theta_t,
        torch.tensor(v, dtype=torch.float32)[None],
    )
    assert out.shape == (1, 5, 1)
    assert out[0, :, 0].tolist() == pytest.approx(expected)


def test_bit_flipping_one_slow_bit_flips_per_task_and_fast_bits_vary():
    s = _stream("bit-flipping", [0], examples_per_task=4)
    slow_before = None
    for _ in range(6):
        batches = _take(s, 4)
        slow = batches[0].obs[0, 0, :15]
        for b in batches:
            assert torch.equal(b.obs[0, 0, :15], slow)  # slow bits fixed within a task
        if slow_before is not None:
            assert int((slow != slow_before).sum()) == 1
        slow_before = slow
        assert set(torch.cat([b.obs[0, 0, 15:] for b in batches]).tolist()) <= {0.0, 1.0}
    assert s.info.kind == "regression" and s.info.metric == "squared_error"


@pytest.mark.parametrize("name", STREAMS)
def test_state_dict_round_trip_continues_identically(name):
    s = _stream(name, [0, 1], examples_per_task=7, batch_size=1)
    _take(s, 11)
    state = s.state_dict()
    after = _take(s, 15)
    t = _stream(name, [0, 1], examples_per_task=7, batch_size=1)
    t.load_state_dict(state)
    again = _take(t, 15)
    for a, b in zip(after, again, strict=True):
        assert torch.equal(a.obs, b.obs) and torch.equal(a.target, b.target)
        assert (a.task, a.new_task) == (b.task, b.new_task)


def test_registry_lists_the_streams():
    assert {"permuted-mnist", "label-shuffled-mnist", "bit-flipping"} <= set(STREAMS)


@pytest.mark.parametrize("name", STREAMS)
def test_probe_batch_later_draws_now_and_gathers_the_same_examples_later(name):
    now, later = (_stream(name, [0, 1], examples_per_task=5) for _ in range(2))
    pending = []
    for _ in range(12):  # three task starts: each deferred batch keeps the task it was drawn in
        for s in (now, later):
            s.next()
        pending.append((now.probe_batch(16), later.probe_batch_later(16)))
    for (obs, target), gather in pending:
        got_obs, got_target = gather()
        assert torch.equal(obs, got_obs) and torch.equal(target, got_target)
    assert torch.equal(now.probe_batch(3)[0], later.probe_batch(3)[0])  # generators in step
