"""Triton backend of the fused masked multi-group classification losses.

Contract: docs/ops.md#masked-multi-group-losses (element losses, masking with target -1, the
one-hot rule of the softmax loss, reductions, error types). Kernels and their math:
``vcfast/kernels/classification.py`` (repository path ``kernels/classification.py``). The
reduction codes, softmax status codes and messages, argument checks and reductions are those
of the other backends (vcfast.ops._classification_common).

Public functions (2-D inputs of any strides: the kernels take per-tensor strides, nothing is
copied; the gradient comes back as a contiguous [N, C] tensor of the logits dtype):

* ``masked_multigroup_bce_triton(logits, targets, groups, pos_weight, reduction)
  -> (loss, group_counts)``
* ``masked_multigroup_softmax_ce_triton(logits, targets, groups, reduction)
  -> (loss, group_counts)``

``groups`` are the group sizes (a tuple or list of positive ints summing to C);
``reduction`` is 0 = "none" (loss [N, G]), 1 = "sum", 2 = "mean", 3 = "group_mean"
(0-dim loss); ``group_counts`` is int64 [G]: valid entries (BCE) / known samples (softmax)
per group. The loss is float32, or float64 for float64 logits. Both are differentiable with
respect to ``logits`` only (``pos_weight`` and ``targets`` get no gradient).

Registered ops (schemas take ``groups`` as ``int[]``; the arguments in the order of the C++
ops ``vcfast::masked_multigroup_bce`` etc., csrc/ops.cpp):

* ``vcfast::masked_multigroup_bce_triton(logits, targets, groups, pos_weight?, reduction)``
* ``vcfast::masked_multigroup_bce_triton_backward(grad, logits, targets, groups, pos_weight?,
  reduction, group_counts) -> grad_logits``
* ``vcfast::masked_multigroup_softmax_ce_triton(logits, targets, groups, reduction)``
* ``vcfast::masked_multigroup_softmax_ce_triton_backward(grad, logits, targets, groups,
  reduction, group_counts) -> grad_logits``

The forward ops save only ``logits, targets, pos_weight`` and the [G] ``group_counts`` for
the backward, which recomputes everything in one kernel launch.

How it runs: the forward kernel (one program per row, looping over the groups and over
BLOCK-wide chunks of each group) writes per-(row, group) partial sums S, valid counts K and a
target-violation flag (BCE: a count of bad
values; softmax: a STATUS_* code) to [N, G] buffers; the requested reduction is a few deterministic
torch ops on those tiny tensors. Target validation: in eager mode the forward raises
ValueError naming the first bad (sample, group) -- this costs one host sync per call. Under
torch.compile with the real GPU kernels (``torch.library.triton_op``) the forward is traced
and no data-dependent host check is possible, so it is skipped there; the kernels set
S[n, g] = NaN for every violating (sample, group), so bad targets still surface as a NaN
loss (for reduction "none" exactly at the offending entries). (Under the interpreter the
ops are opaque custom ops, whose implementation runs eagerly even inside compiled graphs,
so the check does run there.)

Registration: on real GPUs the ops are ``torch.library.triton_op`` (torch.compile can see
the kernels). Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` yields interpreter
objects that ``wrap_triton`` cannot trace, so the triton_op's traced fake/functional
implementations would break opcheck and torch.compile; in that mode the same Python
implementations are registered with ``torch.library.custom_op`` plus ``register_fake``
(same as ``vcfast.ops.spectrogram_triton``).

Without triton the module still imports; calling a function raises RuntimeError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vcfast.ops._classification_common import (
    REDUCTIONS,
    SECOND_DERIVATIVE_ERROR,
    STATUS_BAD_VALUE,
    bad_group_message,
    bad_target_message,
    check_args,
    loss_dtype,
    reduce,
)
from vcfast.ops._triton import (
    check_grid,
    define_op,
    is_interpreted,
    launch_device,
    load_kernels,
    require_runnable,
    triton,
)

__all__ = [
    "masked_multigroup_bce_triton",
    "masked_multigroup_softmax_ce_triton",
    "REDUCTIONS",
    "TRITON_IMPORT_ERROR",
    "USES_TRITON_OP",
]

_kernels, TRITON_IMPORT_ERROR = load_kernels("classification")

# Chunk width of the column loops: next power of two of the largest group, clamped to
# [_MIN_BLOCK, _MAX_BLOCK] (a group wider than BLOCK takes several chunks). Module globals so
# tests can shrink _MAX_BLOCK to exercise multi-chunk groups on tiny inputs.
_MIN_BLOCK = 16
_MAX_BLOCK = 1024


def _kernels_interpreted() -> bool:
    return _kernels is not None and is_interpreted(_kernels._masked_bce_fwd_kernel)


# True: registered with torch.library.triton_op (real GPU kernels); False: custom_op fallback
# (interpreter, see the module docstring) or triton missing.
USES_TRITON_OP = _kernels is not None and not _kernels_interpreted()


# ---------------------------------------------------------------------------------------------
# Host-side helpers


def _not_tracing(*tensors: Tensor | None) -> bool:
    """True for plain eager tensors outside any tracing mode (host syncs and caching are OK)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(t is None or type(t) is torch.Tensor for t in tensors))


