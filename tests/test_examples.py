"""examples/*.py run end to end with --smoke on CPU (examples/README.md): exit code 0, a finite
final loss, and the files they promise where --out is given."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"vcfast_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run(name: str, capsys, *extra: str) -> str:
    code = _load(name).main(["--smoke", "--device", "cpu", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    done = [line for line in out.splitlines() if line.startswith("done:")]
    assert len(done) == 1, out
    losses = re.findall(r"loss (\S+?),?(?:\s|$)", done[0])
    assert losses, done[0]
    for value in losses:
        assert math.isfinite(float(value.rstrip(","))), done[0]
    return out


def test_speaker_classifier_smoke(capsys):
    out = _run("speaker_classifier", capsys)
    assert "speaker" in out and "birthplace" in out and "sex" in out


def test_spectrogram_autoencoder_smoke(capsys, tmp_path):
    _run("spectrogram_autoencoder", capsys, "--loss", "l2", "--out", str(tmp_path))
    assert (tmp_path / "spectrogram_autoencoder.pt").is_file()


def test_specgan_drums_smoke_writes_audio(capsys, tmp_path):
    soundfile = pytest.importorskip("soundfile")
    out = _run("specgan_drums", capsys, "--samples", "2", "--out", str(tmp_path))
    wavs = sorted(tmp_path.glob("drum_*.wav"))
    assert len(wavs) == 2, out
    audio, sr = soundfile.read(str(wavs[0]))
    assert sr == 16000 and audio.shape == (16384,)
    assert math.isfinite(float(abs(audio).max()))


def test_specgan_drums_smoke_writes_nothing_without_out(capsys):
    out = _run("specgan_drums", capsys)
    assert "wrote" not in out


@pytest.mark.parametrize("mel", ["auto", "torch"])
def test_esc50_classifier_smoke(capsys, mel):
    out = _run("esc50_classifier", capsys, "--mel", mel)
    if mel == "torch":
        assert "plain-PyTorch fallback" in out
    else:
        import vcfast

        expected = "vcfast.log_mel_spectrogram" if hasattr(vcfast, "log_mel_spectrogram") else (
            "plain-PyTorch fallback")
        assert f"log-mel via {expected}" in out


def test_esc50_fallback_filterbank_is_htk():
    """The fallback's filterbank: triangles peaking at 1 on HTK-spaced centres."""
    torch = pytest.importorskip("torch")
    esc = _load("esc50_classifier")
    fb = esc.htk_mel_filterbank(n_mels=40, n_fft=2048, sr=16000)
    assert fb.shape == (40, 1025)
    assert float(fb.min()) >= 0 and float(fb.max()) <= 1
    # Band 20's centre: 20 + 1 of 41 equal steps on the HTK mel scale up to 8 kHz.
    top = 2595 * math.log10(1 + 8000 / 700)
    centre_hz = 700 * (10 ** (top * 21 / 41 / 2595) - 1)
    peak_bin = int(torch.argmax(fb[20]))
    assert abs(peak_bin * 8000 / 1024 - centre_hz) <= 8000 / 1024
