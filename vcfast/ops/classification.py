"""Masked multi-group classification losses, fused (docs/ops.md#masked-multi-group-losses).

The discriminator's classifier predicts several label groups at once (speaker 1421,
birthplace 53, sex 2 for the StarGAN-VC corpus): ``logits`` and ``targets`` are ``[N, C]``
with ``C = sum(groups)``, group ``g`` covering columns ``[off_g, off_g + groups[g])``.
Targets are -1 (unknown: ignored), 0 or 1; a group unknown for a sample is all -1.

Two losses, with the same reductions:

``masked_multigroup_bce`` (sigmoid CE over the valid entries, Chainer's
``sigmoid_cross_entropy`` with ignore label -1). Per valid entry, with ``pw = pos_weight[j]``
(1 by default) and ``c = 1 + (pw - 1) t``::

    l = (1 - t) x + c (log1p(exp(-|x|)) + max(-x, 0))

``masked_multigroup_softmax_ce`` (one softmax per group). A known group must be one-hot;
per known (sample, group)::

    S = logsumexp(x[group]) - x[class]

Per (sample n, group g): ``S[n, g]`` = summed loss, ``K[n, g]`` = valid entries (sigmoid) or
1 for a known group (softmax). Reductions: ``"none"`` -> ``S`` ``[N, G]``; ``"sum"``;
``"mean"`` -> ``sum S / sum K`` (mean over valid entries / known pairs); ``"group_mean"`` ->
mean over groups that have any valid entry of ``sum_n S[n, g] / sum_n K[n, g]``. Whatever
is masked, the loss and its gradient are finite: an all-unknown batch gives 0 and grad 0.

Backends (``backend=``): ``reference`` (plain PyTorch below), ``cpu`` (C++ kernel in
vcfast._C), ``cuda`` (CUDA C++ kernel in vcfast._C), ``triton``. Default: ``cpu`` for CPU
tensors, ``triton`` for CUDA tensors (``cuda`` without triton). The fused kernels read
logits and targets once forward and once backward, validate the target values in that same
pass, and save nothing [N, C]-sized beyond the inputs themselves for the backward. Only
``reference`` has second derivatives (the fused backends raise RuntimeError when
differentiated twice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vcfast import _extension
from vcfast.ops._backend import resolve_backend
from vcfast.ops._classification_common import (
    REDUCTIONS,
    SECOND_DERIVATIVE_ERROR,
    STATUS_BAD_VALUE,
    STATUS_MIXED,
    STATUS_NO_POSITIVE,
    STATUS_TWO_POSITIVES,
    STATUS_UNKNOWN,
    bad_group_message,
    bad_target_message,
    check_args,
    loss_dtype,
    reduce,
)

__all__ = [
    "REDUCTIONS",
    "masked_multigroup_bce",
    "masked_multigroup_bce_reference",
    "masked_multigroup_softmax_ce",
    "masked_multigroup_softmax_ce_reference",
]


# ---------------------------------------------------------------------------------------------
# Validation (cheap: no pass over the data; the target values are checked by the kernels)


def _reduction_code(op: str, reduction: str) -> int:
    code = REDUCTIONS.get(reduction)
    if code is None:
        raise ValueError(f"{op}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    return code


def _pick_backend(op: str, backend: str | None, device: torch.device) -> str:
    """The backend of a loss call (vcfast.ops._backend; CUDA default: cuda, then triton: on an
    H200 the C++ kernels ran 2-4x faster than the Triton ones at N = 16-4096, see README.md)."""
    return resolve_backend(op, backend, device)


def _eager_checks(x: torch.Tensor) -> bool:
    """Data-dependent checks run in eager mode on real data only (not under torch.compile,
    not on meta tensors); the fused kernels check inside the kernel in every mode."""
    return x.device.type != "meta" and not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------
# References: plain PyTorch, differentiable through autograd


def _per_group_sum(values: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """[N, C] -> [N, G]: sums over each group's columns."""
    return torch.stack([part.sum(1) for part in values.split(sizes, 1)], 1)


def _check_target_values(op: str, targets: torch.Tensor) -> None:
    bad = ~((targets == -1) | (targets == 0) | (targets == 1))  # NaN is bad too
    if bad.any():
        raise ValueError(bad_target_message(op, targets, int(bad.nonzero()[0, 0])))