def _bounds(groups: Sequence[int]) -> list[int]:
    out = [0]
    for size in groups:
        out.append(out[-1] + int(size))
    return out


_OFFSETS_CACHE: dict[tuple, Tensor] = {}


def _offsets(groups: Sequence[int], device: torch.device, eager: bool) -> Tensor:
    """int64 [G + 1] column offsets of the groups (cached per (groups, device) in eager mode)."""
    if not eager:
        return torch.tensor(_bounds(groups), dtype=torch.int64, device=device)
    key = (tuple(int(s) for s in groups), str(device))
    off = _OFFSETS_CACHE.get(key)
    if off is None:
        off = torch.tensor(_bounds(groups), dtype=torch.int64, device=device)
        if len(_OFFSETS_CACHE) > 64:
            _OFFSETS_CACHE.clear()
        _OFFSETS_CACHE[key] = off
    return off


def _block(groups: Sequence[int]) -> int:
    return max(_MIN_BLOCK, min(_MAX_BLOCK, triton.next_power_of_2(max(int(s) for s in groups))))


def _num_warps(block: int) -> int:
    return 8 if block >= 1024 else 4


def _check_inputs(name: str, logits: Tensor, targets: Tensor, groups: Sequence[int],
                  pos_weight: Tensor | None, reduction: int) -> None:
    check_args(name, logits, targets, groups, pos_weight)
    if reduction not in REDUCTIONS.values():
        raise ValueError(f"{name}: reduction must be 0 (none), 1 (sum), 2 (mean) or "
                         f"3 (group_mean), got {reduction!r}")


def _check_grad(name: str, grad: Tensor, logits: Tensor, group_counts: Tensor,
                n_groups: int, reduction: int) -> None:
    expected = (logits.shape[0], n_groups) if reduction == 0 else ()
    if tuple(grad.shape) != tuple(expected):
        raise ValueError(f"{name}: grad must have shape {tuple(expected)}, got "
                         f"{tuple(grad.shape)}")
    if not grad.dtype.is_floating_point or grad.device != logits.device:
        raise ValueError(f"{name}: grad must be floating-point on {logits.device}, got "
                         f"{grad.dtype} on {grad.device}")
    if tuple(group_counts.shape) != (n_groups,) or group_counts.device != logits.device:
        raise ValueError(f"{name}: group_counts must be [{n_groups}] on {logits.device}, got "
                         f"{tuple(group_counts.shape)} on {group_counts.device}")


