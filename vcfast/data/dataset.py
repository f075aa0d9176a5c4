"""StarGAN training pairs from a :class:`~vcfast.data.corpus.Corpus`
(docs/training.md#training-pairs).

Each item pairs a real crop ``x_real`` (with its labels) with a crop ``x_orig`` of *another*
utterance, a different speaker's whenever the corpus has more than one speaker, whose labels are
the conversion target ``c'``. Waveforms only: the trainer turns a batch into spectrograms on the
training device with :func:`vcfast.log_spectrogram`.

Determinism: item ``i`` of epoch ``e`` uses its own CPU ``torch.Generator`` seeded from
``(seed, e, i)``, so it does not depend on the number of loader workers, on the order items are
fetched in, or on any global RNG. :func:`make_loader` draws the epoch's order from
``(seed, epoch)`` as well.
"""

from __future__ import annotations

import operator
import warnings
from typing import Optional

import numpy as np
import torch
import torch.utils.data

from .audio import CROP_SAMPLES, SAMPLE_RATE, NoUsableCropError, load_audio, random_crop
from .corpus import Corpus

__all__ = ["StarGANPairDataset", "make_loader"]

# Extra utterances tried when every crop drawn from one is rejected (the RMS rule of
# docs/ops.md#crops), so one noise-like file does not stop a long training run.
_CROP_FALLBACK_TRIES = 8
# Domain-separation tags so the per-item and per-epoch-order seeds never coincide.
_TAG_ITEM = 0x17E1
_TAG_ORDER = 0x0DE2
_TAG_LOADER = 0x10AD


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _mixed_seed(*words: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class StarGANPairDataset(torch.utils.data.Dataset):
    """Item i -> dict(wave_real FloatTensor[crop_samples], labels_real LongTensor[G],
    wave_orig FloatTensor[crop_samples], labels_orig LongTensor[G]).

    wave_* are crops (docs/ops.md#crops: peak-normalised, RMS-rejected). wave_orig is a crop of
    another utterance (a different speaker when the corpus has >1) whose labels are the conversion
    target. Deterministic: the item depends only on (seed, epoch, i), never on worker count or
    order.

    Items also carry ``index_real`` and ``index_orig`` (LongTensor scalars): the positions of the
    two utterances in ``corpus.utterances``, for logging and sample names.

    Args:
        corpus: the utterances (every one at least ``crop_samples`` long at 16 kHz).
        crop_samples: crop length in samples (default 66 304, docs/ops.md#crops).
        seed: non-negative int; with the epoch and the item index it fixes every draw.
        items_per_epoch: dataset length; default one item per utterance. Item ``i`` takes
            utterance ``i % len(corpus)`` as ``x_real``.
        cache_audio: decode and resample every file once, here, and keep the 16 kHz waveforms
            in memory (one flat float32 tensor, shared copy-on-write with forked workers);
            otherwise each item decodes its two files.

    Raises:
        ValueError: empty corpus, bad argument, an utterance shorter than ``crop_samples``.
        AudioReadError: (with ``cache_audio``) a file the corpus scan accepted fails to decode.
    """

    def __init__(self, corpus: Corpus, *, crop_samples: int = CROP_SAMPLES, seed: int = 0,
                 items_per_epoch: Optional[int] = None, cache_audio: bool = True) -> None:
        if not isinstance(corpus, Corpus):
            raise TypeError(f"corpus must be a vcfast.data.Corpus, got {type(corpus).__name__}")
        if not corpus.utterances:
            raise ValueError(f"corpus {corpus.root} has no utterances; cannot build a dataset")
        self.corpus = corpus
        self.crop_samples = _check_int("crop_samples", crop_samples, 1)
        self.seed = _check_int("seed", seed, 0)
        self.items_per_epoch = (len(corpus.utterances) if items_per_epoch is None
                                else _check_int("items_per_epoch", items_per_epoch, 1))
        self.cache_audio = bool(cache_audio)
        self.epoch = 0

        short = [u for u in corpus.utterances if u.num_samples < self.crop_samples]
        if short:
            raise ValueError(
                f"{len(short)} utterance(s) are shorter than crop_samples={self.crop_samples} "
                f"at {SAMPLE_RATE} Hz, e.g. {short[0].path} ({short[0].num_samples} samples); "
                f"load the corpus with min_samples={self.crop_samples}"
            )
        self.labels = corpus.label_indices()  # [N, G] long, -1 unknown
        speakers = [u.labels["speaker"] for u in corpus.utterances]
        names = sorted(set(speakers))
        self._speaker_of = torch.tensor([names.index(s) for s in speakers], dtype=torch.long)
        self._n_speakers = len(names)

        self._flat: Optional[torch.Tensor] = None
        self._bounds: Optional[torch.Tensor] = None
        if self.cache_audio:
            waves = [self._decode(i) for i in range(len(corpus.utterances))]
            lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
            self._bounds = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            self._flat = torch.cat(waves) if waves else torch.empty(0)

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        return self.items_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and pairs the items give (an int >= 0)."""
        self.epoch = _check_int("epoch", epoch, 0)

    def wave(self, index: int) -> torch.Tensor:
        """The full 16 kHz waveform of utterance ``index`` (from the cache when enabled)."""
        if self._flat is not None:
            return self._flat[int(self._bounds[index]):int(self._bounds[index + 1])]
        return self._decode(index)

    def __getitem__(self, i: int) -> dict:
        n_items = self.items_per_epoch
        i = operator.index(i)  # also accepts numpy and 0-d tensor indices
        if not -n_items <= i < n_items:
            raise IndexError(f"item {i} out of range for a dataset of {n_items} items")
        i %= n_items
        gen = torch.Generator().manual_seed(_mixed_seed(_TAG_ITEM, self.seed, self.epoch, i))
        n_utt = len(self.corpus.utterances)
        real, wave_real = self._usable_crop(i % n_utt, gen, exclude_speaker=None)
        orig, wave_orig = self._usable_crop(self._draw_partner(real, gen), gen,
                                            exclude_speaker=int(self._speaker_of[real]))
        return {
            "wave_real": wave_real,
            "labels_real": self.labels[real].clone(),
            "wave_orig": wave_orig,
            "labels_orig": self.labels[orig].clone(),
            "index_real": torch.tensor(real, dtype=torch.long),
            "index_orig": torch.tensor(orig, dtype=torch.long),
        }

    # ------------------------------------------------------------------ internals
    def _decode(self, index: int) -> torch.Tensor:
        utt = self.corpus.utterances[index]
        wave = load_audio(utt.path, SAMPLE_RATE)
        if wave.shape[0] < self.crop_samples:
            # soundfile.info and the decoder disagree only by resampler rounding; a shorter
            # decode means the header lied (truncated file).
            raise ValueError(
                f"{utt.path}: decodes to {wave.shape[0]} samples at {SAMPLE_RATE} Hz, fewer "
                f"than one crop of {self.crop_samples}; the file may be truncated"
            )
        return wave

    def _draw_partner(self, real: int, gen: torch.Generator,
                      exclude_speaker: Optional[int] = None) -> int:
        """Another utterance: a different speaker's when there are several speakers."""
        n = len(self.corpus.utterances)
        if n == 1:
            return real
        if self._n_speakers > 1:
            avoid = int(self._speaker_of[real]) if exclude_speaker is None else exclude_speaker
            candidates = (self._speaker_of != avoid).nonzero().flatten()
        else:
            candidates = torch.cat([torch.arange(real), torch.arange(real + 1, n)])
        return int(candidates[torch.randint(len(candidates), (1,), generator=gen)])

    def _usable_crop(self, index: int, gen: torch.Generator,
                     exclude_speaker: Optional[int]) -> tuple:
        """``(utterance index, crop)``; falls back to other utterances if no crop passes."""
        first_error = None
        for _ in range(_CROP_FALLBACK_TRIES):
            try:
                return index, random_crop(self.wave(index), self.crop_samples, generator=gen)
            except NoUsableCropError as e:
                if first_error is None:
                    first_error = f"{self.corpus.utterances[index].path}: {e}"
                    warnings.warn(f"no usable crop, using another utterance: {first_error}")
                # The replacement keeps the pairing rule: for x_orig, still another speaker.
                index = self._draw_partner(index, gen, exclude_speaker)
        raise NoUsableCropError(
            f"no usable crop after trying {_CROP_FALLBACK_TRIES} utterances; first failure: "
            f"{first_error}"
        )


def make_loader(dataset, batch_size: int, *, workers: int = 0, seed: int = 0, epoch: int = 0,
                drop_last: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` whose batches depend only on ``(seed, epoch)``.

    Sets ``dataset.set_epoch(epoch)`` (when it has one) and shuffles with a permutation drawn
    from ``(seed, epoch)``; neither building nor iterating the loader touches the global RNG;
    with :class:`StarGANPairDataset` the batches are then identical for any ``workers``. Build
    one loader per epoch. Workers use one intra-op thread each, because the crops are cheap and
    the training process needs the cores.

    Args:
        dataset: a map-style dataset (normally a :class:`StarGANPairDataset`).
        batch_size: items per batch (int >= 1).
        workers: loader worker processes (0 = load in the calling process).
        seed: order seed (int >= 0).
        epoch: epoch number (int >= 0); also selects the dataset's crops.
        drop_last: drop the last incomplete batch (the default: training wants equal batches).

    Raises:
        ValueError: a bad argument, or ``drop_last`` with fewer items than ``batch_size``
            (the loader would yield nothing).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    workers = _check_int("workers", workers, 0)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    n = len(dataset)
    if drop_last and n < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({n} items) and drop_last=True, "
            f"so the loader would yield no batch; lower batch_size or raise items_per_epoch"
        )
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    gen = torch.Generator().manual_seed(_mixed_seed(_TAG_ORDER, seed, epoch))
    order = torch.randperm(n, generator=gen).tolist()
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        drop_last=drop_last,
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=False,
        # DataLoader draws its workers' base seed from this generator; without one it would
        # draw from the global RNG and shift every later random number of the training run.
        generator=torch.Generator().manual_seed(_mixed_seed(_TAG_LOADER, seed, epoch)),
    )


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)
