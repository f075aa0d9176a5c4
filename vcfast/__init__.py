"""vcfast: fused Triton and C++/CUDA kernels for StarGAN voice conversion on spectrograms.

Functional API (``vcfast.log_spectrogram``, ...) and modules (``vcfast.nn``) work with or
without the compiled extension; ``vcfast.backends()`` says which kernels can run here.
"""

from vcfast import data, labels, memory, metrics, models, nn
from vcfast._extension import backends, build_info, cpu_isa, set_cpu_isa
from vcfast.labels import LabelSpace
from vcfast.metrics import multigroup_accuracy
from vcfast.models import convert_stargan
from vcfast.nn.mel import LogMelSpectrogram
from vcfast.ops.classification import masked_multigroup_bce, masked_multigroup_softmax_ce
from vcfast.ops.gradient_penalty import gradient_penalty
from vcfast.ops.inverse import spectrogram_to_wave
from vcfast.ops.mel import MEL_PRESETS, MelConfig, log_mel_spectrogram, mel_filterbank
from vcfast.ops.spectrogram import (
    PRESETS,
    SpectrogramConfig,
    log_spectrogram,
    measure_bin_stats,
    resolve_config,
)

__version__ = "0.1.0"

__all__ = [
    "LabelSpace",
    "LogMelSpectrogram",
    "MEL_PRESETS",
    "MelConfig",
    "PRESETS",
    "SpectrogramConfig",
    "backends",
    "build_info",
    "cpu_isa",
    "set_cpu_isa",
    "convert_stargan",
    "log_mel_spectrogram",
    "log_spectrogram",
    "labels",
    "masked_multigroup_bce",
    "masked_multigroup_softmax_ce",
    "measure_bin_stats",
    "mel_filterbank",
    "memory",
    "metrics",
    "models",
    "multigroup_accuracy",
    "data",
    "gradient_penalty",
    "nn",
    "resolve_config",
    "spectrogram_to_wave",
]
