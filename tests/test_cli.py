"""The `vcfast` command: info, demo, roundtrip, and its error handling."""

import json

import soundfile as sf
import torch

from vcfast.cli import main
from vcfast.data import synthetic_speech


def test_info_prints_backends(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] is True
    assert "extension_loaded" in info["build"]


def test_demo_writes_audio_png_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-iter", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["spectrogram_shape"] == [256, 256]
    assert 0 < report["spectral_convergence"] < 1
    original, sr = sf.read(out / "original.wav")
    assert sr == 16000 and len(original) == 66304
    assert (out / "reconstructed.wav").stat().st_size > 0
    assert (out / "spectrogram.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "spectral convergence" in capsys.readouterr().out


def test_roundtrip_any_length_and_rate(tmp_path):
    # 22.05 kHz, 1.7 s: resampled to 16 kHz, not a multiple of the hop
    wave = synthetic_speech(37485, sr=22050, seed=3).numpy()
    sf.write(tmp_path / "in.flac", wave, 22050)
    assert main(["roundtrip", str(tmp_path / "in.flac"), str(tmp_path / "out.wav"), "--n-iter", "4"]) == 0
    out, sr = sf.read(tmp_path / "out.wav")
    assert sr == 16000 and abs(len(out) - 37485 * 16000 / 22050) < 256 + 1  # whole frames only
    assert torch.isfinite(torch.from_numpy(out)).all()


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["roundtrip", str(tmp_path / "missing.wav"), str(tmp_path / "out.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    assert main(["demo", "--input", str(tmp_path / "bad.wav"), "--out", str(tmp_path / "d")]) == 2
    assert "bad.wav" in capsys.readouterr().err
    sf.write(tmp_path / "short.wav", synthetic_speech(8000).numpy(), 16000)
    assert main(["demo", "--input", str(tmp_path / "short.wav"), "--out", str(tmp_path / "d")]) == 2
    assert "fewer than one crop" in capsys.readouterr().err
