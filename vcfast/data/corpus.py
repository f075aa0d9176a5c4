"""Speech corpora on disk: discovery, labels and sanity checks
(docs/labels.md#how-a-corpus-builds-them).

Two layouts are understood (:func:`load_corpus` detects which one by default):

``folders``
    A folder per speaker holding audio files (``.wav``, ``.flac``, ``.ogg``; any sample rate,
    any channel count), directly or one sub-folder deep::

        root/alice/001.wav
        root/alice/session2/002.flac
        root/bob/001.ogg
        root/speakers.csv          (optional)

    ``speakers.csv`` has the header ``speaker,birthplace,sex`` (further columns become further
    label groups, in header order) and one row per speaker; any cell but the speaker may be
    empty, meaning *unknown*. Groups: ``speaker``, ``birthplace``, ``sex`` (+ extra columns).

``vctk``
    The VCTK corpus: ``root/wav48*/pXXX/*.wav`` or ``*.flac`` (e.g. ``wav48/p225/p225_001.wav``
    in VCTK 0.80, ``wav48_silence_trimmed/p225/p225_001_mic1.flac`` in VCTK 0.92) plus
    ``root/speaker-info.txt`` (whitespace columns ``ID AGE GENDER ACCENTS REGION``, one header
    line, IDs with or without the ``p``, REGION possibly missing or several words).
    Groups: ``speaker``, ``accent``, ``gender``. When both microphones of VCTK 0.92 are present
    (``..._mic1.flac`` and ``..._mic2.flac``) only ``mic1`` is used, so an utterance is not
    counted twice.

Label groups and class names come from the data: classes are the sorted distinct names seen on
usable utterances; a group with no known value anywhere (e.g. no ``speakers.csv``) is left out,
because a group needs at least one class.

Files are checked cheaply with :func:`soundfile.info` (no decoding): unreadable files and files
shorter than one crop (docs/ops.md#crops: 66 304 samples at 16 kHz, after resampling) are skipped
with a
:func:`warnings.warn` and listed in :attr:`Corpus.skipped`.
"""

from __future__ import annotations

import csv
import os
import pathlib
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import soundfile as sf
import torch

from ..labels import LabelSpace
from .audio import CROP_SAMPLES, SAMPLE_RATE

