"""Checkpointable state: flatten nested NamedTuples/dicts of tensors to a plain list and back.

Learner state is a NamedTuple tree; checkpoints store only its tensor leaves (in a fixed order),
so loading needs no unpickling of custom classes (``torch.load(weights_only=True)``). To load,
build a fresh state with ``init`` and copy the saved leaves into it.
"""

from __future__ import annotations

from typing import Any

import torch


def tree_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors in ``tree`` (tuples, lists, dicts in key order), depth first."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for k in tree for leaf in tree_leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in tree_leaves(item)]
    return []


def _same_kind(a: torch.dtype, b: torch.dtype) -> bool:
    """Floats load into floats of any width (a run moved to float64); other dtypes must match
    (counts, keys, generator states)."""
    return a == b or (a.is_floating_point and b.is_floating_point)


#: what a mismatch of layouts most likely means, and what to do
_LAYOUT_HINT = (
    "the checkpoint was written by another learner or by an older contlearn whose learner "
    "state had another layout (shrink-and-perturb's changed from generator states to "
    "counter-based keys and an update count, then gained its noise definition's version); "
    "resume it with the version that wrote it, or start the run afresh"
)


def load_tree(tree: Any, leaves: list[torch.Tensor]) -> None:
    """Copy ``leaves`` into the tensors of ``tree`` in place (same order as :func:`tree_leaves`).

    Raises:
        ValueError: the number, shapes or dtypes of the leaves do not match (one line, with
            what it most likely means).
    """
    targets = tree_leaves(tree)
    if len(targets) != len(leaves):
        raise ValueError(
            f"state has {len(targets)} tensors, checkpoint has {len(leaves)}: {_LAYOUT_HINT}"
        )
    for i, (dst, src) in enumerate(zip(targets, leaves, strict=True)):
        if dst.shape != src.shape or not _same_kind(dst.dtype, src.dtype):
            raise ValueError(
                f"state tensor {i}: {tuple(dst.shape)} {dst.dtype} != checkpoint "
                f"{tuple(src.shape)} {src.dtype}: {_LAYOUT_HINT}"
            )
    for dst, src in zip(targets, leaves, strict=True):
        dst.copy_(src)
