"""Evaluation metrics for the multi-group domain classifier (docs/ops.md#accuracy).

:func:`multigroup_accuracy` is the per-group top-1 accuracy (a speaker accuracy of about 0.4
after 16 h of training was the original experiment's figure), computed only over samples
where the group is known.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from vcfast.labels import _onehot_segments_to_indices

__all__ = ["multigroup_accuracy"]


def _resolve_groups(groups: Any) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Sizes and names from a LabelSpace-like object (``.sizes``, optional ``.names``), a
    sequence of ints, or a sequence of ``(name, size)`` pairs."""
    if hasattr(groups, "sizes"):
        sizes = tuple(groups.sizes)
        names = getattr(groups, "names", None)
    elif isinstance(groups, Sequence) and not isinstance(groups, (str, bytes)):
        if len(groups) and all(
            isinstance(g, Sequence) and not isinstance(g, (str, bytes)) and len(g) == 2
            for g in groups
        ):
            names = tuple(g[0] for g in groups)
            sizes = tuple(g[1] for g in groups)
        else:
            sizes = tuple(groups)
            names = None
    else:
        raise TypeError(
            "groups must be a LabelSpace (or anything with .sizes), a sequence of group sizes, "
            f"or a sequence of (name, size) pairs; got {type(groups).__name__}"
        )
    if len(sizes) == 0:
        raise ValueError("groups is empty")
    checked = []
    for k, s in enumerate(sizes):
        if isinstance(s, bool):
            raise TypeError(f"group {k} size must be an int, got {s!r}")
        s = operator.index(s)
        if s < 1:
            raise ValueError(f"group {k} size must be >= 1, got {s}")
        checked.append(s)
    if names is None:
        names = tuple(f"group{k}" for k in range(len(checked)))
    else:
        names = tuple(str(n) for n in names)
        if len(names) != len(checked):
            raise ValueError(f"{len(names)} group names for {len(checked)} group sizes")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate group names {list(names)}")
    if "mean" in names:
        raise ValueError("a group named 'mean' would clash with the 'mean' result key")
    return tuple(checked), names


@torch.no_grad()
# It returns Python numbers (a host sync), so it cannot be part of a compiled graph: under
# torch.compile it runs eagerly between graphs, and fullgraph=True refuses it by name.
@torch.compiler.disable
def multigroup_accuracy(logits: torch.Tensor, targets: torch.Tensor, groups: Any) -> dict:
    """Per-group top-1 accuracy of multi-group classifier logits.

    Args:
        logits: ``[N, C]`` scores, ``C = sum(sizes)``, groups concatenated in order.
        targets: either the classifier target ``[N, C]`` in {-1, 0, 1} (one-hot per known
            group, all -1 where unknown) or class indices ``[N, G]`` with -1 for unknown.
            (When every group has size 1 both are ``[N, G]``; a 1 anywhere means one-hot.)
        groups: a ``LabelSpace`` (or anything with ``.sizes`` and optionally ``.names``), a
            sequence of group sizes, or a sequence of ``(name, size)`` pairs.

    Returns:
        ``{name: {"accuracy": float, "correct": int, "count": int}, ..., "mean": float}``;
        names default to ``"group0", "group1", ...``. ``count`` is the number of samples
        where the group is known; ``accuracy`` is ``correct / count`` or ``nan`` when
        ``count == 0``. ``"mean"`` is the unweighted mean of the accuracies of groups with
        ``count > 0`` (``nan`` if none). All values are plain Python numbers.
    """
    sizes, names = _resolve_groups(groups)
    n_classes, n_groups = sum(sizes), len(sizes)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] != n_classes:
        raise ValueError(
            f"logits must have shape [N, {n_classes}] (groups {sizes}), got {list(logits.shape)}"
        )
    targets = torch.as_tensor(targets, device=logits.device)
    if targets.dim() != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must have shape [{logits.shape[0]}, {n_classes}] (one-hot) or "
            f"[{logits.shape[0]}, {n_groups}] (indices), got {list(targets.shape)}"
        )
    onehot = targets.shape[1] == n_classes
    if onehot and n_classes == n_groups:
        # Every group has size 1, so both forms are [N, G]: a known class is 1 as a one-hot
        # and 0 as an index, -1 is unknown in both. Any 1 means one-hot (1 is never a valid
        # index here); otherwise read indices.
        onehot = bool((targets == 1).any())
    if onehot:
        index = _onehot_segments_to_indices(
            torch.split(targets, sizes, dim=1), names, "multigroup_accuracy"
        )
    elif targets.shape[1] == n_groups:
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"index targets must have an integer dtype, got {targets.dtype}")
        index = targets.to(torch.long)
        size_t = torch.tensor(sizes, device=index.device)
        bad = (index < -1) | (index >= size_t)
        if bool(bad.any()):
            i, k = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"multigroup_accuracy: sample {i}, group '{names[k]}': index {int(index[i, k])} "
                f"out of range (valid: 0..{sizes[k] - 1}, or -1 for unknown)"
            )
    else:
        raise ValueError(
            f"targets must have {n_classes} columns (one-hot) or {n_groups} (indices), "
            f"got {targets.shape[1]}"
        )

    known = index >= 0
    pred = torch.stack([seg.argmax(dim=1) for seg in torch.split(logits, sizes, dim=1)], dim=1)
    correct = ((pred == index) & known).sum(dim=0).tolist()
    count = known.sum(dim=0).tolist()

    result: dict[str, Any] = {}
    accs = []
    for name, c, n in zip(names, correct, count):
        acc = c / n if n else math.nan
        result[name] = {"accuracy": float(acc), "correct": int(c), "count": int(n)}
        if n:
            accs.append(acc)
    result["mean"] = float(sum(accs) / len(accs)) if accs else math.nan
    return result