__all__ = [
    "AUDIO_EXTENSIONS",
    "FOLDER_GROUPS",
    "VCTK_GROUPS",
    "Utterance",
    "Corpus",
    "load_corpus",
    "demo_corpus_dir",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File name endings (lower case) treated as audio when scanning a corpus.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
#: Label groups of the ``folders`` layout (before extra ``speakers.csv`` columns).
FOLDER_GROUPS = ("speaker", "birthplace", "sex")
#: Label groups of the ``vctk`` layout.
VCTK_GROUPS = ("speaker", "accent", "gender")
#: Name of the optional label file of the ``folders`` layout.
SPEAKERS_CSV = "speakers.csv"
#: Name of VCTK's speaker table.
VCTK_SPEAKER_INFO = "speaker-info.txt"

_LAYOUTS = ("auto", "folders", "vctk")
# Per-file skip warnings beyond this many are summarised in one line, so a damaged copy of a
# 44k-file corpus does not print 44k warnings.
_MAX_SKIP_WARNINGS = 20


@dataclass(frozen=True)
class Utterance:
    """One audio file of a corpus.

    Attributes:
        path: the audio file.
        labels: group name -> class name, ``None`` = unknown; has every group of the corpus.
        num_samples: length in samples at 16 kHz (from :func:`soundfile.info`, resampling
            accounted for; the resampled length may differ from a decode by ±1 sample).
    """

    path: pathlib.Path
    labels: dict[str, Optional[str]]
    num_samples: int

    @property
    def speaker(self) -> str:
        """The speaker name (every corpus layout has a ``speaker`` group)."""
        return self.labels["speaker"]


@dataclass
class Corpus:
    """A labelled set of utterances, as found by :func:`load_corpus`.

    Attributes:
        root: the corpus folder.
        layout: ``"folders"`` or ``"vctk"``.
        utterances: usable utterances, sorted by speaker then path.
        label_space: groups and class names (sorted) from the data.
        skipped: ``(file, reason)`` for each file left out (unreadable, shorter than one crop).
        warnings: other problems worth reporting (label rows naming speakers without audio...).
    """

    root: pathlib.Path
    layout: str
    utterances: list[Utterance]
    label_space: LabelSpace
    skipped: list[tuple[pathlib.Path, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.utterances)

    def label_indices(self) -> torch.Tensor:
        """Class indices of every utterance: LongTensor ``[len(utterances), n_groups]``.

        ``-1`` marks an unknown label.
        """
        if not self.utterances:
            return torch.empty(0, self.label_space.n_groups, dtype=torch.long)
        return self.label_space.encode_indices([u.labels for u in self.utterances])

    def speakers(self) -> list[str]:
        """Sorted names of the speakers that have at least one utterance in this corpus."""
        return sorted({u.labels["speaker"] for u in self.utterances})

    def total_seconds(self) -> float:
        """Total audio duration in seconds (at 16 kHz)."""
        return sum(u.num_samples for u in self.utterances) / SAMPLE_RATE

    def split(self, held_out_per_speaker: int = 1, seed: int = 0) -> tuple[Corpus, Corpus]:
        """Split into ``(train, held_out)`` corpora sharing this corpus's label space.

        From each speaker, ``held_out_per_speaker`` utterances chosen at random (deterministic
        given ``seed``) go to ``held_out``, but every speaker keeps at least one utterance in
        ``train`` (a speaker with a single utterance contributes nothing to ``held_out``).
        ``skipped`` and ``warnings`` are copied to ``train`` only, so a report that sums them
        does not count them twice.
        """
        if isinstance(held_out_per_speaker, bool) or not isinstance(held_out_per_speaker, int) \
                or held_out_per_speaker < 0:
            raise ValueError(
                f"held_out_per_speaker must be an int >= 0, got {held_out_per_speaker!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        by_speaker: dict = {}
        for i, u in enumerate(self.utterances):
            by_speaker.setdefault(u.labels["speaker"], []).append(i)
        gen = torch.Generator().manual_seed(seed)
        held: set = set()
        # Sorted speakers so the draws do not depend on dict insertion order.
        for spk in sorted(by_speaker):
            idx = by_speaker[spk]
            k = min(held_out_per_speaker, len(idx) - 1)
            if k > 0:
                perm = torch.randperm(len(idx), generator=gen)[:k].tolist()
                held.update(idx[j] for j in perm)
        train = [u for i, u in enumerate(self.utterances) if i not in held]
        held_out = [u for i, u in enumerate(self.utterances) if i in held]
        return (
            Corpus(self.root, self.layout, train, self.label_space,
                   list(self.skipped), list(self.warnings)),
            Corpus(self.root, self.layout, held_out, self.label_space, [], []),
        )

    def summary(self) -> str:
        """One paragraph describing the corpus, for reports and logs."""
        n = len(self.utterances)
        text = (
            f"Corpus {self.root} (layout {self.layout}): {n} utterance{'s' if n != 1 else ''}, "
            f"{self.total_seconds() / 60:.1f} min of audio, {len(self.speakers())} speakers."
        )
        if n:
            idx = self.label_indices()
            parts = []
            for k, (name, size) in enumerate(zip(self.label_space.names, self.label_space.sizes)):
                unknown = int((idx[:, k] < 0).sum())
                parts.append(
                    f"{name} ({size} class{'es' if size != 1 else ''}, "
                    f"{100.0 * unknown / n:.0f}% unknown)"
                )
            text += " Label groups: " + ", ".join(parts) + "."
        if self.skipped:
            reasons: dict = {}
            for _, reason in self.skipped:
                kind = "too short" if reason.startswith("shorter") else "unreadable"
                reasons[kind] = reasons.get(kind, 0) + 1
            detail = ", ".join(f"{v} {k}" for k, v in sorted(reasons.items()))
            text += f" Skipped {len(self.skipped)} file(s): {detail}."
        if self.warnings:
            text += f" {len(self.warnings)} warning(s): " + " | ".join(self.warnings[:3])
            if len(self.warnings) > 3:
                text += " | ..."
        return text


def demo_corpus_dir() -> pathlib.Path:
    """The bundled demo corpus folder, ``vcfast/data/demo_corpus/``.

    Eight espeak-ng voices in the ``folders`` layout, made by ``scripts/make_demo_corpus.py``.
    """
    return pathlib.Path(__file__).resolve().parent / "demo_corpus"


# ----------------------------------------------------------------------------- discovery


def _is_audio(p: pathlib.Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS


def _visible_dirs(folder: pathlib.Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _audio_in_speaker_dir(folder: pathlib.Path) -> list:
    """Audio files in ``folder`` and in its direct sub-folders, sorted by path."""
    files = [p for p in folder.iterdir() if _is_audio(p)]
    for sub in _visible_dirs(folder):
        files.extend(p for p in sub.iterdir() if _is_audio(p))
    return sorted(files)


def _vctk_wav_dirs(root: pathlib.Path) -> list:
    return sorted(p for p in root.glob("wav48*") if p.is_dir())


def _detect_layout(root: pathlib.Path) -> str:
    # A wav48* folder is VCTK's signature; anything else is read as a folder per speaker.
    return "vctk" if _vctk_wav_dirs(root) else "folders"


def _length_at_16k(frames: int, rate: int) -> int:
    """Length after resampling to 16 kHz, rounded like soxr does (exact integer maths)."""
    if rate == SAMPLE_RATE:
        return frames
    return (2 * frames * SAMPLE_RATE + rate) // (2 * rate)


def _check_file(path: pathlib.Path, min_samples: int) -> tuple:
    """``(num_samples at 16 kHz, None)`` for a usable file, ``(0, reason)`` otherwise."""
    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile raises several types for corrupt input
        return 0, f"unreadable audio: {e}"
    if info.frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
        return 0, "unreadable audio: no samples"
    n = _length_at_16k(int(info.frames), int(info.samplerate))
    if n < min_samples:
        return 0, (
            f"shorter than one crop: {n} samples at {SAMPLE_RATE} Hz ({n / SAMPLE_RATE:.2f} s) "
            f"< {min_samples} ({min_samples / SAMPLE_RATE:.2f} s)"
        )
    return n, None


# ----------------------------------------------------------------------------- label files


def _read_speakers_csv(path: pathlib.Path) -> tuple:
    """``(group names after 'speaker', {speaker: {group: value | None}})`` from speakers.csv."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    # Line numbers are 1-based file lines (csv rows == lines: the cells hold no newlines).
    numbered = [(i + 1, [c.strip() for c in r]) for i, r in enumerate(rows)]
    numbered = [(ln, r) for ln, r in numbered if any(r)]  # blank lines carry nothing
    if not numbered:
        raise ValueError(
            f"{path}: label file is empty; expected a header line 'speaker,birthplace,sex'"
        )
    header_line, header = numbered[0]
    if header[0].lower() != "speaker" or any(not h for h in header):
        raise ValueError(
            f"{path}, line {header_line}: bad header {','.join(header)!r}; expected "
            f"'speaker,birthplace,sex' (first column 'speaker', every column named; extra "
            f"columns become extra label groups)"
        )
    groups = [h.lower() for h in header[1:]]
    if len(set(groups)) != len(groups) or "speaker" in groups:
        raise ValueError(f"{path}, line {header_line}: duplicate column in header {header!r}")
    table: dict = {}
    for line, row in numbered[1:]:
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {line}: expected {len(header)} cells ({','.join(header)}), "
                f"got {len(row)}: {','.join(row)!r}"
            )
        speaker = row[0]
        if not speaker:
            raise ValueError(f"{path}, line {line}: the speaker cell is empty")
        if speaker in table:
            raise ValueError(f"{path}, line {line}: speaker {speaker!r} is listed twice")
        table[speaker] = {g: (v or None) for g, v in zip(groups, row[1:])}
    return groups, table


def _vctk_id(token: str) -> str:
    # speaker-info.txt of VCTK 0.80 writes "225", the folders are "p225".
    return f"p{token}" if token.isdigit() else token


def _read_vctk_speaker_info(path: pathlib.Path) -> dict:
    """``{speaker: {"accent": ..., "gender": ...}}`` from VCTK's speaker-info.txt."""
    table: dict = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line_no, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or tokens[0].upper() == "ID" or tokens[0].startswith("#"):
            continue
        if len(tokens) < 3:
            raise ValueError(
                f"{path}, line {line_no}: expected columns 'ID AGE GENDER ACCENTS REGION', "
                f"got {line.strip()!r}"
            )
        speaker = _vctk_id(tokens[0])
        accent = tokens[3] if len(tokens) > 3 and not tokens[3].startswith("(") else None
        # REGION (tokens[4:]) is free text, often missing: not a label group.
        table[speaker] = {"accent": accent, "gender": tokens[2] or None}
    return table


# ----------------------------------------------------------------------------- loading


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def load_corpus(root: PathLike, *, layout: str = "auto", min_samples: int = CROP_SAMPLES) -> Corpus:
    """Find the utterances and labels of a corpus folder.

    Args:
        root: the corpus folder.
        layout: ``"folders"``, ``"vctk"`` or ``"auto"`` (VCTK when ``root`` holds a
            ``wav48*`` folder, else folders).
        min_samples: files shorter than this many samples at 16 kHz are skipped (default one
            crop, 66 304 samples).

    Returns:
        A :class:`Corpus`; utterances sorted by speaker folder, then path.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
        ValueError: bad ``layout``/``min_samples``; no audio file found; every file skipped;
            malformed ``speakers.csv`` / ``speaker-info.txt`` (message names file and line).

    Unreadable files and files shorter than ``min_samples`` are skipped with a warning;
    label rows naming speakers without audio are reported in :attr:`Corpus.warnings`.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples must be a positive int, got {min_samples!r}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    root = pathlib.Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(2, "corpus folder not found", str(root))
    if not root.is_dir():
        raise NotADirectoryError(20, "corpus root must be a folder, got a file", str(root))
    root = root.resolve()
    if layout == "auto":
        layout = _detect_layout(root)

    notes: list = []
    if layout == "folders":
        groups, files, labels_by_speaker = _scan_folders(root, notes)
    else:
        groups, files, labels_by_speaker = _scan_vctk(root, notes)

    if not files:
        raise ValueError(
            f"no audio files found under {root} (expected a folder per speaker or the VCTK "
            f"layout; audio extensions: {', '.join(AUDIO_EXTENSIONS)})"
        )

    utterances: list = []
    skipped: list = []
    for speaker, path in files:
        n, reason = _check_file(path, min_samples)
        if reason is not None:
            skipped.append((path, reason))
            if len(skipped) <= _MAX_SKIP_WARNINGS:
                _warn(f"skipping {path}: {reason}")
            continue
        other = labels_by_speaker.get(speaker, {})
        labels = {"speaker": speaker}
        labels.update({g: other.get(g) for g in groups[1:]})
        utterances.append(Utterance(path=path, labels=labels, num_samples=n))
    if len(skipped) > _MAX_SKIP_WARNINGS:
        _warn(f"skipped {len(skipped)} files under {root} in all (see Corpus.skipped)")

    if not utterances:
        n_short = sum(r.startswith("shorter") for _, r in skipped)
        raise ValueError(
            f"no usable audio file under {root}: all {len(skipped)} files were skipped "
            f"({len(skipped) - n_short} unreadable, {n_short} shorter than {min_samples} samples "
            f"= {min_samples / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz); first: "
            f"{skipped[0][0]}: {skipped[0][1]}"
        )

    label_space, dropped = _label_space_from(groups, utterances)
    if dropped:
        utterances = [
            Utterance(u.path, {g: v for g, v in u.labels.items() if g not in dropped},
                      u.num_samples)
            for u in utterances
        ]
        notes.append(
            f"label group(s) {', '.join(dropped)} left out: no usable utterance has a known value"
        )
    for note in notes:
        _warn(note)
    return Corpus(root=root, layout=layout, utterances=utterances, label_space=label_space,
                  skipped=skipped, warnings=notes)


def _label_space_from(groups: Iterable, utterances: list) -> tuple:
    """Label space with sorted class names per group; groups with no known value dropped."""
    names: dict = {}
    dropped = []
    for g in groups:
        classes = sorted({u.labels[g] for u in utterances if u.labels[g] is not None})
        if classes:
            names[g] = classes
        else:
            dropped.append(g)
    return LabelSpace.from_names(names), dropped


def _unlisted_note(kind: str, label_file: pathlib.Path, names: list) -> str:
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"{label_file} lists {len(names)} speaker(s) with no audio {kind}: {shown}"


def _scan_folders(root: pathlib.Path, notes: list) -> tuple:
    speaker_dirs = _visible_dirs(root)
    files = [(d.name, p) for d in speaker_dirs for p in _audio_in_speaker_dir(d)]
    groups = list(FOLDER_GROUPS)
    table: dict = {}
    csv_path = root / SPEAKERS_CSV
    if csv_path.is_file():
        extra, table = _read_speakers_csv(csv_path)
        # Header order decides the group order; the standard header gives FOLDER_GROUPS.
        groups = ["speaker"] + extra
        with_audio = {s for s, _ in files}
        missing = sorted(s for s in table if s not in with_audio)
        if missing:
            notes.append(_unlisted_note("folder", csv_path, missing))
        unlabelled = sorted(s for s in with_audio if s not in table)
        if unlabelled:
            notes.append(
                f"{len(unlabelled)} speaker folder(s) have no row in {csv_path} (their other "
                f"labels are unknown): {', '.join(unlabelled[:10])}"
                + (", ..." if len(unlabelled) > 10 else "")
            )
    if not files and any(_is_audio(p) for p in root.iterdir()):
        raise ValueError(
            f"no audio files found under {root} (expected a folder per speaker or the VCTK "
            f"layout): the audio files lie directly in {root}; put each speaker's files in a "
            f"folder named after the speaker"
        )
    return groups, files, table


def _scan_vctk(root: pathlib.Path, notes: list) -> tuple:
    wav_dirs = _vctk_wav_dirs(root)
    if not wav_dirs:
        raise ValueError(
            f"no audio files found under {root} (expected a folder per speaker or the VCTK "
            f"layout: {root}/wav48*/pXXX/*.wav)"
        )
    files: list = []
    chosen: Optional[pathlib.Path] = None
    for wav_dir in wav_dirs:
        found = []
        for spk_dir in _visible_dirs(wav_dir):
            spk_files = sorted(p for p in spk_dir.iterdir() if _is_audio(p))
            names = {p.name for p in spk_files}
            for p in spk_files:
                # VCTK 0.92 records each utterance with two microphones: keep one.
                if p.stem.endswith("_mic2") and p.name.replace("_mic2", "_mic1") in names:
                    continue
                found.append((spk_dir.name, p))
        if found:
            files, chosen = found, wav_dir
            break
    if chosen is not None and len(wav_dirs) > 1:
        others = ", ".join(d.name for d in wav_dirs if d != chosen)
        notes.append(f"using audio from {chosen.name}; ignored {others} (same utterances)")

    table: dict = {}
    info_path = root / VCTK_SPEAKER_INFO
    if info_path.is_file():
        table = _read_vctk_speaker_info(info_path)
        with_audio = {s for s, _ in files}
        missing = sorted(s for s in table if s not in with_audio)
        if missing and files:
            notes.append(_unlisted_note("folder", info_path, missing))
    elif files:
        notes.append(f"{info_path} not found: accent and gender are unknown")
    return list(VCTK_GROUPS), files, table
