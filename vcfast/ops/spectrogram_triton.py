"""Triton backend of the fused log-spectrogram (``vcfast.log_spectrogram(..., backend="triton")``).

Why a GEMM and not an FFT: the op keeps a band of bins (stargan_vc: 256 of the 513 rfft bins
of a 1024-point frame), so the DFT of just those bins is a dense [B*n_frames, n_fft] x
[n_fft, n_bins] product (cos and sin halves, window folded into the basis) that runs on
tensor cores, reads frames straight out of the waveform (never materialised) and fuses the
whole per-bin chain (magnitude, power, log offset/floor, log, normalisation, clip) into its
epilogue: no spectrum-sized tensor is ever allocated, in the forward or in the backward
(except under ``torch.use_deterministic_algorithms(True)``: the backward then stores the
[B*n_frames, n_fft] frame gradients and overlap-adds them in a fixed order, where it otherwise
adds them into the waveform gradient with float atomics, whose order varies from run to run).
The kernels and their math are in ``vcfast/kernels/spectrogram.py``.

Ops (both ``torch.library.triton_op``, so torch.compile can see and fuse the kernels):

* ``vcfast::log_spectrogram_triton(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi,
  magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi, precision) -> Tensor``
* ``vcfast::log_spectrogram_triton_backward(grad, wave, window, shift, scale, ...) -> Tensor``

The forward op has an autograd formula (gradient for ``wave`` only) that saves only
``wave, window, shift, scale`` and recomputes the spectrum in the backward op.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` yields interpreter objects that
``wrap_triton`` cannot trace (it hands them back unwrapped, and launching one on a fake or
functional tensor fails), so the triton_op's traced fake/functional implementations would
break opcheck and torch.compile. In that mode the same Python implementations are
registered with ``torch.library.custom_op`` plus an explicit ``register_fake`` instead:
eager behaviour is identical, and torch.compile keeps the op as an opaque call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vcfast.ops._triton import (
    check_dot_tiles,
    check_grid,
    define_op,
    is_interpreted,
    launch_device,
    load_kernels,
    triton,
)

__all__ = ["log_spectrogram_triton", "TRITON_IMPORT_ERROR", "USES_TRITON_OP"]

_kernels, TRITON_IMPORT_ERROR = load_kernels("spectrogram")

_PRECISION_CODES = {"ieee": 0, "tf32": 1, "bf16": 2}

# Tile sizes (powers of two >= 16, as tl.dot requires). Ragged edges are masked.
_BLOCK_M = 64  # frames per tile
# bins (forward / backward step 1) or frame samples (overlap-add) per tile; at 64 the tiles
# spill registers to local memory in some precision / arch combinations (vcfast.aot:
# sm_80 bf16 forward, sm_80 ieee overlap-add, the backward's first GEMM everywhere).
_BLOCK_N = 32
_BLOCK_K = 32  # reduction: frame samples (forward) or bins (overlap-add)
_BLOCK_M_FP64 = 32
_BLOCK_N_FP64 = 32
_BLOCK_K_FP64 = 16
# At 4 warps the float32 tiles need more than 255 registers per thread and spill to local
# memory on sm_80 to sm_90 (every precision; vcfast.aot); 8 warps hold them in 124-209.
_NUM_WARPS = 8


def _kernels_interpreted() -> bool:
    return _kernels is not None and is_interpreted(_kernels._log_spectrogram_fwd_kernel)


# True: registered with torch.library.triton_op (real GPU kernels); False: custom_op fallback
# (interpreter, see the module docstring) or triton missing.
USES_TRITON_OP = _kernels is not None and not _kernels_interpreted()


# ---------------------------------------------------------------------------------------------
# Host-side helpers


def _power_mode(power: float) -> int:
    if power == 1.0:
        return 1
    if power == 2.0:
        return 2
    return 0


_TRIG_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def _not_tracing(*tensors: Tensor) -> bool:
    """True for plain eager tensors outside any tracing mode (only then is caching safe)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(type(t) is torch.Tensor for t in tensors))


