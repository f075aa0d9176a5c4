"""Log-mel spectrogram: STFT -> |X|^power -> mel filterbank -> log -> normalisation, with
presets (docs/ops.md#log-mel-spectrogram).

Per mel band m and frame f of a waveform x (framing as torch.stft, optionally centred):

    X[k, f] = sum_n window[n] * x_pad[f*hop + n] * exp(-2j*pi*k*n / n_fft)
    P[k, f] = |X[k, f]| ** power
    M[m, f] = sum_k fb[k, m] * P[k, f]                      (fb: mel_filterbank)
    l       = ln(max(M, log_floor))                          log="natural"
            = (20 / power) * log10(max(M, log_floor))        log="db"
    l       = max(l, max_{m,f} l - top_db)                   per clip, only with top_db (dB)
    y       = (l - shift[m]) * scale[m]                      normalisation

Backends (``backend=``): ``"reference"`` (the chain written out: frames by hand, rfft, the
filterbank matmul, the log), ``"fast"`` (one torch.stft, the power spectrum as a sum of squares,
one matmul, an in-place epilogue) and ``"cpu"`` (the fused C++ kernel csrc/cpu/mel_cpu.cpp,
registered as ``vcfast::log_mel_spectrogram``: blocks of frames per thread, FFT, |X|^power,
filterbank, log and per-band affine in one pass; the backward recomputes the block's FFT).
"reference" and "fast" are plain PyTorch, differentiable with respect to the waveform (second
derivatives included). "cpu" is differentiable with respect to the waveform only, once (no
double backward); it covers every setting except ``top_db`` (a per-clip maximum over the whole
spectrogram), for which an explicit ``backend="cpu"`` raises ValueError. The default
(``backend=None``) is "cpu" for CPU tensors when vcfast._C has the op and the settings are
covered (and no window/mean/std tensor asks for a gradient), else "fast". All three compile
with torch.compile(fullgraph=True) (the op has a fake implementation and an autograd formula).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vcfast import _extension

__all__ = [
    "MEL_PRESETS",
    "MelConfig",
    "MelNormalization",
    "hz_to_mel",
    "log_mel_spectrogram",
    "log_mel_spectrogram_reference",
    "mel_filterbank",
    "mel_to_hz",
    "resolve_mel_config",
]

_MEL_SCALES = ("htk", "slaney")
_MEL_NORMS = (None, "slaney")
_WINDOWS = ("hann", "hamming", "rectangular")
_PAD_MODES = ("reflect", "constant")
_LOGS = ("natural", "db")
_NORMALIZATIONS = (None, "range", "mean_std")
_BACKENDS = (None, "reference", "fast", "cpu")

# Slaney's Auditory Toolbox scale (docs/ops.md#log-mel-spectrogram): linear below 1000 Hz,
# 3 mels per 200 Hz, logarithmic above with 27 mels per factor 6.4.
_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP  # 15
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def _fail(function: str, name: str, message: str) -> None:
    raise ValueError(f"{function}: `{name}` {message}")


# ---------------------------------------------------------------------------------------------
# Mel scales and the filterbank


def hz_to_mel(freq: torch.Tensor, mel_scale: str = "htk") -> torch.Tensor:
    """Hz -> mel: HTK ``2595 log10(1 + f / 700)``, or Slaney (linear below 1 kHz, log above)."""
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    if mel_scale == "slaney":
        linear = freq / _SLANEY_F_SP
        log = _SLANEY_MIN_LOG_MEL + torch.log(
            torch.clamp_min(freq, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
        return torch.where(freq >= _SLANEY_MIN_LOG_HZ, log, linear)
    _fail("hz_to_mel", "mel_scale", f"must be one of {_MEL_SCALES}, got {mel_scale!r}")


def mel_to_hz(mel: torch.Tensor, mel_scale: str = "htk") -> torch.Tensor:
    """The inverse of :func:`hz_to_mel`."""
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    if mel_scale == "slaney":
        linear = mel * _SLANEY_F_SP
        log = _SLANEY_MIN_LOG_HZ * torch.exp(
            _SLANEY_LOGSTEP * (torch.clamp_min(mel, _SLANEY_MIN_LOG_MEL) - _SLANEY_MIN_LOG_MEL))
        return torch.where(mel >= _SLANEY_MIN_LOG_MEL, log, linear)
    _fail("mel_to_hz", "mel_scale", f"must be one of {_MEL_SCALES}, got {mel_scale!r}")


def _check_filterbank_args(n_freqs, f_min, f_max, n_mels, sample_rate, mel_scale, norm,
                           function: str = "mel_filterbank") -> None:
    if isinstance(n_freqs, bool) or not isinstance(n_freqs, int) or n_freqs < 2:
        _fail(function, "n_freqs", f"must be an int >= 2, got {n_freqs!r}")
    if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
        _fail(function, "n_mels", f"must be an int >= 1, got {n_mels!r}")
    if not isinstance(sample_rate, (int, float)) or not sample_rate > 0:
        _fail(function, "sample_rate", f"must be > 0, got {sample_rate!r}")
    if not isinstance(f_min, (int, float)) or not f_min >= 0:
        _fail(function, "f_min", f"must be >= 0 Hz, got {f_min!r}")
    if not isinstance(f_max, (int, float)) or f_max > sample_rate / 2:
        _fail(function, "f_max", f"must be a frequency <= sample_rate / 2 = {sample_rate / 2} "
              f"Hz (the Nyquist frequency), got {f_max!r}")
    if not f_min < f_max:
        _fail(function, "f_min", f"must be < f_max, got f_min={f_min}, f_max={f_max}")
    if mel_scale not in _MEL_SCALES:
        _fail(function, "mel_scale", f"must be one of {_MEL_SCALES}, got {mel_scale!r}")
    if norm not in _MEL_NORMS:
        _fail(function, "norm", f"must be one of {_MEL_NORMS}, got {norm!r}")


def mel_filterbank(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: float,
    mel_scale: str = "htk",
    norm: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Triangular mel filters, ``[n_freqs, n_mels]`` (docs/ops.md#log-mel-spectrogram).

    ``n_freqs`` one-sided STFT bins (``n_fft // 2 + 1``) at ``linspace(0, sample_rate / 2,
    n_freqs)`` Hz; ``n_mels + 2`` points equally spaced in mel between ``f_min`` and ``f_max``
    give the filter edges and peaks. Filter m rises from 0 at ``f[m]`` to 1 at ``f[m+1]`` and
    falls to 0 at ``f[m+2]``; ``norm="slaney"`` multiplies it by ``2 / (f[m+2] - f[m])``
    (constant area). The formulas of torchaudio.functional.melscale_fbanks and
    librosa.filters.mel; computed in float64, returned in ``dtype``.
    """
    _check_filterbank_args(n_freqs, f_min, f_max, n_mels, sample_rate, mel_scale, norm)
    f64 = torch.float64
    all_freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=f64)
    m_lo = hz_to_mel(torch.tensor(float(f_min), dtype=f64), mel_scale)
    m_hi = hz_to_mel(torch.tensor(float(f_max), dtype=f64), mel_scale)
    f_pts = mel_to_hz(torch.linspace(0.0, 1.0, n_mels + 2, dtype=f64) * (m_hi - m_lo) + m_lo,
                      mel_scale)
    f_diff = f_pts[1:] - f_pts[:-1]  # [n_mels + 1]
    slopes = f_pts[None, :] - all_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp_min(torch.minimum(down, up), 0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (f_pts[2:] - f_pts[:-2]))
    if not torch.compiler.is_compiling():
        empty = (fb.amax(dim=0) == 0).nonzero().flatten().tolist()
        if empty:
            warnings.warn(
                f"mel_filterbank: mel band(s) {empty} fall between two STFT bins and are all "
                f"zero (their output is the log floor); use fewer mels, a larger n_fft or "
                f"mel_scale='slaney'", stacklevel=2)
    return fb.to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Configuration and presets


