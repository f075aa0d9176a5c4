"""Triton backend of the label-table ops of LabelConcatConv2d (GPU tensors; CPU under
TRITON_INTERPRET=1).

Same contracts as ``vcfast.ops.label_conv`` (references) and the C++ CPU ops; kernels in
``kernels/label_conv.py``. float16, bfloat16, float32, float64; half types computed in float32
and rounded once. Indices int64.

Registered ops:

* ``vcfast::label_table_add_triton(Tensor conv_out, Tensor table, Tensor row_ids,
  Tensor col_ids) -> Tensor``
  (functional; differentiable: grad conv_out = grad, grad table = label_table_grad_triton(grad))
* ``vcfast::label_table_grad_triton(Tensor grad, Tensor row_ids, Tensor col_ids,
  SymInt num_rows, SymInt num_cols) -> Tensor``
  (deterministic two-stage segmented sum, no atomics; not differentiable)

Registration as in ``vcfast.ops.gradient_penalty_triton``: ``triton_op`` with compiled kernels,
``custom_op`` + ``register_fake`` under the interpreter. Without triton the module imports;
calling a function raises RuntimeError.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vcfast.ops._triton import (
    check_grid,
    define_op,
    is_interpreted,
    launch_device,
    load_kernels,
    require_runnable,
    triton,
)
from vcfast.ops.label_conv import _table_grad_backward, _table_grad_setup_context

__all__ = ["label_table_add_triton", "label_table_grad_triton", "TRITON_IMPORT_ERROR",
           "USES_TRITON_OP"]

_kernels, TRITON_IMPORT_ERROR = load_kernels("label_conv")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BLOCK_ADD = 1024
_BLOCK_J = 128
_BLOCK_I = 16
_NUM_WARPS = 4


def _kernels_interpreted() -> bool:
    return _kernels is not None and is_interpreted(_kernels._label_table_add_kernel)


USES_TRITON_OP = _kernels is not None and not _kernels_interpreted()


def _emulate_bf16_rne(out: Tensor) -> bool:
    return out.dtype == torch.bfloat16 and _kernels_interpreted()


def _check_add(conv_out: Tensor, table: Tensor, row_ids: Tensor, col_ids: Tensor) -> None:
    torch._check_type(conv_out.dtype in _DTYPES,
                      lambda: f"vcfast::label_table_add_triton: unsupported dtype {conv_out.dtype}")
    torch._check_type(table.dtype == conv_out.dtype,
                      lambda: f"vcfast::label_table_add_triton: table dtype {table.dtype} "
                              f"differs from conv_out's {conv_out.dtype}")
    torch._check_value(conv_out.dim() == 4 and table.dim() == 4,
                       lambda: "vcfast::label_table_add_triton: conv_out and table must be 4-D")
    torch._check_value(conv_out.shape[0] == table.shape[0]
                       and conv_out.shape[1] == table.shape[1],
                       lambda: "vcfast::label_table_add_triton: conv_out and table disagree on "
                               "[B, O]")
    _check_ids(row_ids, conv_out.shape[2], "row_ids")
    _check_ids(col_ids, conv_out.shape[3], "col_ids")


def _check_ids(ids: Tensor, length, name: str) -> None:
    torch._check_type(ids.dtype == torch.int64,
                      lambda: f"vcfast label tables: {name} must be int64")
    torch._check_value(ids.dim() == 1 and ids.shape[0] == length,
                       lambda: f"vcfast label tables: {name} must be 1-D of length {length}")


def _label_table_add_impl(conv_out: Tensor, table: Tensor, row_ids: Tensor,
                          col_ids: Tensor) -> Tensor:
    _check_add(conv_out, table, row_ids, col_ids)
    conv_out = conv_out.contiguous()
    table = table.contiguous()
    b, o, h, w = conv_out.shape
    r, s = table.shape[2], table.shape[3]
    out = torch.empty_like(conv_out)
    if b * o > 0 and h * w > 0:
        grid = (b * o, triton.cdiv(h * w, _BLOCK_ADD))
        check_grid(_ADD_NAME, grid)
        with launch_device(conv_out):
            torch.library.wrap_triton(_kernels._label_table_add_kernel)[grid](
                conv_out, table, row_ids.contiguous(), col_ids.contiguous(), out, h, w, r * s, s,
                IS_FP64=conv_out.dtype == torch.float64,
                EMULATE_BF16_RNE=_emulate_bf16_rne(out), BLOCK=_BLOCK_ADD, num_warps=_NUM_WARPS)
    return out


def _label_table_grad_impl(grad: Tensor, row_ids: Tensor, col_ids: Tensor, num_rows: int,
                           num_cols: int) -> Tensor:
    torch._check_type(grad.dtype in _DTYPES,
                      lambda: f"vcfast::label_table_grad_triton: unsupported dtype {grad.dtype}")
    torch._check_value(grad.dim() == 4, lambda: "vcfast::label_table_grad_triton: grad must be 4-D")
    _check_ids(row_ids, grad.shape[2], "row_ids")
    _check_ids(col_ids, grad.shape[3], "col_ids")
    grad = grad.contiguous()
    b, o, h, w = grad.shape
    out = grad.new_empty((b, o, num_rows, num_cols))
    if b * o == 0 or num_rows * num_cols == 0:
        return out
    if h * w == 0:
        return out.zero_()
    is_fp64 = grad.dtype == torch.float64
    acc_dtype = torch.float64 if is_fp64 else torch.float32
    tmp = torch.empty((b * o * h, num_cols), dtype=acc_dtype, device=grad.device)
    block_s = triton.next_power_of_2(num_cols)
    block_r = triton.next_power_of_2(num_rows)
    check_grid(_GRAD_NAME, (b * o * h,))
    with launch_device(grad):
        torch.library.wrap_triton(_kernels._label_grad_cols_kernel)[(b * o * h,)](
            grad, col_ids.contiguous(), tmp, w, num_cols,
            IS_FP64=is_fp64, BLOCK_J=min(_BLOCK_J, triton.next_power_of_2(w)), BLOCK_S=block_s,
            num_warps=_NUM_WARPS)
    with launch_device(grad):
        torch.library.wrap_triton(_kernels._label_grad_rows_kernel)[(b * o,)](
            tmp, row_ids.contiguous(), out, h, num_rows, num_cols,
            IS_FP64=is_fp64, EMULATE_BF16_RNE=_emulate_bf16_rne(out), BLOCK_I=_BLOCK_I,
            BLOCK_R=block_r, BLOCK_S=block_s, num_warps=_NUM_WARPS)
    return out


def aot_launch_configs() -> list[dict]:
    """The compiled-kernel configurations the launchers above pick (read by vcfast.aot).

    Kept next to the launch code so the two change together; tests/test_aot_kernels.py checks
    that recorded launches use only configurations listed here. Entries as in
    ``vcfast.ops.spectrogram_triton.aot_launch_configs``.

    The grad kernels size BLOCK_R / BLOCK_S by the table (next power of two of the pattern
    counts R, S <= the kernel's taps per axis: 7 x 7 for the generator's stem): listed for
    tables up to 16 x 16 (every BLOCK_S and BLOCK_R = BLOCK_S; BLOCK_J, from the width, at
    every value with the stem's BLOCK_S = 8). Larger tables are unchecked and need more
    registers. Dtypes: float32 and float64 everywhere, bfloat16 at the largest blocks.
    EMULATE_BF16_RNE is True only under the interpreter.
    """
    if _kernels is None:
        return []
    configs = []
    table_blocks = (1, 2, 4, 8, 16)
    j_blocks = [1 << i for i in range(_BLOCK_J.bit_length())]  # 1 .. _BLOCK_J
    cols_blocks = sorted({(j, 8) for j in j_blocks} | {(_BLOCK_J, s) for s in table_blocks})
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        is_fp64 = dtype == torch.float64
        acc = torch.float64 if is_fp64 else torch.float32
        configs.append({
            "kernel": "_label_table_add_kernel", "num_warps": _NUM_WARPS, "largest": True,
            "constexprs": {"IS_FP64": is_fp64, "EMULATE_BF16_RNE": False, "BLOCK": _BLOCK_ADD},
            "args": {"conv_ptr": dtype, "table_ptr": dtype, "row_ptr": torch.int64,
                     "col_ptr": torch.int64, "out_ptr": dtype}})
        for block_j, block_s in cols_blocks:
            largest = (block_j, block_s) == (_BLOCK_J, table_blocks[-1])
            if dtype == torch.bfloat16 and not largest:
                continue
            configs.append({
                "kernel": "_label_grad_cols_kernel", "num_warps": _NUM_WARPS, "largest": largest,
                "constexprs": {"IS_FP64": is_fp64, "BLOCK_J": block_j, "BLOCK_S": block_s},
                "args": {"grad_ptr": dtype, "col_ptr": torch.int64, "tmp_ptr": acc}})
        for block in table_blocks:
            largest = block == table_blocks[-1]
            if dtype == torch.bfloat16 and not largest:
                continue
            configs.append({
                "kernel": "_label_grad_rows_kernel", "num_warps": _NUM_WARPS, "largest": largest,
                "constexprs": {"IS_FP64": is_fp64, "EMULATE_BF16_RNE": False,
                               "BLOCK_I": _BLOCK_I, "BLOCK_R": block, "BLOCK_S": block},
                "args": {"tmp_ptr": acc, "row_ptr": torch.int64, "out_ptr": dtype}})
    return configs


_ADD_NAME = "vcfast::label_table_add_triton"
_GRAD_NAME = "vcfast::label_table_grad_triton"

if _kernels is not None:
    _add_op = define_op(_ADD_NAME, _label_table_add_impl, use_triton_op=USES_TRITON_OP)
    _grad_op = define_op(_GRAD_NAME, _label_table_grad_impl, use_triton_op=USES_TRITON_OP)
    if not USES_TRITON_OP:

        @_add_op.register_fake
        def _label_table_add_fake(conv_out, table, row_ids, col_ids):
            _check_add(conv_out, table, row_ids, col_ids)
            return torch.empty_like(conv_out, memory_format=torch.contiguous_format)

        @_grad_op.register_fake
        def _label_table_grad_fake(grad, row_ids, col_ids, num_rows, num_cols):
            return grad.new_empty((grad.shape[0], grad.shape[1], num_rows, num_cols))

    def _setup_context(ctx, inputs, output):
        _, table, row_ids, col_ids = inputs
        ctx.save_for_backward(row_ids, col_ids)
        ctx.table_shape = (table.shape[2], table.shape[3])

    def _backward(ctx, grad):
        row_ids, col_ids = ctx.saved_tensors
        num_rows, num_cols = ctx.table_shape
        return grad, _grad_op(grad, row_ids, col_ids, num_rows, num_cols), None, None

    _add_op.register_autograd(_backward, setup_context=_setup_context)
    _grad_op.register_autograd(_table_grad_backward, setup_context=_table_grad_setup_context)


def _require_triton(name: str, t: Tensor) -> None:
    require_runnable(name, t, kernels=_kernels, import_error=TRITON_IMPORT_ERROR,
                     interpreted=_kernels_interpreted(), module="label_conv",
                     fallback="vcfast.ops.label_conv")


def label_table_add_triton(conv_out: Tensor, table: Tensor, row_ids: Tensor,
                           col_ids: Tensor) -> Tensor:
    """``conv_out + table[:, :, row_ids][:, :, :, col_ids]`` (differentiable)."""
    _require_triton("label_table_add_triton", conv_out)
    return _add_op(conv_out, table, row_ids, col_ids)


def label_table_grad_triton(grad: Tensor, row_ids: Tensor, col_ids: Tensor, num_rows: int,
                            num_cols: int) -> Tensor:
    """Segmented sum of ``grad`` [B, O, H, W] per (row pattern, column pattern): [B, O, R, S]."""
    _require_triton("label_table_grad_triton", grad)
    return _grad_op(grad, row_ids, col_ids, int(num_rows), int(num_cols))
