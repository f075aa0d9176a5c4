"""An independent judge of voice conversion: a speaker classifier trained apart from the GAN
(docs/training.md#judging-conversion).

StarGAN-VC's discriminator has its own classifier head, but it is trained together with the
generator, so its verdict on converted speech is not independent: G learns to satisfy exactly
that classifier. The judge is a separate network (six conv-BatchNorm-LeakyReLU layers, one
pooled 3x3 conv head per label group, the architecture of examples/speaker_classifier.py),
trained only on the real spectrograms of the corpus's *training* split with
``vcfast.masked_multigroup_softmax_ce`` (unknown labels left out,
docs/ops.md#softmax-cross-entropy). :func:`judge_conversion` then converts the held-out
utterances to every other speaker with the generator and asks the judge whom it hears.

    judge = train_judge(corpus, steps=300, batch=8, device="cpu", seed=0, image_size=256)
    judge.save("run/judge.pt"); judge = Judge.load("run/judge.pt")
    generator, label_space, _ = vcfast.train.load_generator("run")
    scores = judge_conversion(judge, generator, corpus)
"""

from __future__ import annotations

import io
import math
import os
import pickle
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vcfast.data import Corpus, load_audio, load_crop, random_crop
from vcfast.labels import LabelSpace
from vcfast.metrics import multigroup_accuracy
from vcfast.models.generator import module_device
from vcfast.ops.classification import masked_multigroup_softmax_ce
from vcfast.train.checkpoint import write_atomically
from vcfast.train.models import FULL_IMAGE_SIZE, model_spectrogram
from vcfast.voice import convert_spectrogram

__all__ = ["Judge", "MultiHeadClassifier", "conv_bn_lrelu", "judge_conversion", "train_judge"]

#: Smallest spectrogram side the five stride-2 convolutions can take (32 -> 1 x 1).
MIN_IMAGE_SIZE = 32
_FORMAT = "vcfast-judge-1"


def conv_bn_lrelu(c_in: int, c_out: int, k: int, s: int, p: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, s, p), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)
    )


class MultiHeadClassifier(nn.Module):
    """Six conv-BN-LeakyReLU layers (3x3 stride 1, then five 4x4 stride 2, widening
    ``width`` -> ``16 * width`` channels), then one global-average-pooled 3x3 conv head per label
    group. Output ``[N, sum(group_sizes)]``: the groups' logits side by side, the layout of
    ``vcfast.masked_multigroup_softmax_ce`` and ``vcfast.multigroup_accuracy``."""

    def __init__(self, group_sizes: list[int], width: int = 64):
        super().__init__()
        chans = [width, width, 2 * width, 4 * width, 8 * width, 16 * width]
        layers = [conv_bn_lrelu(1, chans[0], 3, 1, 1)]
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers.append(conv_bn_lrelu(c_in, c_out, 4, 2, 1))
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Conv2d(chans[-1], n, 3, 1, 1) for n in group_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.cat([head(h).mean(dim=(2, 3)) for head in self.heads], dim=1)


