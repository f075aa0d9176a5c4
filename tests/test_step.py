"""One step definition (vcfast/train/step.py): `vcfast train` and the memory estimator run the
same D step and G step, and the estimator's figure for the trainer's own step is what the
live-bytes tracker measures when that step runs on real CPU tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from vcfast.data import load_corpus, synthetic_speech
from vcfast.estimate import build_iteration, estimate_iteration
from vcfast.labels import LabelSpace
from vcfast.memory import LiveBytesTracker, tensor_bytes
from vcfast.train import TrainConfig, build_models, train
from vcfast.train import step as step_module
from vcfast.train.step import LossWeights, Stepper, encode_batch, make_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_corpus(root: Path) -> Path:
    """Two speakers x 2 files of 4.5 s synthetic speech."""
    for s, speaker in enumerate(("alice", "bob")):
        (root / speaker).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            wave = synthetic_speech(int(4.5 * 16000), seed=10 * s + k).numpy() * 0.5
            sf.write(root / speaker / f"utt{k}.wav", wave, 16000)
    (root / "speakers.csv").write_text("speaker,birthplace,sex\nalice,north,F\nbob,,M\n")
    return root


def _labels() -> LabelSpace:
    return LabelSpace([("speaker", 10), ("accent", 4), ("sex", 2)])


def test_the_trainer_and_the_estimator_call_the_same_step(tmp_path, monkeypatch):
    calls = {"d_step": 0, "g_step": 0}
    for name in calls:
        real = getattr(Stepper, name)

        def counted(self, batch, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, batch)

        monkeypatch.setattr(Stepper, name, counted)

    corpus = load_corpus(_write_corpus(tmp_path / "corpus"))
    config = TrainConfig(size="tiny", steps=1, batch_size=2, n_critic=2, held_out_per_speaker=0,
                         device="cpu", seed=0)
    train(config, corpus, tmp_path / "run", progress=False)
    assert calls == {"d_step": 2, "g_step": 1}

    estimate_iteration(2, size="tiny", n_critic=2, label_space=corpus.label_space)
    assert calls == {"d_step": 4, "g_step": 2}
    iteration = build_iteration(1, size="tiny", n_critic=1, device="cpu")
    assert type(iteration.stepper) is Stepper
    assert step_module.Stepper is Stepper  # the loop's step is this module's (no copy)
    from vcfast.train import loop

    assert loop._Stepper is Stepper


@pytest.mark.parametrize("optimizer, checkpoint_blocks", [("rmsprop", False), ("adam", True)])
def test_estimate_of_the_trainers_step_equals_the_tracker_on_real_cpu_tensors(
        optimizer, checkpoint_blocks):
    """The trainer's own objects (build_models, make_optimizer, encode_batch, Stepper with the
    config's weights), on real CPU tensors under the tracker, against estimate_iteration for
    the same options on the meta device: the same baseline, peak and phase peaks, exactly."""
    batch, n_critic = 2, 2
    labels = _labels()
    config = TrainConfig(size="tiny", optimizer=optimizer, checkpoint_blocks=checkpoint_blocks,
                         batch_size=batch, n_critic=n_critic, device="cpu")
    G, D = build_models(config, labels)
    opt_g = make_optimizer(config.optimizer, G.parameters(), config.learning_rate)
    opt_d = make_optimizer(config.optimizer, D.parameters(), config.learning_rate)
    for opt, model in ((opt_d, D), (opt_g, G)):  # steady state: gradients and optimizer state
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    size = config.model_sizes["image_size"]
    x_real, x_orig = torch.rand(2, batch, 1, size, size)
    step_batch = encode_batch(x_real, x_orig, torch.tensor([[0, 1, -1], [3, -1, 1]]),
                              torch.tensor([[2, 0, 0], [-1, 3, -1]]), labels)
    stepper = Stepper(G, D, opt_g, opt_d, labels.sizes, weights=LossWeights.from_config(config))
    state = (G, D, opt_g.state, opt_d.state, *vars(step_batch).values())
    tracker = LiveBytesTracker(baseline_bytes=tensor_bytes(*state))
    tracker.adopt(*state)
    with tracker:
        for _ in range(n_critic):
            with tracker.phase("d_step"):
                stepper.d_step(step_batch)
        with tracker.phase("g_step"):
            stepper.g_step(step_batch)
    assert tracker.peak_allocated_bytes > 2**20  # a real step ran

    meta = estimate_iteration(batch, size="tiny", n_critic=n_critic, optimizer=optimizer,
                              checkpoint_residual_blocks=checkpoint_blocks, label_space=labels)
    assert meta["image_size"] == size and meta["optimizer"] == optimizer
    assert meta["baseline_bytes"] == tracker.baseline_bytes
    assert meta["peak_bytes"] == tracker.peak_bytes
    assert meta["phases"] == tracker.phase_peaks


def test_estimate_follows_the_optimizer_and_the_loss_weights():
    labels = _labels()
    rmsprop = estimate_iteration(2, size="tiny", n_critic=1, label_space=labels)
    adam = estimate_iteration(2, size="tiny", n_critic=1, label_space=labels, optimizer="adam")
    params = sum(p.numel() * 4 for p in build_models(TrainConfig(size="tiny"), labels)[0]
                 .parameters())
    assert adam["baseline_bytes"] > rmsprop["baseline_bytes"] + params  # 2 moments, not 1
    no_gp = estimate_iteration(2, size="tiny", n_critic=1, label_space=labels,
                               weights=LossWeights(gp=0.0))
    assert no_gp["phases"]["d_step"] < rmsprop["phases"]["d_step"]
    with pytest.raises(ValueError, match="optimizer"):
        estimate_iteration(1, size="tiny", optimizer="sgd")
    with pytest.raises(ValueError, match="size"):
        estimate_iteration(1, size="huge")
