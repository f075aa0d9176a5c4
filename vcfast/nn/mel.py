"""nn.Module wrapper of the log-mel spectrogram (docs/ops.md#log-mel-spectrogram)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vcfast.ops.mel import MelConfig, _apply, _prepare, make_affine


class LogMelSpectrogram(nn.Module):
    """``[samples]`` / ``[batch, samples]`` waveform -> ``[(batch,) n_mels, n_frames]``.

    The window and the mel filterbank are buffers (derived from the settings, so left out of
    the state_dict), and so are the per-band ``mean``/``std`` of ``normalization="mean_std"``
    (kept in the state_dict): ``.to(device)`` and ``.to(torch.float64)`` move them all. See
    :func:`vcfast.log_mel_spectrogram` for the math, presets and settings. The gradient flows
    to the waveform.

    Example::

        mel = vcfast.nn.LogMelSpectrogram("esc50_mel")   # 5 s at 44.1 kHz -> 128 x 431
        x = mel(torch.randn(8, 220500))                  # [8, 128, 431]
    """

    def __init__(
        self,
        preset: str | MelConfig | None = None,
        *,
        window: str | torch.Tensor | None = None,
        mean: torch.Tensor | Sequence[float] | None = None,
        std: torch.Tensor | Sequence[float] | None = None,
        backend: str | None = None,
        **settings,
    ) -> None:
        super().__init__()
        config, custom_window, mean, std = _prepare(None, preset, window, mean, std, settings)
        if backend not in (None, "reference", "fast", "cpu"):
            raise ValueError("LogMelSpectrogram: `backend` must be None, 'reference', 'fast' "
                             f"or 'cpu', got {backend!r}")
        self.config = config
        self.backend = backend
        dtype = torch.float32
        win = (custom_window.to(dtype) if custom_window is not None
               else config.make_window(dtype))
        self.register_buffer("window", win, persistent=False)
        self.register_buffer("filterbank", config.make_filterbank(dtype), persistent=False)
        mean, std = make_affine(config, dtype, None, mean, std)
        if mean is not None:
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
        else:
            self.mean = self.std = None

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return _apply(wave, self.config, self.window, self.filterbank, self.mean, self.std,
                      self.backend)

    def n_frames(self, samples: int) -> int:
        return self.config.n_frames(samples)

    def extra_repr(self) -> str:
        c = self.config
        text = (f"sample_rate={c.sample_rate}, n_fft={c.n_fft}, hop={c.hop}, n_mels={c.n_mels}, "
                f"f=[{c.f_min}, {c.resolved_f_max}] Hz, mel_scale={c.mel_scale}, "
                f"mel_norm={c.mel_norm}, power={c.power}, center={c.center}")
        if c.center:
            text += f", pad_mode={c.pad_mode}"
        text += f", log={c.log}"
        if c.top_db is not None:
            text += f", top_db={c.top_db}"
        if c.normalization is not None:
            text += f", normalization={c.normalization}"
        return text + f", backend={self.backend or 'auto'}"
