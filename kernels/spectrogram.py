"""Triton kernels of the fused log-spectrogram (vcfast.ops.spectrogram_triton launches them).

Design
------
The op keeps only a band of the rfft bins (stargan_vc: 256 of the 513 bins of a 1024-point
FFT), so instead of an FFT followed by a gather, the DFT of the kept bins is computed as a
GEMM on tensor cores:

    frames[M = B * n_frames, K = n_fft]  @  basis[K, n_bins]

where row m = (b, f) of ``frames`` is read straight from the waveform at address
``b * stride_b + (f * hop + n) * stride_t`` (the frames are never materialised), and the
window is folded into the two bases, built once in float64 by the host code:

    basis_cos[n, k] =  window[n] * cos(2*pi*(bin_lo + k)*n / n_fft)     -> re
    basis_sin[n, k] = -window[n] * sin(2*pi*(bin_lo + k)*n / n_fft)     -> im

The whole per-bin chain (magnitude, power, log offset/floor, log, affine normalisation,
clip; see csrc/include/vcfast/spectrogram_math.h) runs in the GEMM epilogue on the fp32
(fp64 for fp64 input) accumulators, so no spectrum-sized tensor ever exists: the forward
reads the waveform and writes the output, nothing else.

The backward recomputes re/im with the same GEMM (only the waveform is saved), maps dL/dy
to (dL/dre, dL/dim) in the epilogue and writes them to two [M, n_bins] buffers; a second
GEMM forms dL/dframes = g_re @ basis_cos^T + g_im @ basis_sin^T ([M, n_fft], one tile at a
time, never stored) and overlap-adds it into the waveform gradient with ``tl.atomic_add``
(each sample is hit by ceil(n_fft / hop) frames: 4 for stargan_vc, so contention is low; the
float32 sum order, hence the last bits, is not deterministic). Under
``torch.use_deterministic_algorithms(True)`` the kernel stores dL/dframes ([M, n_fft], the one
spectrum-sized buffer of that mode) and the host adds the frames up in a fixed order.

float32 square roots and divisions are IEEE round-to-nearest (``tl.sqrt_rn``, ``tl.div_rn``):
``tl.sqrt`` and ``/`` compile to ``sqrt.approx.ftz.f32`` and ``div.full.f32`` (approximate, and
flushing subnormals to zero), which would make quiet bins (|X| ~ 1e-20, squared subnormal) and
the backward's 1/|X| differ from the CPU backends and the reference by more than rounding.
tests/test_kernel_ptx.py checks the sm_90 PTX. (``tl.log`` / ``tl.exp`` are libdevice calls.)

Scalars arrive in a small ``params`` tensor of the compute dtype (Triton passes Python
floats as fp32, which would round e.g. log_floor=1e-3 in the float64 path):
    params = [magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi]

float64: ``tl.dot`` accepts float64 operands with input_precision="ieee" (the interpreter
computes it in numpy float64; on NVIDIA GPUs it lowers to DMMA on sm80+/FMA elsewhere), so
float64 goes through the same kernels with float64 accumulators and ignores ``PRECISION``.

All address arithmetic is int64 (program ids and offsets are widened before they are
multiplied by strides), so waveforms with more than 2**31 elements are safe.
"""

import triton
import triton.language as tl

# PRECISION codes (constexpr): how the GEMM tiles go through tl.dot for float32 input.
PRECISION_IEEE = 0  # fp32 operands, input_precision="ieee" (fp32-accurate)
PRECISION_TF32 = 1  # fp32 operands, input_precision="tf32"
PRECISION_BF16 = 2  # operands rounded to bf16, fp32 accumulation
# Same numbers as PRECISION_BF16 for the Triton interpreter, whose tl.dot multiplies the raw
# uint16 storage of bf16 operands (Triton 3.8 interpreter bug): the operands are rounded to
# bf16 and widened back to fp32, and the fp32 dot of those is exact per product, like the
# bf16 tensor-core MMA with fp32 accumulation. The host picks it only under TRITON_INTERPRET.
PRECISION_BF16_EMULATED = 3

