"""nn.Module wrapper of the fused log-spectrogram."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vcfast.ops.spectrogram import SpectrogramConfig, _apply, resolve_config


class LogSpectrogram(nn.Module):
    """``[..., samples]`` waveform -> ``[..., n_bins, n_frames]`` normalised log spectrogram.

    The window and per-bin normalisation are buffers, so ``.to(device)`` moves them and
    ``state_dict`` carries the specgan mean/std. See :func:`vcfast.log_spectrogram` for the
    math, presets and arguments. The gradient flows to the waveform, so the module can sit
    inside a model (for example a generator that outputs audio).

    Example::

        spec = vcfast.nn.LogSpectrogram()            # stargan_vc: 66 304 samples -> 256 x 256
        x = spec(torch.randn(8, 66304))              # [8, 256, 256], values in [0, 1]
    """

    def __init__(
        self,
        preset: str | SpectrogramConfig = "stargan_vc",
        *,
        backend: str | None = None,
        nan_policy: str = "auto",
        mean: torch.Tensor | Sequence[float] | None = None,
        std: torch.Tensor | Sequence[float] | None = None,
        precision: str = "ieee",
        **overrides,
    ) -> None:
        super().__init__()
        self.config = resolve_config(preset, **overrides)
        self.backend = backend
        self.nan_policy = nan_policy
        self.precision = precision
        shift, scale = self.config.make_affine(torch.float32, None, mean, std)
        self.register_buffer("window", self.config.make_window(torch.float32))
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return _apply(wave, self.config, self.window, self.shift, self.scale, self.backend,
                      self.nan_policy, self.precision)

    def n_frames(self, samples: int) -> int:
        return self.config.n_frames(samples)

    def extra_repr(self) -> str:
        c = self.config
        lo, hi = c.kept_bins
        return (f"n_fft={c.n_fft}, hop={c.hop}, window={c.window}, bins=[{lo}, {hi}), "
                f"normalization={c.normalization}, backend={self.backend or 'auto'}")