def _group_weights(grad: Tensor, group_counts: Tensor, n_rows: int, n_groups: int,
                   reduction: int, dtype: torch.dtype) -> Tensor:
    """w[n, g] = dL/dS[n, g], a contiguous [N, G] tensor (tiny).

    Materialised rather than passed as a stride-0 view so that the strides handed to the
    kernel are those of a plain tensor whatever layout a compiler gives the broadcast.
    """
    grad = grad.to(dtype)
    if reduction == 0:
        w = grad
    elif reduction == 1:
        w = grad.expand(n_rows, n_groups)
    elif reduction == 2:
        total = group_counts.sum()
        w = torch.where(total > 0, grad / total.clamp_min(1).to(dtype), 0.0)
        w = w.expand(n_rows, n_groups)
    else:
        present = group_counts > 0
        denom = present.sum() * group_counts  # |P| * group_counts[g], exact in int64
        w = torch.where(present, grad / denom.clamp_min(1).to(dtype), 0.0)
        w = w.expand(n_rows, n_groups)
    return w.contiguous()


def _raise_on_flags(name: str, flags: Tensor, targets: Tensor, groups: Sequence[int],
                    softmax: bool) -> None:
    """Eager only: one host sync; raises ValueError naming the first bad (sample, group).

    ``flags``: per (sample, group) the number of bad values (BCE) or the status (softmax).
    """
    bad = torch.nonzero(flags >= STATUS_BAD_VALUE if softmax else flags)
    if bad.shape[0] == 0:
        return
    n, g = (int(v) for v in bad[0].tolist())
    if softmax:
        raise ValueError(bad_group_message(name, targets, n, g, tuple(groups),
                                           int(flags[n, g])))
    raise ValueError(bad_target_message(name, targets, n))


