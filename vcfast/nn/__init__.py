"""Modules built on vcfast's fused ops."""

from vcfast.nn.classification import MaskedMultiGroupBCE, MaskedMultiGroupSoftmaxCE
from vcfast.nn.critic import GradientPenalty, PiecewiseLinearCritic
from vcfast.nn.spectrogram import LogSpectrogram

__all__ = [
    "GradientPenalty",
    "LogSpectrogram",
    "MaskedMultiGroupBCE",
    "MaskedMultiGroupSoftmaxCE",
    "PiecewiseLinearCritic",
]