class Judge(nn.Module):
    """A :class:`MultiHeadClassifier` over ``label_space``'s groups that reads
    ``[N, 1, image_size, image_size]`` model spectrograms (``vcfast.train.models.
    model_spectrogram``: the crops the generator of that image size sees).

    ``info`` records how it was trained (steps, seconds, seed, final loss, utterances).
    """

    def __init__(self, label_space: LabelSpace, image_size: int = FULL_IMAGE_SIZE,
                 width: int = 16):
        super().__init__()
        if not isinstance(label_space, LabelSpace):
            raise TypeError(f"Judge: label_space must be a vcfast.LabelSpace, "
                            f"got {type(label_space).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) \
                or image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"Judge: image_size must be an int >= {MIN_IMAGE_SIZE}, "
                             f"got {image_size!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"Judge: width must be an int >= 1, got {width!r}")
        self.label_space = label_space
        self.image_size = image_size
        self.width = width
        self.info: dict[str, Any] = {}
        self.classifier = MultiHeadClassifier(list(label_space.sizes), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def spectrogram(self, waves: torch.Tensor) -> torch.Tensor:
        """Waves ``[B, samples]`` (crops) -> the judge's input ``[B, 1, S, S]``."""
        return model_spectrogram(waves, self.image_size)

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights, label space, sizes and ``info`` to ``path`` (torch.save format),
        atomically (temp file + os.replace); returns the path."""
        path = Path(path)
        buf = io.BytesIO()
        torch.save({
            "format": _FORMAT,
            "label_space": self.label_space.to_dict(),
            "image_size": self.image_size,
            "width": self.width,
            "info": dict(self.info),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }, buf)
        write_atomically(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Judge:
        """A judge written by :meth:`save`, in eval mode on ``map_location``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"judge file {str(path)!r} does not exist")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
                raise ValueError(f"not a {_FORMAT} file")
            judge = cls(LabelSpace.from_dict(blob["label_space"]), int(blob["image_size"]),
                        int(blob["width"]))
            judge.load_state_dict(blob["state_dict"])
        except (KeyError, RuntimeError, ValueError, TypeError, EOFError,
                pickle.UnpicklingError) as exc:
            raise ValueError(f"{str(path)!r} is not a judge written by vcfast.judge: {exc}") \
                from None
        judge.info = dict(blob.get("info") or {})
        return judge.to(map_location).eval()


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"`{name}` must be an int >= {lo}, got {value!r}")
    return value


