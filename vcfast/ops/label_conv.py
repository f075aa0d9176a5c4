"""Label-table ops of :class:`vcfast.nn.LabelConcatConv2d` (label conditioning without tiling).

``conv(cat(x, tile(c)))`` = ``conv(x; W_x)`` + ``conv(tile(c); W_c)``. The label term at output
position (i, j) depends only on which kernel taps fall inside the (zero-padded) input: a row
pattern ``r(i)`` and a column pattern ``s(j)`` (interior positions share one pattern). With

    P[b, o, ki, kj] = sum_c c[b, c] * W_c[o, c, ki, kj]
    T[b, o, r, s]   = sum_{ki valid for r} sum_{kj valid for s} P[b, o, ki, kj]   (A_row P A_col^T)

the label term is ``T[b, o, r(i), s(j)]``. The tables are tiny; the only spatially large work is

* ``label_table_add(conv_out, table, row_ids, col_ids)`` ->
  ``conv_out + table[:, :, row_ids][:, :, :, col_ids]`` (functional: a new contiguous tensor,
  ``conv_out`` is untouched), differentiable: the gradient for ``conv_out`` is the incoming
  gradient, the one for ``table`` is ``label_table_grad`` of it;
* ``label_table_grad(grad, row_ids, col_ids, num_rows, num_cols)`` -> ``[B, O, R, S]``, the
  segmented sum over the positions of each (row pattern, column pattern) pair, itself
  differentiable (its adjoint is the gather), so second derivatives are exact.

Backends: plain-PyTorch references here; C++ CPU ops ``vcfast::label_table_add`` /
``vcfast::label_table_grad`` (csrc/cpu/label_conv_cpu.cpp); Triton ops ``..._triton``
(vcfast.ops.label_conv_triton, GPU tensors or CPU under TRITON_INTERPRET=1). ``row_ids`` /
``col_ids`` are int64 on the data's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vcfast import _extension

__all__ = [
    "tap_patterns",
    "label_table_add",
    "label_table_grad",
    "label_table_add_reference",
    "label_table_grad_reference",
]


def tap_patterns(in_size: int, kernel_size: int, stride: int, padding: int,
                 out_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Valid-tap patterns along one spatial axis (dilation 1, zero padding).

    Returns ``(ids, indicator)`` on the CPU: ``ids`` int64 [out_size] maps each output index to
    its pattern; ``indicator`` bool [num_patterns, kernel_size] says which taps of a pattern
    read inside the input (tap ``k`` of output ``i`` reads ``i * stride - padding + k``).
    """
    if out_size is None:
        out_size = (in_size + 2 * padding - kernel_size) // stride + 1
    out_size = max(int(out_size), 0)
    # Plain Python on the sizes, no tensor ops: under torch.compile the pattern count is then a
    # constant (torch.unique's output size is data-dependent, which Inductor cannot compile).
    # The taps of output i that read inside the input are the range [lo, hi).
    ranges = []
    for i in range(out_size):
        start = i * stride - padding
        lo, hi = max(0, -start), min(kernel_size, in_size - start)
        ranges.append((lo, hi) if lo < hi else (0, 0))
    rows = {r: tuple(r[0] <= k < r[1] for k in range(kernel_size)) for r in ranges}
    order = sorted(rows, key=rows.__getitem__)  # the rows sorted, as torch.unique sorts them
    number = {r: j for j, r in enumerate(order)}
    ids = torch.tensor([number[r] for r in ranges], dtype=torch.int64)
    indicator = torch.tensor([rows[r] for r in order], dtype=torch.bool).reshape(len(order),
                                                                                kernel_size)
    return ids, indicator


# ---------------------------------------------------------------------------------------------
# References


def _check_add_args(conv_out: Tensor, table: Tensor, row_ids: Tensor, col_ids: Tensor) -> None:
    if conv_out.dim() != 4 or table.dim() != 4:
        raise ValueError(f"label_table_add: conv_out [B, O, H, W] and table [B, O, R, S] "
                         f"must be 4-D, got {tuple(conv_out.shape)} and {tuple(table.shape)}")
    if conv_out.shape[:2] != table.shape[:2]:
        raise ValueError(f"label_table_add: conv_out {tuple(conv_out.shape)} and table "
                         f"{tuple(table.shape)} disagree on [B, O]")
    if table.dtype != conv_out.dtype:
        raise TypeError(f"label_table_add: table dtype {table.dtype} differs from conv_out's "
                        f"{conv_out.dtype}")
    _check_ids(row_ids, conv_out.shape[2], "row_ids")
    _check_ids(col_ids, conv_out.shape[3], "col_ids")


def _check_ids(ids: Tensor, length: int, name: str) -> None:
    if ids.dtype != torch.int64 or ids.dim() != 1 or ids.shape[0] != length:
        raise ValueError(f"label tables: {name} must be int64 [{length}], "
                         f"got {ids.dtype} {tuple(ids.shape)}")