def _trig(n_fft: int, bin_lo: int, bin_hi: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """float64 [n_fft, n_bins]: cos and -sin of 2*pi*(bin_lo + k)*n / n_fft.

    The phase index (n * bin) is reduced modulo n_fft in exact integer arithmetic before the
    float64 trig, so the table is accurate to ~1 ulp even for large n_fft.
    """
    n = torch.arange(n_fft, dtype=torch.int64, device=device)
    k = torch.arange(bin_lo, bin_hi, dtype=torch.int64, device=device)
    index = torch.remainder(n[:, None] * k[None, :], n_fft)
    phase = index.to(torch.float64) * (2.0 * math.pi / n_fft)
    return torch.cos(phase), -torch.sin(phase)


def _bases(window: Tensor, n_fft: int, bin_lo: int, bin_hi: int, dtype: torch.dtype
           ) -> tuple[Tensor, Tensor]:
    """(basis_cos, basis_sin), [n_fft, n_bins] contiguous in ``dtype``, window folded in.

    The window-independent trig table is cached per (n_fft, bin_lo, bin_hi, device) in eager
    mode; the window product (two small elementwise ops) is redone on every call, so a
    window changed in place is always honoured.
    """
    if _not_tracing(window):
        key = (n_fft, bin_lo, bin_hi, str(window.device))
        trig = _TRIG_CACHE.get(key)
        if trig is None:
            trig = _trig(n_fft, bin_lo, bin_hi, window.device)
            if len(_TRIG_CACHE) > 16:
                _TRIG_CACHE.clear()
            _TRIG_CACHE[key] = trig
    else:
        trig = _trig(n_fft, bin_lo, bin_hi, window.device)
    w = window.to(torch.float64)[:, None]
    return (w * trig[0]).to(dtype).contiguous(), (w * trig[1]).to(dtype).contiguous()


_PARAMS_CACHE: dict[tuple, Tensor] = {}


def _params(magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi,
            like: Tensor) -> Tensor:
    """The scalars as a [6] tensor of the compute dtype (Triton would pass floats as fp32).

    Built once per (values, dtype, device) in eager mode and cached: ``torch.tensor(...,
    device=cuda)`` copies from pageable host memory, a copy that synchronises the host with
    the GPU, on every call otherwise. The kernels only read it.
    """
    values = [float(v) for v in (magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi)]
    if not _not_tracing(like):
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    # float.hex: -0.0 and 0.0 (or two NaNs) must not share an entry by comparing equal.
    key = (tuple(v.hex() for v in values), like.dtype, str(like.device))
    params = _PARAMS_CACHE.get(key)
    if params is None:
        params = torch.tensor(values, dtype=like.dtype, device=like.device)
        if len(_PARAMS_CACHE) > 64:
            _PARAMS_CACHE.clear()
        _PARAMS_CACHE[key] = params
    return params


def _precision_code(precision: str, dtype: torch.dtype) -> int:
    if dtype == torch.float64:
        # float64 is always exact and the kernels ignore PRECISION: one code for all three
        # requests, so one compiled variant instead of three.
        return _kernels.PRECISION_IEEE
    code = _PRECISION_CODES[precision]
    if code == _kernels.PRECISION_BF16 and _kernels_interpreted():
        # The Triton 3.8 interpreter's tl.dot multiplies the raw bit patterns of bf16
        # operands; the emulated mode gives the bf16-MMA numbers (see the kernels module).
        code = _kernels.PRECISION_BF16_EMULATED
    return code


def _blocks(dtype: torch.dtype) -> tuple[int, int, int]:
    if dtype == torch.float64:
        return _BLOCK_M_FP64, _BLOCK_N_FP64, _BLOCK_K_FP64
    return _BLOCK_M, _BLOCK_N, _BLOCK_K


def _fit(block: int, n: int) -> int:
    """Shrink a tile to the problem (never below 16) so tiny problems waste less work."""
    return max(16, min(block, triton.next_power_of_2(max(n, 1))))


def _check_inputs(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi, precision) -> None:
    torch._check(wave.dim() == 2, lambda: f"wave must be [batch, samples], got {tuple(wave.shape)}")
    torch._check(wave.dtype in (torch.float32, torch.float64),
                 lambda: f"wave must be float32 or float64, got {wave.dtype}")
    n_bins = bin_hi - bin_lo
    expected = (("window", window, n_fft), ("shift", shift, n_bins), ("scale", scale, n_bins))
    for name, t, n in expected:
        torch._check(t.dim() == 1 and t.shape[0] == n,
                     lambda name=name, t=t, n=n: f"{name} must have shape [{n}], "
                                                 f"got {tuple(t.shape)}")
        torch._check(t.dtype == wave.dtype and t.device == wave.device,
                     lambda name=name, t=t: f"{name} must match wave's dtype and device, got "
                                            f"{t.dtype} on {t.device}")
    torch._check(0 <= bin_lo < bin_hi <= n_fft // 2 + 1,
                 lambda: f"need 0 <= bin_lo < bin_hi <= n_fft // 2 + 1, got {bin_lo}, {bin_hi}")
    torch._check(hop >= 1, lambda: f"hop must be >= 1, got {hop}")
    torch._check(wave.shape[1] >= n_fft,
                 lambda: f"wave has {wave.shape[1]} samples, fewer than n_fft={n_fft}")
    torch._check(precision in _PRECISION_CODES,
                 lambda: f"precision must be one of {tuple(_PRECISION_CODES)}, got {precision!r}")


# ---------------------------------------------------------------------------------------------
# Op implementations (traceable: triton_op registers them as their own fake kernels too)


def _forward_impl(wave: Tensor, window: Tensor, shift: Tensor, scale: Tensor, n_fft: int, hop: int,
                  bin_lo: int, bin_hi: int, magnitude_scale: float, power: float,
                  log_offset: float, log_floor: float, clip_lo: float, clip_hi: float,
                  precision: str) -> Tensor:
    _check_inputs(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi, precision)
    batch, samples = wave.shape
    n_frames = (samples - n_fft) // hop + 1
    n_bins = bin_hi - bin_lo
    m_rows = batch * n_frames
    out = wave.new_empty((batch, n_bins, n_frames))
    if m_rows == 0:
        return out
    basis_cos, basis_sin = _bases(window, n_fft, bin_lo, bin_hi, wave.dtype)
    params = _params(magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi, wave)
    bm, bn, bk = _blocks(wave.dtype)
    bm, bn, bk = _fit(bm, m_rows), _fit(bn, n_bins), _fit(bk, n_fft)
    grid = (triton.cdiv(m_rows, bm), triton.cdiv(n_bins, bn))
    check_dot_tiles(_FWD_NAME, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    check_grid(_FWD_NAME, grid)
    with launch_device(wave):
        torch.library.wrap_triton(_kernels._log_spectrogram_fwd_kernel)[grid](
            wave, basis_cos, basis_sin, shift.contiguous(), scale.contiguous(), params, out,
            m_rows, n_frames, hop, n_fft, n_bins,
            wave.stride(0), wave.stride(1), out.stride(0), out.stride(1), out.stride(2),
            POWER_MODE=_power_mode(power), PRECISION=_precision_code(precision, wave.dtype),
            IS_FP64=wave.dtype == torch.float64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=_NUM_WARPS,
        )
    return out


def _backward_impl(grad: Tensor, wave: Tensor, window: Tensor, shift: Tensor, scale: Tensor,
                   n_fft: int, hop: int, bin_lo: int, bin_hi: int, magnitude_scale: float,
                   power: float, log_offset: float, log_floor: float, clip_lo: float,
                   clip_hi: float, precision: str) -> Tensor:
    _check_inputs(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi, precision)
    batch, samples = wave.shape
    n_frames = (samples - n_fft) // hop + 1
    n_bins = bin_hi - bin_lo
    m_rows = batch * n_frames
    torch._check(grad.shape == (batch, n_bins, n_frames),
                 lambda: f"grad must have shape {(batch, n_bins, n_frames)}, "
                         f"got {tuple(grad.shape)}")
    torch._check(grad.dtype == wave.dtype and grad.device == wave.device,
                 lambda: "grad must match wave's dtype and device")
    # Float atomics add in whatever order the programs run: under
    # torch.use_deterministic_algorithms(True) the kernel stores the frames' gradients and
    # _overlap_add sums them in a fixed order instead.
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad_wave = torch.zeros((batch, samples), dtype=wave.dtype, device=wave.device)
    if m_rows == 0:
        return grad_wave
    basis_cos, basis_sin = _bases(window, n_fft, bin_lo, bin_hi, wave.dtype)
    params = _params(magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi, wave)
    g_re = wave.new_empty((m_rows, n_bins))
    g_im = wave.new_empty((m_rows, n_bins))
    has_clip = not (clip_lo == -math.inf and clip_hi == math.inf)
    code = _precision_code(precision, wave.dtype)
    is_fp64 = wave.dtype == torch.float64
    bm0, bn0, bk0 = _blocks(wave.dtype)

    bm, bn, bk = _fit(bm0, m_rows), _fit(bn0, n_bins), _fit(bk0, n_fft)
    grid = (triton.cdiv(m_rows, bm), triton.cdiv(n_bins, bn))
    check_dot_tiles(_BWD_NAME, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    check_grid(_BWD_NAME, grid)
    with launch_device(wave):
        torch.library.wrap_triton(_kernels._log_spectrogram_bwd_spec_kernel)[grid](
            wave, basis_cos, basis_sin, shift.contiguous(), scale.contiguous(), params, grad,
            g_re, g_im, m_rows, n_frames, hop, n_fft, n_bins,
            wave.stride(0), wave.stride(1), grad.stride(0), grad.stride(1), grad.stride(2),
            POWER_MODE=_power_mode(power), HAS_CLIP=has_clip, PRECISION=code, IS_FP64=is_fp64,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=_NUM_WARPS,
        )

    bm, bn, bk = _fit(bm0, m_rows), _fit(bn0, n_fft), _fit(bk0, n_bins)
    grid = (triton.cdiv(m_rows, bm), triton.cdiv(n_fft, bn))
    check_dot_tiles(_BWD_NAME, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    check_grid(_BWD_NAME, grid)
    # The overlap-add GEMM reads basis^T: transposed copies make its tiles load contiguously.
    cos_t, sin_t = basis_cos.t().contiguous(), basis_sin.t().contiguous()
    target = wave.new_empty((m_rows, n_fft)) if deterministic else grad_wave
    with launch_device(wave):
        torch.library.wrap_triton(_kernels._log_spectrogram_bwd_overlap_add_kernel)[grid](
            g_re, g_im, cos_t, sin_t, target, m_rows, n_frames, hop, n_fft, n_bins, samples,
            PRECISION=code, IS_FP64=is_fp64, STORE_FRAMES=deterministic, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, num_warps=_NUM_WARPS,
        )
    if deterministic:
        _overlap_add(target.view(batch, n_frames, n_fft), hop, grad_wave)
    return grad_wave


def _overlap_add(frames: Tensor, hop: int, out: Tensor) -> None:
    """out[b, f*hop + n] += frames[b, f, n] in a fixed order (deterministic, no atomics).

    Frame f's samples [r*hop, (r+1)*hop) land in hop-wide slot f + r of the output, so one
    strided add per r in 0..ceil(n_fft / hop) - 1 covers every frame at once (4 adds for
    stargan_vc); the buffer is padded to whole slots and cropped to ``out``.
    """
    batch, n_frames, n_fft = frames.shape
    n_shifts = -(-n_fft // hop)
    slots = frames.new_zeros((batch, n_frames + n_shifts, hop))
    for r in range(n_shifts):
        width = min(hop, n_fft - r * hop)
        slots[:, r:r + n_frames, :width] += frames[:, :, r * hop:r * hop + width]
    used = min(out.shape[1], slots.shape[1] * hop)
    out[:, :used] += slots.view(batch, -1)[:, :used]


def aot_launch_configs() -> list[dict]:
    """The compiled-kernel configurations the launchers above pick (read by vcfast.aot).

    Kept next to the launch code so the two change together; tests/test_aot_kernels.py checks
    that recorded launches use only configurations listed here. Each entry: ``kernel`` (name
    in vcfast.kernels.spectrogram), ``constexprs``, ``num_warps``, ``args`` (pointer argument
    -> tensor dtype; integer arguments are i32), ``largest`` (the heaviest configuration of
    the kernel, compiled on every target even when the report is cut short).

    Tiles: each kernel's default tiles per dtype, and the all-16 tiles ``_fit`` gives the
    smallest problems (tiles in between are picked too and need less than the default ones).
    PRECISION_BF16_EMULATED exists only under the interpreter, so no GPU compiles it.
    """
    if _kernels is None:
        return []
    k = _kernels
    configs = []

    def add(kernel, names, dtype, largest, **constexprs):
        configs.append({"kernel": kernel, "constexprs": constexprs, "num_warps": _NUM_WARPS,
                        "args": dict.fromkeys(names, dtype), "largest": largest})

    fwd_ptrs = ("wave_ptr", "cos_ptr", "sin_ptr", "shift_ptr", "scale_ptr", "params_ptr",
                "out_ptr")
    spec_ptrs = fwd_ptrs[:-1] + ("grad_ptr", "gre_ptr", "gim_ptr")
    oa_ptrs = ("gre_ptr", "gim_ptr", "cos_t_ptr", "sin_t_ptr", "grad_wave_ptr")
    powers = (k.POWER_GENERAL, k.POWER_ONE, k.POWER_TWO)
    for dtype in (torch.float32, torch.float64):
        is_fp64 = dtype == torch.float64
        bm, bn, bk = _blocks(dtype)
        default = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        smallest = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
        codes = (k.PRECISION_IEEE,) if is_fp64 else tuple(_PRECISION_CODES.values())
        for code in codes:
            flags = {"PRECISION": code, "IS_FP64": is_fp64}
            for power in powers:
                heaviest = power == k.POWER_GENERAL
                add("_log_spectrogram_fwd_kernel", fwd_ptrs, dtype, heaviest,
                    POWER_MODE=power, **flags, **default)
                for has_clip in (True, False):
                    add("_log_spectrogram_bwd_spec_kernel", spec_ptrs, dtype,
                        heaviest and has_clip, POWER_MODE=power, HAS_CLIP=has_clip, **flags,
                        **default)
            for store_frames in (False, True):  # True: deterministic mode
                add("_log_spectrogram_bwd_overlap_add_kernel", oa_ptrs, dtype, not store_frames,
                    STORE_FRAMES=store_frames, **flags, **default)
            add("_log_spectrogram_fwd_kernel", fwd_ptrs, dtype, False,
                POWER_MODE=k.POWER_GENERAL, **flags, **smallest)
            add("_log_spectrogram_bwd_spec_kernel", spec_ptrs, dtype, False,
                POWER_MODE=k.POWER_GENERAL, HAS_CLIP=True, **flags, **smallest)
            add("_log_spectrogram_bwd_overlap_add_kernel", oa_ptrs, dtype, False,
                STORE_FRAMES=False, **flags, **smallest)
    return configs


# ---------------------------------------------------------------------------------------------
# Registration

_FWD_NAME = "vcfast::log_spectrogram_triton"
_BWD_NAME = "vcfast::log_spectrogram_triton_backward"
_N_NON_WAVE_INPUTS = 3 + 10 + 1  # window, shift, scale; 10 scalars; precision

if _kernels is not None:
    _fwd_op = define_op(_FWD_NAME, _forward_impl, use_triton_op=USES_TRITON_OP)
    _bwd_op = define_op(_BWD_NAME, _backward_impl, use_triton_op=USES_TRITON_OP)
    if not USES_TRITON_OP:  # interpreter: custom ops need explicit fakes

        @_fwd_op.register_fake
        def _forward_fake(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi,
                          magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi,
                          precision):
            _check_inputs(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi, precision)
            n_frames = (wave.shape[1] - n_fft) // hop + 1
            return wave.new_empty((wave.shape[0], bin_hi - bin_lo, n_frames))

        @_bwd_op.register_fake
        def _backward_fake(grad, wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi,
                           magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi,
                           precision):
            _check_inputs(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi, precision)
            return wave.new_empty((wave.shape[0], wave.shape[1]))

    def _setup_context(ctx, inputs, output):
        wave, window, shift, scale, *rest = inputs
        # Only the waveform and the tiny per-bin tensors are saved; the backward recomputes
        # the spectrum, so nothing spectrum-sized stays alive between forward and backward.
        ctx.save_for_backward(wave, window, shift, scale)
        ctx.rest = tuple(rest)

    def _backward(ctx, grad):
        wave, window, shift, scale = ctx.saved_tensors
        grad_wave = _bwd_op(grad, wave, window, shift, scale, *ctx.rest)
        return (grad_wave,) + (None,) * _N_NON_WAVE_INPUTS

    _fwd_op.register_autograd(_backward, setup_context=_setup_context)

    def _no_second_derivative(ctx, grad):
        from vcfast.ops.spectrogram import SECOND_DERIVATIVE_ERROR

        raise RuntimeError(SECOND_DERIVATIVE_ERROR)

    _bwd_op.register_autograd(_no_second_derivative)


def log_spectrogram_triton(
    wave: Tensor, window: Tensor, shift: Tensor, scale: Tensor, *, n_fft: int, hop: int,
    bin_lo: int, bin_hi: int, magnitude_scale: float, power: float, log_offset: float,
    log_floor: float, clip_lo: float, clip_hi: float, precision: str = "ieee",
) -> Tensor:
    """Fused log-spectrogram with the Triton kernels; [B, T] -> [B, n_bins, n_frames].

    ``wave`` is float32 or float64 [B, T] (any strides), ``window`` [n_fft] and ``shift`` /
    ``scale`` [n_bins = bin_hi - bin_lo] of the same dtype and device; n_frames =
    (T - n_fft) // hop + 1. Differentiable with respect to ``wave`` only. ``precision`` picks
    the float32 GEMM mode: "ieee" (fp32-accurate), "tf32" or "bf16"; float64 is always exact.
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (slow; for tests).
    """
    if _kernels is None:
        raise RuntimeError("log_spectrogram_triton: the Triton backend needs the triton package, "
                           f"which failed to import ({TRITON_IMPORT_ERROR}); use backend='cpu', "
                           "'cuda' or 'reference'")
    if wave.device.type == "cpu" and not _kernels_interpreted():
        raise RuntimeError("log_spectrogram_triton: CPU tensors need TRITON_INTERPRET=1 set before "
                           "vcfast.kernels.spectrogram is imported (the Triton interpreter)")
    return _fwd_op(wave, window, shift, scale, int(n_fft), int(hop), int(bin_lo), int(bin_hi),
                   float(magnitude_scale), float(power), float(log_offset), float(log_floor),
                   float(clip_lo), float(clip_hi), str(precision))
