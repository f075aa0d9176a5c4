"""vcfast.judge (docs/training.md#judging-conversion): the separately trained speaker
classifier, its save/load, judge_conversion and `vcfast evaluate`, at tiny sizes on the
bundled demo corpus."""

from __future__ import annotations

import json
import math

import pytest
import torch

import vcfast
from vcfast.cli import main
from vcfast.data import demo_corpus_dir, load_corpus, load_crop
from vcfast.judge import Judge, judge_conversion, train_judge
from vcfast.train import TrainConfig, load_generator, train

# 64 x 64 spectrograms (the "tiny" models' image size), width 8: 60 steps reach ~0.5 speaker
# accuracy on the training split (chance 1/8) in a few seconds on 2 cores.
SIZE, WIDTH, STEPS = 64, 8, 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(demo_corpus_dir())


@pytest.fixture(scope="module")
def judge(corpus):
    return train_judge(corpus, steps=STEPS, batch=8, device="cpu", seed=0, image_size=SIZE,
                       width=WIDTH)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    """A tiny StarGAN run of 1 step on the demo corpus (the checkpoint judge_conversion uses)."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(size="tiny", steps=1, batch_size=2, n_critic=1, log_every=1,
                         sample_every=100, checkpoint_every=1, eval_every=100, device="cpu",
                         seed=0)
    train(config, corpus, out, progress=False)
    return out


def test_judge_beats_chance_on_training_speech(judge, corpus):
    train_split, _ = corpus.split(1, seed=0)
    gen = torch.Generator().manual_seed(1)
    waves = torch.stack([load_crop(u.path, generator=gen) for u in train_split.utterances])
    with torch.no_grad():
        logits = judge(judge.spectrogram(waves))
    acc = vcfast.multigroup_accuracy(logits, train_split.label_indices(), corpus.label_space)
    chance = 1 / corpus.label_space.size_of("speaker")
    assert acc["speaker"]["accuracy"] > 2 * chance, acc
    assert judge.info["steps"] == STEPS and judge.info["train_utterances"] == len(train_split)
    assert not judge.training


def test_save_load_round_trip(judge, tmp_path):
    path = judge.save(tmp_path / "judge.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["judge.pt"]  # no temp file left behind
    loaded = Judge.load(path)
    assert loaded.label_space == judge.label_space and loaded.image_size == SIZE
    assert loaded.info == judge.info and not loaded.training
    x = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), judge(x))
    (tmp_path / "bad.pt").write_bytes(b"not a judge")
    with pytest.raises(ValueError, match="not a judge"):
        Judge.load(tmp_path / "bad.pt")


def _check_scores(scores: dict) -> None:
    assert scores["n_utterances"] == 8 and scores["n_conversions"] == 8 * 7
    for key in ("target_speaker_share", "source_speaker_share", "spectral_distance",
                "spectral_distance_unconverted"):
        assert 0.0 <= scores[key] <= 1.0, (key, scores[key])
    for kind in ("accuracy_real", "accuracy_converted"):
        for group, entry in scores[kind].items():
            value = entry if group == "mean" else entry["accuracy"]
            assert math.isnan(value) or 0.0 <= value <= 1.0, (kind, group, value)
    assert scores["target_speaker_share"] == scores["accuracy_converted"]["speaker"]["accuracy"]
    assert scores["accuracy_converted"]["speaker"]["count"] == 56


def test_judge_conversion_keys_and_ranges(judge, run_dir, corpus):
    generator, label_space, _ = load_generator(run_dir)
    was = generator.training
    scores = judge_conversion(judge, generator, corpus, seed=0)
    _check_scores(scores)
    assert generator.training == was
    with pytest.raises(ValueError, match="max_utterances"):
        judge_conversion(judge, generator, corpus, max_utterances=0)


def test_cli_evaluate(run_dir, tmp_path, capsys):
    out_json = tmp_path / "scores.json"
    assert main(["evaluate", "--ckpt", str(run_dir), "--judge-steps", "2", "--judge-width", "4",
                 "--device", "cpu", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "| speaker |" in printed and "spectral distance" in printed
    assert (run_dir / "judge.pt").is_file()
    scores = json.loads(out_json.read_text())
    _check_scores(scores)
    assert scores["judge_info"]["steps"] == 2
    # Loading the saved judge instead of training one.
    assert main(["evaluate", "--ckpt", str(run_dir), "--judge", str(run_dir / "judge.pt"),
                 "--device", "cpu", "--max-utterances", "2"]) == 0
    assert "14 conversions of 2 held-out" in capsys.readouterr().out
    assert main(["evaluate", "--ckpt", str(run_dir), "--judge", str(tmp_path / "none.pt")]) == 2
