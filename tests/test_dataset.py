"""StarGANPairDataset / make_loader: crops and pairing (docs/training.md#training-pairs),
determinism, workers."""

from __future__ import annotations

import functools
import pathlib
import warnings

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from vcfast.data import (
    CROP_SAMPLES,
    MAX_CROP_RMS,
    Corpus,
    StarGANPairDataset,
    demo_corpus_dir,
    load_corpus,
    make_loader,
    synthetic_speech,
)

KEYS = ("wave_real", "labels_real", "wave_orig", "labels_orig", "index_real", "index_orig")


@functools.lru_cache(maxsize=None)
def _second_of_speech(seed: int) -> np.ndarray:
    return synthetic_speech(16000, sr=16000, seed=seed).numpy()


def write_speech(path: pathlib.Path, sr: int = 16000, channels: int = 1, seconds: float = 4.5,
                 seed: int = 0) -> None:
    """1 s of synthetic speech repeated at random loudness (distinct per seed), at ``sr``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gains = np.random.default_rng(seed).uniform(0.2, 0.6, int(seconds) + 2).astype(np.float32)
    wave = np.concatenate([g * _second_of_speech(seed % 3) for g in gains])
    if sr != 16000:
        wave = soxr.resample(wave, 16000, sr)
    wave = wave[: int(seconds * sr)]
    sf.write(str(path), np.stack([wave, wave], 1) if channels == 2 else wave, sr)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("pairs")
    write_speech(root / "alice" / "a1.wav", seed=1)
    write_speech(root / "alice" / "a2.wav", sr=22050, channels=2, seed=2)
    write_speech(root / "bob" / "b1.flac", seed=3)
    write_speech(root / "bob" / "b2.flac", seconds=5.0, seed=4)
    write_speech(root / "carol" / "c1.wav", sr=22050, seed=5)
    (root / "speakers.csv").write_text(
        "speaker,birthplace,sex\nalice,Tokyo,F\nbob,,M\ncarol,Osaka,\n")
    return load_corpus(root)


@pytest.fixture(scope="module")
def dataset(corpus) -> StarGANPairDataset:
    return StarGANPairDataset(corpus, seed=3)


def items_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in KEYS)


def crop_start(wave: torch.Tensor, crop: torch.Tensor) -> int:
    """Start of the slice of ``wave`` that ``crop`` is a peak-normalised copy of, or -1."""
    head = 256
    windows = wave.unfold(0, head, 1)[: wave.shape[0] - crop.shape[0] + 1].double()
    cosine = windows @ crop[:head].double() / (
        windows.norm(dim=1) * crop[:head].double().norm() + 1e-30)
    start = int(cosine.argmax())
    piece = wave[start:start + crop.shape[0]]
    ok = torch.allclose(piece / piece.abs().max(), crop, atol=1e-6)
    return start if ok else -1


def test_item_shapes_and_spec2_crops(dataset, corpus):
    assert len(dataset) == len(corpus.utterances) == 5
    item = dataset[0]
    assert set(item) == set(KEYS)
    for key in ("wave_real", "wave_orig"):
        w = item[key]
        assert w.shape == (CROP_SAMPLES,) and w.dtype == torch.float32
        assert float(w.abs().max()) == 1.0  # peak-normalised
        assert float(w.double().square().mean().sqrt()) <= MAX_CROP_RMS
    for key in ("labels_real", "labels_orig"):
        assert item[key].shape == (3,) and item[key].dtype == torch.long


def test_pairing_and_crops_come_from_the_named_utterances(dataset, corpus):
    labels = corpus.label_indices()
    speakers = [u.labels["speaker"] for u in corpus.utterances]
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            item = dataset[i]
            real, orig = int(item["index_real"]), int(item["index_orig"])
            assert real == i % len(corpus.utterances)
            assert speakers[orig] != speakers[real]  # another speaker's utterance
            assert torch.equal(item["labels_real"], labels[real])
            assert torch.equal(item["labels_orig"], labels[orig])  # the target's own labels
            assert crop_start(dataset.wave(real), item["wave_real"]) >= 0
            assert crop_start(dataset.wave(orig), item["wave_orig"]) >= 0
            # The crop is not from another utterance (all test files differ).
            other = (orig + 1) % len(corpus.utterances)
            assert crop_start(dataset.wave(other), item["wave_orig"]) == -1
    dataset.set_epoch(0)


def test_deterministic_given_seed_epoch_index(corpus, dataset):
    twin = StarGANPairDataset(corpus, seed=3, cache_audio=False)  # also: no cache, same items
    dataset.set_epoch(0)
    for i in (4, 0, 2):  # order does not matter
        assert items_equal(dataset[i], twin[i])
    other_seed = StarGANPairDataset(corpus, seed=4)
    assert not all(torch.equal(dataset[i]["wave_real"], other_seed[i]["wave_real"])
                   for i in range(5))
    first = [dataset[i]["wave_real"] for i in range(5)]
    dataset.set_epoch(1)
    second = [dataset[i]["wave_real"] for i in range(5)]
    dataset.set_epoch(0)
    assert sum(not torch.equal(a, b) for a, b in zip(first, second)) >= 4  # new crops
    assert items_equal(dataset[1], twin[1])  # back to epoch 0: the same again


def test_single_speaker_pairs_with_another_utterance(tmp_path):
    write_speech(tmp_path / "solo" / "1.wav", seed=1)
    write_speech(tmp_path / "solo" / "2.wav", seed=2)
    write_speech(tmp_path / "solo" / "3.wav", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no speakers.csv: groups left out
        ds = StarGANPairDataset(load_corpus(tmp_path))
    for i in range(3):
        item = ds[i]
        assert int(item["index_orig"]) != int(item["index_real"])


def test_items_per_epoch_and_index_errors(corpus):
    ds = StarGANPairDataset(corpus, items_per_epoch=12)
    assert len(ds) == 12
    assert int(ds[7]["index_real"]) == 7 % 5
    assert items_equal(ds[-1], ds[11])
    with pytest.raises(IndexError):
        ds[12]


def test_bad_arguments(corpus):
    with pytest.raises(ValueError, match="crop_samples"):
        StarGANPairDataset(corpus, crop_samples=0, cache_audio=False)
    with pytest.raises(ValueError, match="shorter than crop_samples"):
        StarGANPairDataset(corpus, crop_samples=5 * 16000, cache_audio=False)
    with pytest.raises(ValueError, match="seed"):
        StarGANPairDataset(corpus, seed=-1, cache_audio=False)
    with pytest.raises(TypeError, match="Corpus"):
        StarGANPairDataset([1, 2, 3])
    empty = Corpus(corpus.root, corpus.layout, [], corpus.label_space)
    with pytest.raises(ValueError, match="no utterances"):
        StarGANPairDataset(empty)


def test_noise_file_falls_back_to_another_utterance(tmp_path):
    # Uniform noise: RMS after peak normalisation is ~1/sqrt(3) > 0.5, so every crop is rejected.
    write_speech(tmp_path / "alice" / "a1.wav", seed=1)
    write_speech(tmp_path / "bob" / "b1.wav", seed=2)
    (tmp_path / "noise").mkdir()
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 5 * 16000).astype(np.float32)
    sf.write(str(tmp_path / "noise" / "n.wav"), noise, 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = StarGANPairDataset(load_corpus(tmp_path))
    noise_index = 2
    assert ds.corpus.utterances[noise_index].labels["speaker"] == "noise"
    with pytest.warns(UserWarning, match="no usable crop"):
        item = ds[noise_index]
    assert int(item["index_real"]) != noise_index
    assert float(item["wave_real"].double().square().mean().sqrt()) <= MAX_CROP_RMS


def test_loader_order_is_deterministic_per_seed_and_epoch(dataset):
    def order(**kw):
        return [b["index_real"].tolist() for b in make_loader(dataset, 2, drop_last=False, **kw)]

    assert order(seed=0, epoch=0) == order(seed=0, epoch=0)
    assert sorted(sum(order(seed=0, epoch=0), [])) == list(range(5))  # every item once
    orders = {str(order(seed=0, epoch=e)) for e in range(6)}
    assert len(orders) > 1
    assert len(list(make_loader(dataset, 2))) == 2  # drop_last: 5 items -> 2 batches
    dataset.set_epoch(0)


def test_loader_leaves_global_rng_alone(dataset):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for _ in make_loader(dataset, 2, seed=1, epoch=2):
        pass
    assert torch.equal(torch.rand(3), expected)
    dataset.set_epoch(0)


def test_loader_workers_give_identical_batches(dataset):
    single = list(make_loader(dataset, 2, workers=0, seed=5, epoch=1))
    parallel = list(make_loader(dataset, 2, workers=2, seed=5, epoch=1))
    assert len(single) == len(parallel) == 2
    for a, b in zip(single, parallel):
        assert a["wave_real"].shape == (2, CROP_SAMPLES)
        assert items_equal(a, b)
    dataset.set_epoch(0)


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 6}, "larger than the dataset"),
    ({"batch_size": 2, "workers": -1}, "workers"),
    ({"batch_size": 2, "epoch": -1}, "epoch"),
])
def test_loader_bad_arguments(dataset, kw, match):
    with pytest.raises(ValueError, match=match):
        make_loader(dataset, **kw)


def test_demo_corpus_dataset_pairs_across_speakers():
    corpus = load_corpus(demo_corpus_dir())
    ds = StarGANPairDataset(corpus, seed=0)
    batch = next(iter(make_loader(ds, 4)))
    assert batch["wave_real"].shape == (4, CROP_SAMPLES)
    real_spk = batch["labels_real"][:, 0]
    orig_spk = batch["labels_orig"][:, 0]
    assert bool((real_spk != orig_spk).all())
    labels = corpus.label_indices()
    assert torch.equal(batch["labels_real"], labels[batch["index_real"]])
    assert torch.equal(batch["labels_orig"], labels[batch["index_orig"]])
    # Unknown labels reach the batches as -1 (grace: birthplace, ben: sex).
    assert bool((labels == -1).any())
