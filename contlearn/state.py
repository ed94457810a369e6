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


def load_tree(tree: Any, leaves: list[torch.Tensor]) -> None:
    """Copy ``leaves`` into the tensors of ``tree`` in place (same order as :func:`tree_leaves`).

    Raises:
        ValueError: the number or shapes of the leaves do not match.
    """
    targets = tree_leaves(tree)
    if len(targets) != len(leaves):
        raise ValueError(f"state has {len(targets)} tensors, checkpoint has {len(leaves)}")
    for dst, src in zip(targets, leaves, strict=True):
        if dst.shape != src.shape:
            raise ValueError(
                f"state tensor shape {tuple(dst.shape)} != checkpoint {tuple(src.shape)}"
            )
        dst.copy_(src)
