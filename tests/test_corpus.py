"""Corpus discovery and labels: folders and VCTK layouts, bad input, split, bundled demo corpus."""

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
    demo_corpus_dir,
    load_audio,
    load_corpus,
    synthetic_speech,
)

SECONDS = 4.5  # a little longer than one crop (4.14 s)


@functools.lru_cache(maxsize=None)
def _second_of_speech(seed: int) -> np.ndarray:
    return synthetic_speech(16000, sr=16000, seed=seed).numpy()


def speech_at(sr: int, seconds: float, seed: int) -> np.ndarray:
    """Speech-like test audio: 1 s of synthetic speech (cached, the slow part) repeated with a
    different loudness per repetition (so no two files or crops are alike), resampled to ``sr``."""
    reps = int(np.ceil(seconds)) + 1
    gains = np.random.default_rng(seed).uniform(0.2, 0.6, reps).astype(np.float32)
    wave = np.concatenate([g * _second_of_speech(seed % 3) for g in gains])
    if sr != 16000:
        wave = soxr.resample(wave, 16000, sr)
    return wave[: int(seconds * sr)]


def write_speech(path: pathlib.Path, sr: int = 16000, channels: int = 1, seconds: float = SECONDS,
                 seed: int = 0) -> pathlib.Path:
    """Synthetic speech file at ``sr`` with ``channels`` channels (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = speech_at(sr, seconds, seed)
    data = np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave
    sf.write(str(path), data, sr)
    return path


def make_folders_corpus(root: pathlib.Path, csv: str | None = None) -> pathlib.Path:
    """alice: 22.05 kHz mono + 44.1 kHz stereo; bob: 16 kHz flac in a sub-folder + ogg; carol: 1."""
    write_speech(root / "alice" / "a1.wav", sr=22050, seed=1)
    write_speech(root / "alice" / "a2.wav", sr=44100, channels=2, seed=2)
    write_speech(root / "bob" / "session1" / "b1.flac", sr=16000, seed=3)
    write_speech(root / "bob" / "b2.ogg", sr=22050, seed=4)
    write_speech(root / "carol" / "c1.flac", sr=16000, seed=5)
    (root / "carol" / "notes.txt").write_text("not audio")
    if csv is not None:
        (root / "speakers.csv").write_text(csv)
    return root


STANDARD_CSV = "speaker,birthplace,sex\nalice,Tokyo,F\nbob,,M\ncarol,Osaka,\n"


def load_quietly(root, **kw) -> Corpus:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_corpus(root, **kw)


# ----------------------------------------------------------------------------- folders layout


def test_folders_layout_labels_and_lengths(tmp_path):
    corpus = load_corpus(make_folders_corpus(tmp_path, STANDARD_CSV))
    assert corpus.layout == "folders"
    assert corpus.root == tmp_path.resolve()
    assert corpus.skipped == [] and corpus.warnings == []
    space = corpus.label_space
    assert space.names == ("speaker", "birthplace", "sex")
    assert space.class_names("speaker") == ("alice", "bob", "carol")
    assert space.class_names("birthplace") == ("Osaka", "Tokyo")
    assert space.class_names("sex") == ("F", "M")
    names = [u.path.relative_to(corpus.root).as_posix() for u in corpus.utterances]
    assert names == ["alice/a1.wav", "alice/a2.wav", "bob/b2.ogg", "bob/session1/b1.flac",
                     "carol/c1.flac"]
    assert corpus.utterances[2].labels == {"speaker": "bob", "birthplace": None, "sex": "M"}
    expected = torch.tensor([[0, 1, 0], [0, 1, 0], [1, -1, 1], [1, -1, 1], [2, 0, -1]])
    assert torch.equal(corpus.label_indices(), expected)
    assert corpus.speakers() == ["alice", "bob", "carol"]
    for u in corpus.utterances:
        # soundfile.info + resampling arithmetic must match the decoded length.
        assert abs(u.num_samples - load_audio(u.path).shape[0]) <= 1, u.path
        assert u.num_samples >= CROP_SAMPLES


def test_folders_without_csv_has_only_speaker_group(tmp_path):
    with pytest.warns(UserWarning, match="birthplace, sex left out"):
        corpus = load_corpus(make_folders_corpus(tmp_path))
    assert corpus.label_space.names == ("speaker",)
    assert corpus.utterances[0].labels == {"speaker": "alice"}
    assert corpus.label_indices().shape == (5, 1)


def test_extra_csv_columns_become_groups(tmp_path):
    csv = "speaker,birthplace,sex,age_band\nalice,Tokyo,F,20s\nbob,Kobe,M,\ncarol,,,30s\n"
    corpus = load_corpus(make_folders_corpus(tmp_path, csv))
    assert corpus.label_space.names == ("speaker", "birthplace", "sex", "age_band")
    assert corpus.label_space.class_names("age_band") == ("20s", "30s")
    assert corpus.utterances[-1].labels["age_band"] == "30s"


def test_auto_detects_folders_and_explicit_layout_matches(tmp_path):
    make_folders_corpus(tmp_path, STANDARD_CSV)
    auto = load_corpus(tmp_path)
    explicit = load_corpus(tmp_path, layout="folders")
    assert [u.path for u in auto.utterances] == [u.path for u in explicit.utterances]


# ----------------------------------------------------------------------------- VCTK layout

SPEAKER_INFO = """ID  AGE  GENDER  ACCENTS  REGION
225  23  F    English    Southern  England
p226  22  M    English    Surrey
227  38  M    Scottish
p999  25  F    Irish    Dublin   (no audio for this speaker)
"""


def test_vctk_layout(tmp_path):
    write_speech(tmp_path / "wav48" / "p225" / "p225_001.wav", sr=48000, seed=1)
    write_speech(tmp_path / "wav48" / "p225" / "p225_002.wav", sr=48000, seed=2)
    write_speech(tmp_path / "wav48" / "p226" / "p226_001.wav", sr=48000, seed=3)
    write_speech(tmp_path / "wav48" / "p227" / "p227_001.wav", sr=48000, seed=4)
    (tmp_path / "speaker-info.txt").write_text(SPEAKER_INFO)
    with pytest.warns(UserWarning, match="p999"):
        corpus = load_corpus(tmp_path)
    assert corpus.layout == "vctk"
    assert len(corpus.utterances) == 4
    space = corpus.label_space
    assert space.names == ("speaker", "accent", "gender")
    assert space.class_names("speaker") == ("p225", "p226", "p227")
    assert space.class_names("accent") == ("English", "Scottish")
    assert space.class_names("gender") == ("F", "M")
    assert torch.equal(corpus.label_indices(),
                       torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 1], [2, 1, 1]]))
    assert any("p999" in w for w in corpus.warnings)
    assert all(abs(u.num_samples - SECONDS * 16000) <= 1 for u in corpus.utterances)


def test_vctk_092_flac_keeps_one_microphone(tmp_path):
    base = tmp_path / "wav48_silence_trimmed"
    for spk in ("p225", "p226"):
        for mic in (1, 2):
            write_speech(base / spk / f"{spk}_001_mic{mic}.flac", seed=mic)
    (tmp_path / "speaker-info.txt").write_text(SPEAKER_INFO.replace("p999", "p998"))
    corpus = load_quietly(tmp_path, layout="vctk")
    assert [u.path.name for u in corpus.utterances] == ["p225_001_mic1.flac", "p226_001_mic1.flac"]
    assert corpus.label_space.class_names("accent") == ("English",)


def test_vctk_without_speaker_info(tmp_path):
    write_speech(tmp_path / "wav48" / "p225" / "p225_001.wav")
    corpus = load_quietly(tmp_path)
    assert corpus.label_space.names == ("speaker",)
    assert any("speaker-info.txt not found" in w for w in corpus.warnings)


def test_vctk_bad_speaker_info_line(tmp_path):
    write_speech(tmp_path / "wav48" / "p225" / "p225_001.wav")
    (tmp_path / "speaker-info.txt").write_text("ID AGE GENDER ACCENTS REGION\n225\n")
    with pytest.raises(ValueError, match=r"speaker-info.txt, line 2"):
        load_corpus(tmp_path)


# ----------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_corpus(missing)


def test_root_is_a_file(tmp_path):
    f = write_speech(tmp_path / "x.wav")
    with pytest.raises(NotADirectoryError, match="x.wav"):
        load_corpus(f)


@pytest.mark.parametrize("setup", ["empty", "empty_speakers", "no_audio"])
def test_empty_corpus(tmp_path, setup):
    if setup == "empty_speakers":
        (tmp_path / "alice").mkdir()
        (tmp_path / "bob").mkdir()
    elif setup == "no_audio":
        (tmp_path / "alice").mkdir()
        (tmp_path / "alice" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no audio files found under .*expected a folder per "
                                         r"speaker or the VCTK layout"):
        load_corpus(tmp_path)


def test_audio_directly_in_root_explains(tmp_path):
    write_speech(tmp_path / "a.wav")
    with pytest.raises(ValueError, match="folder named after the speaker"):
        load_corpus(tmp_path)


def test_vctk_layout_requested_on_folders(tmp_path):
    make_folders_corpus(tmp_path)
    with pytest.raises(ValueError, match="VCTK"):
        load_corpus(tmp_path, layout="vctk")


@pytest.mark.parametrize("kw", [{"layout": "csv"}, {"min_samples": 0}, {"min_samples": 1.5}])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        load_corpus(tmp_path, **kw)


def test_corrupt_and_short_files_skipped_with_warning(tmp_path):
    make_folders_corpus(tmp_path, STANDARD_CSV)
    bad = tmp_path / "bob" / "corrupt.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    empty = tmp_path / "alice" / "empty.flac"
    empty.write_bytes(b"")
    short = write_speech(tmp_path / "carol" / "short.wav", sr=22050, seconds=4.0)  # < 4.14 s
    with pytest.warns(UserWarning, match="skipping") as record:
        corpus = load_corpus(tmp_path)
    messages = " ".join(str(r.message) for r in record)
    assert "corrupt.wav" in messages and "short.wav" in messages and "empty.flac" in messages
    skipped = dict(corpus.skipped)
    assert set(skipped) == {bad.resolve(), empty.resolve(), short.resolve()}
    assert skipped[bad.resolve()].startswith("unreadable")
    assert skipped[short.resolve()].startswith("shorter than one crop")
    assert len(corpus.utterances) == 5
    assert "Skipped 3 file(s): 1 too short, 2 unreadable" in corpus.summary()


def test_speaker_with_only_bad_files_disappears(tmp_path):
    make_folders_corpus(tmp_path, STANDARD_CSV)
    write_speech(tmp_path / "dave" / "d1.wav", seconds=1.0)
    corpus = load_quietly(tmp_path)
    assert corpus.label_space.class_names("speaker") == ("alice", "bob", "carol")


def test_every_file_unusable(tmp_path):
    write_speech(tmp_path / "alice" / "a.wav", seconds=1.0)
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / "b.wav").write_bytes(b"RIFF nonsense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"no usable audio file .* all 2 files were skipped "
                                             r"\(1 unreadable, 1 shorter"):
            load_corpus(tmp_path)


def test_min_samples_argument(tmp_path):
    make_folders_corpus(tmp_path, STANDARD_CSV)
    # A lower minimum admits a file shorter than one crop...
    write_speech(tmp_path / "carol" / "c2.wav", seconds=3.0)
    assert len(load_quietly(tmp_path, min_samples=2 * 16000).utterances) == 6
    assert len(load_quietly(tmp_path).utterances) == 5
    # ...a higher one rejects the 4.5 s files too: nothing usable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no usable audio file"):
            load_corpus(tmp_path, min_samples=5 * 16000)


def test_csv_naming_unknown_speakers_is_a_warning(tmp_path):
    csv = STANDARD_CSV + "dave,Kyoto,M\nerin,,F\n"
    with pytest.warns(UserWarning, match="2 speaker.*no audio.*dave, erin"):
        corpus = load_corpus(make_folders_corpus(tmp_path, csv))
    assert any("dave" in w for w in corpus.warnings)
    # Classes come from usable utterances only: Kyoto (dave's) is not a class.
    assert corpus.label_space.class_names("birthplace") == ("Osaka", "Tokyo")


def test_speaker_missing_from_csv_gets_unknown_labels(tmp_path):
    csv = "speaker,birthplace,sex\nalice,Tokyo,F\nbob,Kobe,M\n"
    corpus = load_quietly(make_folders_corpus(tmp_path, csv))
    assert corpus.utterances[-1].labels == {"speaker": "carol", "birthplace": None, "sex": None}
    assert any("carol" in w for w in corpus.warnings)


@pytest.mark.parametrize("csv, where", [
    ("name,birthplace,sex\nalice,Tokyo,F\n", "line 1: bad header"),
    ("speaker,,sex\nalice,Tokyo,F\n", "line 1: bad header"),
    ("speaker,sex,sex\nalice,F,F\n", "line 1: duplicate column"),
    ("speaker,birthplace,sex\nalice,Tokyo,F\nbob,M\n", "line 3: expected 3 cells"),
    ("speaker,birthplace,sex\n\nalice,Tokyo,F,extra\n", "line 3: expected 3 cells"),
    ("speaker,birthplace,sex\n,Tokyo,F\n", "line 2: the speaker cell is empty"),
    ("speaker,birthplace,sex\nalice,Tokyo,F\nalice,Kobe,F\n", "line 3: speaker 'alice' is listed"),
    ("", "label file is empty"),
])
def test_malformed_csv(tmp_path, csv, where):
    make_folders_corpus(tmp_path, csv)
    with pytest.raises(ValueError, match="speakers.csv") as info:
        load_corpus(tmp_path)
    assert where in str(info.value)


# ----------------------------------------------------------------------------- split / summary


def test_split(tmp_path):
    make_folders_corpus(tmp_path, STANDARD_CSV)
    write_speech(tmp_path / "alice" / "a3.flac", seed=9)
    corpus = load_corpus(tmp_path)
    train, held = corpus.split(held_out_per_speaker=1, seed=0)
    assert train.label_space == corpus.label_space and held.label_space == corpus.label_space
    # alice 3 -> 1 held out, bob 2 -> 1, carol 1 -> 0 (a speaker keeps one training utterance).
    assert sorted(u.labels["speaker"] for u in held.utterances) == ["alice", "bob"]
    assert len(train.utterances) == 4 and train.speakers() == ["alice", "bob", "carol"]
    assert {u.path for u in train.utterances}.isdisjoint(u.path for u in held.utterances)
    again = corpus.split(held_out_per_speaker=1, seed=0)[1]
    assert [u.path for u in again.utterances] == [u.path for u in held.utterances]
    seeds = {tuple(u.path for u in corpus.split(1, seed=s)[1].utterances) for s in range(8)}
    assert len(seeds) > 1  # the seed matters
    assert len(corpus.split(held_out_per_speaker=0)[1].utterances) == 0
    with pytest.raises(ValueError, match="held_out_per_speaker"):
        corpus.split(held_out_per_speaker=-1)


def test_summary_mentions_groups(tmp_path):
    corpus = load_corpus(make_folders_corpus(tmp_path, STANDARD_CSV))
    text = corpus.summary()
    assert "5 utterances" in text and "3 speakers" in text
    assert "birthplace (2 classes, 40% unknown)" in text


# ----------------------------------------------------------------------------- demo corpus


def test_demo_corpus_loads_with_partial_labels():
    root = demo_corpus_dir()
    assert root.is_dir() and (root / "speakers.csv").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundled corpus must load without any warning
        corpus = load_corpus(root)
    assert corpus.layout == "folders" and corpus.skipped == [] and corpus.warnings == []
    space = corpus.label_space
    assert space.names == ("speaker", "birthplace", "sex")
    assert len(space.class_names("speaker")) == 8
    assert space.class_names("birthplace") == ("caribbean", "england", "scotland", "usa")
    assert space.class_names("sex") == ("female", "male")
    by_speaker = {u.labels["speaker"]: u.labels for u in corpus.utterances}
    assert by_speaker["grace"]["birthplace"] is None
    assert by_speaker["ben"]["sex"] is None
    assert len(corpus.utterances) == 24
    assert all(u.num_samples >= CROP_SAMPLES + 16000 * 0.8 for u in corpus.utterances)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 3_000_000


def test_demo_corpus_crops_pass_rms_rule():
    corpus = load_corpus(demo_corpus_dir())
    for u in corpus.utterances[::3]:
        wave = load_audio(u.path)
        for start in (0, wave.shape[0] - CROP_SAMPLES):
            crop = wave[start:start + CROP_SAMPLES].double()
            rms = float((crop / crop.abs().max()).square().mean().sqrt())
            assert rms <= MAX_CROP_RMS, (u.path, start, rms)