def masked_multigroup_bce_reference(
    logits: torch.Tensor, targets: torch.Tensor, groups, reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked multi-group sigmoid CE in plain PyTorch (the semantics every backend follows)."""
    op = "vcfast.masked_multigroup_bce"
    sizes = check_args(op, logits, targets, groups, pos_weight)
    code = _reduction_code(op, reduction)
    if _eager_checks(targets):
        _check_target_values(op, targets)
    dtype = loss_dtype(logits)
    valid = targets != -1
    positive = (targets == 1).to(dtype)  # compared in the targets' own dtype: exact
    pw = None if pos_weight is None else pos_weight.to(dtype)
    # binary_cross_entropy_with_logits computes exactly (1 - t) x + c (log1p(e^-|x|) + max(-x, 0)).
    loss = F.binary_cross_entropy_with_logits(logits.to(dtype), positive, pos_weight=pw,
                                              reduction="none")
    loss = torch.where(valid, loss, 0.0)
    return reduce(_per_group_sum(loss, sizes), _per_group_sum(valid.to(dtype), sizes), code)[0]


def _softmax_status(targets: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """[N, G] status codes (STATUS_* of vcfast.ops._classification_common)."""
    columns = []
    for t in targets.split(sizes, 1):
        unknown = (t == -1).sum(1)
        positive = (t == 1).sum(1)
        bad = (~((t == -1) | (t == 0) | (t == 1))).sum(1)
        status = torch.zeros_like(unknown)
        status = torch.where(positive > 1, STATUS_TWO_POSITIVES, status)
        status = torch.where(positive == 0, STATUS_NO_POSITIVE, status)
        status = torch.where(unknown > 0, STATUS_MIXED, status)
        status = torch.where(unknown == t.shape[1], STATUS_UNKNOWN, status)
        columns.append(torch.where(bad > 0, STATUS_BAD_VALUE, status))
    return torch.stack(columns, 1)


def masked_multigroup_softmax_ce_reference(
    logits: torch.Tensor, targets: torch.Tensor, groups, reduction: str = "mean",
) -> torch.Tensor:
    """Masked per-group softmax CE in plain PyTorch (the semantics every backend follows)."""
    op = "vcfast.masked_multigroup_softmax_ce"
    sizes = check_args(op, logits, targets, groups)
    code = _reduction_code(op, reduction)
    if _eager_checks(targets):
        status = _softmax_status(targets, sizes)
        errors = (status >= STATUS_BAD_VALUE).flatten().nonzero()
        if len(errors):
            n, g = divmod(int(errors[0]), len(sizes))
            raise ValueError(bad_group_message(op, targets, n, g, sizes, int(status[n, g])))
    dtype = loss_dtype(logits)
    S, K = [], []
    for x, t in zip(logits.to(dtype).split(sizes, 1), targets.split(sizes, 1)):
        known = (t != -1).all(1)
        label = (t == 1).to(torch.int64).argmax(1, keepdim=True)
        loss = torch.logsumexp(x, 1) - x.gather(1, label)[:, 0]
        S.append(torch.where(known, loss, 0.0))
        K.append(known.to(dtype))
    return reduce(torch.stack(S, 1), torch.stack(K, 1), code)[0]


# ---------------------------------------------------------------------------------------------
# Registration of the C++ ops' fake implementations and autograd (schemas and CPU/CUDA
# kernels come from vcfast._C).

if _extension.EXTENSION_LOADED:
    _BCE_OP = torch.ops.vcfast.masked_multigroup_bce.default
    _SOFTMAX_OP = torch.ops.vcfast.masked_multigroup_softmax_ce.default

    def _fake_outputs(logits, groups, reduction):
        dtype = loss_dtype(logits)
        shape = (logits.shape[0], len(groups)) if reduction == 0 else ()
        counts = logits.new_empty((len(groups),), dtype=torch.int64)
        return logits.new_empty(shape, dtype=dtype), counts

    @torch.library.register_fake("vcfast::masked_multigroup_bce")
    def _bce_fake(logits, targets, groups, pos_weight, reduction):
        return _fake_outputs(logits, groups, reduction)

    @torch.library.register_fake("vcfast::masked_multigroup_bce_backward")
    def _bce_backward_fake(grad, logits, targets, groups, pos_weight, reduction, group_counts):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    @torch.library.register_fake("vcfast::masked_multigroup_softmax_ce")
    def _softmax_fake(logits, targets, groups, reduction):
        return _fake_outputs(logits, groups, reduction)

    @torch.library.register_fake("vcfast::masked_multigroup_softmax_ce_backward")
    def _softmax_backward_fake(grad, logits, targets, groups, reduction, group_counts):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # Saved for backward: logits and targets (the inputs themselves, no copies) and the [G]
    # group counts; the backward recomputes everything else in its one pass.
    def _bce_setup_context(ctx, inputs, output):
        logits, targets, groups, pos_weight, reduction = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, targets, pos_weight, output[1])
        ctx.groups, ctx.reduction = groups, reduction

    def _bce_backward(ctx, grad_loss, _grad_counts):
        logits, targets, pos_weight, counts = ctx.saved_tensors
        grad = torch.ops.vcfast.masked_multigroup_bce_backward.default(
            grad_loss, logits, targets, ctx.groups, pos_weight, ctx.reduction, counts)
        # Only logits get a gradient: targets are labels, groups and reduction are
        # configuration, and pos_weight is a fixed class weighting.
        return grad, None, None, None, None

    def _softmax_setup_context(ctx, inputs, output):
        logits, targets, groups, reduction = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, targets, output[1])
        ctx.groups, ctx.reduction = groups, reduction

    def _softmax_backward(ctx, grad_loss, _grad_counts):
        logits, targets, counts = ctx.saved_tensors
        grad = torch.ops.vcfast.masked_multigroup_softmax_ce_backward.default(
            grad_loss, logits, targets, ctx.groups, ctx.reduction, counts)
        # Only logits get a gradient (targets are labels, the rest configuration).
        return grad, None, None, None

    torch.library.register_autograd("vcfast::masked_multigroup_bce", _bce_backward,
                                    setup_context=_bce_setup_context)
    torch.library.register_autograd("vcfast::masked_multigroup_softmax_ce", _softmax_backward,
                                    setup_context=_softmax_setup_context)

    def _no_second_derivative(ctx, grad):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)

    # Without a formula a double backward would warn and silently drop every term through
    # the fused backward (create_graph=True gave a gradient that depends on nothing).
    for _name in ("masked_multigroup_bce_backward", "masked_multigroup_softmax_ce_backward"):
        torch.library.register_autograd(f"vcfast::{_name}", _no_second_derivative)


# ---------------------------------------------------------------------------------------------
# Public API


def masked_multigroup_bce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    groups: Sequence[int],
    reduction: str = "mean",
    pos_weight: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sigmoid cross-entropy over the entries whose target is not -1, per label group.

    Args:
        logits: ``[N, C]`` float16/bfloat16/float32/float64 (half types computed in float32).
        targets: ``[N, C]`` int8/16/32/64 or floating, values -1 (unknown), 0 or 1.
        groups: group sizes summing to C, e.g. ``(1421, 53, 2)``, or an object with ``.sizes``.
        reduction: ``"mean"`` (over valid entries, default), ``"sum"``, ``"group_mean"`` or
            ``"none"`` (``[N, G]`` per-sample, per-group sums).
        pos_weight: optional ``[C]`` weight of the positive term (as in
            ``binary_cross_entropy_with_logits``); it gets no gradient.
        backend: ``None`` (by device), ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        The loss, float64 for float64 logits, else float32; gradient flows to ``logits``.

    Raises:
        ValueError: a target outside {-1, 0, 1} (NaN included), groups not summing to C, a
            group size < 1, mismatched shapes or devices. TypeError: non-floating logits,
            uint8/bool targets.
    """
    op = "vcfast.masked_multigroup_bce"
    sizes = check_args(op, logits, targets, groups, pos_weight)
    code = _reduction_code(op, reduction)
    backend = _pick_backend(op, backend, logits.device)
    if backend == "cpu" or backend == "cuda":
        return _BCE_OP(logits, targets, sizes, pos_weight, code)[0]
    if backend == "triton":
        from vcfast.ops.classification_triton import masked_multigroup_bce_triton

        return masked_multigroup_bce_triton(logits.contiguous(), targets.contiguous(), sizes,
                                            pos_weight, code)[0]
    return masked_multigroup_bce_reference(logits, targets, sizes, reduction, pos_weight)


def masked_multigroup_softmax_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    groups: Sequence[int],
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Per-group softmax cross-entropy, skipping (sample, group) pairs whose group is unknown.

    Args:
        logits: ``[N, C]`` float16/bfloat16/float32/float64 (half types computed in float32).
        targets: ``[N, C]``: each group of each sample one-hot (exactly one 1, the rest 0) or
            all -1 (unknown). int8/16/32/64 or floating.
        groups: group sizes summing to C, or an object with ``.sizes``.
        reduction: ``"mean"`` (over known (sample, group) pairs, default), ``"sum"``,
            ``"group_mean"`` or ``"none"`` (``[N, G]``, 0 where unknown).
        backend: ``None`` (by device), ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        The loss, float64 for float64 logits, else float32; gradient flows to ``logits``.

    Raises:
        ValueError naming the first offending sample and group when a group has two or more
        positives, no positive, or mixes -1 with 0/1, or a value is outside {-1, 0, 1}; the
        argument errors of :func:`masked_multigroup_bce`.
    """
    op = "vcfast.masked_multigroup_softmax_ce"
    sizes = check_args(op, logits, targets, groups)
    code = _reduction_code(op, reduction)
    backend = _pick_backend(op, backend, logits.device)
    if backend == "cpu" or backend == "cuda":
        return _SOFTMAX_OP(logits, targets, sizes, code)[0]
    if backend == "triton":
        from vcfast.ops.classification_triton import masked_multigroup_softmax_ce_triton

        return masked_multigroup_softmax_ce_triton(logits.contiguous(), targets.contiguous(),
                                                   sizes, code)[0]
    return masked_multigroup_softmax_ce_reference(logits, targets, sizes, reduction)
