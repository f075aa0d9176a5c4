"""Triton kernels of the slope-bit ops (vcfast.ops.gradient_penalty_triton launches them).

Semantics are those of ``vcfast/ops/slope_bits.py`` (plain-PyTorch references) and
``csrc/cpu/gradient_penalty_cpu.cpp``:

Bit layout: element ``e`` of the flattened contiguous tensor is bit ``e % 8`` of byte
``e // 8``; ``n`` elements pack into ``ceil(n / 8)`` uint8 bytes. The elementwise kernels
work in whole bytes: a program owns BLOCK bytes = 8 * BLOCK elements, seen as a [BLOCK, 8]
tile (row r = byte, column i = bit i), so no two programs ever write the same byte and no
atomics are needed. Padding bits of the last byte (elements >= n) are 0.

Arithmetic: float16 / bfloat16 are computed in float32 and rounded once on store (like
PyTorch's opmath and the C++ kernels); float32 in float32; float64 in float64. The slope is a
Python float: Triton passes those as float32, which is exactly what PyTorch's ``z * slope``
uses for float32 and half tensors, but would round e.g. 0.01 for float64, so float64 kernels
(``IS_FP64``) read the slope from a 1-element float64 tensor (``slope_ptr``) instead.

bfloat16 rounding under the interpreter: the Triton 3.8 interpreter converts float32 to
bfloat16 by truncating the mantissa (compiled kernels round to nearest even, like PyTorch), so
the host sets ``EMULATE_BF16_RNE`` only when the kernels are interpreted and the output is
bfloat16; _to_output then rounds to nearest even with integer arithmetic on the float32 bits
(NaN kept NaN), which gives the compiled kernels' (and PyTorch's) numbers.

All offsets are int64 (program ids are widened before multiplying), so tensors with more
than 2**31 elements are safe.
"""

import triton
import triton.language as tl

from vcfast.kernels._common import to_output as _to_output


@triton.jit
def _load_slope(slope, slope_ptr, IS_FP64: tl.constexpr):
    if IS_FP64:
        s = tl.load(slope_ptr)
    else:
        s = slope
    return s


@triton.jit
def _leaky_relu_with_bits_kernel(
    z_ptr, out_ptr, bits_ptr, slope, slope_ptr, n, n_bytes,
    IS_FP64: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[e] = z[e] if z[e] > 0 else z[e] * slope;  bits[b] = sum_i (z[8b + i] > 0) << i.

    Program p handles bytes [p * BLOCK, (p + 1) * BLOCK), i.e. elements
    e = 8 * b + i for i in 0..7. Elements e >= n are masked (their bit is 0); z = 0 (and NaN)
    is not > 0, so it gets the negative slope and bit 0 (PyTorch's LeakyReLU convention).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # [BLOCK] byte indices
    shifts = tl.arange(0, 8)  # [8] bit positions
    offs_e = offs_b[:, None] * 8 + shifts[None, :].to(tl.int64)  # [BLOCK, 8] element indices
    e_mask = offs_e < n
    z = tl.load(z_ptr + offs_e, mask=e_mask, other=0.0)
    if IS_FP64:
        v = z
    else:
        v = z.to(tl.float32)
    s = _load_slope(slope, slope_ptr, IS_FP64)
    positive = v > 0.0
    out = _to_output(tl.where(positive, v, v * s), out_ptr, EMULATE_BF16_RNE)
    tl.store(out_ptr + offs_e, out, mask=e_mask)
    packed = tl.sum(positive.to(tl.int32) << shifts[None, :], axis=1)  # [BLOCK], 0..255
    tl.store(bits_ptr + offs_b, packed.to(tl.uint8), mask=offs_b < n_bytes)


@triton.jit
def _scale_by_slope_bits_kernel(
    x_ptr, bits_ptr, out_ptr, slope, slope_ptr, n, n_bytes,
    IS_FP64: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[e] = x[e] if bit (e % 8) of bits[e // 8] is set else x[e] * slope.

    Same [BLOCK bytes, 8 bits] tiling as _leaky_relu_with_bits_kernel; only the first
    ceil(n / 8) bytes of ``bits`` are read.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_b = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    shifts = tl.arange(0, 8)
    offs_e = offs_b[:, None] * 8 + shifts[None, :].to(tl.int64)
    e_mask = offs_e < n
    packed = tl.load(bits_ptr + offs_b, mask=offs_b < n_bytes, other=0).to(tl.int32)
    positive = ((packed[:, None] >> shifts[None, :]) & 1) != 0  # [BLOCK, 8]
    x = tl.load(x_ptr + offs_e, mask=e_mask, other=0.0)
    if IS_FP64:
        v = x
    else:
        v = x.to(tl.float32)
    s = _load_slope(slope, slope_ptr, IS_FP64)
    out = _to_output(tl.where(positive, v, v * s), out_ptr, EMULATE_BF16_RNE)
    tl.store(out_ptr + offs_e, out, mask=e_mask)


@triton.jit
def _penalty_sumsq_kernel(
    g_ptr, partial_ptr, per_sample, chunk, n_chunks,
    IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """partial[i, c] = sum_{j in chunk c of sample i} g[i, j]^2.

    g is contiguous [N, per_sample]; program p is (sample i, chunk c) = divmod(p, n_chunks),
    chunk c covers j in [c * chunk, min((c + 1) * chunk, per_sample)) (``chunk`` is a
    multiple of BLOCK) and is summed in BLOCK-wide vectors. Accumulation is float32
    (float64 for float64 g); partial is [N, n_chunks] of that dtype, and the host sums each
    row in a fixed order, so the result is deterministic (no atomics).
    """
    pid = tl.program_id(0).to(tl.int64)
    sample = pid // n_chunks
    c = pid % n_chunks
    row = g_ptr + sample * per_sample
    start = c * chunk
    offs = tl.arange(0, BLOCK).to(tl.int64)
    if IS_FP64:
        acc = tl.zeros((BLOCK,), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, chunk, BLOCK):
        j = start + k + offs
        v = tl.load(row + j, mask=j < per_sample, other=0.0)
        if IS_FP64:
            w = v
        else:
            w = v.to(tl.float32)
        acc += w * w
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _penalty_scale_kernel(
    g_ptr, coeff_ptr, u_ptr, per_sample, n_chunks,
    IS_FP64: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr,
):
    """u[i, j] = g[i, j] * coeff[i] for j in block c of sample i, (i, c) = divmod(pid, n_chunks).

    coeff[i] = weight * 2 * (n_i - target) / n_i / N (0 where n_i = 0) is computed by the host
    from the sums of squares, in float32 (float64 for float64 g); u is stored in g's dtype.
    """
    pid = tl.program_id(0).to(tl.int64)
    sample = pid // n_chunks
    c = pid % n_chunks
    j = c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < per_sample
    base = sample * per_sample
    coeff = tl.load(coeff_ptr + sample)
    v = tl.load(g_ptr + base + j, mask=mask, other=0.0)
    if not IS_FP64:
        v = v.to(tl.float32)
    tl.store(u_ptr + base + j, _to_output(v * coeff, u_ptr, EMULATE_BF16_RNE), mask=mask)