def _empty_partials(logits: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    n_rows = logits.shape[0]
    s = torch.empty((n_rows, n_groups), dtype=loss_dtype(logits), device=logits.device)
    k = torch.empty((n_rows, n_groups), dtype=torch.int32, device=logits.device)
    flags = torch.empty((n_rows, n_groups), dtype=torch.int32, device=logits.device)
    return s, k, flags


# ---------------------------------------------------------------------------------------------
# Op implementations (traceable: triton_op registers them as their own fake kernels too)

_BCE = "masked_multigroup_bce_triton"
_SCE = "masked_multigroup_softmax_ce_triton"


def _launch_args(name: str, logits: Tensor, targets: Tensor, groups: list[int],
                 eager: bool) -> tuple[Tensor, tuple, dict]:
    """What every launch passes: group offsets, the inputs' strides, the constexprs/warps."""
    check_grid(name, (logits.shape[0],))
    block = _block(groups)
    strides = (logits.stride(0), logits.stride(1), targets.stride(0), targets.stride(1))
    meta = {"IS_FP64": logits.dtype == torch.float64, "BLOCK": block,
            "num_warps": _num_warps(block)}
    return _offsets(groups, logits.device, eager), strides, meta


def _forward(name: str, logits: Tensor, targets: Tensor, groups: list[int],
             pos_weight: Tensor | None, reduction: int, softmax: bool) -> tuple[Tensor, Tensor]:
    """The forward of either loss: one launch writing the [N, G] partials, then the reduction."""
    _check_inputs(name, logits, targets, groups, pos_weight, reduction)
    eager = _not_tracing(logits, targets, pos_weight)
    n_rows, n_groups = logits.shape[0], len(groups)
    s, k, flags = _empty_partials(logits, n_groups)
    if n_rows == 0:
        s.zero_()
        k.zero_()
        return reduce(s, k, reduction)
    off, strides, meta = _launch_args(name, logits, targets, groups, eager)
    with launch_device(logits):
        if softmax:
            torch.library.wrap_triton(_kernels._masked_softmax_ce_fwd_kernel)[(n_rows,)](
                logits, targets, off, s, k, flags, n_groups, *strides, **meta)
        else:
            has_pw = pos_weight is not None
            torch.library.wrap_triton(_kernels._masked_bce_fwd_kernel)[(n_rows,)](
                logits, targets, pos_weight if has_pw else logits, off, s, k, flags, n_groups,
                *strides, pos_weight.stride(0) if has_pw else 0,
                HAS_PW=has_pw, USE_LIBDEVICE=not _kernels_interpreted(), **meta)
    if eager:
        _raise_on_flags(name, flags, targets, groups, softmax=softmax)
    return reduce(s, k, reduction)


def _backward(name: str, grad: Tensor, logits: Tensor, targets: Tensor, groups: list[int],
              pos_weight: Tensor | None, reduction: int, group_counts: Tensor,
              softmax: bool) -> Tensor:
    """The backward of either loss (arguments in the C++ backward ops' order): one launch."""
    _check_inputs(name, logits, targets, groups, pos_weight, reduction)
    n_rows, n_cols = logits.shape
    n_groups = len(groups)
    _check_grad(name, grad, logits, group_counts, n_groups, reduction)
    grad_logits = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return grad_logits
    eager = _not_tracing(logits, targets, pos_weight)
    w = _group_weights(grad, group_counts, n_rows, n_groups, reduction, loss_dtype(logits))
    off, strides, meta = _launch_args(name, logits, targets, groups, eager)
    with launch_device(logits):
        if softmax:
            torch.library.wrap_triton(_kernels._masked_softmax_ce_bwd_kernel)[(n_rows,)](
                logits, targets, off, w, grad_logits, n_groups, n_cols, *strides,
                w.stride(0), w.stride(1), **meta)
        else:
            has_pw = pos_weight is not None
            torch.library.wrap_triton(_kernels._masked_bce_bwd_kernel)[(n_rows,)](
                logits, targets, pos_weight if has_pw else logits, off, w, grad_logits,
                n_groups, n_cols, *strides, pos_weight.stride(0) if has_pw else 0,
                w.stride(0), w.stride(1), HAS_PW=has_pw, **meta)
    return grad_logits


# The registered ops' implementations; the backward ops take their arguments in the order of
# the C++ backward ops (vcfast::masked_multigroup_bce_backward etc.: group_counts last).


def _bce_forward_impl(logits: Tensor, targets: Tensor, groups: list[int],
                      pos_weight: Tensor | None, reduction: int) -> tuple[Tensor, Tensor]:
    return _forward(_BCE, logits, targets, groups, pos_weight, reduction, softmax=False)


def _bce_backward_impl(grad: Tensor, logits: Tensor, targets: Tensor, groups: list[int],
                          pos_weight: Tensor | None, reduction: int,
                          group_counts: Tensor) -> Tensor:
    return _backward(_BCE + "_backward", grad, logits, targets, groups, pos_weight, reduction,
                     group_counts, softmax=False)


def _sce_forward_impl(logits: Tensor, targets: Tensor, groups: list[int],
                      reduction: int) -> tuple[Tensor, Tensor]:
    return _forward(_SCE, logits, targets, groups, None, reduction, softmax=True)


def _sce_backward_impl(grad: Tensor, logits: Tensor, targets: Tensor, groups: list[int],
                          reduction: int, group_counts: Tensor) -> Tensor:
    return _backward(_SCE + "_backward", grad, logits, targets, groups, None, reduction,
                     group_counts, softmax=True)


def aot_launch_configs() -> list[dict]:
    """The compiled-kernel configurations the launchers above pick (read by vcfast.aot).

    Kept next to the launch code so the two change together; tests/test_aot_kernels.py checks
    that recorded launches use only configurations listed here. Entries as in
    ``vcfast.ops.spectrogram_triton.aot_launch_configs``.

    BLOCK: every power of two ``_block`` can return, with its ``_num_warps``. Dtypes: float32
    logits (float64 for IS_FP64) with int64 targets, the widest of each kind (most registers
    per element), at every BLOCK; bfloat16 logits with int8 targets (the narrow conversion
    paths) at the largest BLOCK. USE_LIBDEVICE is False only under the interpreter.
    """
    if _kernels is None:
        return []
    configs = []
    blocks = []
    block = _MIN_BLOCK
    while block <= _MAX_BLOCK:
        blocks.append(block)
        block *= 2
    dtype_sets = ((torch.float32, torch.int64, blocks), (torch.float64, torch.int64, blocks),
                  (torch.bfloat16, torch.int8, blocks[-1:]))
    for logits, targets, dtype_blocks in dtype_sets:
        is_fp64 = logits == torch.float64
        out = torch.float64 if is_fp64 else torch.float32
        for block in dtype_blocks:
            common = {"num_warps": _num_warps(block), "largest": block == blocks[-1]}
            for has_pw in (True, False):
                configs.append({
                    "kernel": "_masked_bce_fwd_kernel", **common,
                    "constexprs": {"HAS_PW": has_pw, "IS_FP64": is_fp64, "USE_LIBDEVICE": True,
                                   "BLOCK": block},
                    "args": {"x_ptr": logits, "t_ptr": targets, "pw_ptr": logits,
                             "off_ptr": torch.int64, "s_ptr": out, "k_ptr": torch.int32,
                             "flag_ptr": torch.int32}})
                configs.append({
                    "kernel": "_masked_bce_bwd_kernel", **common,
                    "constexprs": {"HAS_PW": has_pw, "IS_FP64": is_fp64, "BLOCK": block},
                    "args": {"x_ptr": logits, "t_ptr": targets, "pw_ptr": logits,
                             "off_ptr": torch.int64, "w_ptr": out, "gx_ptr": logits}})
            configs.append({
                "kernel": "_masked_softmax_ce_fwd_kernel", **common,
                "constexprs": {"IS_FP64": is_fp64, "BLOCK": block},
                "args": {"x_ptr": logits, "t_ptr": targets, "off_ptr": torch.int64,
                         "s_ptr": out, "k_ptr": torch.int32, "flag_ptr": torch.int32}})
            configs.append({
                "kernel": "_masked_softmax_ce_bwd_kernel", **common,
                "constexprs": {"IS_FP64": is_fp64, "BLOCK": block},
                "args": {"x_ptr": logits, "t_ptr": targets, "off_ptr": torch.int64,
                         "w_ptr": out, "gx_ptr": logits}})
    return configs


# ---------------------------------------------------------------------------------------------
# Registration

_BCE_FWD_NAME = "vcfast::masked_multigroup_bce_triton"
_BCE_BWD_NAME = "vcfast::masked_multigroup_bce_triton_backward"
_SCE_FWD_NAME = "vcfast::masked_multigroup_softmax_ce_triton"
_SCE_BWD_NAME = "vcfast::masked_multigroup_softmax_ce_triton_backward"


def _fake_forward(logits: Tensor, n_groups: int, reduction: int) -> tuple[Tensor, Tensor]:
    shape = (logits.shape[0], n_groups) if reduction == 0 else ()
    return (logits.new_empty(shape, dtype=loss_dtype(logits)),
            logits.new_empty((n_groups,), dtype=torch.int64))


if _kernels is not None:
    _bce_fwd_op = define_op(_BCE_FWD_NAME, _bce_forward_impl, use_triton_op=USES_TRITON_OP)
    _bce_bwd_op = define_op(_BCE_BWD_NAME, _bce_backward_impl, use_triton_op=USES_TRITON_OP)
    _sce_fwd_op = define_op(_SCE_FWD_NAME, _sce_forward_impl, use_triton_op=USES_TRITON_OP)
    _sce_bwd_op = define_op(_SCE_BWD_NAME, _sce_backward_impl, use_triton_op=USES_TRITON_OP)
    if not USES_TRITON_OP:  # interpreter: custom ops need explicit fakes

        @_bce_fwd_op.register_fake
        def _bce_forward_fake(logits, targets, groups, pos_weight, reduction):
            _check_inputs(_BCE, logits, targets, groups, pos_weight, reduction)
            return _fake_forward(logits, len(groups), reduction)

        @_bce_bwd_op.register_fake
        def _bce_backward_fake(grad, logits, targets, groups, pos_weight, reduction,
                               group_counts):
            name = _BCE + "_backward"
            _check_inputs(name, logits, targets, groups, pos_weight, reduction)
            _check_grad(name, grad, logits, group_counts, len(groups), reduction)
            return torch.empty_like(logits, memory_format=torch.contiguous_format)

        @_sce_fwd_op.register_fake
        def _sce_forward_fake(logits, targets, groups, reduction):
            _check_inputs(_SCE, logits, targets, groups, None, reduction)
            return _fake_forward(logits, len(groups), reduction)

        @_sce_bwd_op.register_fake
        def _sce_backward_fake(grad, logits, targets, groups, reduction, group_counts):
            name = _SCE + "_backward"
            _check_inputs(name, logits, targets, groups, None, reduction)
            _check_grad(name, grad, logits, group_counts, len(groups), reduction)
            return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _bce_setup_context(ctx, inputs, output):
        logits, targets, groups, pos_weight, reduction = inputs
        # Only the inputs and the [G] counts are saved; the backward recomputes the rest.
        ctx.save_for_backward(logits, targets, pos_weight, output[1])
        ctx.groups, ctx.reduction = groups, reduction

    def _bce_backward(ctx, grad, _grad_counts):
        logits, targets, pos_weight, group_counts = ctx.saved_tensors
        grad_logits = _bce_bwd_op(grad, logits, targets, ctx.groups, pos_weight, ctx.reduction,
                                  group_counts)
        return grad_logits, None, None, None, None

    def _sce_setup_context(ctx, inputs, output):
        logits, targets, groups, reduction = inputs
        ctx.save_for_backward(logits, targets, output[1])
        ctx.groups, ctx.reduction = groups, reduction

    def _sce_backward(ctx, grad, _grad_counts):
        logits, targets, group_counts = ctx.saved_tensors
        grad_logits = _sce_bwd_op(grad, logits, targets, ctx.groups, ctx.reduction,
                                  group_counts)
        return grad_logits, None, None, None

    _bce_fwd_op.register_autograd(_bce_backward, setup_context=_bce_setup_context)
    _sce_fwd_op.register_autograd(_sce_backward, setup_context=_sce_setup_context)

    def _no_second_derivative(ctx, grad):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)

    _bce_bwd_op.register_autograd(_no_second_derivative)
    _sce_bwd_op.register_autograd(_no_second_derivative)


