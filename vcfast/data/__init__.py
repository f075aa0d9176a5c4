"""Data pipeline: audio I/O, cropping (docs/ops.md#crops), corpora, StarGAN training pairs, test
audio."""

from .audio import (
    CROP_SAMPLES,
    MAX_CROP_RMS,
    SAMPLE_RATE,
    AudioReadError,
    NoUsableCropError,
    load_audio,
    load_crop,
    peak_normalize,
    random_crop,
    save_audio,
)
from .corpus import Corpus, Utterance, demo_corpus_dir, load_corpus
from .dataset import StarGANPairDataset, make_loader
from .synth import synthetic_speech

__all__ = [
    "SAMPLE_RATE",
    "CROP_SAMPLES",
    "MAX_CROP_RMS",
    "AudioReadError",
    "NoUsableCropError",
    "load_audio",
    "peak_normalize",
    "random_crop",
    "load_crop",
    "save_audio",
    "synthetic_speech",
    "Utterance",
    "Corpus",
    "load_corpus",
    "demo_corpus_dir",
    "StarGANPairDataset",
    "make_loader",
]
