"""Spectrogram -> waveform: undo the normalisation, then Fast Griffin-Lim phase retrieval.

``spectrogram_to_wave`` is the approximate inverse of :func:`vcfast.log_spectrogram` for the
same preset/overrides (and ``mean``/``std`` for "standardize"). It

1. undoes the per-bin affine and the log (see ``_magnitudes``) to get linear STFT magnitudes
   |X| for the kept bins [bin_lo, bin_hi), and puts zeros in every other bin of the
   ``n_fft // 2 + 1``-bin one-sided spectrum (DC, and above 4 kHz for stargan_vc: nothing is
   known about them, and zero is what adds no energy the forward op could not see);
2. runs Fast Griffin-Lim (Perraudin, Balazs & Søndergaard, "A fast Griffin-Lim algorithm",
   WASPAA 2013), the same loop as ``torchaudio.transforms.GriffinLim`` but on STFT helpers
   that frame exactly like the forward op: no centering, frame f = samples
   ``f*hop .. f*hop + n_fft - 1``, window from ``config.make_window``, and specgan's
   ``pad_end`` zeros are enforced as known zeros in every iteration.

What cannot be recovered (inherent to the forward op, not to this implementation):

* the phase (Griffin-Lim only finds *a* signal whose STFT magnitude is close to the target;
  the result can sound phasey and its sign/time-shift is arbitrary);
* everything below the log floor: a value at the floor (stargan_vc: y = 0, |X| <= 1.024) is
  mapped back to the floor itself, so quiet bins come back slightly louder than they were;
* everything clipped: specgan clips y to [-1, 1] (3 std of ln|X|), so louder/quieter bins
  come back at the clip level;
* bins outside [bin_lo, bin_hi) (stargan_vc: DC and 4-8 kHz), which come back silent.

Pure torch ops: any device, batched over leading dims, differentiable if you need it (but
the graph of n_iter STFT round trips is large; call under ``torch.no_grad()`` otherwise).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vcfast.ops.spectrogram import SpectrogramConfig, resolve_config

__all__ = ["spectrogram_to_wave", "framed_stft", "framed_istft"]

# Overlap-added window-square envelope below which a sample counts as unobservable (it got
# ~zero weight in every frame). Same threshold as torch.istft's NOLA check; such samples are
# set to 0 (the minimum-norm choice) instead of dividing by ~0.
_ENVELOPE_EPS = 1e-11
# Added to |angles| before normalising to unit modulus, as torchaudio does: keeps 0/0 out.
_PHASE_EPS = 1e-16
_INITS = ("zeros", "random")


# ---------------------------------------------------------------------------------------------
# STFT helpers with the forward op's framing


def framed_stft(x: torch.Tensor, window: torch.Tensor, hop: int) -> torch.Tensor:
    """One-sided STFT without centering: ``[B, samples] -> [B, n_fft // 2 + 1, n_frames]``.

    ``X[k, f] = sum_n window[n] * x[f*hop + n] * exp(-2j*pi*k*n / n_fft)`` with
    ``n_fft = len(window)`` and ``n_frames = (samples - n_fft) // hop + 1`` (trailing samples
    that do not fill a frame are ignored), i.e. exactly the forward op's spectrum.
    """
    n_fft = window.shape[-1]
    frames = x.unfold(-1, n_fft, hop) * window  # [B, n_frames, n_fft]
    return torch.fft.rfft(frames, n=n_fft, dim=-1).transpose(-1, -2)


def _overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """``[B, n_frames, n_fft] -> [B, (n_frames - 1) * hop + n_fft]``, summing overlaps."""
    batch, n_frames, n_fft = frames.shape
    length = (n_frames - 1) * hop + n_fft
    # fold is col2im: column f of the [B, n_fft, n_frames] input lands at f*hop .. f*hop+n_fft-1.
    out = F.fold(frames.transpose(1, 2), output_size=(1, length), kernel_size=(1, n_fft),
                 stride=(1, hop))
    return out.reshape(batch, length)


def _inverse_envelope(window: torch.Tensor, hop: int, n_frames: int,
                      known_zeros: int = 0) -> torch.Tensor:
    """``1 / sum_f window[n - f*hop]**2`` where that sum is > eps, else 0; ``[samples]``.

    The last ``known_zeros`` samples are forced to 0 as well: samples the forward op is
    known to have seen as zeros (specgan's ``pad_end``), so the inverse keeps them zero.
    """
    squares = (window * window).expand(1, n_frames, window.shape[-1])
    envelope = _overlap_add(squares, hop)[0]
    inv = torch.where(envelope > _ENVELOPE_EPS, 1.0 / envelope.clamp_min(_ENVELOPE_EPS),
                      torch.zeros_like(envelope))
    if known_zeros:
        inv[-known_zeros:] = 0
    return inv


def framed_istft(spectrum: torch.Tensor, window: torch.Tensor, hop: int,
                 inv_envelope: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares inverse of :func:`framed_stft`: ``[B, n_fft//2+1, n_frames] -> [B, samples]``.

    Each frame is ``irfft``'d, multiplied by the window again, overlap-added, and divided by
    the overlap-added squared window (Griffin & Lim 1984, eq. 6): the signal whose STFT is
    closest to ``spectrum`` in the least-squares sense, so ``framed_istft(framed_stft(x)) == x``
    wherever the envelope is nonzero. Samples with envelope <= 1e-11 (e.g. sample 0 under a
    periodic Hann window, which every frame weights by 0) come back as 0. Unlike
    ``torch.istft(center=False)`` this accepts windows that are 0 at the edges.
    ``samples = (n_frames - 1) * hop + n_fft``.
    """
    n_fft = window.shape[-1]
    frames = torch.fft.irfft(spectrum.transpose(-1, -2), n=n_fft, dim=-1) * window
    if inv_envelope is None:
        inv_envelope = _inverse_envelope(window, hop, spectrum.shape[-1])
    return _overlap_add(frames, hop) * inv_envelope


# ---------------------------------------------------------------------------------------------
# Normalisation inverse


def _magnitudes(spec: torch.Tensor, config: SpectrogramConfig, shift: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """Normalised log spectrogram ``[B, n_bins, F]`` -> linear |X| of the kept bins."""
    # y = (l - shift) * scale  =>  l = y / scale + shift (scale > 0 for every normalisation).
    log_mag = spec / scale[:, None] + shift[:, None]
    # l = ln(max(s + offset, floor)): exp gives s + offset (or the floor, which is as close as
    # we can get); clamp because exp(l) < offset would otherwise be a negative magnitude.
    s = (torch.exp(log_mag) - config.log_offset).clamp_min(0.0)
    if config.power != 1.0:
        s = s ** (1.0 / config.power)
    return s * config.magnitude_scale


# ---------------------------------------------------------------------------------------------
# Public API


def _fail_type(message: str) -> None:
    raise TypeError(f"spectrogram_to_wave: {message}")


def _fail_value(message: str) -> None:
    raise ValueError(f"spectrogram_to_wave: {message}")


def _check_args(spec, config, preset, overrides, n_iter, momentum, length,
                init) -> tuple[int, float]:
    if not isinstance(spec, torch.Tensor):
        _fail_type(f"`spec` must be a torch.Tensor, got {type(spec).__name__}")
    if spec.is_complex() or not spec.is_floating_point():
        _fail_type(f"`spec` must be a real floating tensor (float32/float64; bf16/fp16 are "
                   f"computed in float32), got dtype {spec.dtype}")
    if spec.dim() < 2:
        _fail_value(f"`spec` must have shape [..., n_bins, n_frames], got {tuple(spec.shape)}")
    if spec.shape[-2] != config.n_bins:
        name = f"preset {preset}" if isinstance(preset, str) else "the given SpectrogramConfig"
        if overrides:
            name += f" with overrides {sorted(overrides)}"
        _fail_value(f"`spec` has {spec.shape[-2]} rows but {name} keeps {config.n_bins} bins")
    if spec.shape[-1] < 1:
        _fail_value("`spec` has 0 frames")
    if isinstance(n_iter, bool):
        _fail_type("`n_iter` must be an int >= 1, got a bool")
    try:
        n_iter = operator.index(n_iter)
    except TypeError:
        _fail_type(f"`n_iter` must be an int >= 1, got {type(n_iter).__name__}")
    if n_iter < 1:
        _fail_value(f"`n_iter` must be >= 1, got {n_iter}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        _fail_type(f"`momentum` must be a float in [0, 1), got {type(momentum).__name__}")
    momentum = float(momentum)
    if not 0.0 <= momentum < 1.0:
        # Perraudin et al. prove convergence for alpha < 1; alpha > 1 is known to diverge.
        _fail_value(f"`momentum` must be in [0, 1) (0 = plain Griffin-Lim; >= 1 is unstable), "
                    f"got {momentum}")
    if length is not None:
        if isinstance(length, bool):
            _fail_type("`length` must be an int >= 1 or None, got a bool")
        try:
            length = operator.index(length)
        except TypeError:
            _fail_type(f"`length` must be an int >= 1 or None, got {type(length).__name__}")
        if length < 1:
            _fail_value(f"`length` must be >= 1, got {length}")
    if init not in _INITS:
        _fail_value(f"`init` must be one of {_INITS}, got {init!r}")
    if torch.compiler.is_compiling():
        # A data-dependent `if` would break the graph. On the CPU the check becomes an
        # assertion inside the graph (RuntimeError); on a GPU it would be a device-side
        # assert, which leaves the CUDA context unusable, so there NaN/Inf reach the output.
        if spec.device.type == "cpu":
            torch._assert_async(torch.isfinite(spec).all(),
                                "spectrogram_to_wave: `spec` contains NaN or Inf")
    elif not torch.isfinite(spec).all():
        _fail_value("`spec` contains NaN or Inf")
    return n_iter, momentum


def spectrogram_to_wave(
    spec: torch.Tensor,
    preset: str | SpectrogramConfig = "stargan_vc",
    *,
    n_iter: int = 32,
    momentum: float = 0.99,
    mean: torch.Tensor | Sequence[float] | None = None,
    std: torch.Tensor | Sequence[float] | None = None,
    length: int | None = None,
    init: str = "zeros",
    generator: torch.Generator | None = None,
    return_convergence: bool = False,
    **overrides,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Waveform whose :func:`vcfast.log_spectrogram` approximates ``spec`` (Fast Griffin-Lim).

    Args:
        spec: ``[..., n_bins, n_frames]`` normalised log spectrogram, as returned by
            ``log_spectrogram(wave, preset, mean=..., std=..., **overrides)`` (row 0 = bin
            ``bin_lo``). Real float; float64 is computed in float64, anything else in float32.
            Any device; leading dims are a batch.
        preset: ``"stargan_vc"`` (default), ``"specgan"`` or a :class:`SpectrogramConfig`;
            with ``**overrides`` it must be the configuration that produced ``spec``.
        n_iter: Griffin-Lim iterations (int >= 1). Each costs one STFT and one inverse STFT.
        momentum: Fast Griffin-Lim's alpha in [0, 1); 0.99 (default) as recommended by
            Perraudin et al., 0 gives plain Griffin-Lim. alpha > 1 is unstable, hence refused.
        mean, std: per-bin statistics for ``normalization="standardize"`` (specgan), the same
            ones given to the forward op (``vcfast.measure_bin_stats``); required there.
        length: output length in samples: crop, or pad with zeros at the end. Default
            ``(n_frames - 1) * hop + n_fft - pad_end`` (stargan_vc: 256 frames -> 66 304,
            specgan: 128 frames -> 16 384), the shortest input giving ``n_frames`` frames.
        init: initial phase: ``"zeros"`` (all bins phase 0; deterministic) or ``"random"``
            (uniform in [0, 2 pi), drawn with ``generator``).
        generator: ``torch.Generator`` on ``spec``'s device for ``init="random"``.
        return_convergence: also return the spectral convergence of the result.
        **overrides: any :class:`SpectrogramConfig` field, as for the forward op.

    Returns:
        ``wave`` ``[..., samples]`` in the units the forward op expects (stargan_vc: full
        scale ~ 1), float64 for float64 ``spec`` else float32; with ``return_convergence``
        ``(wave, sc)`` where ``sc`` ``[...]`` is
        ``||framed_stft(wave)|_kept - S||_F / ||S||_F`` over the kept bins and all frames,
        ``S`` being the magnitudes decoded from ``spec``; measured on the wave of the default
        length (with the ``pad_end`` zeros), i.e. before ``length`` crops or pads. 0 means a
        perfect (consistent) inverse; it includes the error of floor/clip values.

    Raises:
        TypeError: ``spec`` not a real floating tensor; ``n_iter``/``momentum``/``length`` of
            the wrong type; unknown override.
        ValueError: row count != the configuration's n_bins, NaN/Inf in ``spec``, ``n_iter`` <
            1, ``momentum`` outside [0, 1), bad ``init``/``length``, ``mean``/``std`` missing
            or wrongly shaped (raised by ``SpectrogramConfig.make_affine``). Under
            ``torch.compile`` NaN/Inf in a CPU ``spec`` raise RuntimeError instead (an
            assertion in the graph); in a GPU ``spec`` they propagate to the output.
    """
    config = resolve_config(preset, **overrides)
    n_iter, momentum = _check_args(spec, config, preset, overrides, n_iter, momentum, length, init)
    dtype = torch.float64 if spec.dtype == torch.float64 else torch.float32
    device = spec.device
    shift, scale = config.make_affine(dtype, device, mean, std)
    window = config.make_window(dtype, device)

    batch_shape = spec.shape[:-2]
    n_frames = spec.shape[-1]
    y = spec.to(dtype).reshape(-1, config.n_bins, n_frames)
    target = _magnitudes(y, config, shift, scale)  # [B, n_bins, F], the kept bins only
    lo, hi = config.kept_bins
    # The full one-sided spectrum the loop works on: unknown bins stay at magnitude 0.
    magnitude = F.pad(target, (0, 0, lo, config.n_rfft - hi))

    inv_envelope = _inverse_envelope(window, config.hop, n_frames, known_zeros=config.pad_end)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    if init == "random":
        phase = torch.rand(magnitude.shape, dtype=dtype, device=device, generator=generator)
        angles = torch.polar(torch.ones_like(phase), phase * (2 * math.pi))
    else:
        angles = torch.ones(magnitude.shape, dtype=complex_dtype, device=device)

    # Fast Griffin-Lim (torchaudio's loop): project onto consistent spectrograms (istft then
    # stft), extrapolate with momentum from the previous projection, keep only the phase.
    tprev = None
    for _ in range(n_iter):
        inverse = framed_istft(magnitude * angles, window, config.hop, inv_envelope)
        rebuilt = framed_stft(inverse, window, config.hop)
        angles = rebuilt
        if momentum and tprev is not None:
            angles = angles - tprev * (momentum / (1.0 + momentum))
        angles = angles / (angles.abs() + _PHASE_EPS)
        tprev = rebuilt
    wave = framed_istft(magnitude * angles, window, config.hop, inv_envelope)

    if return_convergence:
        achieved = framed_stft(wave, window, config.hop)[:, lo:hi].abs()
        sc = (torch.linalg.vector_norm(achieved - target, dim=(-2, -1))
              / torch.linalg.vector_norm(target, dim=(-2, -1)).clamp_min(torch.finfo(dtype).tiny))

    # Drop the pad_end samples the forward op appended (they are zeros here anyway).
    natural = config.samples_for_frames(n_frames)
    out_len = natural if length is None else length
    if out_len <= natural:
        wave = wave[:, :out_len]
    else:
        wave = F.pad(wave[:, :natural], (0, out_len - natural))
    wave = wave.reshape(*batch_shape, out_len)
    if return_convergence:
        return wave, sc.reshape(batch_shape)
    return wave
