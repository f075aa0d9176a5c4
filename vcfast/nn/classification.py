"""nn.Module wrappers of the fused masked multi-group losses
(docs/ops.md#masked-multi-group-losses)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vcfast.ops._classification_common import group_sizes
from vcfast.ops.classification import (
    REDUCTIONS,
    masked_multigroup_bce,
    masked_multigroup_softmax_ce,
)


def _sizes(module: str, groups) -> tuple[int, ...]:
    sizes = getattr(groups, "sizes", groups)
    if not isinstance(sizes, (list, tuple)):
        raise TypeError(f"{module}: `groups` must be a list/tuple of group sizes, got "
                        f"{type(sizes).__name__}")
    return group_sizes(module, sizes, sum(s for s in sizes if isinstance(s, int)))


def _check_reduction(module: str, reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{module}: reduction must be one of {tuple(REDUCTIONS)}, "
                         f"got {reduction!r}")
    return reduction


class MaskedMultiGroupBCE(nn.Module):
    """Sigmoid cross-entropy over the valid (target != -1) entries of several label groups.

    ``forward(logits [N, C], targets [N, C]) -> loss``; see :func:`vcfast.masked_multigroup_bce`
    for the math, dtypes and reductions. ``pos_weight`` (``[C]``) is a buffer, so ``.to()``
    moves it and ``state_dict`` keeps it.

    Example::

        loss_fn = vcfast.nn.MaskedMultiGroupBCE((1421, 53, 2))   # speaker, birthplace, sex
        loss = loss_fn(d_cls_logits, targets)                    # targets in {-1, 0, 1}
    """

    def __init__(self, groups: Sequence[int], reduction: str = "mean",
                 pos_weight: torch.Tensor | None = None, backend: str | None = None) -> None:
        super().__init__()
        self.groups = _sizes("MaskedMultiGroupBCE", groups)
        self.reduction = _check_reduction("MaskedMultiGroupBCE", reduction)
        self.backend = backend
        if pos_weight is not None:
            pos_weight = torch.as_tensor(pos_weight)
            if pos_weight.shape != (sum(self.groups),):
                raise ValueError(f"MaskedMultiGroupBCE: `pos_weight` must have shape "
                                 f"[C]=[{sum(self.groups)}], got {tuple(pos_weight.shape)}")
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_multigroup_bce(logits, targets, self.groups, self.reduction,
                                     self.pos_weight, self.backend)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, reduction={self.reduction!r}, "
                f"pos_weight={self.pos_weight is not None}, backend={self.backend or 'auto'}")


class MaskedMultiGroupSoftmaxCE(nn.Module):
    """One softmax cross-entropy per label group, skipping groups unknown for a sample.

    ``forward(logits [N, C], targets [N, C]) -> loss``; each group of ``targets`` is one-hot
    or all -1. See :func:`vcfast.masked_multigroup_softmax_ce`.
    """

    def __init__(self, groups: Sequence[int], reduction: str = "mean",
                 backend: str | None = None) -> None:
        super().__init__()
        self.groups = _sizes("MaskedMultiGroupSoftmaxCE", groups)
        self.reduction = _check_reduction("MaskedMultiGroupSoftmaxCE", reduction)
        self.backend = backend

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_multigroup_softmax_ce(logits, targets, self.groups, self.reduction,
                                            self.backend)

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, reduction={self.reduction!r}, "
                f"backend={self.backend or 'auto'}")
