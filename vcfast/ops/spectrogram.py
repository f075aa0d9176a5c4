"""Fused STFT -> magnitude -> log -> normalisation, with presets (docs/ops.md#log-spectrogram).

Per kept bin k and frame f of a waveform x (all presets are this one recipe):

    X[k, f] = sum_n window[n] * x[f*hop + n] * exp(-2j*pi*k*n / n_fft)
    s       = (|X| / magnitude_scale) ** power
    l       = ln(max(s + log_offset, log_floor))
    y       = clamp((l - shift[k]) * scale[k], clip_lo, clip_hi)

for bins k in [bin_lo, bin_hi) (row 0 of the output is bin ``bin_lo``). ``shift``/``scale``
come from the normalisation: ``"range"`` maps ln values in [log_range_lo, log_range_hi] to
[0, 1] (stargan_vc: [ln 1e-3, 0]); ``"standardize"`` is (l - mean[k]) / (std[k] * std_divisor)
with per-bin dataset statistics (specgan); ``"none"`` leaves ln values as they are.

Backends (``backend=``): ``reference`` (the torch.stft chain below), ``cpu`` (C++ kernel in
vcfast._C), ``cuda`` (cuFFT + fused CUDA epilogues in vcfast._C), ``triton`` (DFT of the kept
bins as a GEMM with the epilogue fused). Default: ``cpu`` for CPU tensors; for CUDA tensors
``cuda`` when vcfast._C was built with CUDA, else ``triton`` (else ``reference``). Why ``cuda``:
with the default ``precision="ieee"`` the Triton GEMM compiles to scalar fp32 FMAs (tensor cores
only with ``precision="tf32"`` or ``"bf16"``, or for float64 as DMMA on sm_80+), against cuFFT's
O(n log n) transform of every bin; the choice is to be re-measured on a GPU (the bench step
of scripts/gpu_validate.sh runs bench/bench_spectrogram.py::test_gpu, which times both). Every
backend has a gradient with respect to the waveform; only ``reference`` has
second derivatives (the fused backends raise RuntimeError when differentiated twice).

NaN policy: with ``nan_policy="raise"`` a NaN or Inf in any sample that reaches the output
raises ValueError; ``"propagate"`` lets it flow to the affected frames. The default ``"auto"``
is ``"raise"`` for CPU tensors and ``"propagate"`` for CUDA tensors: on a GPU the check has to
bring its verdict to the host, a device-to-host sync that stalls the CPU until every queued
kernel has run, on every call; pass ``nan_policy="raise"`` to opt in to it there. Under
torch.compile the reference and Triton backends skip the eager check (the C++ kernels check
inside the kernel in every mode).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from vcfast import _extension
from vcfast.ops._backend import resolve_backend

__all__ = [
    "PRESETS",
    "SpectrogramConfig",
    "resolve_config",
    "log_spectrogram",
    "log_spectrogram_reference",
    "measure_bin_stats",
]

_WINDOWS = ("hamming", "hann", "rectangular")
_NORMALIZATIONS = ("range", "standardize", "none")
_PRECISIONS = ("ieee", "tf32", "bf16")
SECOND_DERIVATIVE_ERROR = (
    "vcfast.log_spectrogram: second derivatives (a double backward, create_graph=True) are not "
    "implemented by the fused backends 'cpu', 'cuda' and 'triton'; use backend='reference' "
    "where one is needed")


@dataclass(frozen=True)
class SpectrogramConfig:
    """Every parameter of the recipe. Presets are instances; overrides replace fields."""

    sample_rate: int
    n_fft: int
    hop: int
    window: str = "hamming"
    periodic_window: bool = False  # False: symmetric, as numpy.hamming(n_fft)
    pad_end: int = 0  # zeros appended before framing (specgan: 128)
    magnitude_scale: float = 1.0
    power: float = 1.0
    bin_lo: int = 0
    bin_hi: int | None = None  # None: up to and including the Nyquist bin
    log_floor: float = 0.0
    log_offset: float = 0.0
    normalization: str = "none"
    log_range: tuple[float, float] | None = None  # "range": ln values mapped to [0, 1]
    std_divisor: float = 1.0  # "standardize": (l - mean) / (std * std_divisor)
    clip: tuple[float, float] | None = None

    @property
    def n_rfft(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def kept_bins(self) -> tuple[int, int]:
        return self.bin_lo, self.n_rfft if self.bin_hi is None else self.bin_hi

    @property
    def n_bins(self) -> int:
        lo, hi = self.kept_bins
        return hi - lo

    def n_frames(self, samples: int) -> int:
        """Frames produced from ``samples`` input samples (before pad_end)."""
        return (samples + self.pad_end - self.n_fft) // self.hop + 1

    def samples_for_frames(self, n_frames: int) -> int:
        """The shortest input length giving ``n_frames`` frames (66 304 -> 256 for stargan_vc)."""
        return self.n_fft + (n_frames - 1) * self.hop - self.pad_end

    def frequency_range_hz(self) -> tuple[float, float]:
        """Centre frequencies of the first and last kept bins (stargan_vc: 15.6 .. 4000 Hz)."""
        lo, hi = self.kept_bins
        return lo * self.sample_rate / self.n_fft, (hi - 1) * self.sample_rate / self.n_fft

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"log_spectrogram: inconsistent parameters: {message}")

        if not isinstance(self.n_fft, int) or self.n_fft < 2:
            fail(f"n_fft must be an int >= 2, got {self.n_fft!r}")
        if not isinstance(self.hop, int) or self.hop < 1:
            fail(f"hop must be an int >= 1, got {self.hop!r}")
        if not isinstance(self.pad_end, int) or self.pad_end < 0:
            fail(f"pad_end must be an int >= 0, got {self.pad_end!r}")
        if self.window not in _WINDOWS:
            fail(f"window must be one of {_WINDOWS}, got {self.window!r}")
        lo, hi = self.kept_bins
        if not (0 <= lo < hi <= self.n_rfft):
            fail(f"need 0 <= bin_lo < bin_hi <= n_fft // 2 + 1 = {self.n_rfft}, "
                 f"got bin_lo={lo}, bin_hi={hi}")
        if not self.magnitude_scale > 0:
            fail(f"magnitude_scale must be > 0, got {self.magnitude_scale}")
        if not self.power > 0:
            fail(f"power must be > 0, got {self.power}")
        if self.log_floor < 0 or self.log_offset < 0:
            fail(f"log_floor and log_offset must be >= 0, got {self.log_floor}, {self.log_offset}")
        if self.log_floor == 0 and self.log_offset == 0:
            fail("log_floor or log_offset must be > 0, otherwise silent bins give ln(0) = -inf")
        if self.normalization not in _NORMALIZATIONS:
            fail(f"normalization must be one of {_NORMALIZATIONS}, got {self.normalization!r}")
        if self.normalization == "range":
            lo_l, hi_l = self.resolved_log_range()
            if not hi_l > lo_l:
                fail(f"log_range must satisfy lo < hi, got ({lo_l}, {hi_l})")
        if self.normalization == "standardize" and not self.std_divisor > 0:
            fail(f"std_divisor must be > 0, got {self.std_divisor}")
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            fail(f"clip must be (lo, hi) with lo < hi, got {self.clip}")

    def resolved_log_range(self) -> tuple[float, float]:
        if self.log_range is not None:
            return float(self.log_range[0]), float(self.log_range[1])
        # Default: the floor maps to 0 and a full-scale magnitude (s = 1) maps to 1.
        return math.log(max(self.log_floor, self.log_offset)), 0.0

    def make_window(self, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> torch.Tensor:
        if self.window == "hamming":
            return torch.hamming_window(self.n_fft, periodic=self.periodic_window, dtype=dtype,
                                        device=device)
        if self.window == "hann":
            return torch.hann_window(self.n_fft, periodic=self.periodic_window, dtype=dtype,
                                     device=device)
        return torch.ones(self.n_fft, dtype=dtype, device=device)

    def make_affine(
        self,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        mean: torch.Tensor | Sequence[float] | None = None,
        std: torch.Tensor | Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-bin (shift, scale) of the normalisation, shape [n_bins] each."""
        n = self.n_bins
        if self.normalization == "standardize":
            if mean is None or std is None:
                raise ValueError(
                    "log_spectrogram: normalization='standardize' needs per-bin `mean` and `std` "
                    f"(shape [{n}]); measure them with vcfast.measure_bin_stats(...)"
                )
            mean_t = torch.as_tensor(mean, dtype=dtype, device=device).reshape(-1)
            std_t = torch.as_tensor(std, dtype=dtype, device=device).reshape(-1)
            for name, t in (("mean", mean_t), ("std", std_t)):
                if t.numel() != n:
                    raise ValueError(f"log_spectrogram: `{name}` must have {n} values (one per "
                                     f"kept bin), got shape {tuple(t.shape)}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"log_spectrogram: `{name}` contains NaN or Inf")
            if not (std_t > 0).all():
                raise ValueError("log_spectrogram: every `std` entry must be > 0")
            return mean_t, 1.0 / (std_t * self.std_divisor)
        if mean is not None or std is not None:
            raise ValueError(
                f"log_spectrogram: `mean`/`std` are only used with normalization='standardize', "
                f"this configuration uses {self.normalization!r}"
            )
        if self.normalization == "range":
            lo, hi = self.resolved_log_range()
            shift, scale = lo, 1.0 / (hi - lo)
        else:
            shift, scale = 0.0, 1.0
        return (torch.full((n,), shift, dtype=dtype, device=device),
                torch.full((n,), scale, dtype=dtype, device=device))

    def kernel_scalars(self) -> dict[str, float | int]:
        """The scalar arguments of the registered ops, in schema order."""
        lo, hi = self.kept_bins
        clip_lo, clip_hi = self.clip if self.clip is not None else (-math.inf, math.inf)
        return dict(
            n_fft=self.n_fft, hop=self.hop, bin_lo=lo, bin_hi=hi,
            magnitude_scale=float(self.magnitude_scale), power=float(self.power),
            log_offset=float(self.log_offset), log_floor=float(self.log_floor),
            clip_lo=float(clip_lo), clip_hi=float(clip_hi),
        )


PRESETS: dict[str, SpectrogramConfig] = {
    # 66 304 samples -> 256 bins (15.6 Hz .. 4 kHz) x 256 frames in [0, 1].
    "stargan_vc": SpectrogramConfig(
        sample_rate=16000, n_fft=1024, hop=256, window="hamming", periodic_window=False,
        magnitude_scale=1024.0, power=1.0, bin_lo=1, bin_hi=257, log_floor=1e-3,
        normalization="range",
    ),
    # 16 384 samples + 128 zeros -> 128 bins x 128 frames in [-1, 1].
    "specgan": SpectrogramConfig(
        sample_rate=16000, n_fft=256, hop=128, window="hann", periodic_window=True, pad_end=128,
        magnitude_scale=1.0, power=1.0, bin_lo=0, bin_hi=128, log_offset=1e-6,
        normalization="standardize", std_divisor=3.0, clip=(-1.0, 1.0),
    ),
}
# esc50_mel needs a mel filterbank matmul between the magnitude and the log, which
# is not a per-bin epilogue; it is left out of this op rather than bolted on (see README).

_FIELDS = {f.name for f in dataclasses.fields(SpectrogramConfig)}


def resolve_config(preset: str | SpectrogramConfig = "stargan_vc",
                   **overrides) -> SpectrogramConfig:
    """The preset's configuration with ``overrides`` applied, validated."""
    if isinstance(preset, SpectrogramConfig):
        base = preset
    elif isinstance(preset, str) and preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ValueError(f"log_spectrogram: unknown preset {preset!r}; choose one of "
                         f"{sorted(PRESETS)} or pass a SpectrogramConfig")
    unknown = set(overrides) - _FIELDS
    if unknown:
        raise TypeError(f"log_spectrogram: unknown parameter(s) {sorted(unknown)}; "
                        f"overridable: {sorted(_FIELDS)}")
    config = dataclasses.replace(base, **overrides) if overrides else base
    config.validate()
    return config


def log_spectrogram_reference(
    wave: torch.Tensor, window: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    n_fft: int, hop: int, bin_lo: int, bin_hi: int, magnitude_scale: float, power: float,
    log_offset: float, log_floor: float, clip_lo: float, clip_hi: float,
) -> torch.Tensor:
    """The plain torch.stft chain; [batch, samples] -> [batch, n_bins, n_frames]."""
    spectrum = torch.stft(wave, n_fft, hop, window=window, center=False, return_complex=True)
    magnitude = spectrum[:, bin_lo:bin_hi].abs() / magnitude_scale
    if power != 1.0:
        magnitude = magnitude**power
    log_mag = torch.log(torch.clamp_min(magnitude + log_offset, log_floor))
    return torch.clamp((log_mag - shift[:, None]) * scale[:, None], clip_lo, clip_hi)


# ---------------------------------------------------------------------------------------------
# Registration of the C++ op's fake implementation and autograd (the schema and the CPU/CUDA
# kernels come from vcfast._C).

if _extension.EXTENSION_LOADED:

    @torch.library.register_fake("vcfast::log_spectrogram")
    def _log_spectrogram_fake(wave, window, shift, scale, n_fft, hop, bin_lo, bin_hi,
                              magnitude_scale, power, log_offset, log_floor, clip_lo, clip_hi,
                              check_finite):
        torch._check(wave.dim() == 2, lambda: "wave must be [batch, samples]")
        n_frames = (wave.shape[1] - n_fft) // hop + 1
        return wave.new_empty((wave.shape[0], bin_hi - bin_lo, n_frames))

    @torch.library.register_fake("vcfast::log_spectrogram_backward")
    def _log_spectrogram_backward_fake(grad, wave, window, shift, scale, n_fft, hop, bin_lo,
                                       bin_hi, magnitude_scale, power, log_offset, log_floor,
                                       clip_lo, clip_hi):
        return torch.empty_like(wave)

    _SCALAR_NAMES = ("n_fft", "hop", "bin_lo", "bin_hi", "magnitude_scale", "power",
                     "log_offset", "log_floor", "clip_lo", "clip_hi")

    def _setup_context(ctx, inputs, output):
        wave, window, shift, scale, *scalars = inputs
        # Only the waveform (and the tiny per-bin tensors) are saved: the backward recomputes
        # the spectrum, so no spectrum-sized tensor stays alive between forward and backward.
        ctx.save_for_backward(wave, window, shift, scale)
        ctx.scalars = scalars[: len(_SCALAR_NAMES)]

    def _backward(ctx, grad):
        wave, window, shift, scale = ctx.saved_tensors
        grad_wave = torch.ops.vcfast.log_spectrogram_backward(
            grad, wave, window, shift, scale, *ctx.scalars)
        # Only the waveform gets a gradient; window, shift, scale, the scalars and
        # check_finite are configuration.
        return (grad_wave,) + (None,) * (3 + len(_SCALAR_NAMES) + 1)

    torch.library.register_autograd("vcfast::log_spectrogram", _backward,
                                    setup_context=_setup_context)

    def _no_second_derivative(ctx, grad):
        raise RuntimeError(SECOND_DERIVATIVE_ERROR)

    # Without a formula a double backward would warn and silently drop every term through
    # the fused backward (create_graph=True gave a gradient that depends on nothing).
    torch.library.register_autograd("vcfast::log_spectrogram_backward", _no_second_derivative)


# ---------------------------------------------------------------------------------------------
# Public API


def _check_wave(wave: torch.Tensor) -> None:
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"log_spectrogram: `wave` must be a torch.Tensor, got "
                        f"{type(wave).__name__}")
    if wave.is_complex() or not wave.is_floating_point():
        raise TypeError(
            f"log_spectrogram: `wave` must be a real floating tensor (float32/float64; "
            f"bf16/fp16 are computed in float32), got dtype {wave.dtype}")
    if wave.dim() < 1:
        raise ValueError("log_spectrogram: `wave` must have shape [..., samples], got a scalar")


