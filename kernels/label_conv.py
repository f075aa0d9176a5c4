"""Triton kernels of the label-table ops (vcfast.ops.label_conv_triton launches them).

Semantics: ``vcfast/ops/label_conv.py`` (references) and ``csrc/cpu/label_conv_cpu.cpp``.

* ``_label_table_add_kernel``: out[p, i, j] = conv[p, i, j] + table[p, row_ids[i], col_ids[j]]
  over planes p = b * O + o; grid (planes, cdiv(H * W, BLOCK)). Computed in float32 (float64
  for float64) and rounded once; bfloat16 output under the interpreter is rounded to nearest
  even by hand (``EMULATE_BF16_RNE``: the Triton 3.8 interpreter truncates).
* Segmented sum (backward), two deterministic stages, no atomics:
  ``_label_grad_cols_kernel``: tmp[p, i, s] = sum_{j: col_ids[j] == s} grad[p, i, j], one program
  per (plane, row), one-hot reduction over column blocks;
  ``_label_grad_rows_kernel``: out[p, r, s] = sum_{i: row_ids[i] == r} tmp[p, i, s], one program
  per plane. tmp / accumulators are float32 (float64 for float64).
Offsets are int64.
"""

import triton
import triton.language as tl

from vcfast.kernels._common import to_output as _to_output


@triton.jit
def _label_table_add_kernel(conv_ptr, table_ptr, row_ptr, col_ptr, out_ptr, H, W, RS, S,
                            IS_FP64: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
                            BLOCK: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    hw = H * W
    mask = offs < hw
    i = offs // W
    j = offs % W
    r = tl.load(row_ptr + i, mask=mask, other=0)
    s = tl.load(col_ptr + j, mask=mask, other=0)
    base = plane * hw
    if IS_FP64:
        v = tl.load(conv_ptr + base + offs, mask=mask, other=0.0).to(tl.float64)
        t = tl.load(table_ptr + plane * RS + r * S + s, mask=mask, other=0.0).to(tl.float64)
    else:
        v = tl.load(conv_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(table_ptr + plane * RS + r * S + s, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + offs, _to_output(v + t, out_ptr, EMULATE_BF16_RNE), mask=mask)


@triton.jit
def _label_grad_cols_kernel(grad_ptr, col_ptr, tmp_ptr, W, S,
                            IS_FP64: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # plane * H + i
    s_idx = tl.arange(0, BLOCK_S)
    if IS_FP64:
        acc = tl.zeros((BLOCK_S,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for j0 in range(0, W, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        m = js < W
        g = tl.load(grad_ptr + row * W + js, mask=m, other=0.0).to(acc.dtype)
        s = tl.load(col_ptr + js, mask=m, other=-1)
        hit = s[None, :] == s_idx[:, None]
        acc += tl.sum(tl.where(hit, g[None, :], 0.0), axis=1)
    tl.store(tmp_ptr + row * S + s_idx, acc, mask=s_idx < S)


@triton.jit
def _label_grad_rows_kernel(tmp_ptr, row_ptr, out_ptr, H, R, S,
                            IS_FP64: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr,
                            BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    r_idx = tl.arange(0, BLOCK_R)
    s_idx = tl.arange(0, BLOCK_S)
    s_mask = s_idx < S
    if IS_FP64:
        acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
    for i0 in range(0, H, BLOCK_I):
        is_ = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        m = is_ < H
        t = tl.load(tmp_ptr + (plane * H + is_[:, None]) * S + s_idx[None, :],
                    mask=m[:, None] & s_mask[None, :], other=0.0).to(acc.dtype)
        r = tl.load(row_ptr + is_, mask=m, other=-1)
        hit = r[None, :] == r_idx[:, None]                             # [BLOCK_R, BLOCK_I]
        acc += tl.sum(tl.where(hit[:, :, None], t[None, :, :], 0.0), axis=1)
    out_offs = plane * R * S + r_idx[:, None] * S + s_idx[None, :]
    tl.store(out_ptr + out_offs, _to_output(acc, out_ptr, EMULATE_BF16_RNE),
             mask=(r_idx[:, None] < R) & s_mask[None, :])
