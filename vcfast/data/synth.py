"""Synthetic speech-like audio for demos and tests (no dataset download needed)."""

from __future__ import annotations

import math

import torch

__all__ = ["synthetic_speech"]


def synthetic_speech(n: int = 66304, sr: int = 16000, seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Synthetic speech: sawtooth glottal source at a gliding f0 (100 -> 200 -> 100 Hz) through
    three formant resonances (vowels a/i/u, one per syllable, FFT-filtered), 4 Hz syllable
    envelope with random loudness, a little noise, peak-normalised to 1. Returns ``[n]`` of
    ``dtype``.

    Not speech, but it has what the spectrogram tests and the demo need: harmonics with
    a moving pitch, formant structure, syllable-rate loudness changes and a noise floor."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    t = torch.arange(n, dtype=dt) / sr
    f0 = 150 - 50 * torch.cos(2 * math.pi * t / t[-1]) + 3 * torch.sin(2 * math.pi * 5 * t)
    source = 2 * torch.frac(torch.cumsum(f0 / sr, 0)) - 1  # 1/k harmonic spectrum
    source_spec = torch.fft.rfft(source)
    freqs = torch.fft.rfftfreq(n, 1 / sr).to(dt)

    def formant_filter(formants):
        # Sum of resonance magnitude responses (centre frequency, bandwidth in Hz).
        return sum(1 / torch.sqrt(1 + ((freqs - fc) / (bw / 2)) ** 2) for fc, bw in formants)

    vowels = [[(700, 110), (1220, 120), (2600, 160)],  # a
              [(300, 70), (2300, 100), (3000, 150)],  # i
              [(350, 80), (800, 90), (2400, 150)]]  # u
    syllable = torch.floor(t * 4.0).long()
    envelope = torch.sin(math.pi * torch.frac(t * 4.0)) ** 2
    loudness = 0.6 + 0.4 * torch.rand(int(syllable.max()) + 1, generator=g, dtype=dt)
    envelope = envelope * loudness[syllable]
    x = torch.zeros(n, dtype=dt)
    for i, formants in enumerate(vowels):
        voiced = torch.fft.irfft(source_spec * formant_filter(formants), n)
        x = x + torch.where(syllable % 3 == i, voiced, torch.zeros_like(voiced))
    x = x / x.abs().max() * envelope + 0.003 * torch.randn(n, generator=g, dtype=dt)
    return (x / x.abs().max()).to(dtype)
