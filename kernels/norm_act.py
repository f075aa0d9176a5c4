"""Triton kernels of the fused instance-norm + ReLU ops (vcfast.ops.norm_act_triton launches them).

Semantics are those of the plain-PyTorch references in ``vcfast/ops/norm_act.py``.
Layout: z / a / grad_a / grad_z are contiguous [N * C, HW] (one row per (sample, channel));
mean / rstd are [N * C] and gamma / beta [C], all in the accumulation dtype (float32, or
float64 for float64 z); the arithmetic is done in that dtype and rounded once on store.

* ``_norm_relu_fwd_kernel``: grid (N * C, cdiv(HW, BLOCK)); a = relu(xhat * gamma + beta),
  xhat = (z - mean) * rstd (same expression order as the reference).
* ``_norm_relu_bwd_kernel``: grid (N * C,); one program per row makes two passes over it:
  the row sums sum_g = sum(g) and sum_gx = sum(g * xhat) with g = grad_a * (y > 0)
  (stored per row: the host reduces them over the batch in a fixed order, so grad_gamma /
  grad_beta are deterministic, no atomics), then grad_z = (gamma * rstd) *
  (g - sum_g / HW - xhat * (sum_gx / HW)) with batch statistics (``BATCH_STATS``), or
  (gamma * rstd) * g with running statistics.

Rounding: the launcher compiles both kernels with ``enable_fp_fusion=False``. Triton otherwise
contracts ``xhat * gamma + beta`` (and ``xhat * mean_gx`` in the backward) into one FMA, rounded
once instead of twice, so on a GPU y could differ from the reference's by an ulp and flip the
ReLU mask for elements next to 0 (csrc/include/vcfast/norm_act_math.h keeps the same order).
NaN: the forward keeps it (relu(NaN) = NaN); the backward's mask ``y > 0`` is false for NaN, so
its gradient is 0, as in the reference.

bfloat16 under the interpreter: the Triton 3.8 interpreter truncates float32 -> bfloat16 (the
compiled kernels round to nearest even), so the host sets ``EMULATE_BF16_RNE`` there and
_to_output rounds with integer arithmetic (same trick as kernels/gradient_penalty.py).
Offsets are int64 (program ids widened before multiplying).
"""

import triton
import triton.language as tl

from vcfast.kernels._common import to_output as _to_output


@triton.jit
def _norm_relu_fwd_kernel(
    z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, a_ptr, C, HW,
    EMULATE_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    c = row % C
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    gamma = tl.load(gamma_ptr + c)
    beta = tl.load(beta_ptr + c)
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < HW
    base = row * HW
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(mean.dtype)
    xhat = (z - mean) * rstd
    y = xhat * gamma + beta
    # relu that keeps NaN (and -0.0) like torch.relu: `y > 0 ? y : 0` would turn NaN into 0.
    a = tl.where(y < 0.0, 0.0, y)
    tl.store(a_ptr + base + offs, _to_output(a, a_ptr, EMULATE_BF16_RNE), mask=mask)


@triton.jit
def _norm_relu_bwd_kernel(
    grad_a_ptr, z_ptr, mean_ptr, rstd_ptr, gamma_ptr, beta_ptr, grad_z_ptr,
    sum_g_ptr, sum_gx_ptr, C, HW,
    BATCH_STATS: tl.constexpr, EMULATE_BF16_RNE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = row % C
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    gamma = tl.load(gamma_ptr + c)
    beta = tl.load(beta_ptr + c)
    base = row * HW
    lane = tl.arange(0, BLOCK).to(tl.int64)
    acc_g = tl.zeros((BLOCK,), dtype=mean.dtype)
    acc_gx = tl.zeros((BLOCK,), dtype=mean.dtype)
    for start in range(0, HW, BLOCK):
        offs = start + lane
        mask = offs < HW
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(mean.dtype)
        ga = tl.load(grad_a_ptr + base + offs, mask=mask, other=0.0).to(mean.dtype)
        xhat = (z - mean) * rstd
        y = xhat * gamma + beta
        g = tl.where((y > 0.0) & mask, ga, 0.0)
        acc_g += g
        acc_gx += g * xhat
    sum_g = tl.sum(acc_g, axis=0)
    sum_gx = tl.sum(acc_gx, axis=0)
    tl.store(sum_g_ptr + row, sum_g)
    tl.store(sum_gx_ptr + row, sum_gx)
    scale = gamma * rstd
    mean_g = sum_g / HW
    mean_gx = sum_gx / HW
    for start in range(0, HW, BLOCK):
        offs = start + lane
        mask = offs < HW
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(mean.dtype)
        ga = tl.load(grad_a_ptr + base + offs, mask=mask, other=0.0).to(mean.dtype)
        xhat = (z - mean) * rstd
        y = xhat * gamma + beta
        g = tl.where(y > 0.0, ga, 0.0)
        if BATCH_STATS:
            gz = scale * (g - mean_g - xhat * mean_gx)
        else:
            gz = scale * g
        tl.store(grad_z_ptr + base + offs, _to_output(gz, grad_z_ptr, EMULATE_BF16_RNE),
                 mask=mask)
