"""Held-out evaluation of a StarGAN-VC generator/discriminator pair."""

from __future__ import annotations

from typing import Any

import torch

from vcfast.data import Corpus, StarGANPairDataset
from vcfast.labels import LabelSpace
from vcfast.metrics import multigroup_accuracy
from vcfast.models.generator import inference_mode, module_device
from vcfast.ops.inverse import spectrogram_to_wave
from vcfast.train.models import FULL_IMAGE_SIZE, model_spectrogram, spectrogram_overrides

__all__ = ["evaluate", "flatten_metrics"]


@torch.no_grad()
def evaluate(
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    held_out: Corpus,
    label_space: LabelSpace,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 4,
    seed: int = 0,
    max_utterances: int | None = None,
    griffin_lim_iterations: int = 32,
    bf16: bool = False,
) -> dict[str, Any]:
    """Scores on held-out utterances (one crop each, docs/ops.md#crops, deterministic given
    ``seed``).

    Each crop x (labels c) is paired with another speaker's utterance whose labels c' are
    the conversion target (the training pairing). Reports

    * ``accuracy_real``: D's classifier per-group accuracy on the real crops vs c
      (:func:`vcfast.multigroup_accuracy`: ``{group: {"accuracy", "correct", "count"}, "mean"}``);
    * ``accuracy_converted``: the same on G(x, c') vs c' (does the conversion fool the
      classifier into the target domain?);
    * ``reconstruction_l1``: mean |G(G(x, c'), c) - x| (cycle consistency);
    * ``spectral_convergence``: Fast Griffin-Lim's ``||STFT(y)| - S|| / ||S||`` for the first
      converted utterance (how well the converted spectrogram can be turned into audio).

    Both models run in eval mode (G's InstanceNorm then uses its running statistics, as at
    conversion time) and are put back in their previous mode afterwards.
    """
    if not isinstance(held_out, Corpus):
        raise TypeError(
            f"evaluate: held_out must be a vcfast.data.Corpus, got {type(held_out).__name__}"
        )
    if not isinstance(label_space, LabelSpace):
        raise TypeError(
            f"evaluate: label_space must be a vcfast.LabelSpace, got {type(label_space).__name__}"
        )
    if held_out.label_space != label_space:
        raise ValueError(
            "evaluate: held_out.label_space differs from label_space (a corpus/checkpoint mismatch)"
        )
    if not held_out.utterances:
        raise ValueError("evaluate: the held-out corpus has no utterances")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be an int >= 1, got {batch_size!r}")
    device = torch.device(device) if device is not None else module_device(generator)
    image_size = int(getattr(discriminator, "image_size", FULL_IMAGE_SIZE))
    n_items = len(held_out.utterances)
    if max_utterances is not None:
        n_items = min(n_items, int(max_utterances))
    dataset = StarGANPairDataset(held_out, seed=seed, items_per_epoch=n_items)
    was_training = discriminator.training
    discriminator.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    logits_real, logits_fake, labels_real, labels_orig = [], [], [], []
    l1_sum, l1_count = 0.0, 0
    first_converted = None
    # G converts as `vcfast convert` does: instance statistics (vcfast.models.inference_mode).
    try:
        with inference_mode(generator):
            for start in range(0, n_items, batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, n_items))]
                wave_real = torch.stack([item["wave_real"] for item in items]).to(device)
                real_idx = torch.stack([item["labels_real"] for item in items]).to(device)
                orig_idx = torch.stack([item["labels_orig"] for item in items]).to(device)
                x_real = model_spectrogram(wave_real, image_size)
                c_real = label_space.generator_input(real_idx, device=device)
                c_target = label_space.generator_input(orig_idx, device=device)
                with autocast:
                    x_fake = generator(x_real, c_target).float()
                    x_rec = generator(x_fake, c_real).float()
                    _, cls_real = discriminator(x_real)
                    _, cls_fake = discriminator(x_fake)
                logits_real.append(cls_real.float().cpu())
                logits_fake.append(cls_fake.float().cpu())
                labels_real.append(real_idx.cpu())
                labels_orig.append(orig_idx.cpu())
                l1_sum += float((x_rec - x_real).abs().sum())
                l1_count += x_real.numel()
                if first_converted is None:
                    first_converted = x_fake[0, 0].float()
    finally:
        discriminator.train(was_training)
    _, convergence = spectrogram_to_wave(
        first_converted,
        n_iter=griffin_lim_iterations,
        return_convergence=True,
        **spectrogram_overrides(image_size),
    )
    return {
        "n_utterances": n_items,
        "accuracy_real": multigroup_accuracy(
            torch.cat(logits_real), torch.cat(labels_real), label_space
        ),
        "accuracy_converted": multigroup_accuracy(
            torch.cat(logits_fake), torch.cat(labels_orig), label_space
        ),
        "reconstruction_l1": l1_sum / max(l1_count, 1),
        "spectral_convergence": float(convergence),
    }


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``evaluate``'s nested result as flat ``name -> number`` (for CSV and TensorBoard)."""
    flat: dict[str, float] = {}
    for kind, short in (("accuracy_real", "acc_real"), ("accuracy_converted", "acc_converted")):
        for group, value in metrics[kind].items():
            flat[f"{short}_{group}"] = value if group == "mean" else value["accuracy"]
    flat["reconstruction_l1"] = float(metrics["reconstruction_l1"])
    flat["spectral_convergence"] = float(metrics["spectral_convergence"])
    return flat
