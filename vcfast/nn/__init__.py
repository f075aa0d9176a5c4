"""Modules built on vcfast's fused ops."""

from vcfast.nn.classification import MaskedMultiGroupBCE, MaskedMultiGroupSoftmaxCE
from vcfast.nn.critic import GradientPenalty, PiecewiseLinearCritic
from vcfast.nn.label_conv import LabelConcatConv2d
from vcfast.nn.mel import LogMelSpectrogram
from vcfast.nn.norm_act import InstanceNormReLUConv2d, LeanResidualBlock, instance_norm_relu_conv
from vcfast.nn.spectrogram import LogSpectrogram

__all__ = [
    "GradientPenalty",
    "InstanceNormReLUConv2d",
    "LabelConcatConv2d",
    "LeanResidualBlock",
    "LogMelSpectrogram",
    "LogSpectrogram",
    "MaskedMultiGroupBCE",
    "MaskedMultiGroupSoftmaxCE",
    "PiecewiseLinearCritic",
    "instance_norm_relu_conv",
]
