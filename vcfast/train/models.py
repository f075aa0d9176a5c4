"""Building the trainer's models and loading a trained generator back."""

from __future__ import annotations

import os
from typing import Any

import torch

from vcfast.labels import LabelSpace
from vcfast.models import StarGANDiscriminator, StarGANGenerator
from vcfast.ops.spectrogram import log_spectrogram
from vcfast.train.checkpoint import CheckpointError, load_weights, read_state, resolve_checkpoint
from vcfast.train.config import TrainConfig

__all__ = [
    "build_discriminator",
    "build_generator",
    "build_models",
    "load_generator",
    "model_spectrogram",
    "spectrogram_overrides",
]

#: Spectrogram side length of the stargan_vc preset (256 bins x 256 frames, docs/ops.md#presets).
FULL_IMAGE_SIZE = 256
_HOP, _N_FFT = 256, 1024  # stargan_vc preset


def spectrogram_overrides(image_size: int) -> dict[str, int]:
    """``log_spectrogram`` / ``spectrogram_to_wave`` overrides for an ``image_size`` square:
    none at 256 (docs/ops.md#presets); otherwise the lowest ``image_size`` bins (1 ..
    image_size)."""
    return {} if image_size == FULL_IMAGE_SIZE else {"bin_hi": 1 + image_size}


def model_spectrogram(wave: torch.Tensor, image_size: int = FULL_IMAGE_SIZE) -> torch.Tensor:
    """Waves ``[B, samples]`` -> model input ``[B, 1, image_size, image_size]`` (fused op).

    At 256 this is ``log_spectrogram(wave).unsqueeze(1)``; smaller sizes (the "tiny" test
    models) keep the first ``image_size`` frames of the lowest ``image_size`` bins, computing
    only those.
    """
    if image_size != FULL_IMAGE_SIZE:
        wave = wave[..., : (image_size - 1) * _HOP + _N_FFT]
    return log_spectrogram(wave, **spectrogram_overrides(image_size)).unsqueeze(1)


def _check_label_space(label_space: Any, what: str) -> LabelSpace:
    if not isinstance(label_space, LabelSpace):
        raise TypeError(
            f"{what}: label_space must be a vcfast.LabelSpace, got {type(label_space).__name__}"
        )
    return label_space


def build_generator(config: TrainConfig, label_space: LabelSpace) -> StarGANGenerator:
    """G of ``config.size`` for ``label_space`` (input width ``label_space.input_dim``)."""
    _check_label_space(label_space, "build_generator")
    if config.size == "paper":
        return StarGANGenerator.paper(
            label_space, checkpoint_residual_blocks=config.checkpoint_blocks
        )
    sizes = config.model_sizes
    return StarGANGenerator(
        conv_dim=sizes["g_conv_dim"],
        c_dim=label_space.input_dim,
        repeat_num=sizes["g_repeat"],
        in_channels=1,
        checkpoint_residual_blocks=config.checkpoint_blocks,
    )


def build_discriminator(config: TrainConfig, label_space: LabelSpace) -> StarGANDiscriminator:
    """D of ``config.size``: stride-2 convs down to 4x4, classifier over ``n_classes``."""
    _check_label_space(label_space, "build_discriminator")
    if config.size == "paper":
        return StarGANDiscriminator.paper(label_space, image_size=FULL_IMAGE_SIZE)
    sizes = config.model_sizes
    return StarGANDiscriminator(
        in_channels=1,
        image_size=sizes["image_size"],
        conv_dim=sizes["d_conv_dim"],
        repeat_num=sizes["d_repeat"],
        n_classes=label_space.n_classes,
    )


def build_models(
    config: TrainConfig, label_space: LabelSpace
) -> tuple[StarGANGenerator, StarGANDiscriminator]:
    """``(G, D)`` on the CPU, initialised from ``config.seed`` (the same seed, the same weights).

    The global torch RNG is re-seeded with ``config.seed`` (the training loop then continues
    from that state, which is what makes a run a function of its seed).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"build_models: config must be a TrainConfig, got {type(config).__name__}")
    _check_label_space(label_space, "build_models")
    torch.manual_seed(config.seed)
    generator = build_generator(config, label_space)
    discriminator = build_discriminator(config, label_space)
    return generator, discriminator


def load_generator(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[StarGANGenerator, LabelSpace, dict[str, Any]]:
    """A trained generator from a run directory (its latest checkpoint) or a checkpoint dir.

    Returns ``(G in eval mode on map_location, label_space, info)`` where ``info`` holds
    ``config`` (the TrainConfig fields as a dict), ``step`` and ``checkpoint`` (the directory).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: no checkpoint there, or files missing / not matching their config.
    """
    checkpoint_dir = resolve_checkpoint(path)
    state = read_state(checkpoint_dir)
    try:
        config = TrainConfig.from_dict(state["config"], source=f"{checkpoint_dir}/state.json")
        label_space = LabelSpace.from_dict(state["label_space"])
        step = int(state["step"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{checkpoint_dir}/state.json is not a vcfast checkpoint state: {exc}"
        ) from None
    generator = build_generator(config, label_space)
    load_weights(generator, checkpoint_dir / "generator.safetensors", map_location)
    generator.to(map_location).eval()
    info = {"config": config.to_dict(), "step": step, "checkpoint": str(checkpoint_dir)}
    return generator, label_space, info