# POWER_MODE codes (constexpr): s = m ** power.
POWER_ONE = 1  # s = m
POWER_TWO = 2  # s = m * m
POWER_GENERAL = 0  # s = exp(power * ln m)  (m = 0 gives exp(-inf) = 0 for power > 0)


@triton.jit
def _dot_acc(a, b, acc, PRECISION: tl.constexpr, IS_FP64: tl.constexpr):
    """acc + a @ b with the requested operand precision (float64 always exact "ieee")."""
    if IS_FP64:
        # out_dtype must be named: Triton 3.6 defaults it to float32 whatever acc is (and
        # then rejects the float64 acc); 3.8 takes acc's type.
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    elif PRECISION == 3:
        acc = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                     input_precision="ieee")
    elif PRECISION == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PRECISION == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _dft_tile(wave_ptr, cos_ptr, sin_ptr, row_base, m_mask, offs_n, n_mask, K, NB, stride_wt,
              PRECISION: tl.constexpr, IS_FP64: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(re, im)[m, k] = sum_n wave[row_base[m] + n*stride_wt] * basis_{cos,sin}[n, k], n < K.

    row_base is the int64 address of frame m's first sample; basis_* are [K, NB] row-major.
    """
    if IS_FP64:
        acc_re = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        acc_im = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc_re = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_im = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = offs_k < K
        a = tl.load(wave_ptr + row_base[:, None] + offs_k[None, :] * stride_wt,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b_off = offs_k[:, None] * NB + offs_n[None, :]
        b_mask = k_mask[:, None] & n_mask[None, :]
        bc = tl.load(cos_ptr + b_off, mask=b_mask, other=0.0)
        bs = tl.load(sin_ptr + b_off, mask=b_mask, other=0.0)
        acc_re = _dot_acc(a, bc, acc_re, PRECISION, IS_FP64)
        acc_im = _dot_acc(a, bs, acc_im, PRECISION, IS_FP64)
    return acc_re, acc_im


@triton.jit
def _sqrt_rn(x, IS_FP64: tl.constexpr):
    # tl.sqrt_rn takes float32 only; float64 sqrt has no approximate form (sqrt.rn.f64).
    if IS_FP64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _div_rn(x, y, IS_FP64: tl.constexpr):
    # tl.div_rn takes float32 only; float64 division is always div.rn.f64.
    if IS_FP64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r


@triton.jit
def _power(m, power, POWER_MODE: tl.constexpr):
    if POWER_MODE == 1:
        s = m
    elif POWER_MODE == 2:
        s = m * m
    else:
        s = tl.exp(power * tl.log(m))
    return s


@triton.jit
def _log_spectrogram_fwd_kernel(
    wave_ptr, cos_ptr, sin_ptr, shift_ptr, scale_ptr, params_ptr, out_ptr,
    M, n_frames, hop, K, NB,
    stride_wb, stride_wt, stride_ob, stride_ok, stride_of,
    POWER_MODE: tl.constexpr, PRECISION: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward: one [BLOCK_M frames x BLOCK_N bins] tile of the output.

    For m = b * n_frames + f and kept bin k (absolute bin bin_lo + k):
        re = sum_n wave[b, f*hop + n] * basis_cos[n, k]      (window folded into the basis)
        im = sum_n wave[b, f*hop + n] * basis_sin[n, k]
        s  = (sqrt(re^2 + im^2) / magnitude_scale) ** power
        u  = s + log_offset
        v  = log_floor if u < log_floor else u               (NaN u stays NaN)
        z  = (ln v - shift[k]) * scale[k]
        out[b, k, f] = clip_lo if z < clip_lo else (clip_hi if z > clip_hi else z)
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < NB
    b = offs_m // n_frames
    f = offs_m % n_frames
    row_base = b * stride_wb + f * hop * stride_wt

    re, im = _dft_tile(wave_ptr, cos_ptr, sin_ptr, row_base, m_mask, offs_n, n_mask, K, NB,
                       stride_wt, PRECISION, IS_FP64, BLOCK_M, BLOCK_N, BLOCK_K)

    magnitude_scale = tl.load(params_ptr + 0)
    power = tl.load(params_ptr + 1)
    log_offset = tl.load(params_ptr + 2)
    log_floor = tl.load(params_ptr + 3)
    clip_lo = tl.load(params_ptr + 4)
    clip_hi = tl.load(params_ptr + 5)
    shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=1.0)

    m = _div_rn(_sqrt_rn(re * re + im * im, IS_FP64), magnitude_scale, IS_FP64)
    u = _power(m, power, POWER_MODE) + log_offset
    v = tl.where(u < log_floor, log_floor, u)
    z = (tl.log(v) - shift[None, :]) * scale[None, :]
    y = tl.where(z < clip_lo, clip_lo, tl.where(z > clip_hi, clip_hi, z))

    out_off = b[:, None] * stride_ob + offs_n[None, :] * stride_ok + f[:, None] * stride_of
    tl.store(out_ptr + out_off, y, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _log_spectrogram_bwd_spec_kernel(
    wave_ptr, cos_ptr, sin_ptr, shift_ptr, scale_ptr, params_ptr, grad_ptr, gre_ptr, gim_ptr,
    M, n_frames, hop, K, NB,
    stride_wb, stride_wt, stride_gb, stride_gk, stride_gf,
    POWER_MODE: tl.constexpr, HAS_CLIP: tl.constexpr, PRECISION: tl.constexpr,
    IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward step 1: dL/dy -> (dL/dre, dL/dim) for one [BLOCK_M x BLOCK_N] tile.

    re, im are recomputed exactly as in the forward; with g = grad[b, k, f], |X| = sqrt(re^2+im^2),
    m = |X| / magnitude_scale, u = m**power + log_offset, v = max(u, log_floor),
    z = (ln v - shift[k]) * scale[k]:
        pass  = (clip_lo <= z <= clip_hi  or no clip)  and  u >= log_floor  and  |X| != 0
        g_abs = g * scale[k] / v * power * m**(power-1) / magnitude_scale
        g_re[m, k] = pass ? g_abs * re / |X| : 0
        g_im[m, k] = pass ? g_abs * im / |X| : 0
    (the subgradient conventions of torch.clamp, torch.clamp_min and torch.abs).
    g_re, g_im are row-major [M, NB].
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < NB
    b = offs_m // n_frames
    f = offs_m % n_frames
    row_base = b * stride_wb + f * hop * stride_wt
    tile_mask = m_mask[:, None] & n_mask[None, :]

    re, im = _dft_tile(wave_ptr, cos_ptr, sin_ptr, row_base, m_mask, offs_n, n_mask, K, NB,
                       stride_wt, PRECISION, IS_FP64, BLOCK_M, BLOCK_N, BLOCK_K)

    magnitude_scale = tl.load(params_ptr + 0)
    power = tl.load(params_ptr + 1)
    log_offset = tl.load(params_ptr + 2)
    log_floor = tl.load(params_ptr + 3)
    shift = tl.load(shift_ptr + offs_n, mask=n_mask, other=0.0)
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=1.0)
    g = tl.load(grad_ptr + b[:, None] * stride_gb + offs_n[None, :] * stride_gk
                + f[:, None] * stride_gf, mask=tile_mask, other=0.0)

    abs_x = _sqrt_rn(re * re + im * im, IS_FP64)
    m = _div_rn(abs_x, magnitude_scale, IS_FP64)
    u = _power(m, power, POWER_MODE) + log_offset
    v = tl.where(u < log_floor, log_floor, u)
    passes = (u >= log_floor) & (abs_x != 0.0)
    if HAS_CLIP:
        clip_lo = tl.load(params_ptr + 4)
        clip_hi = tl.load(params_ptr + 5)
        z = (tl.log(v) - shift[None, :]) * scale[None, :]
        passes = passes & (z >= clip_lo) & (z <= clip_hi)
    if POWER_MODE == 1:
        g_abs = _div_rn(_div_rn(g * scale[None, :], v, IS_FP64), magnitude_scale, IS_FP64)
    elif POWER_MODE == 2:
        g_abs = _div_rn(_div_rn(g * scale[None, :], v, IS_FP64) * (2.0 * m), magnitude_scale,
                        IS_FP64)
    else:
        dpow = power * tl.exp((power - 1.0) * tl.log(m))  # m = 0 is masked out below
        g_abs = _div_rn(_div_rn(g * scale[None, :], v, IS_FP64) * dpow, magnitude_scale, IS_FP64)
    safe_abs = tl.where(passes, abs_x, 1.0)
    g_re = tl.where(passes, _div_rn(g_abs * re, safe_abs, IS_FP64), 0.0)
    g_im = tl.where(passes, _div_rn(g_abs * im, safe_abs, IS_FP64), 0.0)

    buf_off = offs_m[:, None] * NB + offs_n[None, :]
    tl.store(gre_ptr + buf_off, g_re, mask=tile_mask)
    tl.store(gim_ptr + buf_off, g_im, mask=tile_mask)


@triton.jit
def _log_spectrogram_bwd_overlap_add_kernel(
    gre_ptr, gim_ptr, cos_t_ptr, sin_t_ptr, grad_wave_ptr,
    M, n_frames, hop, K, NB, T,
    PRECISION: tl.constexpr, IS_FP64: tl.constexpr, STORE_FRAMES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward step 2: a [BLOCK_M frames x BLOCK_N samples] tile of dL/dframes, overlap-added.

    With STORE_FRAMES (torch.use_deterministic_algorithms(True)) the tile is stored instead into
    grad_wave_ptr taken as a contiguous [M, K] frames buffer, and the host overlap-adds the
    frames in a fixed order: float atomics add in whatever order the programs run.

    Since re = frame @ basis_cos and im = frame @ basis_sin (window folded in, basis_sin
    carrying the minus sign),
        dL/dframe[m, n] = sum_k g_re[m, k] * basis_cos[n, k] + g_im[m, k] * basis_sin[n, k]
    and, for m = b * n_frames + f, grad_wave[b, f*hop + n] += dL/dframe[m, n]  (tl.atomic_add;
    grad_wave is a zero-initialised contiguous [B, T] buffer). cos_t / sin_t are the bases
    transposed to row-major [NB, K], so the B-operand tiles load contiguously along n.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # sample within the frame
    m_mask = offs_m < M
    n_mask = offs_n < K
    b = offs_m // n_frames
    f = offs_m % n_frames

    if IS_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, NB, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # kept bin
        k_mask = offs_k < NB
        a_off = offs_m[:, None] * NB + offs_k[None, :]
        a_mask = m_mask[:, None] & k_mask[None, :]
        a_re = tl.load(gre_ptr + a_off, mask=a_mask, other=0.0)
        a_im = tl.load(gim_ptr + a_off, mask=a_mask, other=0.0)
        # basis^T tile [BLOCK_K bins, BLOCK_N samples] of the row-major [NB, K] transposed basis.
        bt_off = offs_k[:, None] * K + offs_n[None, :]
        bt_mask = k_mask[:, None] & n_mask[None, :]
        bc = tl.load(cos_t_ptr + bt_off, mask=bt_mask, other=0.0)
        bs = tl.load(sin_t_ptr + bt_off, mask=bt_mask, other=0.0)
        acc = _dot_acc(a_re, bc, acc, PRECISION, IS_FP64)
        acc = _dot_acc(a_im, bs, acc, PRECISION, IS_FP64)

    tile_mask = m_mask[:, None] & n_mask[None, :]
    if STORE_FRAMES:
        tl.store(grad_wave_ptr + offs_m[:, None] * K + offs_n[None, :], acc, mask=tile_mask)
    else:
        dst = b[:, None] * T + f[:, None] * hop + offs_n[None, :]
        tl.atomic_add(grad_wave_ptr + dst, acc, mask=tile_mask, sem="relaxed")