def _check_runnable(name: str, logits: Tensor) -> None:
    require_runnable(name, logits, kernels=_kernels, import_error=TRITON_IMPORT_ERROR,
                     interpreted=_kernels_interpreted(), module="classification",
                     fallback="vcfast.masked_multigroup_bce / masked_multigroup_softmax_ce "
                              "with backend 'cpu', 'cuda' or 'reference'")


def _groups_list(groups: Sequence[int]) -> list[int]:
    if isinstance(groups, int) or not isinstance(groups, Sequence):
        raise ValueError(f"groups must be a sequence of group sizes, got {groups!r}")
    return [int(s) for s in groups]


def masked_multigroup_bce_triton(logits: Tensor, targets: Tensor, groups: Sequence[int],
                                 pos_weight: Tensor | None, reduction: int
                                 ) -> tuple[Tensor, Tensor]:
    """Masked multi-group sigmoid cross-entropy with the Triton kernels.

    ``logits`` [N, C] float16/bfloat16/float32/float64 and ``targets`` [N, C] (int8/16/32/64
    or float16/bfloat16/float32/float64, values -1 = unknown, 0, 1), any strides; ``groups``
    sizes summing to C; ``pos_weight`` [C] or None; ``reduction`` 0-3 (none, sum, mean,
    group_mean). Returns (loss, group_counts int64 [G]); loss is [N, G] for "none", else 0-dim,
    float32 (float64 for float64 logits). Differentiable w.r.t. ``logits``. Runs on CUDA
    tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow; for tests).
    """
    _check_runnable(_BCE, logits)
    return _bce_fwd_op(logits, targets, _groups_list(groups), pos_weight, int(reduction))


def masked_multigroup_softmax_ce_triton(logits: Tensor, targets: Tensor, groups: Sequence[int],
                                        reduction: int) -> tuple[Tensor, Tensor]:
    """Masked multi-group softmax cross-entropy (one softmax per group) with the Triton kernels.

    Inputs as for :func:`masked_multigroup_bce_triton` (no pos_weight). Each (sample, group)
    of targets is either all -1 (unknown: skipped) or one-hot; anything else raises
    ValueError naming the sample and group (eager; see the module docstring for
    torch.compile). Returns (loss, group_counts int64 [G] = known samples per group).
    """
    _check_runnable(_SCE, logits)
    return _sce_fwd_op(logits, targets, _groups_list(groups), int(reduction))