@dataclass(frozen=True)
class MelConfig:
    """Every parameter of the recipe; presets are instances, keyword settings replace fields.
    Names follow vcfast.log_spectrogram's SpectrogramConfig where they overlap."""

    sample_rate: int
    n_fft: int
    hop: int
    n_mels: int
    window: str = "hann"
    periodic_window: bool = True  # True: periodic, as torch.hann_window's default
    center: bool = True  # pad n_fft // 2 samples on both sides before framing (torch.stft)
    pad_mode: str = "reflect"
    power: float = 2.0
    f_min: float = 0.0
    f_max: float | None = None  # None: sample_rate / 2
    mel_scale: str = "htk"
    mel_norm: str | None = None
    log: str = "natural"
    log_floor: float = 1e-10
    top_db: float | None = None
    normalization: str | None = None
    log_range: tuple[float, float] | None = None  # "range": log values mapped to [0, 1]

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def resolved_f_max(self) -> float:
        return self.sample_rate / 2 if self.f_max is None else float(self.f_max)

    @property
    def log_multiplier(self) -> float:
        """Factor from ln to the log units: 1, or 20 / (power * ln 10) for decibels."""
        return 1.0 if self.log == "natural" else 20.0 / (self.power * math.log(10.0))

    def n_frames(self, samples: int) -> int:
        if self.center:
            return samples // self.hop + 1
        return (samples - self.n_fft) // self.hop + 1

    def resolved_log_range(self) -> tuple[float, float]:
        if self.log_range is not None:
            return float(self.log_range[0]), float(self.log_range[1])
        # Default: the floor maps to 0 and a mel value of 1 (log 0) maps to 1.
        return self.log_multiplier * math.log(self.log_floor), 0.0

    def validate(self) -> None:
        fn = "log_mel_spectrogram"
        for name in ("sample_rate", "n_fft", "hop", "n_mels"):
            value = getattr(self, name)
            low = 2 if name == "n_fft" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                _fail(fn, name, f"must be an int >= {low}, got {value!r}")
        if self.window not in _WINDOWS:
            _fail(fn, "window", f"must be one of {_WINDOWS} or a tensor of n_fft samples, got "
                  f"{self.window!r}")
        if self.pad_mode not in _PAD_MODES:
            _fail(fn, "pad_mode", f"must be one of {_PAD_MODES}, got {self.pad_mode!r}")
        if not isinstance(self.power, (int, float)) or not self.power > 0:
            _fail(fn, "power", f"must be > 0, got {self.power!r}")
        if self.mel_norm not in _MEL_NORMS:
            _fail(fn, "mel_norm", f"must be one of {_MEL_NORMS}, got {self.mel_norm!r}")
        _check_filterbank_args(self.n_freqs, self.f_min, self.resolved_f_max, self.n_mels,
                               self.sample_rate, self.mel_scale, self.mel_norm, fn)
        if self.log not in _LOGS:
            _fail(fn, "log", f"must be one of {_LOGS}, got {self.log!r}")
        if not isinstance(self.log_floor, (int, float)) or not self.log_floor > 0:
            _fail(fn, "log_floor", f"must be > 0 (it keeps silent bands from log 0), got "
                  f"{self.log_floor!r}")
        if self.top_db is not None:
            if self.log != "db":
                _fail(fn, "top_db", "needs log='db'")
            if not isinstance(self.top_db, (int, float)) or not self.top_db > 0:
                _fail(fn, "top_db", f"must be > 0 dB, got {self.top_db!r}")
        if self.normalization not in _NORMALIZATIONS:
            _fail(fn, "normalization", f"must be None, 'range', ('mean_std', mean, std) or a "
                  f"MelNormalization, got {self.normalization!r}")
        if self.log_range is not None and self.normalization != "range":
            _fail(fn, "log_range", "is only used with normalization='range'")
        if self.normalization == "range":
            lo, hi = self.resolved_log_range()
            if not hi > lo:
                _fail(fn, "log_range", f"must be (lo, hi) with lo < hi, got ({lo}, {hi})")

    def make_window(self, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> torch.Tensor:
        if self.window == "hann":
            return torch.hann_window(self.n_fft, periodic=self.periodic_window, dtype=dtype,
                                     device=device)
        if self.window == "hamming":
            return torch.hamming_window(self.n_fft, periodic=self.periodic_window, dtype=dtype,
                                        device=device)
        return torch.ones(self.n_fft, dtype=dtype, device=device)

    def make_filterbank(self, dtype: torch.dtype,
                        device: torch.device | str | None = None) -> torch.Tensor:
        return mel_filterbank(self.n_freqs, self.f_min, self.resolved_f_max, self.n_mels,
                              self.sample_rate, self.mel_scale, self.mel_norm, dtype, device)


@dataclass(frozen=True, eq=False)
class MelNormalization:
    """A normalisation with its data: ``kind="range"`` (optional ``log_range``) or
    ``kind="mean_std"`` with per-band ``mean`` and ``std`` ([n_mels] each)."""

    kind: str
    mean: torch.Tensor | Sequence[float] | None = None
    std: torch.Tensor | Sequence[float] | None = None
    log_range: tuple[float, float] | None = None


MEL_PRESETS: dict[str, MelConfig] = {
    # ESC-50 clips: 5 s at 44.1 kHz (220 500 samples) -> 128 mels x 431 frames. Slaney's
    # scale and area norm (librosa's defaults): on the HTK scale band 0 would be empty here.
    "esc50_mel": MelConfig(sample_rate=44100, n_fft=1024, hop=512, n_mels=128, center=True,
                           mel_scale="slaney", mel_norm="slaney"),
}

_FIELDS = {f.name for f in dataclasses.fields(MelConfig)}
_REQUIRED = ("sample_rate", "n_fft", "hop", "n_mels")


def _split_normalization(settings: dict, mean, std):
    """Turns ``normalization=("mean_std", mean, std)`` or a MelNormalization into config
    fields plus (mean, std)."""
    norm = settings.get("normalization")
    if isinstance(norm, MelNormalization):
        settings["normalization"] = norm.kind
        if norm.log_range is not None:
            settings["log_range"] = norm.log_range
        if norm.mean is not None or norm.std is not None:
            if mean is not None or std is not None:
                _fail("log_mel_spectrogram", "mean",
                      "is given twice (also in the MelNormalization)")
            mean, std = norm.mean, norm.std
    elif isinstance(norm, tuple):
        if len(norm) != 3 or norm[0] != "mean_std":
            _fail("log_mel_spectrogram", "normalization",
                  f"as a tuple must be ('mean_std', mean, std), got {norm!r}")
        if mean is not None or std is not None:
            _fail("log_mel_spectrogram", "mean", "is given twice (also in `normalization`)")
        settings["normalization"], mean, std = norm
    return mean, std


def resolve_mel_config(preset: str | MelConfig | None = None, **settings) -> MelConfig:
    """The preset's configuration with ``settings`` applied (or, without a preset, the settings
    alone: sample_rate, n_fft, hop and n_mels are then required), validated."""
    unknown = set(settings) - _FIELDS
    if unknown:
        raise TypeError(f"log_mel_spectrogram: unknown setting(s) {sorted(unknown)}; "
                        f"known: {sorted(_FIELDS)}")
    if preset is None:
        missing = [name for name in _REQUIRED if name not in settings]
        if missing:
            _fail("log_mel_spectrogram", missing[0],
                  f"is required without a preset (choose one of {sorted(MEL_PRESETS)} or give "
                  f"{', '.join(_REQUIRED)})")
        config = MelConfig(**settings)
    else:
        if isinstance(preset, MelConfig):
            base = preset
        elif isinstance(preset, str) and preset in MEL_PRESETS:
            base = MEL_PRESETS[preset]
        else:
            _fail("log_mel_spectrogram", "preset", f"must be one of {sorted(MEL_PRESETS)}, a "
                  f"MelConfig or None, got {preset!r}")
        config = dataclasses.replace(base, **settings) if settings else base
    config.validate()
    return config


def make_affine(config: MelConfig, dtype: torch.dtype, device=None, mean=None, std=None):
    """Per-band (shift, scale) tensors for "mean_std", else None (scalars are used)."""
    fn = "log_mel_spectrogram"
    if config.normalization != "mean_std":
        if mean is not None or std is not None:
            _fail(fn, "mean", f"and `std` are only used with normalization='mean_std', this "
                  f"configuration uses {config.normalization!r}")
        return None, None
    if mean is None or std is None:
        _fail(fn, "mean" if mean is None else "std",
              f"is required by normalization='mean_std' (shape [{config.n_mels}])")
    mean_t = torch.as_tensor(mean, dtype=dtype, device=device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=dtype, device=device).reshape(-1)
    for name, t in (("mean", mean_t), ("std", std_t)):
        if t.numel() != config.n_mels:
            _fail(fn, name, f"must have n_mels={config.n_mels} values, got {t.numel()}")
        if not torch.isfinite(t).all():
            _fail(fn, name, "contains NaN or Inf")
    if not (std_t > 0).all():
        _fail(fn, "std", "must be > 0 everywhere")
    return mean_t, std_t


# ---------------------------------------------------------------------------------------------
# The two implementations. Both take [batch, samples] in the compute dtype, the window [n_fft],
# the filterbank [n_freqs, n_mels] and mean/std [n_mels] (or None); they return
# [batch, n_mels, n_frames].


def _finish_reference(mel: torch.Tensor, config: MelConfig, mean, std) -> torch.Tensor:
    log = torch.log(torch.clamp_min(mel, config.log_floor))
    if config.log == "db":
        log = log * config.log_multiplier
        if config.top_db is not None:
            peak = log.amax(dim=(-2, -1), keepdim=True)
            log = torch.maximum(log, peak - config.top_db)
    if config.normalization == "range":
        lo, hi = config.resolved_log_range()
        return (log - lo) / (hi - lo)
    if config.normalization == "mean_std":
        return (log - mean[:, None]) / std[:, None]
    return log


def log_mel_spectrogram_reference(
    wave: torch.Tensor, config: MelConfig, window: torch.Tensor, filterbank: torch.Tensor,
    mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
) -> torch.Tensor:
    """The chain written out from the formulas (docs/ops.md#log-mel-spectrogram)."""
    x = wave
    if config.center:
        half = config.n_fft // 2
        x = F.pad(x[:, None, :], (half, half), mode=config.pad_mode)[:, 0, :]
    frames = x.unfold(-1, config.n_fft, config.hop) * window  # [batch, n_frames, n_fft]
    spectrum = torch.fft.rfft(frames, dim=-1)  # [batch, n_frames, n_freqs]
    power = spectrum.abs() ** config.power
    mel = torch.matmul(power, filterbank).transpose(-2, -1)  # [batch, n_mels, n_frames]
    return _finish_reference(mel, config, mean, std)


def _log_mel_fast(
    wave: torch.Tensor, config: MelConfig, window: torch.Tensor, filterbank: torch.Tensor,
    mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
) -> torch.Tensor:
    spectrum = torch.stft(wave, config.n_fft, config.hop, window=window, center=config.center,
                          pad_mode=config.pad_mode, return_complex=True)
    if config.power == 2.0:
        # |X|^2 as re^2 + im^2, accumulated in place: no square root, and autograd keeps only
        # views of the spectrum.
        power = spectrum.real.square()
        power.addcmul_(spectrum.imag, spectrum.imag)
    elif config.power == 1.0:
        power = spectrum.abs()
    else:
        power = spectrum.abs().pow_(config.power) if not _tracks(wave) else (
            spectrum.abs() ** config.power)
    del spectrum
    # [n_mels, n_freqs] @ [batch, n_freqs, n_frames]: BLAS reads the transposed view as is.
    mel = torch.matmul(filterbank.mT, power)
    del power
    # The epilogue in place where autograd allows it: clamp_min and log need their inputs
    # (out of place), every affine step after the log is in place on the log's output.
    log = torch.log(torch.clamp_min(mel, config.log_floor))
    if config.log == "db":
        log.mul_(config.log_multiplier)
        if config.top_db is not None:
            peak = log.amax(dim=(-2, -1), keepdim=True)
            log = torch.maximum(log, peak - config.top_db)
    if config.normalization == "range":
        lo, hi = config.resolved_log_range()
        log.sub_(lo).mul_(1.0 / (hi - lo))
    elif config.normalization == "mean_std":
        log.sub_(mean[:, None]).div_(std[:, None])
    return log


def _tracks(wave: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and wave.requires_grad


# ---------------------------------------------------------------------------------------------
# The fused C++ CPU backend (csrc/cpu/mel_cpu.cpp). The op takes the waveform already padded
# (so the padding's gradient is autograd's) and per-band shift/scale:
#     y = (log_multiplier * ln(max(fb^T |X|^power, log_floor)) - shift[m]) * scale[m]


def _cpu_affine(config: MelConfig, n_mels: int, dtype, device, mean, std):
    """(shift, scale) per band of the op for the configuration's normalisation."""
    if config.normalization == "mean_std":
        return mean, 1.0 / std
    if config.normalization == "range":
        lo, hi = config.resolved_log_range()
        return (torch.full((n_mels,), lo, dtype=dtype, device=device),
                torch.full((n_mels,), 1.0 / (hi - lo), dtype=dtype, device=device))
    return (torch.zeros(n_mels, dtype=dtype, device=device),
            torch.ones(n_mels, dtype=dtype, device=device))


class _CentrePad(torch.autograd.Function):
    """F.pad of [batch, samples] by ``half`` samples on both sides ("reflect" or "constant"),
    with a backward that copies the gradient's middle once and folds the reflected edges into
    it (reflection_pad1d_backward zero-fills and scatters the whole padded length)."""

    @staticmethod
    def forward(x, half, mode):
        return F.pad(x.unsqueeze(1), (half, half), mode=mode).squeeze(1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.half, ctx.mode = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad):
        half = ctx.half
        samples = grad.shape[-1] - 2 * half
        grad_x = grad[:, half:half + samples].clone()
        if ctx.mode == "reflect":
            grad_x[:, 1:half + 1] += grad[:, :half].flip(-1)
            grad_x[:, samples - half - 1:samples - 1] += grad[:, half + samples:].flip(-1)
        return grad_x, None, None


def _log_mel_cpu(
    wave: torch.Tensor, config: MelConfig, window: torch.Tensor, filterbank: torch.Tensor,
    mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
) -> torch.Tensor:
    x = _CentrePad.apply(wave, config.n_fft // 2, config.pad_mode) if config.center else wave
    shift, scale = _cpu_affine(config, config.n_mels, x.dtype, x.device, mean, std)
    return torch.ops.vcfast.log_mel_spectrogram(
        x, window, filterbank, shift, scale, config.n_fft, config.hop, float(config.power),
        float(config.log_floor), float(config.log_multiplier))


def _cpu_unsupported(config: MelConfig) -> str | None:
    """The argument the cpu backend cannot compute, or None."""
    return "top_db" if config.top_db is not None else None


def _pick_backend(backend, config: MelConfig, x: torch.Tensor, params) -> str:
    fn = "log_mel_spectrogram"
    if backend is None:
        if (x.device.type == "cpu" and _cpu_unsupported(config) is None
                and _extension.has_op("log_mel_spectrogram")
                and not (torch.is_grad_enabled()
                         and any(p is not None and p.requires_grad for p in params))):
            return "cpu"
        return "fast"
    if backend == "cpu":
        if x.device.type != "cpu":
            _fail(fn, "backend", f"'cpu' needs a CPU tensor, got one on {x.device}")
        unsupported = _cpu_unsupported(config)
        if unsupported is not None:
            _fail(fn, unsupported, "is not computed by backend='cpu' (it needs the whole "
                  "clip's maximum); use backend='fast' or None")
        if not _extension.has_op("log_mel_spectrogram"):
            raise RuntimeError(f"{fn}: backend='cpu' needs vcfast._C with the "
                               "log_mel_spectrogram op; rebuild the extension or use 'fast'")
    return backend


if _extension.has_op("log_mel_spectrogram"):

    @torch.library.register_fake("vcfast::log_mel_spectrogram")
    def _log_mel_spectrogram_fake(wave, window, filterbank, shift, scale, n_fft, hop, power,
                                  log_floor, log_multiplier):
        torch._check(wave.dim() == 2, lambda: "wave must be [batch, samples]")
        n_frames = (wave.shape[1] - n_fft) // hop + 1
        return wave.new_empty((wave.shape[0], filterbank.shape[1], n_frames))

    @torch.library.register_fake("vcfast::log_mel_spectrogram_backward")
    def _log_mel_spectrogram_backward_fake(grad, wave, window, filterbank, shift, scale, n_fft,
                                           hop, power, log_floor, log_multiplier):
        return torch.empty_like(wave)

    _MEL_SCALARS = 5  # n_fft, hop, power, log_floor, log_multiplier

    def _mel_setup_context(ctx, inputs, output):
        wave, window, filterbank, shift, scale, *scalars = inputs
        # Only the waveform and the small per-configuration tensors: the backward recomputes
        # the spectrum block by block.
        ctx.save_for_backward(wave, window, filterbank, shift, scale)
        ctx.scalars = scalars

    def _mel_backward(ctx, grad):
        grad_wave = torch.ops.vcfast.log_mel_spectrogram_backward(grad, *ctx.saved_tensors,
                                                                  *ctx.scalars)
        # Only the waveform gets a gradient; the other tensors are configuration.
        return (grad_wave,) + (None,) * (4 + _MEL_SCALARS)

    torch.library.register_autograd("vcfast::log_mel_spectrogram", _mel_backward,
                                    setup_context=_mel_setup_context)

    def _mel_no_second_derivative(ctx, grad):
        raise RuntimeError(
            "vcfast.log_mel_spectrogram: second derivatives (a double backward, "
            "create_graph=True) are not implemented by backend='cpu'; use backend='fast' or "
            "'reference' where one is needed")

    torch.library.register_autograd("vcfast::log_mel_spectrogram_backward",
                                    _mel_no_second_derivative)


# ---------------------------------------------------------------------------------------------
# Public API


def _check_wave(wave, config: MelConfig) -> None:
    fn = "log_mel_spectrogram"
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"{fn}: `wave` must be a torch.Tensor, got {type(wave).__name__}")
    if wave.is_complex() or not wave.is_floating_point():
        raise TypeError(f"{fn}: `wave` must be a real floating tensor, got dtype {wave.dtype}")
    if wave.dim() not in (1, 2):
        _fail(fn, "wave", f"must be [samples] or [batch, samples], got shape "
              f"{tuple(wave.shape)}")
    samples = wave.shape[-1]
    if config.center and config.pad_mode == "reflect":
        if samples <= config.n_fft // 2:
            _fail(fn, "wave", f"has {samples} samples; center=True with pad_mode='reflect' "
                  f"needs more than n_fft // 2 = {config.n_fft // 2}")
    elif not config.center and samples < config.n_fft:
        _fail(fn, "wave", f"has {samples} samples, shorter than one frame of "
              f"n_fft={config.n_fft} (center=False)")


def _compute_dtype(wave: torch.Tensor) -> torch.dtype:
    return torch.float64 if wave.dtype == torch.float64 else torch.float32


def _apply(wave, config, window, filterbank, mean, std, backend) -> torch.Tensor:
    """The op on prepared tensors; shared by the functional API and the module."""
    _check_wave(wave, config)
    if backend not in _BACKENDS:
        _fail("log_mel_spectrogram", "backend", f"must be one of {_BACKENDS}, got {backend!r}")
    dtype = _compute_dtype(wave)
    x = wave.to(dtype)
    x = x[None] if wave.dim() == 1 else x
    window, filterbank = window.to(x.device, dtype), filterbank.to(x.device, dtype)
    if mean is not None:
        mean, std = mean.to(x.device, dtype), std.to(x.device, dtype)
    backend = _pick_backend(backend, config, x, (window, filterbank, mean, std))
    if backend == "cpu":
        out = _log_mel_cpu(x, config, window, filterbank, mean, std)
    elif backend == "reference":
        out = log_mel_spectrogram_reference(x, config, window, filterbank, mean, std)
    elif _tracks(x) or torch.compiler.is_compiling():
        out = _log_mel_fast(x, config, window, filterbank, mean, std)
    else:
        out = _log_mel_fast_chunked(x, config, window, filterbank, mean, std)
    return out[0] if wave.dim() == 1 else out


# Without autograd the fast path runs a few clips at a time, so that its spectrum-sized
# temporaries (padded frames, complex spectrum, |X|^2) stay near this many elements instead of
# growing with the batch; every step is per clip (top_db included), so the result is the same.
_CHUNK_ELEMENTS = 1 << 20


def _log_mel_fast_chunked(x, config, window, filterbank, mean, std) -> torch.Tensor:
    per_clip = config.n_frames(x.shape[-1]) * config.n_freqs
    clips = max(1, _CHUNK_ELEMENTS // per_clip)
    if clips >= x.shape[0]:
        return _log_mel_fast(x, config, window, filterbank, mean, std)
    out = x.new_empty((x.shape[0], config.n_mels, config.n_frames(x.shape[-1])))
    for start in range(0, x.shape[0], clips):
        out[start:start + clips] = _log_mel_fast(x[start:start + clips], config, window,
                                                 filterbank, mean, std)
    return out


def _prepare(wave, preset, window, mean, std, settings):
    """(config, window, filterbank, mean, std) for a functional call."""
    if isinstance(window, torch.Tensor):
        custom_window = window
    else:
        custom_window = None
        if window is not None:
            settings["window"] = window
    mean, std = _split_normalization(settings, mean, std)
    config = resolve_mel_config(preset, **settings)
    if custom_window is not None and tuple(custom_window.shape) != (config.n_fft,):
        _fail("log_mel_spectrogram", "window", f"as a tensor must have shape "
              f"[n_fft]=[{config.n_fft}], got {tuple(custom_window.shape)}")
    return config, custom_window, mean, std


@functools.lru_cache(maxsize=32)
def _cached_window_filterbank(config: MelConfig, dtype: torch.dtype, device: torch.device):
    """The window and filterbank of a functional call, made once per configuration (outside
    inference mode, so that a graph may save them later; never modified in place)."""
    with torch.inference_mode(False), torch.no_grad():
        return config.make_window(dtype, device), config.make_filterbank(dtype, device)


def log_mel_spectrogram(
    wave: torch.Tensor,
    preset: str | MelConfig | None = None,
    *,
    window: str | torch.Tensor | None = None,
    mean: torch.Tensor | Sequence[float] | None = None,
    std: torch.Tensor | Sequence[float] | None = None,
    backend: str | None = None,
    **settings,
) -> torch.Tensor:
    """Log-mel spectrogram of ``wave`` (docs/ops.md#log-mel-spectrogram).

    Args:
        wave: ``[samples]`` or ``[batch, samples]``, float32/float64 (bf16/fp16 computed in
            float32). Differentiable.
        preset: ``"esc50_mel"``, a :class:`MelConfig`, or None (then ``sample_rate``, ``n_fft``,
            ``hop`` and ``n_mels`` are required settings).
        window: None (the configuration's, periodic Hann by default), ``"hann"``,
            ``"hamming"``, ``"rectangular"``, or a tensor of ``n_fft`` samples.
        mean, std: per-band statistics for ``normalization="mean_std"``.
        backend: None (``"cpu"`` for CPU tensors where it covers the settings, else
            ``"fast"``), ``"cpu"`` (fused C++ kernel; no ``top_db``, no double backward),
            ``"fast"`` (torch.stft + matmul + in-place epilogue), ``"reference"``.
        **settings: any :class:`MelConfig` field: sample_rate, n_fft, hop, n_mels,
            periodic_window, center (True), pad_mode ("reflect" | "constant"), power (2.0),
            f_min (0), f_max (None: Nyquist), mel_scale ("htk" | "slaney"), mel_norm
            (None | "slaney"), log ("natural" | "db"), log_floor (1e-10), top_db (None; dB
            only), normalization (None | "range" | ("mean_std", mean, std) |
            :class:`MelNormalization`), log_range.

    Returns:
        ``[n_mels, n_frames]`` or ``[batch, n_mels, n_frames]``; float64 for float64 input,
        else float32. ``esc50_mel`` on a 5 s clip (220 500 samples): ``[128, 431]``.
    """
    config, custom_window, mean, std = _prepare(wave, preset, window, mean, std, settings)
    if not isinstance(wave, torch.Tensor):
        _check_wave(wave, config)
    dtype, device = _compute_dtype(wave), wave.device
    if torch.compiler.is_compiling():
        win, fb = config.make_window(dtype, device), config.make_filterbank(dtype, device)
    else:
        win, fb = _cached_window_filterbank(config, dtype, device)
    win = custom_window if custom_window is not None else win
    mean, std = make_affine(config, dtype, device, mean, std)
    return _apply(wave, config, win, fb, mean, std, backend)
