"""The `vcfast` command: info, demo, train, convert, roundtrip, and its error handling."""

import json

import pytest
import soundfile as sf
import torch

from vcfast.cli import main
from vcfast.data import synthetic_speech

SR = 16000


def test_info_prints_backends(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"] is True
    assert "extension_loaded" in info["build"]


def test_roundtrip_any_length_and_rate(tmp_path):
    # 22.05 kHz, 1.7 s: resampled to 16 kHz, not a multiple of the hop
    wave = synthetic_speech(37485, sr=22050, seed=3).numpy()
    sf.write(tmp_path / "in.flac", wave, 22050)
    assert main(["roundtrip", str(tmp_path / "in.flac"), str(tmp_path / "out.wav"),
                 "--n-iter", "4"]) == 0
    out, sr = sf.read(tmp_path / "out.wav")
    assert sr == 16000 and abs(len(out) - 37485 * 16000 / 22050) < 256 + 1  # whole frames only
    assert torch.isfinite(torch.from_numpy(out)).all()


def test_roundtrip_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["roundtrip", str(tmp_path / "missing.wav"), str(tmp_path / "out.wav")]) == 2
    assert "missing.wav" in capsys.readouterr().err
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    assert main(["roundtrip", str(tmp_path / "bad.wav"), str(tmp_path / "out.wav")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vcfast roundtrip: error:") and "bad.wav" in err


# ---------------------------------------------------------------------------------------------
# train + convert on a tiny synthetic corpus


def write_corpus(root):
    """Two speakers, two 4.4 s utterances each, folders layout with a speakers.csv."""
    for k, speaker in enumerate(["alice", "bob"]):
        (root / speaker).mkdir(parents=True)
        for j in range(2):
            wave = synthetic_speech(70000, seed=10 * k + j).numpy()
            sf.write(root / speaker / f"{j:03d}.wav", wave, SR)
    (root / "speakers.csv").write_text("speaker,birthplace,sex\nalice,leeds,F\nbob,,M\n")
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder trained for one step at size tiny with `vcfast train`."""
    base = tmp_path_factory.mktemp("train")
    corpus = write_corpus(base / "corpus")
    run = base / "run"
    assert main(["train", "--data", str(corpus), "--out", str(run), "--size", "tiny",
                 "--steps", "1", "--device", "cpu", "--held-out-per-speaker", "0",
                 "--no-progress"]) == 0
    assert (run / "checkpoints" / "LATEST").is_file()
    return run


def test_convert_odd_length_22050_hz_stereo(tmp_path, trained_run, capsys):
    samples = int(3.3 * 22050) + 7  # odd length, not a multiple of anything
    left = synthetic_speech(samples, sr=22050, seed=5).numpy()
    sf.write(tmp_path / "in.wav", [[a, -0.5 * a] for a in left], 22050)
    out = tmp_path / "out.wav"
    assert main(["convert", "--ckpt", str(trained_run), "--input", str(tmp_path / "in.wav"),
                 "--speaker", "bob", "--sex", "M", "--out", str(out), "--n-iter", "2"]) == 0
    converted, sr = sf.read(out)
    assert sr == 16000 and converted.ndim == 1
    assert abs(len(converted) - samples * 16000 / 22050) <= 2
    assert 0.5 < abs(converted).max() <= 1.0 and torch.isfinite(torch.from_numpy(converted)).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically
    printed = capsys.readouterr().out
    assert "speaker=bob" in printed and "sex=M" in printed and "spectral convergence" in printed


def test_convert_from_a_checkpoint_folder_and_label_flag(tmp_path, trained_run):
    checkpoints = trained_run / "checkpoints"
    checkpoint = checkpoints / (checkpoints / "LATEST").read_text().strip()
    sf.write(tmp_path / "in.flac", synthetic_speech(20000, seed=1).numpy(), SR)
    out = tmp_path / "out.flac"
    assert main(["convert", "--ckpt", str(checkpoint), "--input", str(tmp_path / "in.flac"),
                 "--speaker", "alice", "--label", "birthplace=leeds", "--label", "sex=",
                 "--out", str(out), "--n-iter", "1"]) == 0
    converted, sr = sf.read(out)
    assert sr == 16000 and len(converted) == 20000


@pytest.mark.parametrize("extra,expected", [
    (["--speaker", "zed"], "unknown speaker 'zed' (2 classes; valid: 'alice', 'bob')"),
    (["--speaker", "alicee"], "did you mean 'alice'"),
    (["--speaker", "bob", "--label", "accent=Scottish"],
     "the checkpoint has no label group 'accent'; its groups are speaker, birthplace, sex"),
    (["--speaker", "bob", "--sex", "X"], "unknown sex 'X'"),
    (["--speaker", "bob", "--label", "sex"], "expected group=value"),
    (["--speaker", "bob", "--sex", "M", "--label", "sex=F"], "label group 'sex' is given twice"),
])
def test_convert_label_errors(tmp_path, trained_run, capsys, extra, expected):
    sf.write(tmp_path / "in.wav", synthetic_speech(20000, seed=1).numpy(), SR)
    argv = ["convert", "--ckpt", str(trained_run), "--input", str(tmp_path / "in.wav"),
            "--out", str(tmp_path / "out.wav")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vcfast convert: error:") and expected in err
    assert not (tmp_path / "out.wav").exists()


def test_convert_file_errors(tmp_path, trained_run, capsys):
    good = tmp_path / "in.wav"
    sf.write(good, synthetic_speech(20000, seed=1).numpy(), SR)

    def run(ckpt, inp, out=tmp_path / "out.wav"):
        code = main(["convert", "--ckpt", str(ckpt), "--input", str(inp), "--speaker", "bob",
                     "--out", str(out), "--n-iter", "1"])
        return code, capsys.readouterr().err

    code, err = run(tmp_path / "no-run", good)
    assert code == 2 and "no-run" in err and "does not exist" in err
    (tmp_path / "empty-run").mkdir()
    code, err = run(tmp_path / "empty-run", good)
    assert code == 2 and "empty-run" in err and "checkpoint" in err
    code, err = run(trained_run, tmp_path / "missing.wav")
    assert code == 2 and "missing.wav" in err
    (tmp_path / "bad.wav").write_bytes(b"RIFF but not really audio")
    code, err = run(trained_run, tmp_path / "bad.wav")
    assert code == 2 and "bad.wav" in err
    sf.write(tmp_path / "short.wav", synthetic_speech(2048, seed=1).numpy()[:500], SR)
    code, err = run(trained_run, tmp_path / "short.wav")
    assert code == 2 and "500 samples; need at least 1024" in err
    code, err = run(trained_run, good, out=tmp_path / "nowhere" / "out.wav")
    assert code == 2 and "nowhere" in err
    code, err = run(trained_run, good, out=tmp_path / "out.mp3")
    assert code == 2 and ".wav or .flac" in err
    assert not list(tmp_path.glob("out.*"))


# ---------------------------------------------------------------------------------------------
# vcfast demo


def test_demo_tiny_budget_writes_wavs_png_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1", "--size", "tiny", "--n-iter", "2",
                 "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"device", "model", "corpus", "training", "evaluation", "conversion",
                           "roundtrip_spectral_convergence", "phases", "files", "total_seconds"}
    assert report["device"] == "cpu" and report["model"]["size"] == "tiny"
    assert report["model"]["generator_params"] > 0 and report["model"]["discriminator_params"] > 0
    assert report["training"]["steps_done"] == 1
    phases = [row["phase"] for row in report["phases"]]
    assert phases == ["load corpus", "train", "convert", "round trip", "judge"]
    assert all(row["seconds"] >= 0 and row["peak_rss_mib"] > 0 for row in report["phases"])
    conversion = report["conversion"]
    assert conversion["source_labels"]["speaker"] != conversion["target_labels"]["speaker"]
    assert 0 < conversion["spectral_convergence"] < 1 and conversion["windows"] >= 1
    assert set(report["evaluation"]) >= {"accuracy_real", "accuracy_converted"}
    # The independent judge's figures (docs/training.md#judging-conversion).
    judge = report["judge"]
    assert 0 <= judge["target_speaker_share"] <= 1 and 0 <= judge["spectral_distance"] <= 1
    assert judge["judge_info"]["steps"] > 0 and judge["n_conversions"] > 0

    converted, sr = sf.read(out / "converted.wav")
    source, source_sr = sf.read(out / "source.wav")
    assert sr == source_sr == 16000 and len(converted) == len(source) > 66304 // 4
    assert (out / "converted.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "run" / "checkpoints" / "LATEST").is_file()
    for key, path in report["files"].items():
        assert path is None or (tmp_path / path).exists(), key
    markdown = (out / "report.md").read_text()
    assert "converted.wav" in markdown and "spectral convergence" in markdown
    assert "judge on real held-out" in markdown
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    assert "converted.wav" in capsys.readouterr().out


def test_demo_errors_are_reported(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--data", str(tmp_path / "no-corpus"),
                 "--steps", "1", "--size", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vcfast demo: error:") and "no-corpus" in err