def train_judge(corpus: Corpus, steps: int = 300, batch: int = 8,
                device: str | torch.device = "cpu", seed: int = 0, *,
                image_size: int = FULL_IMAGE_SIZE, width: int = 16, lr: float = 2e-4,
                held_out_per_speaker: int = 1) -> Judge:
    """Train a :class:`Judge` on random crops (docs/ops.md#crops) of the real utterances of
    ``corpus.split(held_out_per_speaker, seed)``'s training split, the same split the trainer
    uses with the same seed, so the held-out utterances stay unseen by the judge too.

    Adam (lr ``lr``, betas 0.5/0.999), ``masked_multigroup_softmax_ce`` averaged over groups.
    The weights are initialised from ``seed`` without touching the global RNG. Returns the
    judge in eval mode on ``device`` with ``info`` = ``{"steps", "batch", "seed", "seconds",
    "final_loss", "train_utterances", "held_out_per_speaker"}``.
    """
    if not isinstance(corpus, Corpus):
        raise TypeError(f"train_judge: corpus must be a vcfast.data.Corpus, "
                        f"got {type(corpus).__name__}")
    _check_int("steps", steps, 1)
    _check_int("batch", batch, 1)
    device = torch.device(device)
    train_split, _ = corpus.split(held_out_per_speaker, seed=seed)
    if not train_split.utterances:
        raise ValueError("train_judge: the corpus has no training utterances")
    space = corpus.label_space
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = Judge(space, image_size, width)
    judge.to(device).train()
    opt = torch.optim.Adam(judge.parameters(), lr=lr, betas=(0.5, 0.999))
    waves = [load_audio(u.path) for u in train_split.utterances]
    indices = train_split.label_indices()
    gen = torch.Generator().manual_seed(seed)
    sizes = list(space.sizes)
    start, loss_v = time.perf_counter(), float("nan")
    for _ in range(steps):
        pick = torch.randint(0, len(waves), (batch,), generator=gen)
        clips = torch.stack([random_crop(waves[i], generator=gen) for i in pick])
        x = judge.spectrogram(clips.to(device))
        target = space.classifier_target(indices[pick], dtype=torch.float32, device=device)
        loss = masked_multigroup_softmax_ce(judge(x), target, sizes, reduction="group_mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
    judge.info = {"steps": steps, "batch": batch, "seed": seed,
                  "seconds": round(time.perf_counter() - start, 2), "final_loss": loss_v,
                  "train_utterances": len(train_split.utterances),
                  "held_out_per_speaker": held_out_per_speaker}
    return judge.eval()


def _speaker_labels(corpus: Corpus) -> dict[str, dict[str, str | None]]:
    """Speaker -> that speaker's labels (the utterance with the most known labels)."""
    best: dict[str, dict] = {}
    for u in corpus.utterances:
        known = sum(v is not None for v in u.labels.values())
        have = best.get(u.labels["speaker"])
        if have is None or known > sum(v is not None for v in have.values()):
            best[u.labels["speaker"]] = dict(u.labels)
    return best


def _bin_means(spec: torch.Tensor) -> torch.Tensor:
    """``[..., bins, frames]`` -> per-bin mean over frames ``[..., bins]``."""
    return spec.float().mean(dim=-1)


@torch.no_grad()
def judge_conversion(judge: Judge, generator: nn.Module, corpus: Corpus, *,
                     held_out_per_speaker: int = 1, seed: int = 0,
                     device: str | torch.device | None = None,
                     max_utterances: int | None = None) -> dict[str, Any]:
    """Convert held-out utterances to every other speaker and let the judge score them.

    The held-out utterances are ``corpus.split(held_out_per_speaker, seed)[1]`` (the trainer's
    split for the same seed), one deterministic crop each (at most ``max_utterances``). Each
    crop's ``[1, S, S]`` model spectrogram (S = ``judge.image_size``, which must be the
    generator's image size) is converted to each other speaker's full labels with
    :func:`vcfast.voice.convert_spectrogram` (one window, InstanceNorm with the window's own
    statistics, as ``vcfast convert`` does).

    Returns:

    * ``accuracy_real``: the judge's :func:`vcfast.multigroup_accuracy` on the real held-out
      crops (``{group: {"accuracy", "correct", "count"}, "mean"}``); the ceiling the
      converted figures can be read against.
    * ``accuracy_converted``: the same on the converted crops against the *target* labels:
      per group, the share of conversions the judge attributes to the target's class (groups
      where the target's class is unknown are not counted).
    * ``target_speaker_share``: ``accuracy_converted["speaker"]["accuracy"]``.
    * ``source_speaker_share``: share of conversions the judge still attributes to the
      *source* speaker.
    * ``spectral_distance``: mean over conversions of
      ``mean_b |mean_t Y[b, t] - M_target[b]|``, where ``Y`` is the converted log-spectrogram
      (values in [0, 1]) and ``M_target[b]`` is the per-bin mean over frames and over one crop
      of every utterance of the target speaker in the corpus (real speech). It compares
      average spectral envelopes (timbre, formant region, level), not content; lower is closer.
    * ``spectral_distance_unconverted``: the same for the unconverted source crops against
      the same targets: the distance conversion started from.
    * ``n_utterances``, ``n_conversions``: counts.

    All figures except the counts lie in [0, 1] (``nan`` for a group with no known label).
    Judge and generator are put back in their previous train/eval modes.
    """
    if not isinstance(judge, Judge):
        raise TypeError(f"judge_conversion: judge must be a vcfast.judge.Judge, "
                        f"got {type(judge).__name__}")
    if not isinstance(corpus, Corpus):
        raise TypeError(f"judge_conversion: corpus must be a vcfast.data.Corpus, "
                        f"got {type(corpus).__name__}")
    space = judge.label_space
    if corpus.label_space != space:
        raise ValueError("judge_conversion: the corpus's label space differs from the judge's "
                         "(a judge trained on another corpus?)")
    device = torch.device(device) if device is not None else module_device(generator)
    _, held_out = corpus.split(held_out_per_speaker, seed=seed)
    utterances = list(held_out.utterances)
    if max_utterances is not None:
        utterances = utterances[:_check_int("max_utterances", max_utterances, 1)]
    if not utterances:
        raise ValueError("judge_conversion: no held-out utterances (held_out_per_speaker 0, or "
                         "every speaker has a single utterance)")
    speakers = _speaker_labels(corpus)
    size = judge.image_size
    gen = torch.Generator().manual_seed(seed)

    def crops(paths) -> torch.Tensor:
        waves = torch.stack([load_crop(p, generator=gen) for p in paths]).to(device)
        return judge.spectrogram(waves)  # [N, 1, S, S]

    real = crops([u.path for u in utterances])
    # Reference envelope of each speaker: per-bin means over one crop of each utterance.
    reference: dict[str, torch.Tensor] = {}
    for name in speakers:
        paths = [u.path for u in corpus.utterances if u.labels["speaker"] == name]
        reference[name] = _bin_means(crops(paths)[:, 0]).mean(dim=0)

    converted, target_idx, source_idx, dist, dist_src = [], [], [], [], []
    speaker_group = space.group_index("speaker")
    for u, x in zip(utterances, real):
        for name, labels in speakers.items():
            if name == u.labels["speaker"]:
                continue
            y, _ = convert_spectrogram(generator, space, x[0], labels, window_frames=size,
                                       overlap_frames=0, batch_size=1, device=device)
            converted.append(y.unsqueeze(0))
            target_idx.append(space.encode_indices([labels])[0])
            source_idx.append(space.index_of(speaker_group, u.labels["speaker"]))
            dist.append(float((_bin_means(y) - reference[name]).abs().mean()))
            dist_src.append(float((_bin_means(x[0]) - reference[name]).abs().mean()))
    if not converted:
        raise ValueError("judge_conversion: the corpus has a single speaker: nothing to convert to")

    was_training = judge.training
    judge.eval()
    try:
        logits_real = judge(real.to(module_device(judge))).float().cpu()
        logits_conv = torch.cat([
            judge(torch.stack(converted[i:i + 16]).to(module_device(judge))).float().cpu()
            for i in range(0, len(converted), 16)])
    finally:
        judge.train(was_training)
    real_idx = space.encode_indices([u.labels for u in utterances])
    targets = torch.stack(target_idx)
    acc_real = multigroup_accuracy(logits_real, real_idx, space)
    acc_conv = multigroup_accuracy(logits_conv, targets, space)
    offset, n_spk = space.offsets[speaker_group], space.sizes[speaker_group]
    predicted = logits_conv[:, offset:offset + n_spk].argmax(dim=1)
    source_share = float((predicted == torch.tensor(source_idx)).float().mean())
    return {
        "n_utterances": len(utterances),
        "n_conversions": len(converted),
        "accuracy_real": acc_real,
        "accuracy_converted": acc_conv,
        "target_speaker_share": acc_conv["speaker"]["accuracy"],
        "source_speaker_share": source_share,
        "spectral_distance": sum(dist) / len(dist),
        "spectral_distance_unconverted": sum(dist_src) / len(dist_src),
    }


def format_judge_table(scores: dict[str, Any]) -> list[str]:
    """``judge_conversion``'s result as a small Markdown table plus a line of distances."""

    def pct(value) -> str:
        if isinstance(value, dict):
            if not value.get("count"):
                return "n/a"
            return f"{100 * value['accuracy']:.0f}% ({value['correct']}/{value['count']})"
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else f"{100 * value:.0f}%"

    real, conv = scores["accuracy_real"], scores["accuracy_converted"]
    groups = [g for g in real if g != "mean"] + ["mean"]
    lines = ["| group | judge on real held-out | converted judged as target |",
             "|---|---|---|"]
    lines += [f"| {g} | {pct(real.get(g))} | {pct(conv.get(g))} |" for g in groups]
    lines += ["", f"{scores['n_conversions']} conversions of {scores['n_utterances']} held-out "
              f"utterances; still judged as the source speaker: "
              f"{pct(scores['source_speaker_share'])}; spectral distance to the target speaker "
              f"{scores['spectral_distance']:.4f} (unconverted source: "
              f"{scores['spectral_distance_unconverted']:.4f})."]
    return lines