def _pick_backend(backend: str | None, device: torch.device) -> str:
    """The backend of a call (vcfast.ops._backend). CUDA default: cuda, then triton (see the
    module docstring for why); meta tensors default to the registered op, whose fake
    implementation allocates exactly what the fused kernel does, unlike the reference chain."""
    return resolve_backend("log_spectrogram", backend, device)


def _resolve_nan_policy(nan_policy: str, device: torch.device) -> str:
    """Returns "raise" or "propagate"; "auto" raises only off CUDA (no per-call GPU sync)."""
    if nan_policy not in ("auto", "raise", "propagate"):
        raise ValueError("log_spectrogram: nan_policy must be 'auto', 'raise' or 'propagate', "
                         f"got {nan_policy!r}")
    if nan_policy == "auto":
        return "propagate" if device.type == "cuda" else "raise"
    return nan_policy


def _apply(
    wave: torch.Tensor, config: SpectrogramConfig, window: torch.Tensor, shift: torch.Tensor,
    scale: torch.Tensor, backend: str | None, nan_policy: str, precision: str,
) -> torch.Tensor:
    """The op on prepared per-bin tensors; shared by the functional API and the module."""
    _check_wave(wave)
    nan_policy = _resolve_nan_policy(nan_policy, wave.device)
    if precision not in _PRECISIONS:
        raise ValueError(f"log_spectrogram: precision must be one of {_PRECISIONS}, got "
                         f"{precision!r}")
    backend = _pick_backend(backend, wave.device)
    compute_dtype = torch.float64 if wave.dtype == torch.float64 else torch.float32
    batch_shape = wave.shape[:-1]
    x = wave.to(compute_dtype).reshape(-1, wave.shape[-1])
    if config.pad_end:
        x = torch.nn.functional.pad(x, (0, config.pad_end))
    samples = x.shape[-1]
    if samples < config.n_fft:
        raise ValueError(
            f"log_spectrogram: `wave` has {wave.shape[-1]} samples"
            + (f" (+{config.pad_end} padding)" if config.pad_end else "")
            + f", shorter than one frame of n_fft={config.n_fft}")
    window, shift, scale = (t.to(device=x.device, dtype=compute_dtype)
                            for t in (window, shift, scale))
    scalars = config.kernel_scalars()
    check_finite = nan_policy == "raise"
    if backend in ("cpu", "cuda"):
        out = torch.ops.vcfast.log_spectrogram(x, window, shift, scale, **scalars,
                                               check_finite=check_finite)
    else:
        if check_finite and x.device.type != "meta" and not torch.compiler.is_compiling():
            used = (config.n_frames(wave.shape[-1]) - 1) * config.hop + config.n_fft
            if not torch.isfinite(x[:, :used]).all():
                raise ValueError("log_spectrogram: `wave` contains NaN or Inf "
                                 "(nan_policy='raise'); clean the audio or pass "
                                 "nan_policy='propagate'")
        if backend == "triton":
            from vcfast.ops.spectrogram_triton import log_spectrogram_triton

            out = log_spectrogram_triton(x, window, shift, scale, **scalars, precision=precision)
        else:
            out = log_spectrogram_reference(x, window, shift, scale, **scalars)
    return out.reshape(*batch_shape, out.shape[-2], out.shape[-1])


