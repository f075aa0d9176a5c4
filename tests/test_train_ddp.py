"""`vcfast train` on several processes: DDP on 2 CPU ranks (gloo, loopback) via ``run_ranks``.

docs/training.md#several-processes-ddp is the plan these tests check: 2 ranks x batch b train
like 1 process x batch 2b, a 2-rank checkpoint resumes exactly on 2 ranks and with a note on 1,
and a failing rank ends the job with its error.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from vcfast.data import synthetic_speech
from vcfast.train.distributed import RankFailedError, run_ranks

SPEAKERS = ("alice", "bob", "carol", "dave")


def _write_corpus(root: Path) -> Path:
    """4 speakers x 2 files of synthetic speech; speaker labels only (all known)."""
    samples = int(4.5 * 16000)
    for s, speaker in enumerate(SPEAKERS):
        (root / speaker).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            wave = synthetic_speech(samples, seed=10 * s + k).numpy() * 0.5
            sf.write(root / speaker / f"utt{k}.wav", wave, 16000)
    return root


def _data_eps(x_real: torch.Tensor) -> torch.Tensor:
    """The penalty's interpolation eps as a function of each sample (not of the RNG)."""
    return torch.sigmoid(3 * x_real.detach().flatten(1).mean(1))


def _train_rank(ctx, corpus_dir: str, out_dir: str, overrides: dict, resume: bool = False,
                fail_rank: int | None = None) -> dict:
    """One rank of a run: train, and return the summary and what the rank printed.

    The penalty's eps is a function of the sample (``_data_eps``) so that 1 process x 2b and
    2 ranks x b interpolate each sample with the same eps; otherwise each draws its own
    ``torch.rand`` (per-rank RNG streams) and the runs only agree in distribution.
    ``fail_rank``: that rank raises in its second D step.
    """
    import vcfast.ops.gradient_penalty as penalty
    from vcfast.data import load_corpus
    from vcfast.train import TrainConfig, loop, train

    interpolate = penalty.interpolate

    def interpolate_by_sample(x_real, x_fake, eps=None, generator=None):
        return interpolate(x_real, x_fake, _data_eps(x_real) if eps is None else eps, generator)

    penalty.interpolate = interpolate_by_sample
    if fail_rank == ctx.rank:
        calls = {"n": 0}
        d_step = loop._Stepper.d_step

        def failing_d_step(self, batch):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError(f"injected failure on rank {ctx.rank}")
            return d_step(self, batch)

        loop._Stepper.d_step = failing_d_step
    values = {
        "size": "tiny", "steps": 3, "batch_size": 2, "n_critic": 1, "log_every": 1,
        "sample_every": 100, "checkpoint_every": 1, "eval_every": 100, "keep_checkpoints": 5,
        "device": "cpu", "seed": 3, "held_out_per_speaker": 0,
    }
    values.update(overrides)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = train(TrainConfig(**values), load_corpus(corpus_dir), out_dir, resume=resume,
                        progress=False, dist_ctx=ctx)
    summary.pop("config")
    return {"summary": summary, "stderr": err.getvalue()}


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    return {**{f"G.{k}": v for k, v in load_file(ckpt / "generator.safetensors").items()},
            **{f"D.{k}": v for k, v in load_file(ckpt / "discriminator.safetensors").items()}}


def _losses(run: Path) -> list[dict[str, float]]:
    from vcfast.train.logs import CsvLog
    from vcfast.train.loop import LOSS_COLUMNS
    return [{k: float(row[k]) for k in LOSS_COLUMNS} for row in CsvLog.read(run / "log.csv")]


def _rewind(run: Path, step: int, to: Path) -> Path:
    """A copy of ``run`` whose latest checkpoint is ``step`` (later ones removed)."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    (to / "checkpoints" / "LATEST").write_text(f"step_{step:08d}\n")
    return to


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1 process x batch 4 and 2 ranks x batch 2, 3 steps each (a checkpoint per step)."""
    root = tmp_path_factory.mktemp("ddp")
    corpus = str(_write_corpus(root / "corpus"))
    single, double = root / "single", root / "double"
    (one,) = run_ranks(_train_rank, 1, args=(corpus, str(single), {"batch_size": 4}),
                       timeout_s=120)
    two = run_ranks(_train_rank, 2, args=(corpus, str(double), {}), timeout_s=120)
    return {"root": root, "corpus": corpus, "single": single, "double": double, "one": one,
            "two": two}