def label_table_add_reference(conv_out: Tensor, table: Tensor, row_ids: Tensor,
                              col_ids: Tensor) -> Tensor:
    """``conv_out + table[:, :, row_ids][:, :, :, col_ids]`` (differentiable by autograd)."""
    _check_add_args(conv_out, table, row_ids, col_ids)
    return conv_out + table[:, :, row_ids][:, :, :, col_ids]


def label_table_grad_reference(grad: Tensor, row_ids: Tensor, col_ids: Tensor,
                               num_rows: int, num_cols: int) -> Tensor:
    """Segmented sum ``[B, O, R, S]``: index_add over rows, then over columns.

    Half types are summed in float32 and rounded once.
    """
    _check_ids(row_ids, grad.shape[2], "row_ids")
    _check_ids(col_ids, grad.shape[3], "col_ids")
    g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
    b, o, _, w = g.shape
    rows = g.new_zeros((b, o, num_rows, w)).index_add_(2, row_ids, g)
    out = g.new_zeros((b, o, num_rows, num_cols)).index_add_(3, col_ids, rows)
    return out.to(grad.dtype)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd of the registered C++ ops

_HAS_KERNEL = _extension.has_op("label_table_add") and _extension.has_op("label_table_grad")


def _table_add_setup_context(ctx, inputs, output):
    _, table, row_ids, col_ids = inputs
    ctx.save_for_backward(row_ids, col_ids)
    ctx.table_shape = (table.shape[2], table.shape[3])


def _table_add_backward(ctx, grad):
    row_ids, col_ids = ctx.saved_tensors
    num_rows, num_cols = ctx.table_shape
    return grad, label_table_grad(grad, row_ids, col_ids, num_rows, num_cols), None, None


def _table_grad_setup_context(ctx, inputs, output):
    _, row_ids, col_ids, _, _ = inputs
    ctx.save_for_backward(row_ids, col_ids)


def _table_grad_backward(ctx, grad_table):
    # label_table_grad is linear in its input; its adjoint gives every position the table
    # entry of its (row pattern, column pattern). This makes LabelConcatConv2d twice
    # differentiable (a double backward through label_table_add's backward).
    row_ids, col_ids = ctx.saved_tensors
    return grad_table.index_select(2, row_ids).index_select(3, col_ids), None, None, None, None


if _HAS_KERNEL:

    @torch.library.register_fake("vcfast::label_table_add")
    def _label_table_add_fake(conv_out, table, row_ids, col_ids):
        torch._check(conv_out.dim() == 4 and table.dim() == 4,
                     lambda: "vcfast::label_table_add: conv_out and table must be 4-D")
        return torch.empty_like(conv_out, memory_format=torch.contiguous_format)

    @torch.library.register_fake("vcfast::label_table_grad")
    def _label_table_grad_fake(grad, row_ids, col_ids, num_rows, num_cols):
        torch._check(grad.dim() == 4, lambda: "vcfast::label_table_grad: grad must be 4-D")
        return grad.new_empty((grad.shape[0], grad.shape[1], num_rows, num_cols))

    torch.library.register_autograd("vcfast::label_table_add", _table_add_backward,
                                    setup_context=_table_add_setup_context)
    torch.library.register_autograd("vcfast::label_table_grad", _table_grad_backward,
                                    setup_context=_table_grad_setup_context)


def _use_kernel(t: Tensor) -> bool:
    return _HAS_KERNEL and _extension.EXTENSION_LOADED and t.device.type == "cpu"


def _use_triton(t: Tensor) -> bool:
    if t.device.type != "cuda" or not _extension.triton_available():
        return False
    from vcfast.ops import label_conv_triton  # lazy: Triton kernels decorate at first import

    return label_conv_triton.TRITON_IMPORT_ERROR is None


def label_table_add(conv_out: Tensor, table: Tensor, row_ids: Tensor, col_ids: Tensor) -> Tensor:
    """``conv_out + table[:, :, row_ids][:, :, :, col_ids]``, differentiable for both tensors."""
    _check_add_args(conv_out, table, row_ids, col_ids)
    if _use_kernel(conv_out):
        return torch.ops.vcfast.label_table_add(conv_out, table, row_ids, col_ids)
    if _use_triton(conv_out):
        from vcfast.ops.label_conv_triton import label_table_add_triton

        return label_table_add_triton(conv_out, table, row_ids, col_ids)
    return label_table_add_reference(conv_out, table, row_ids, col_ids)


def label_table_grad(grad: Tensor, row_ids: Tensor, col_ids: Tensor, num_rows: int,
                     num_cols: int) -> Tensor:
    """Segmented sum of ``grad`` [B, O, H, W] per (row pattern, column pattern): [B, O, R, S]."""
    if _use_kernel(grad):
        return torch.ops.vcfast.label_table_grad(grad, row_ids, col_ids, num_rows, num_cols)
    if _use_triton(grad):
        from vcfast.ops.label_conv_triton import label_table_grad_triton

        return label_table_grad_triton(grad, row_ids, col_ids, num_rows, num_cols)
    return label_table_grad_reference(grad, row_ids, col_ids, num_rows, num_cols)
