"""End-to-end tests of vcfast.train at the "tiny" size on a synthesised corpus."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from vcfast.data import load_corpus, synthetic_speech
from vcfast.labels import LabelSpace
from vcfast.train import (
    CheckpointError,
    TrainConfig,
    add_train_arguments,
    build_models,
    cmd_train,
    evaluate,
    load_generator,
    train,
)
from vcfast.train import checkpoint as checkpoint_module
from vcfast.train.cli import config_from_args
from vcfast.train.logs import CsvLog
from vcfast.train.loop import LOSS_COLUMNS

SPEAKERS = ("alice", "bob", "carol")


def _write_corpus(root: Path, speakers=SPEAKERS) -> Path:
    """Speakers x 2 files of 4.5 s synthetic speech, labels with unknown cells."""
    samples = int(4.5 * 16000)
    for s, speaker in enumerate(speakers):
        (root / speaker).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            wave = synthetic_speech(samples, seed=10 * s + k).numpy() * 0.5
            sf.write(root / speaker / f"utt{k}.wav", wave, 16000)
    rows = {
        "alice": "alice,north,F",
        "bob": "bob,,M",
        "carol": "carol,south,",
        "dave": "dave,north,M",
    }
    (root / "speakers.csv").write_text(
        "speaker,birthplace,sex\n" + "\n".join(rows[s] for s in speakers) + "\n"
    )
    return root


def _config(**overrides) -> TrainConfig:
    """Tiny models, 1 D step per G step, a checkpoint after every step (3 kept)."""
    values = {
        "size": "tiny", "steps": 4, "batch_size": 2, "n_critic": 1, "log_every": 1,
        "sample_every": 100, "checkpoint_every": 1, "eval_every": 100, "keep_checkpoints": 3,
        "device": "cpu", "seed": 3,
    }
    values.update(overrides)
    return TrainConfig(**values)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_corpus(_write_corpus(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    """4 uninterrupted steps, a checkpoint after each (3 kept)."""
    run = tmp_path_factory.mktemp("full") / "run"
    summary = train(_config(), corpus, run, progress=False)
    return run, summary


@pytest.fixture(scope="module")
def resumed_run(corpus, tmp_path_factory):
    """The same run as 2 steps, then resumed for 2 more."""
    run = tmp_path_factory.mktemp("resumed") / "run"
    first = train(_config(steps=2), corpus, run, progress=False)
    second = train(_config(steps=4), corpus, run, resume=True, progress=False)
    return run, first, second


def _loss_rows(run: Path) -> list[dict[str, str]]:
    return [{k: row[k] for k in ("step", *LOSS_COLUMNS)} for row in CsvLog.read(run / "log.csv")]


# ---------------------------------------------------------------------------------------------


def test_training_writes_everything(full_run, corpus):
    run, summary = full_run
    assert (
        summary["steps"] == 4
        and summary["steps_this_run"] == 4
        and summary["stopped"] == "completed"
    )
    assert summary["seconds_per_step"] > 0 and summary["peak_rss_bytes"] > 0
    assert all(math.isfinite(v) for v in summary["losses"].values())
    assert set(LOSS_COLUMNS) <= set(summary["losses"])

    rows = CsvLog.read(run / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r[c])) for r in rows for c in LOSS_COLUMNS)
    assert json.loads((run / "config.json").read_text())["size"] == "tiny"
    assert LabelSpace.from_dict(json.loads((run / "labels.json").read_text())) == corpus.label_space
    assert list((run / "tb").glob("events.out.tfevents.*"))

    # Keep the last 3 checkpoints; LATEST names the newest, which is complete.
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "LATEST",
        "step_00000002",
        "step_00000003",
        "step_00000004",
    ]
    assert (checkpoints / "LATEST").read_text().strip() == "step_00000004"
    assert summary["checkpoint"] == str(checkpoints / "step_00000004")
    for name in (
        "generator.safetensors",
        "discriminator.safetensors",
        "training_state.pt",
        "state.json",
    ):
        assert (checkpoints / "step_00000004" / name).is_file()
    state = json.loads((checkpoints / "step_00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["size"] == "tiny"

    # End-of-run sample and evaluation.
    assert Path(summary["sample_png"]).name == "step_00000004.png"
    assert Path(summary["sample_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    wave, rate = sf.read(summary["sample_wav"])
    assert rate == 16000 and wave.ndim == 1 and len(wave) > 1000 and abs(wave).max() > 0
    metrics = summary["eval"]
    assert metrics["n_utterances"] == len(SPEAKERS)  # one held out per speaker
    for kind in ("accuracy_real", "accuracy_converted"):
        assert set(metrics[kind]) == {*corpus.label_space.names, "mean"}
        assert 0.0 <= metrics[kind]["speaker"]["accuracy"] <= 1.0
        assert metrics[kind]["speaker"]["count"] == len(SPEAKERS)
    assert 0 < metrics["reconstruction_l1"] < 1
    assert 0 < metrics["spectral_convergence"] < 1
    assert [int(r["step"]) for r in CsvLog.read(run / "eval.csv")] == [4]


def test_resume_is_exact(full_run, resumed_run):
    full, _ = full_run
    resumed, first, second = resumed_run
    assert first["steps"] == 2 and second["steps"] == 4 and second["steps_this_run"] == 2
    # Same losses, bit for bit (floats are logged with repr), and the same final weights.
    assert _loss_rows(resumed) == _loss_rows(full)
    for name in ("generator.safetensors", "discriminator.safetensors"):
        a = load_file(full / "checkpoints" / "step_00000004" / name)
        b = load_file(resumed / "checkpoints" / "step_00000004" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert (
        second["losses"]
        == json.loads((full / "checkpoints/step_00000004/state.json").read_text())["losses"]
    )


def test_resume_from_an_older_checkpoint_drops_later_log_rows(full_run, corpus, tmp_path):
    full, _ = full_run
    run = tmp_path / "rewound"
    shutil.copytree(full, run)
    # As if the process had died after logging steps 3-4 but before their checkpoints.
    (run / "checkpoints" / "LATEST").write_text("step_00000003\n")
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    summary = train(_config(steps=4), corpus, run, resume=True, progress=False)
    assert summary["steps_this_run"] == 1
    assert _loss_rows(run) == _loss_rows(full)  # row 4 dropped, then written again identically


def test_load_generator_round_trip(full_run, corpus):
    run, _ = full_run
    generator, label_space, info = load_generator(run)
    assert not generator.training
    assert label_space == corpus.label_space
    assert info["step"] == 4 and info["config"]["size"] == "tiny"
    saved = load_file(run / "checkpoints" / "step_00000004" / "generator.safetensors")
    for key, value in generator.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # A checkpoint directory works too, and the generator converts.
    _, _, info2 = load_generator(run / "checkpoints" / "step_00000003")
    assert info2["step"] == 3
    x = torch.rand(1, 1, 64, 64)
    c = label_space.generator_input([{"speaker": "bob"}])
    with torch.no_grad():
        y = generator(x, c)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_load_generator_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a run directory"):
        load_generator(tmp_path)


def test_interrupted_checkpoint_save_leaves_previous_checkpoint(corpus, tmp_path, monkeypatch):
    config = _config()
    generator, discriminator = build_models(config, corpus.label_space)
    checkpoints = tmp_path / "checkpoints"

    def save(step):
        return checkpoint_module.save_checkpoint(
            checkpoints,
            step,
            generator=generator,
            discriminator=discriminator,
            training_state={"step": step},
            state={"step": step},
            keep=3,
        )

    first = save(1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    real_write = checkpoint_module._write_file

    def failing_write(path, data):
        if path.name == "training_state.pt":  # after the weights, before state.json
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_file", failing_write)
    with torch.no_grad():
        generator.stem.weight.add_(1.0)  # the failed save would hold different weights
    with pytest.raises(OSError, match="No space left"):
        save(2)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["LATEST", "step_00000001"]
    assert (checkpoints / "LATEST").read_text().strip() == "step_00000001"
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before

    monkeypatch.setattr(checkpoint_module, "_write_file", real_write)
    assert save(2).name == "step_00000002"
    assert (checkpoints / "LATEST").read_text().strip() == "step_00000002"


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['bogus'\]"):
        TrainConfig.from_dict({"bogus": 1, "steps": 3})
    with pytest.raises(ValueError, match="size must be one of"):
        TrainConfig(size="huge")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        TrainConfig(lr=-1.0)
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"size": "tiny", "learning_rate": 0.1}))
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_json_file(bad_file)
    bad_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.from_json_file(bad_file)
    assert TrainConfig(optimizer="adam").learning_rate == 1e-4
    assert TrainConfig().learning_rate == 1e-5


def test_cli_arguments_and_precedence(tmp_path):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"size": "small", "steps": 7, "optimizer": "adam"}))
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "run"),
            "--config",
            str(config_file),
            "--steps",
            "9",
            "--bf16",
            "--max-minutes",
            "2.5",
        ]
    )
    config = config_from_args(args)
    assert (config.size, config.steps, config.optimizer, config.bf16, config.max_minutes) == (
        "small",
        9,
        "adam",
        True,
        2.5,
    )
    assert config.n_critic == 5  # untouched default
    config_file.write_text(json.dumps({"sizes": "small"}))
    with pytest.raises(ValueError, match="unknown TrainConfig key"):
        config_from_args(
            parser.parse_args(["--out", str(tmp_path / "run"), "--config", str(config_file)])
        )
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--size", "huge"])


def test_resume_refuses_a_different_model_or_label_space(full_run, corpus):
    run, _ = full_run
    with pytest.raises(CheckpointError, match="size='tiny'"):
        train(_config(size="small"), corpus, run, resume=True, progress=False)
    other_labels = dataclasses.replace(
        corpus,
        label_space=LabelSpace.from_names(
            {
                "speaker": ["alice", "bob", "zoe"],
                "birthplace": ["north", "south"],
                "sex": ["F", "M"],
            }
        ),
    )
    with pytest.raises(CheckpointError, match="label space differs"):
        train(_config(), other_labels, run, resume=True, progress=False)
    with pytest.raises(ValueError, match="already holds a training run"):
        train(_config(), corpus, run, progress=False)


def test_resume_without_checkpoint_is_refused(corpus, tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        train(_config(), corpus, tmp_path / "empty", resume=True, progress=False)


def test_max_minutes_and_interrupt_stop_with_a_checkpoint(corpus, tmp_path, monkeypatch):
    summary = train(
        _config(steps=50, max_minutes=1e-6, held_out_per_speaker=0),
        corpus,
        tmp_path / "timed",
        progress=False,
    )
    assert summary["stopped"] == "max_minutes" and summary["steps"] == 1
    assert (tmp_path / "timed" / "checkpoints" / "LATEST").read_text().strip() == "step_00000001"

    from vcfast.train import loop

    calls = {"n": 0}
    real_g_step = loop._Stepper.g_step

    def g_step_then_ctrl_c(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_g_step(self, batch)

    monkeypatch.setattr(loop._Stepper, "g_step", g_step_then_ctrl_c)
    summary = train(
        _config(steps=50, checkpoint_every=100, held_out_per_speaker=0),
        corpus,
        tmp_path / "ctrl_c",
        progress=False,
    )
    assert summary["stopped"] == "interrupted" and summary["steps"] == 1
    state = json.loads(
        (tmp_path / "ctrl_c" / "checkpoints" / "step_00000001" / "state.json").read_text()
    )
    assert state["step"] == 1 and (state["epoch"], state["batch_index"]) == (0, 1)


def test_cmd_train_runs_one_step(tmp_path, capsys):
    corpus_dir = _write_corpus(tmp_path / "corpus", speakers=("alice", "bob"))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        [
            "--data",
            str(corpus_dir),
            "--out",
            str(tmp_path / "run"),
            "--size",
            "tiny",
            "--steps",
            "1",
            "--n-critic",
            "1",
            "--device",
            "cpu",
            "--no-progress",
            "--held-out-per-speaker",
            "0",
        ]
    )
    # A corrupt file and one shorter than a crop: skipped with a warning, counted in the report.
    (corpus_dir / "alice" / "corrupt.wav").write_bytes(b"RIFF\x00\x01 not audio at all")
    sf.write(corpus_dir / "bob" / "short.wav", synthetic_speech(16000).numpy() * 0.5, 16000)
    with pytest.warns(UserWarning):
        assert cmd_train(args) == 0
    out = capsys.readouterr().out
    assert "2 speakers" in out and '"steps": 1' in out
    assert "Skipped 2 file(s)" in out and '"skipped_files": 2' in out
    recorded = json.loads((tmp_path / "run" / "corpus.json").read_text())
    assert sorted(Path(p).name for p, _ in recorded["skipped"]) == ["corrupt.wav", "short.wav"]
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "generator.safetensors").is_file()


def test_evaluate_checks_its_inputs(full_run, corpus):
    run, _ = full_run
    generator, label_space, _ = load_generator(run)
    _, discriminator = build_models(_config(), label_space)
    empty = dataclasses.replace(corpus, utterances=[])
    with pytest.raises(ValueError, match="no utterances"):
        evaluate(generator, discriminator, empty, label_space)
    with pytest.raises(TypeError, match="Corpus"):
        evaluate(generator, discriminator, [], label_space)


def test_bf16_checkpointed_blocks_and_adam_train(corpus, tmp_path):
    config = _config(steps=1, bf16=True, checkpoint_blocks=True, optimizer="adam",
                     held_out_per_speaker=0)
    summary = train(config, corpus, tmp_path / "run", progress=False)
    assert summary["steps"] == 1
    assert all(math.isfinite(v) for v in summary["losses"].values())
    generator, _, info = load_generator(tmp_path / "run")
    assert generator.checkpoint_residual_blocks and info["config"]["optimizer"] == "adam"


def test_progress_in_a_pipe_is_plain_lines(corpus, tmp_path, capsys):
    """stderr under pytest's capture is not a terminal, as in a CI log or a file: the trainer
    prints plain step lines (the first and the last step at least), never the bar's carriage
    returns, and an evaluation line comes after the line of its step."""
    config = _config(steps=3, checkpoint_every=100, eval_every=2)
    train(config, corpus, tmp_path / "run", progress=True, progress_interval_s=3600)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith(("train: step", "step "))]

    def head(line: str) -> str:
        return line.split(",")[0] if line.startswith("train:") else line.split(":")[0]

    # step 2 is printed (interval not reached) because its evaluation line follows it
    assert [head(line) for line in lines] == ["train: step 1/3", "train: step 2/3", "step 2 eval",
                                              "train: step 3/3", "step 3 eval"]
    assert "d_loss" in lines[0] and "samples/s" in lines[0]