def test_two_ranks_train_like_one_process_with_the_global_batch(runs):
    """2 ranks x b == 1 process x 2b, losses and weights to fp32 rounding, after 3 steps.

    Why this can be close and not bit-equal: the ranks average their gradients (DDP) where one
    process takes the mean over 2b samples, a different order of fp32 sums (and RMSprop turns
    a near-zero gradient's rounding into a full-size step: see the weight check). The models
    normalise per instance; G's running statistics are averaged over the ranks after each
    step (linear, so equal to one process's); the masked BCE means are equal because every
    label is known (same count per sample); and the penalty's eps is a function of the sample
    (``_train_rank``) instead of each rank's own RNG stream. The penalty's gradients go
    through DDP's all-reduce: were they left per rank, rank 0's D would differ from the
    1-process D after the first step.
    """
    one, two = runs["one"]["summary"], [r["summary"] for r in runs["two"]]
    assert one["world_size"] == 1 and one["global_batch_size"] == 4
    assert two[0]["world_size"] == 2 and two[0]["global_batch_size"] == 4
    assert two[0]["steps"] == 3 and two[0]["stopped"] == "completed"
    assert len(two[0]["per_rank_samples_per_s"]) == 2 and two[0]["samples_per_s"] > 0
    single, double = _losses(runs["single"]), _losses(runs["double"])
    assert len(single) == len(double) == 3
    for a, b in zip(single, double):
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-5), name
    for step in (1, 3):
        w1, w2 = _weights(runs["single"], step), _weights(runs["double"], step)
        assert w1.keys() == w2.keys()
        for model in ("G.", "D."):
            diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1 if k.startswith(model)])
            # RMSprop's first updates are about lr * sign(grad) * 10 whatever the gradient's
            # size, so a weight whose gradient is ~1e-7 (fp32 noise level) may move the other
            # way: a handful of weights, each by at most 2 * 10 * lr per step. A gradient that
            # was not all-reduced (or a wrong batch) moves most weights apart instead.
            assert (diff > 1e-6).float().mean() < 0.005, (model, step)
            assert diff.max() <= 2 * 10 * 1e-5 * step + 1e-6, (model, step)
    assert any(d["d_gp"] > 0 for d in double)  # the penalty took part


def test_rank_zero_alone_writes(runs):
    double = runs["double"]
    assert (double / "log.csv").is_file() and (double / "config.json").is_file()
    assert sorted(p.name for p in (double / "checkpoints").glob("step_*")) == [
        f"step_{s:08d}" for s in (1, 2, 3)]
    assert runs["two"][1]["summary"]["checkpoint"] is None  # rank 1 wrote none


def test_two_rank_checkpoint_resumes_exactly_on_two_ranks(runs):
    rewound = _rewind(runs["double"], 1, runs["root"] / "resume2")
    results = run_ranks(_train_rank, 2, args=(runs["corpus"], str(rewound), {}, True),
                        timeout_s=120)
    assert results[0]["summary"]["steps_this_run"] == 2
    assert "note" not in results[0]["stderr"]
    w_full, w_resumed = _weights(runs["double"], 3), _weights(rewound, 3)
    for name in w_full:
        assert torch.equal(w_resumed[name], w_full[name]), name


def test_two_rank_checkpoint_resumes_on_one_process_with_a_note(runs):
    rewound = _rewind(runs["double"], 2, runs["root"] / "resume1")
    (result,) = run_ranks(_train_rank, 1,
                          args=(runs["corpus"], str(rewound), {"batch_size": 2}, True),
                          timeout_s=120)
    assert result["summary"]["steps"] == 3 and result["summary"]["steps_this_run"] == 1
    note = result["stderr"]
    assert "written by 2 process(es), this run has 1" in note and "shard" in note


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path, runs):
    start = time.monotonic()
    with pytest.raises(RankFailedError) as caught:
        run_ranks(_train_rank, 2,
                  args=(runs["corpus"], str(tmp_path / "fail"), {}, False, 1), timeout_s=120)
    assert caught.value.rank == 1
    assert "injected failure on rank 1" in str(caught.value)
    assert time.monotonic() - start < 60


def test_vcfast_train_under_torchrun_variables(runs, tmp_path):
    """``python -m vcfast train`` in 2 processes with torchrun's variables (what torchrun
    sets): rank 0 alone prints the report, with the global batch and the throughput."""
    import os
    import subprocess
    import sys

    from vcfast.train.distributed import free_port

    port = str(free_port())
    command = [sys.executable, "-m", "vcfast", "train", "--data", runs["corpus"],
               "--out", str(tmp_path / "run"), "--size", "tiny", "--steps", "2",
               "--batch-size", "2", "--n-critic", "1", "--device", "cpu",
               "--held-out-per-speaker", "0", "--sample-every", "100", "--eval-every", "100",
               "--checkpoint-every", "100", "--no-progress"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    out0, out1 = outputs[0][0], outputs[1][0]
    assert "batch 2 per process x 2 processes = 4" in out0
    assert "samples/s on 2 processes (global batch 4); per process:" in out0
    assert '"world_size": 2' in out0 and '"per_rank_samples_per_s"' in out0
    assert out1 == ""
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
