#!/usr/bin/env python3
"""Generate vcfast's bundled demo corpus with espeak-ng (run once; the output is committed).

    apt-get install espeak-ng          # Debian package; made with espeak-ng 1.51
    python scripts/make_demo_corpus.py [--out vcfast/data/demo_corpus]

Eight synthetic speakers = 4 accents (espeak-ng voices en-us, en-gb-x-rp, en-gb-scotland,
en-029) x 2 sexes (espeak-ng voice variants m*/f*), each with its own pitch (-p) and speed (-s),
so that the speaker, birthplace (accent) and sex labels describe real acoustic differences.
Each speaker reads 3 utterances of different English text, 5-6.5 s each (longer than one training
crop of 66 304 samples = 4.14 s), written as 16 kHz mono 16-bit FLAC. ``speakers.csv`` leaves
some labels empty on purpose (unknown), as real corpora do.

Deterministic: the same espeak-ng version gives the same files (espeak-ng has no randomness;
resampling is soxr's deterministic filter). Everything is written atomically.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import soundfile as sf
import soxr
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vcfast.data.audio import CROP_SAMPLES, MAX_CROP_RMS, SAMPLE_RATE, save_audio  # noqa: E402

#: espeak-ng version the committed corpus was made with.
ESPEAK_VERSION = "1.51"
UTTERANCES_PER_SPEAKER = 3
MIN_SECONDS = 5.0
MAX_SECONDS = 6.5
# Silence kept around the speech after trimming (seconds).
EDGE_SILENCE = 0.15

# (name, espeak-ng voice, variant, pitch 0-99, speed wpm, birthplace label, sex label).
# Labels written as "" are deliberately unknown in speakers.csv.
SPEAKERS = [
    ("amy", "en-us", "f2", 62, 150, "usa", "female"),
    ("ben", "en-us", "m3", 38, 165, "usa", ""),           # sex unknown
    ("clara", "en-gb-x-rp", "f4", 70, 140, "england", "female"),
    ("david", "en-gb-x-rp", "m1", 45, 155, "england", "male"),
    ("ewan", "en-gb-scotland", "m2", 35, 150, "scotland", "male"),
    ("fiona", "en-gb-scotland", "f3", 58, 160, "scotland", "female"),
    ("grace", "en-029", "f1", 66, 145, "", "female"),     # birthplace unknown
    ("henry", "en-029", "m4", 42, 158, "caribbean", "male"),
]

SENTENCES = [
    "The morning train to the coast was late again, so we bought coffee and waited on the cold "
    "platform.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A gentle breeze moved through the tall grass as the sun slowly went down behind the hills.",
    "My grandmother kept a small garden full of tomatoes, beans and bright yellow flowers.",
    "The museum opens at nine, but the best rooms are quiet only in the late afternoon.",
    "If you follow the river north for an hour, you will find an old mill and a wooden bridge.",
    "Six thick thistle sticks were stacked beside the shed, waiting for the winter fire.",
    "We talked about music, films and football until the last bus had already left.",
    "The children built a castle of sand and watched the waves wash the towers away.",
    "Remember to water the plants, feed the cat and lock the back door before you leave.",
    "On Tuesday the library will hold a reading of short stories written by local students.",
    "The recipe asks for two cups of flour, one egg, a little sugar and a pinch of salt.",
    "Lightning flashed over the bay, and a few seconds later the thunder rolled across the town.",
    "He painted the kitchen a pale shade of blue that reminded everyone of the summer sky.",
    "Our neighbours are moving to a bigger house near the school at the end of the month.",
    "The captain checked the map once more and turned the little boat towards the island.",
    "Fresh bread, warm soup and good company are all you need on a rainy evening.",
    "Nobody expected the quiet student to win the chess tournament in only seven moves.",
    "The bells of the old church rang twelve times, and the square filled with people.",
    "She wrote a long letter to her brother, describing the mountains and the frozen lakes.",
    "When the power went out, we lit candles and told stories until it was late.",
    "The engineer explained how the bridge could carry heavy trucks without bending.",
    "Bright red kites danced above the beach while the dogs chased each other in circles.",
    "Could you please repeat the question a little more slowly, so that everyone understands?",
]


def atomic_write_text(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + fsync + os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def espeak_version() -> str:
    """The installed espeak-ng version string, e.g. ``"1.51"``."""
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True)
    # "eSpeak NG text-to-speech: 1.51  Data at: ..."
    return out.stdout.split(":")[1].split()[0]


def synthesise(text: str, voice: str, variant: str, pitch: int, speed: int) -> np.ndarray:
    """espeak-ng speech for ``text`` as float32 mono at 16 kHz, edge silence trimmed."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = pathlib.Path(tmp) / "out.wav"
        subprocess.run(
            ["espeak-ng", "-v", f"{voice}+{variant}", "-p", str(pitch), "-s", str(speed),
             "-w", str(wav), text],
            check=True, capture_output=True,
        )
        data, rate = sf.read(str(wav), dtype="float32")
    if data.ndim > 1:
        data = data.mean(axis=1)
    data = soxr.resample(data, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    loud = np.flatnonzero(np.abs(data) > 0.01 * np.abs(data).max())
    margin = int(EDGE_SILENCE * SAMPLE_RATE)
    return data[max(loud[0] - margin, 0): loud[-1] + margin + 1]


def make_utterance(first_sentence: int, speaker: tuple) -> tuple:
    """Sentences from ``first_sentence`` on, until the speech lasts at least MIN_SECONDS.

    Returns ``(wave, text)``; a result longer than MAX_SECONDS is cut there with a 50 ms fade.
    """
    _, voice, variant, pitch, speed, _, _ = speaker
    text = ""
    k = first_sentence
    while True:
        text = (text + " " + SENTENCES[k % len(SENTENCES)]).strip()
        k += 1
        wave = synthesise(text, voice, variant, pitch, speed)
        if len(wave) >= MIN_SECONDS * SAMPLE_RATE:
            break
    limit = int(MAX_SECONDS * SAMPLE_RATE)
    if len(wave) > limit:
        wave = wave[:limit].copy()
        fade = int(0.05 * SAMPLE_RATE)
        wave[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    # Same level for everyone: peak at 0.9 so the 16-bit FLAC never clips.
    wave = 0.9 * wave / np.abs(wave).max()
    return wave.astype(np.float32), text


def check_crops(wave: np.ndarray, name: str) -> float:
    """Worst peak-normalised RMS over crops at 16 evenly spaced starts (must pass
    docs/ops.md#crops)."""
    if len(wave) < CROP_SAMPLES:
        raise RuntimeError(f"{name}: {len(wave)} samples, shorter than one crop ({CROP_SAMPLES})")
    worst = 0.0
    for start in np.linspace(0, len(wave) - CROP_SAMPLES, 16).astype(int):
        crop = wave[start:start + CROP_SAMPLES].astype(np.float64)
        rms = float(np.sqrt(np.mean((crop / np.abs(crop).max()) ** 2)))
        worst = max(worst, rms)
    if worst > MAX_CROP_RMS:
        raise RuntimeError(f"{name}: a crop has peak-normalised RMS {worst:.3f} > {MAX_CROP_RMS}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "vcfast/data/demo_corpus",
                        help="output folder (default: vcfast/data/demo_corpus)")
    args = parser.parse_args(argv)

    version = espeak_version()
    if version != ESPEAK_VERSION:
        print(f"warning: espeak-ng {version} installed, the committed corpus was made with "
              f"{ESPEAK_VERSION}; the audio will differ slightly", file=sys.stderr)
    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    transcript = []
    total_bytes = 0
    worst_rms = 0.0
    for s, speaker in enumerate(SPEAKERS):
        name = speaker[0]
        folder = out / name
        folder.mkdir(exist_ok=True)
        for j in range(UTTERANCES_PER_SPEAKER):
            # Different text for every speaker and utterance, cycling through the pool.
            first = (s * UTTERANCES_PER_SPEAKER + j) % len(SENTENCES)
            wave, text = make_utterance(first, speaker)
            worst_rms = max(worst_rms, check_crops(wave, f"{name}/{j}"))
            path = folder / f"{name}_{j + 1:03d}.flac"
            save_audio(path, torch.from_numpy(wave), SAMPLE_RATE)
            total_bytes += path.stat().st_size
            transcript.append(f"{name}/{path.name}\t{len(wave) / SAMPLE_RATE:.2f}\t{text}")
            print(f"{path.relative_to(out)}: {len(wave) / SAMPLE_RATE:.2f} s", flush=True)

    rows = ["speaker,birthplace,sex"]
    rows += [f"{n},{b},{x}" for n, _, _, _, _, b, x in SPEAKERS]
    atomic_write_text(out / "speakers.csv", "\n".join(rows) + "\n")
    atomic_write_text(out / "transcript.tsv",
                      "file\tseconds\ttext\n" + "\n".join(transcript) + "\n")
    voices = "\n".join(
        f"| {n} | `{v}+{var}` | {p} | {sp} | {b or '*(unknown)*'} | {x or '*(unknown)*'} |"
        for n, v, var, p, sp, b, x in SPEAKERS
    )
    atomic_write_text(out / "README.md", README.format(
        version=version, n_speakers=len(SPEAKERS), per=UTTERANCES_PER_SPEAKER,
        lo=MIN_SECONDS, hi=MAX_SECONDS, voices=voices,
    ))
    print(f"{len(SPEAKERS) * UTTERANCES_PER_SPEAKER} files, {total_bytes / 1e6:.2f} MB of FLAC, "
          f"worst crop RMS {worst_rms:.3f} (limit {MAX_CROP_RMS}), espeak-ng {version}")
    return 0


README = """# vcfast demo corpus

A tiny synthetic speech corpus bundled with vcfast so that `vcfast demo` (and every command
given no `--data`) works on a fresh machine with nothing to download. Load it with
`vcfast.data.load_corpus(vcfast.data.demo_corpus_dir())` (layout "folders").

* {n_speakers} speakers x {per} utterances, {lo:.1f}-{hi:.1f} s each, 16 kHz mono 16-bit FLAC
  (every file is longer than one training crop (docs/ops.md#crops) of 66 304 samples = 4.14 s).
* Made with **espeak-ng {version}** (Debian package `espeak-ng`) by `scripts/make_demo_corpus.py`:
  4 accents (espeak-ng voices) x 2 sexes (voice variants), each speaker with its own pitch and
  speed, so the labels describe real acoustic differences. The text is ours; the transcript of
  every file is in `transcript.tsv`.
* `speakers.csv` (`speaker,birthplace,sex`) leaves two labels empty on purpose (unknown):
  grace's birthplace and ben's sex, to exercise partial labels (docs/labels.md).

| speaker | espeak-ng voice | pitch | speed (wpm) | birthplace | sex |
|---|---|---|---|---|---|
{voices}

Regenerate (deterministic for a given espeak-ng version):
`apt-get install espeak-ng && python scripts/make_demo_corpus.py`.

License: generated by the vcfast authors from their own text with espeak-ng; the audio is
distributed under the same license as vcfast. It is robotic, synthetic speech: good enough to
show that training and conversion run end to end, not to judge conversion quality.
"""


if __name__ == "__main__":
    raise SystemExit(main())