def log_spectrogram(
    wave: torch.Tensor,
    preset: str | SpectrogramConfig = "stargan_vc",
    *,
    backend: str | None = None,
    nan_policy: str = "auto",
    mean: torch.Tensor | Sequence[float] | None = None,
    std: torch.Tensor | Sequence[float] | None = None,
    precision: str = "ieee",
    **overrides,
) -> torch.Tensor:
    """Log-magnitude spectrogram of ``wave`` in one fused pass.

    Args:
        wave: ``[..., samples]`` real audio, float32/float64 (bf16/fp16 computed in float32).
        preset: ``"stargan_vc"`` (default) or ``"specgan"``, or a :class:`SpectrogramConfig`.
        backend: ``None`` (by device: ``cpu`` for CPU tensors; ``cuda`` for CUDA tensors when
            the extension has CUDA, else ``triton``), ``"reference"``, ``"cpu"``, ``"cuda"`` or
            ``"triton"``.
        nan_policy: ``"raise"`` (ValueError on NaN/Inf input; on CUDA tensors this costs a
            device-to-host sync per call), ``"propagate"``, or ``"auto"`` (default: ``"raise"``
            for CPU tensors, ``"propagate"`` for CUDA tensors).
        mean, std: per-bin statistics for ``normalization="standardize"`` (specgan).
        precision: Triton GEMM precision: ``"ieee"`` (fp32-accurate, default; scalar FMAs, no
            tensor cores), ``"tf32"``, ``"bf16"`` (tensor cores). Only ``backend="triton"``.
        **overrides: any :class:`SpectrogramConfig` field (n_fft, hop, window, power, bin_lo,
            bin_hi, log_floor, log_offset, normalization, log_range, clip, ...).

    Returns:
        ``[..., n_bins, n_frames]``, float64 for float64 input, else float32. For the
        stargan_vc preset a 66 304-sample clip gives ``[256, 256]`` with values in [0, 1].
    """
    config = resolve_config(preset, **overrides)
    _check_wave(wave)
    dtype = torch.float64 if wave.dtype == torch.float64 else torch.float32
    window = config.make_window(dtype, wave.device)
    shift, scale = config.make_affine(dtype, wave.device, mean, std)
    return _apply(wave, config, window, shift, scale, backend, nan_policy, precision)


