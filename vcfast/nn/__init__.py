"""Modules built on vcfast's fused ops."""

from vcfast.nn.critic import GradientPenalty, PiecewiseLinearCritic
from vcfast.nn.spectrogram import LogSpectrogram

__all__ = ["GradientPenalty", "LogSpectrogram", "PiecewiseLinearCritic"]
