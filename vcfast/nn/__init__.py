"""Modules built on vcfast's fused ops."""

from vcfast.nn.spectrogram import LogSpectrogram

__all__ = ["LogSpectrogram"]
