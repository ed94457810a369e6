"""The image streams' epoch protocol and held-out scores on generated data (runs and the CLI:
tests/test_image_stream_runs.py; nothing is downloaded).

Independent references: the shipped MNIST arrays and the generated files' tags (which image a
stream showed: tests/image_files.py), per-example loops for the held-out score and the
augmentation, and hand-counted schedules.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
import torch

from contlearn.data.datasets import load_mnist
from contlearn.envs import check_stream, make_stream
from contlearn.envs.epoch_stream import CROP_PAD
from contlearn.envs.protocol import BlockStream, HeldOutStream, ScheduledTaskStream
from contlearn.errors import ConfigError
from contlearn.loop.engine import SupervisedLoop
from contlearn.running.config import resolve
from tests.image_files import tag

PAIRS = {"train_per_class": 6, "test_per_class": 3, "epochs": 2, "batch_size": 4}
INCREMENTAL = {
    "initial_classes": 2,
    "classes_per_increment": 3,
    "train_per_class": 4,
    "validation_per_class": 2,
    "test_per_class": 3,
    "epochs": 2,
    "batch_size": 4,
}


def _stream(name: str, seeds, **options):
    cfg = resolve({"stream": name, **options})
    return make_stream(name, cfg.stream_spec, seeds)


def _take(stream, n):
    return [stream.next() for _ in range(n)]


def _mnist_rows(stream, obs: torch.Tensor) -> list[int]:
    """Which MNIST test images ``obs (n, 1, 28, 28)`` are (by their pixels)."""
    images, _ = load_mnist("test")
    lookup = {images[i].tobytes(): i for i in range(len(images))}
    pixels = (obs.reshape(len(obs), -1) * 255).round().to(torch.uint8).numpy()
    return [lookup[row.tobytes()] for row in pixels]


# -- the protocol -----------------------------------------------------------------------------
def test_mnist_pairs_tasks_are_fixed_disjoint_splits_of_two_digits():
    s = _stream("continual-mnist-pairs", [0], **PAIRS)
    _, labels = load_mnist("test")
    assert s.info.input_shape == (1, 28, 28) and s.info.num_outputs == 2
    assert s.steps_per_task == 2 * (12 // 4)  # E epochs × (2 classes × 6 images / B)
    by_digit = {d: np.flatnonzero(labels == d) for d in range(10)}
    for task in range(3):
        batches = _take(s, s.steps_per_task)
        assert [b.task for b in batches] == [task] * 6
        assert [b.new_task for b in batches] == [True] + [False] * 5
        pair = [int(c) for c in s.cycle[0, task]]
        train = set(s.train_rows[0].tolist())
        test = set(s.test_rows[0].tolist())
        # the first 6 images of each digit in file order train, the next 3 are held out
        assert train == {int(i) for d in pair for i in by_digit[d][:6]}
        assert test == {int(i) for d in pair for i in by_digit[d][6:9]}
        assert not train & test
        for b in batches:  # a step is one mini-batch of the task's train split
            rows = _mnist_rows(s, b.obs[0])
            assert len(rows) == 4 and set(rows) <= train
            assert [pair.index(int(labels[r])) for r in rows] == b.target[0].tolist()
        # the pair's first class is label 0, the second label 1, in train and test alike
        assert s.test_labels[0].tolist() == [0] * 3 + [1] * 3


def test_epochs_show_every_train_example_once_each_in_a_fresh_order():
    s = _stream("continual-mnist-pairs", [5], **{**PAIRS, "epochs": 3})
    batches = _take(s, s.steps_per_task)
    epochs = [torch.cat([b.obs[0] for b in batches[e * 3 : e * 3 + 3]]) for e in range(3)]
    shown = [_mnist_rows(s, x) for x in epochs]
    train = sorted(s.train_rows[0].tolist())
    assert all(sorted(rows) == train for rows in shown)
    assert shown[0] != shown[1] and shown[1] != shown[2]


def test_all_pairs_once_per_cycle_then_a_redraw():
    s = _stream("continual-mnist-pairs", [2], **{**PAIRS, "epochs": 1, "batch_size": 12})
    assert s.steps_per_task == 1
    _take(s, 45)
    first = [tuple(int(c) for c in p) for p in s.cycle[0]]
    assert sorted(tuple(sorted(p)) for p in first) == list(combinations(range(10), 2))
    assert len({p[0] < p[1] for p in first}) == 2  # label orders drawn, not always ascending
    _take(s, 1)  # task 45 starts the second cycle: a new order and new label orders
    second = [tuple(int(c) for c in p) for p in s.cycle[0]]
    assert sorted(tuple(sorted(p)) for p in second) == list(combinations(range(10), 2))
    assert second != first


def test_imagenet_pairs_are_disjoint_within_a_cycle_and_repeat_the_same(image_data):
    options = {"train_per_class": 2, "test_per_class": 1, "epochs": 1, "batch_size": 4}
    s = _stream("continual-imagenet", [1], **options)
    assert s.info.input_shape == (3, 32, 32) and s.steps_per_task == 1
    seen, groups = [], []
    for _ in range(501):
        b = s.next()
        classes = {tag(s.pool[r].numpy())[0] for r in s.train_rows[0].tolist()}
        test = [tag(s.pool[r].numpy()) for r in s.test_rows[0].tolist()]
        assert len(classes) == 2 and {c for c, _ in test} == classes
        assert all(rank == 2 for _, rank in test)  # the image after the 2 train ones
        groups.append(tuple(int(c) for c in s.cycle[0, b.task % 500]))
        seen.append(classes)
    assert sorted(c for g in seen[:500] for c in g) == list(range(1000))  # no repetition
    assert groups[500] == groups[0]  # repeat=same: the reference's class order again


def test_incremental_increments_classes_steps_and_held_out_split(image_data):
    s = _stream("incremental-cifar100", [3], **INCREMENTAL, augment=False)
    assert isinstance(s, ScheduledTaskStream) and isinstance(s, HeldOutStream)
    # increment t: min(2 + 3t, 100) classes × 4 images / B=4 per epoch, 2 epochs
    lengths = [2 * min(2 + 3 * t, 100) for t in range(40)]
    assert [s.steps_until(n) for n in range(40)] == [sum(lengths[:n]) for n in range(40)]
    order = s.class_order[0].tolist()
    assert sorted(order) == list(range(100))
    for t in range(3):
        batches = _take(s, lengths[t])
        assert [b.new_task for b in batches] == [True] + [False] * (lengths[t] - 1)
        seen = order[: 2 + 3 * t]
        tags = [tag(s.pool[r].numpy()) for r in s.train_rows[0].tolist()]
        assert sorted({c for c, _ in tags}) == sorted(seen)
        assert sorted({rank for _, rank in tags}) == [2, 3, 4, 5]  # after 2 held back
        assert [seen[y] for y in s.train_labels[0].tolist()] == [c for c, _ in tags]
        test = [tag(s.pool[r].numpy()) for r in s.test_rows[0].tolist()]
        assert s.test_rows[0].min() >= 800  # the CIFAR-100 test set, after the 800 train images
        assert [seen[y] for y in s.test_labels[0].tolist()] == [c for c, _ in test]
        assert s.step == s.task_ends_at


def test_incremental_class_order_is_a_function_of_the_seed(image_data):
    a = _stream("incremental-cifar100", [4, 9], **INCREMENTAL).class_order
    b = _stream("incremental-cifar100", [9], **INCREMENTAL).class_order
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_incremental_score_counts_only_the_classes_seen_so_far(image_data):
    s = _stream("incremental-cifar100", [0], **INCREMENTAL)
    s.next()  # 2 classes seen
    pred = torch.zeros(1, 3, 100)
    pred[0, 0, 50] = 9.0  # an unseen class has the largest output: the seen arg-max counts
    pred[0, 0, 1] = 1.0
    pred[0, 1, 0] = 1.0
    pred[0, 2, 1] = 2.0
    target = torch.tensor([[1, 1, 1]])
    assert s.score(pred, target).tolist() == [[1.0, 0.0, 1.0]]


def test_augmentation_is_a_reflect_padded_crop_and_flip_per_example(image_data):
    s = _stream("incremental-cifar100", [6], **INCREMENTAL, augment=True, normalize=False)
    plain = _stream("incremental-cifar100", [6], **INCREMENTAL, augment=False, normalize=False)
    b, p = s.next(), plain.next()
    rng = np.random.default_rng()
    rng.bit_generator.state = plain.rngs[0].bit_generator.state  # (the same draws follow)
    flips, shifts = rng.random(4) < 0.5, rng.integers(0, 2 * CROP_PAD + 1, size=(4, 2))
    for i in range(4):
        x = p.obs[0, i].numpy()
        padded = np.pad(x, ((0, 0), (CROP_PAD,) * 2, (CROP_PAD,) * 2), mode="reflect")
        if flips[i]:
            padded = padded[:, :, ::-1]
            # (flip first, then crop: a flipped image's padded crop is the padded flip's)
        dy, dx = shifts[i]
        want = padded[:, dy : dy + 32, dx : dx + 32]
        assert np.array_equal(b.obs[0, i].numpy(), want), i
    assert torch.equal(b.target, p.target)


@pytest.mark.parametrize("name", ["continual-mnist-pairs", "incremental-cifar100"])
def test_blocks_equal_steps_across_epochs_and_tasks(name, image_data):
    options = PAIRS if name == "continual-mnist-pairs" else INCREMENTAL
    a, b = _stream(name, [0, 1], **options), _stream(name, [0, 1], **options)
    assert isinstance(a, BlockStream)
    steps = _take(a, 30)
    got, sizes = [], [5, 1, 7, 2, 100, 3, 9, 100, 100]
    while len(got) < 30:
        block = b.next_block(sizes[len(got) % len(sizes)])
        got += [(block.obs[t], block.target[t]) for t in range(block.obs.shape[0])]
    for step, (obs, target) in zip(steps, got[:30], strict=True):
        assert torch.equal(step.obs, obs) and torch.equal(step.target, target)


def test_replicas_equal_seeds_alone_and_state_resumes_mid_epoch(image_data):
    both = _take(_stream("incremental-cifar100", [3, 8], **INCREMENTAL), 20)
    alone = _stream("incremental-cifar100", [8], **INCREMENTAL)
    first = _take(alone, 7)  # mid-epoch of the second increment's first epoch … and resume
    state = alone.state_dict()
    resumed = _stream("incremental-cifar100", [8], **INCREMENTAL)
    resumed.load_state_dict(state)
    rest = _take(resumed, 13)
    for b, a in zip(both, first + rest, strict=True):
        assert torch.equal(b.obs[1], a.obs[0]) and torch.equal(b.target[1], a.target[0])
        assert (b.task, b.new_task) == (a.task, a.new_task)


@pytest.mark.parametrize(
    "name", ["continual-mnist-pairs", "continual-imagenet", "incremental-cifar100"]
)
def test_check_stream_passes(name, image_data):
    check_stream(name)


# -- the held-out score -----------------------------------------------------------------------
class _Threshold:
    """A replica agent whose answer is fixed: class 1 where the image's mean exceeds a
    per-replica threshold; it learns nothing."""

    def __init__(self, thresholds):
        self.thresholds = torch.tensor(thresholds)  # (R,)

    def outputs(self, obs):
        mean = obs.reshape(obs.shape[0], obs.shape[1], -1).mean(-1)  # (R, n)
        high = (mean > self.thresholds[:, None]).to(torch.float32)
        return torch.stack([1 - high, high], -1)

    act = outputs

    def observe(self, obs, action, feedback):
        return {"loss": torch.zeros(obs.shape[0])}


def test_held_out_score_equals_a_per_example_count():
    s = _stream("continual-mnist-pairs", [0, 1], **{**PAIRS, "test_per_class": 40})
    agent = _Threshold([0.12, 0.14])
    records = []
    loop = SupervisedLoop(s, agent, records.append)
    images, labels = load_mnist("test")
    for task in range(2):
        loop.run(s.steps_until(task + 1))
        held = [r for r in records if "test_accuracy" in r.values]
        assert len(held) == task + 1 and held[-1].task == task and held[-1].step == s.step
        for r in range(2):
            pair = [int(c) for c in s.cycle[r, task]]
            correct = 0
            for row in s.test_rows[r].tolist():  # one example at a time, from the raw bytes
                answer = int(images[row].astype(np.float64).mean() / 255 > agent.thresholds[r])
                correct += answer == pair.index(int(labels[row]))
            assert held[-1].values["test_accuracy"][r].item() == pytest.approx(correct / 80)


def test_an_agent_without_outputs_is_refused_and_held_out_false_runs_it():
    class NoOutputs:
        def act(self, obs):
            return torch.zeros(*obs.shape[:2], 2)

        def observe(self, obs, action, feedback):
            return {}

    with pytest.raises(ConfigError, match="outputs.*held_out=false"):
        SupervisedLoop(_stream("continual-mnist-pairs", [0], **PAIRS), NoOutputs(), print)
    records = []
    s = _stream("continual-mnist-pairs", [0], **PAIRS, held_out=False)
    SupervisedLoop(s, NoOutputs(), records.append).run(s.steps_per_task)
    assert not any("test_accuracy" in r.values for r in records)


def test_permuted_cifar_moves_pixel_positions_and_keeps_colours(image_data):
    from contlearn.data.images import load_cifar

    images, labels = load_cifar("cifar10", "train")
    s = _stream("permuted-cifar10", [0], examples_per_task=10)
    b = s.next()
    assert b.obs.shape == (1, 1, 3, 32, 32)
    idx = int(s.order[0, 0])
    x = (b.obs[0, 0] * 255).round().to(torch.uint8).numpy().reshape(3, 1024)
    perm = s.perm[0].numpy().reshape(3, 1024)
    assert (perm[1] == perm[0] + 1024).all() and (perm[2] == perm[0] + 2048).all()
    plane = perm[0]
    assert sorted(plane) == list(range(1024))
    original = images[idx].reshape(3, 1024)
    for c in range(3):  # position j of every colour plane shows the original's position plane[j]
        assert np.array_equal(x[c], original[c, plane])
    assert int(b.target[0, 0]) == int(labels[idx])


def test_label_shuffled_cifar100_maps_labels_per_task(image_data):
    from contlearn.data.images import load_cifar

    _, labels = load_cifar("cifar100", "train")
    s = _stream("label-shuffled-cifar100", [1], examples_per_task=4)
    assert s.info.num_outputs == 100
    for _ in range(3):
        b = s.next()
        idx = s.order[0, s.pos - 1]
        assert int(b.target[0, 0]) == int(s.label_map[0, labels[idx]])
    assert sorted(s.label_map[0].tolist()) == list(range(100))