def measure_bin_stats(
    waves: Iterable[torch.Tensor], preset: str | SpectrogramConfig = "specgan", *,
    backend: str | None = None, **overrides,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and std of the log spectrum over a dataset (for ``"standardize"``).

    ``waves`` yields ``[..., samples]`` tensors (clips of any batch shape). The statistics are
    over every frame of every clip, accumulated in float64, of l = ln(max(s + offset, floor)):
    the preset's recipe with the normalisation switched off. Returns ``(mean, std)``, each
    ``[n_bins]`` float32, ready for ``log_spectrogram(..., mean=mean, std=std)``.
    """
    config = resolve_config(preset, **overrides)
    raw = dataclasses.replace(config, normalization="none", clip=None)
    total = sum_sq = None
    count = 0
    with torch.no_grad():
        for wave in waves:
            spec = log_spectrogram(wave, raw, backend=backend).to(torch.float64)
            spec = spec.reshape(-1, raw.n_bins, spec.shape[-1])
            batch_sum = spec.sum(dim=(0, 2)).cpu()
            batch_sq = (spec * spec).sum(dim=(0, 2)).cpu()
            total = batch_sum if total is None else total + batch_sum
            sum_sq = batch_sq if sum_sq is None else sum_sq + batch_sq
            count += spec.shape[0] * spec.shape[2]
    if count == 0:
        raise ValueError("measure_bin_stats: `waves` yielded no audio")
    mean = total / count
    var = (sum_sq / count - mean * mean).clamp_min(0.0)
    # A bin that never varies (e.g. all-silent data) would give std 0 and divide by zero later.
    std = var.sqrt().clamp_min(1e-5)
    return mean.float(), std.float()
