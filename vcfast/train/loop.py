"""The StarGAN-VC training loop (docs/training.md) with logs, samples, evaluation and exact resume.

One G step ("step" everywhere here) = ``n_critic`` D updates, each on a fresh batch, then one
G update on the last of those batches. The updates themselves are defined once, in
vcfast/train/step.py (:class:`vcfast.train.step.Stepper`), which the memory estimator runs too:

* D: ``-mean D_src(x_real) + mean D_src(G(x_real, c')) + lambda_gp * GP +
  lambda_cls * BCE(D_cls(x_real), c_real)``, GP the lean (no double backward) penalty on
  ``eps * x_orig + (1 - eps) * x_fake``;
* G: ``-mean D_src(x_fake) + lambda_cls * BCE(D_cls(x_fake), c') +
  lambda_rec * MSE(G(x_fake, c_real), x_real) + lambda_id * MSE(G(x_real, c_real), x_real) +
  lambda_fm * MSE(D_feat(x_fake), D_feat(x_orig))``, the identity term back-propagated on its
  own first so its graph is freed before the rest is built.

c' is the label set of x_orig (the dataset's pairing). Exact resume: the data order is a
pure function of (seed, epoch, batch index), and a checkpoint holds every RNG state, the
optimiser states and the data position, so 2 steps + resume + 2 steps equals 4 steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vcfast.data import Corpus, StarGANPairDataset, make_loader, save_audio
from vcfast.data.dataset import _mixed_seed
from vcfast.labels import LabelSpace
from vcfast.models.generator import inference_mode
from vcfast.ops.inverse import spectrogram_to_wave
from vcfast.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_name,
    latest_checkpoint,
    load_training_state,
    load_weights,
    read_state,
    restore_rng_state,
    save_checkpoint,
    write_atomically,
)
from vcfast.train.config import RESUME_CRITICAL_FIELDS, TrainConfig
from vcfast.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    broadcast_object,
    gather_object,
    reduce_throughput,
    shard_indices,
)
from vcfast.train.evaluate import evaluate, flatten_metrics
from vcfast.train.logs import (
    CsvLog,
    ProgressReporter,
    ScalarWriter,
    progress_interval,
    save_spectrogram_png,
)
from vcfast.train.models import build_models, model_spectrogram, spectrogram_overrides
from vcfast.train.step import LossWeights, StepBatch, Stepper, encode_batch, make_optimizer

__all__ = ["LOSS_COLUMNS", "resolve_device", "train"]

#: Loss components logged per step (D terms from the step's last D update).
LOSS_COLUMNS = [
    "d_loss",
    "d_adv",
    "d_cls",
    "d_gp",
    "g_loss",
    "g_adv",
    "g_cls",
    "g_rec",
    "g_id",
    "g_fm",
]
#: The step the loop runs (vcfast/train/step.py; the name tests patch).
_Stepper = Stepper
_TIMING_COLUMNS = ["seconds_per_step", "steps_per_s", "samples_per_s", "elapsed_s"]
_GRIFFIN_LIM_ITERATIONS = 32
_TAG_RANK = 0x4A4B  # seeds each rank's RNG with several processes


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is checked and returned."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'"
        )
    return device


# ---------------------------------------------------------------------------------------------
# Data


class _BatchStream:
    """Batches in the order fixed by (seed, epoch, batch index), from any position.

    Each epoch's order comes from :func:`make_loader`; with several processes rank ``rank``
    of ``world_size`` reads its shard of that order (:func:`vcfast.train.distributed.
    shard_indices`), so step ``k``'s batches over all ranks are the batch of ``batch_size *
    world_size`` that one process would read at step ``k``; the loader actually iterated is
    rebuilt over the epoch's remaining batches with its own seeded generator, so starting
    mid-epoch loads nothing twice and creating it draws nothing from the global RNG
    (DataLoader otherwise draws its worker base seed from it, which would shift every
    later random number after a resume).
    """

    def __init__(
        self,
        dataset: StarGANPairDataset,
        config: TrainConfig,
        epoch: int,
        batch_index: int,
        pin_memory: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.dataset = dataset
        self.config = config
        self.epoch = epoch
        self.batch_index = batch_index
        self.pin_memory = pin_memory
        self._iterator: Iterator | None = None

    def _open_epoch(self) -> None:
        order_loader = make_loader(
            self.dataset,
            self.config.batch_size,
            workers=self.config.workers,
            seed=self.config.seed,
            epoch=self.epoch,
            drop_last=True,
        )
        batches = list(order_loader.batch_sampler)
        if self.world_size > 1:  # this rank's shard of the same permutation, cut in batches
            size = self.config.batch_size
            shard = shard_indices(
                len(self.dataset), self.epoch, self.config.seed, self.rank, self.world_size
            )
            batches = [shard[k * size : (k + 1) * size] for k in range(len(shard) // size)]
        if not batches:
            raise ValueError(
                f"the training set yields no batch of {self.config.batch_size}"
                + (f" per rank on {self.world_size} ranks" if self.world_size > 1 else "")
            )
        if self.batch_index >= len(batches):  # a checkpoint taken exactly at an epoch's end
            self.epoch, self.batch_index = self.epoch + 1, 0
            return self._open_epoch()
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches[self.batch_index :],
            num_workers=order_loader.num_workers,
            worker_init_fn=order_loader.worker_init_fn,
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch),
        )
        self._iterator = iter(loader)

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch; advances (epoch, batch_index)."""
        while True:
            if self._iterator is None:
                self._open_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch, self.batch_index = self.epoch + 1, 0
                continue
            self.batch_index += 1
            return batch

    def close(self) -> None:
        """Stop loader workers (if any)."""
        self._iterator = None


def _to_spectrograms(
    batch: dict[str, torch.Tensor], device: torch.device, image_size: int, label_space: LabelSpace
) -> StepBatch:
    """Waves -> [B, 1, image_size, image_size] spectrograms on the training device, with the
    label tensors the step reads (vcfast/train/step.py)."""
    wave_real = batch["wave_real"].to(device, non_blocking=True)
    wave_orig = batch["wave_orig"].to(device, non_blocking=True)
    return encode_batch(
        model_spectrogram(wave_real, image_size),
        model_spectrogram(wave_orig, image_size),
        batch["labels_real"].to(device),
        batch["labels_orig"].to(device),
        label_space,
        device=device,
    )


# ---------------------------------------------------------------------------------------------
# Samples


@contextlib.contextmanager
def _isolated_rng():
    """Run side work (samples, evaluation) without moving the training RNG streams."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


class _Sampler:
    """A fixed (source, target) pair rendered every ``sample_every`` steps: PNG + WAV."""

    def __init__(
        self,
        corpus: Corpus,
        label_space: LabelSpace,
        seed: int,
        out_dir: Path,
        device: torch.device,
        image_size: int,
    ):
        self.image_size = image_size
        item = StarGANPairDataset(corpus, seed=seed, items_per_epoch=1)[0]
        self.wave = item["wave_real"]
        self.labels_real = item["labels_real"][None]
        self.labels_orig = item["labels_orig"][None]
        self.label_space = label_space
        self.out_dir = out_dir
        self.device = device
        self.source_name = self._describe(self.labels_real)
        self.target_name = self._describe(self.labels_orig)

    def _describe(self, labels: torch.Tensor) -> str:
        names = self.label_space.to_dicts(labels)[0]
        return ", ".join(
            f"{group}={value if value is not None else '?'}" for group, value in names.items()
        )

    @torch.no_grad()
    def render(self, generator, step: int, bf16: bool) -> tuple[Path | None, Path]:
        """Write samples/step_XXXXXXXX.{png,wav}; return their paths (PNG: None without
        matplotlib)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with inference_mode(generator):  # instance statistics, as vcfast convert uses
            x = model_spectrogram(self.wave.to(self.device)[None], self.image_size)
            c_real = self.label_space.generator_input(self.labels_real, device=self.device)
            c_target = self.label_space.generator_input(self.labels_orig, device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                fake = generator(x, c_target).float()
                rec = generator(fake, c_real).float()
        stem = self.out_dir / checkpoint_name(step)
        png = stem.with_suffix(".png")
        wrote_png = save_spectrogram_png(
            png,
            [
                (f"source ({self.source_name})", x[0, 0]),
                (f"converted, step {step} (-> {self.target_name})", fake[0, 0]),
                ("reconstructed (back to source)", rec[0, 0]),
            ],
        )
        wave = spectrogram_to_wave(
            fake[0, 0].cpu(),
            n_iter=_GRIFFIN_LIM_ITERATIONS,
            **spectrogram_overrides(self.image_size),
        )
        wav = stem.with_suffix(".wav")
        save_audio(wav, wave / wave.abs().max().clamp_min(1e-8) * 0.9)
        return (png if wrote_png else None), wav


# ---------------------------------------------------------------------------------------------
# Resume checks


def _check_resumable(
    saved: dict[str, Any], config: TrainConfig, label_space: LabelSpace, where: Path
) -> None:
    """Refuse a resume whose models or labels would not fit; warn about other changed fields."""
    try:
        saved_config = TrainConfig.from_dict(saved["config"], source=f"{where}/state.json")
        saved_labels = LabelSpace.from_dict(saved["label_space"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}/state.json is not a vcfast training state: {exc}") from None
    for name in RESUME_CRITICAL_FIELDS:
        if getattr(saved_config, name) != getattr(config, name):
            raise CheckpointError(
                f"cannot resume {where}: it was trained with "
                f"{name}={getattr(saved_config, name)!r}, this run asks for "
                f"{name}={getattr(config, name)!r}; use the same {name} or a new --out"
            )
    if saved_labels != label_space:
        differences = []
        if saved_labels.names != label_space.names:
            differences.append(f"groups {list(saved_labels.names)} vs {list(label_space.names)}")
        else:
            for group in label_space.names:
                old, new = saved_labels.class_names(group), label_space.class_names(group)
                if old != new:
                    added = sorted(set(new or ()) - set(old or ()))
                    removed = sorted(set(old or ()) - set(new or ()))
                    differences.append(f"{group}: added {added[:5]}, removed {removed[:5]}")
        raise CheckpointError(
            f"cannot resume {where}: the corpus's label space differs from the checkpoint's "
            f"({'; '.join(differences) or 'class order differs'}); resume with the same corpus "
            "or start a new run"
        )
    ignored = (
        "steps",
        "max_minutes",
        "log_every",
        "sample_every",
        "checkpoint_every",
        "eval_every",
        "keep_checkpoints",
        "device",
        "workers",
    )
    changed = [
        f"{name}: {getattr(saved_config, name)!r} -> {getattr(config, name)!r}"
        for name in TrainConfig.field_names()
        if name not in ignored and getattr(saved_config, name) != getattr(config, name)
    ]
    if changed:
        warnings.warn(
            f"resuming {where} with changed settings ({'; '.join(changed)}); the run will not "
            "match an uninterrupted one",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# train()


class _NoLog:
    """What ranks other than 0 get instead of the CSV logs and the TensorBoard writer."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def _average_buffers(ctx: DistributedContext, model: torch.nn.Module) -> None:
    """Set the floating buffers (G's instance-norm running statistics) to their mean over the
    ranks. Each rank updates them from its own samples; these updates are linear in the
    per-sample statistics, so the mean over ranks is what one process with the global batch
    holds (DDP's default, rank 0's buffers broadcast, would keep rank 0's samples only)."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    mean = all_reduce_mean(ctx, torch.cat([b.detach().reshape(-1) for b in buffers]))
    offset = 0
    with torch.no_grad():
        for b in buffers:
            b.copy_(mean[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def _resume_position(
    saved: dict[str, Any], ctx: DistributedContext, config: TrainConfig
) -> tuple[int, int, str | None]:
    """(epoch, batch_index, note) to resume ``saved`` (a training state) on ``ctx``'s ranks.

    The same world size resumes exactly. Another one continues from the same epoch, at the
    first batch of the new global size not fully read yet (a few items of the epoch may be
    read twice), with other shards and other RNG streams per rank: the note says so.
    """
    epoch, batch_index = int(saved["epoch"]), int(saved["batch_index"])
    saved_world = int(saved.get("world_size", 1))
    if saved_world == ctx.world_size:
        return epoch, batch_index, None
    samples = batch_index * config.batch_size * saved_world
    new_index = samples // (config.batch_size * ctx.world_size)
    note = (
        f"note: this checkpoint was written by {saved_world} process(es), this run has "
        f"{ctx.world_size}: the global batch is now {config.batch_size} x {ctx.world_size} = "
        f"{config.batch_size * ctx.world_size} (--batch-size is per process), each process "
        f"reads another shard of the data order, epoch {epoch} continues at its sample "
        f"{new_index * config.batch_size * ctx.world_size} (was {samples}), and the "
        "per-process random streams differ; the run continues but will not match an "
        "uninterrupted one"
    )
    return epoch, new_index, note


def _write_run_files(
    run_dir: Path, config: TrainConfig, corpus: Corpus, label_space: LabelSpace
) -> None:
    """config.json, labels.json and corpus.json of the run folder."""
    write_atomically(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    write_atomically(run_dir / "labels.json", json.dumps(label_space.to_dict(), indent=2) + "\n")
    write_atomically(
        run_dir / "corpus.json",
        json.dumps(
            {
                "root": str(Path(corpus.root).resolve()),
                "layout": corpus.layout,
                "utterances": len(corpus.utterances),
                # What the corpus loader left out (unreadable, corrupt, shorter than a crop).
                "skipped": [[str(path), reason] for path, reason in corpus.skipped],
                "warnings": list(corpus.warnings),
            },
            indent=2,
        )
        + "\n",
    )


def _peak_memory(device: torch.device) -> dict[str, int | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": int(rss), "peak_cuda_allocated_bytes": cuda}


def train(
    config: TrainConfig,
    corpus: Corpus,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    progress_interval_s: float | None = None,
    dist_ctx: DistributedContext | None = None,
) -> dict[str, Any]:
    """Train StarGAN-VC on ``corpus`` into the run directory ``out_dir`` (docs/training.md).

    ``config.held_out_per_speaker`` utterances per speaker are held out for
    :func:`evaluate` (run every ``eval_every`` steps and at the end). ``resume=True``
    continues the run in ``out_dir`` from its latest checkpoint, exactly as if it had not
    stopped; it refuses a different model size, optimiser or label space. Ctrl-C and
    ``max_minutes`` stop cleanly with a checkpoint.

    ``progress``: report on stderr, as a bar on a terminal; when stderr is not a terminal (a
    CI log, a file) as a plain line for the first and the last step and every
    ``progress_interval_s`` seconds in between (default 30, or the environment variable
    VCFAST_PROGRESS_INTERVAL_S; see :class:`vcfast.train.logs.ProgressReporter`).

    Returns a summary: ``steps`` (G steps done in total), ``steps_this_run``,
    ``seconds_per_step`` (training time per G step, this run), ``samples_per_s``,
    ``peak_rss_bytes`` / ``peak_cuda_allocated_bytes``, ``losses`` (last step), ``eval``
    (last evaluation, nested as :func:`evaluate` returns it), ``checkpoint``, ``sample_png``,
    ``sample_wav``, ``run_dir``, ``device``, ``stopped`` ("completed", "max_minutes" or
    "interrupted"), ``config``, ``world_size``, ``global_batch_size``,
    ``per_rank_samples_per_s``.

    ``dist_ctx``: this process's place in a job of several processes
    (:func:`vcfast.train.distributed.init_from_env`; ``None``: one process). With a world size
    ``W > 1`` G and D are wrapped in DistributedDataParallel, ``config.batch_size`` is the
    batch of each rank (the global batch is ``batch_size * W``), each rank reads its shard of
    the data order, rank 0 alone writes the run folder, and ``samples_per_s`` is the job's
    (docs/training.md#several-processes-ddp). Every rank must call it with the same arguments.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(corpus, Corpus):
        raise TypeError(f"train: corpus must be a vcfast.data.Corpus, got {type(corpus).__name__}")
    if not corpus.utterances:
        raise ValueError(f"train: corpus {corpus.root} has no usable utterances")
    if progress:  # refuse a bad interval (argument or environment) before the run starts
        progress_interval_s = progress_interval(progress_interval_s)
    run_dir = Path(out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train: out_dir {str(run_dir)!r} exists and is not a directory")
    label_space = corpus.label_space
    ctx = dist_ctx if dist_ctx is not None else DistributedContext()
    main = ctx.is_main
    device = ctx.device if ctx.distributed else resolve_device(config.device)
    checkpoints_dir = run_dir / "checkpoints"

    # Rank 0 decides (reads LATEST) and tells every rank: all load the same checkpoint, and a
    # refusal is raised on every rank with rank 0's message.
    resume_from: Path | None = None
    decision: tuple[str | None, str | None, str | None] = (None, None, None)
    if main:
        try:
            if resume:
                resume_from = latest_checkpoint(run_dir) if run_dir.is_dir() else None
                if resume_from is None:
                    raise CheckpointError(
                        f"cannot resume: {str(run_dir)!r} has no checkpoint "
                        f"({checkpoints_dir / 'LATEST'} is missing)"
                    )
                _check_resumable(read_state(resume_from), config, label_space, resume_from)
            elif (checkpoints_dir / "LATEST").exists():
                raise ValueError(
                    f"train: {str(run_dir)!r} already holds a training run; pass resume=True "
                    "(--resume) to continue it, or choose another output directory"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            decision = (str(resume_from) if resume_from else None, None, None)
        except (CheckpointError, ValueError) as exc:
            if not ctx.distributed:
                raise
            decision = (None, type(exc).__name__, str(exc))
    decision = broadcast_object(ctx, decision)
    if decision[1] is not None:
        kind = CheckpointError if decision[1] == "CheckpointError" else ValueError
        raise kind(decision[2])
    resume_from = Path(decision[0]) if decision[0] is not None else None

    # Held-out utterances for evaluation (every speaker keeps at least one for training).
    train_corpus, held_out = corpus, None
    if config.held_out_per_speaker > 0:
        train_corpus, held_out = corpus.split(config.held_out_per_speaker, seed=config.seed)
        if not held_out.utterances:
            held_out = None
    if main:
        _write_run_files(run_dir, config, corpus, label_space)

    generator, discriminator = build_models(config, label_space)  # seeds the global RNG
    generator.to(device).train()
    discriminator.to(device).train()
    if ctx.distributed:
        # Every rank starts from the same weights (same seed; DDP also broadcasts rank 0's),
        # but each draws its own random numbers (the penalty's interpolation eps).
        torch.manual_seed(_mixed_seed(_TAG_RANK, config.seed, ctx.rank))
    opt_g = make_optimizer(config.optimizer, generator.parameters(), config.learning_rate)
    opt_d = make_optimizer(config.optimizer, discriminator.parameters(), config.learning_rate)
    step, epoch, batch_index = 0, 0, 0
    last_eval: dict[str, Any] | None = None
    if resume_from is not None:
        load_weights(generator, resume_from / "generator.safetensors", device)
        load_weights(discriminator, resume_from / "discriminator.safetensors", device)
        saved = load_training_state(resume_from)
        opt_g.load_state_dict(saved["optimizer_g"])
        opt_d.load_state_dict(saved["optimizer_d"])
        for optimizer in (opt_g, opt_d):  # an explicitly changed lr takes effect
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate
        per_rank = saved.get("rng_per_rank") or [saved["rng"]]
        restore_rng_state(per_rank[ctx.rank % len(per_rank)])
        step = int(saved["step"])
        if ctx.distributed and len(per_rank) != ctx.world_size:  # fresh streams, per rank
            torch.manual_seed(_mixed_seed(_TAG_RANK, config.seed, ctx.rank, step))
        epoch, batch_index, note = _resume_position(saved, ctx, config)
        if note is not None and main:
            print(note, file=sys.stderr, flush=True)
        last_eval = read_state(resume_from).get("eval")

    dataset = StarGANPairDataset(
        train_corpus,
        seed=config.seed,
        items_per_epoch=max(len(train_corpus.utterances), config.batch_size * ctx.world_size),
    )
    stream = _BatchStream(
        dataset,
        config,
        epoch,
        batch_index,
        pin_memory=device.type == "cuda",
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    # The models the rest of the loop (samples, evaluation, checkpoints) uses stay unwrapped;
    # the step trains the DDP wrappers, whose backward all-reduces (averages) the gradients,
    # the lean penalty's included (vcfast/ops/gradient_penalty.py, _through_ddp).
    g_train, d_train = generator, discriminator
    if ctx.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        g_train, d_train = (
            torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, broadcast_buffers=False
            )
            for model in (generator, discriminator)
        )
    stepper = _Stepper(
        g_train,
        d_train,
        opt_g,
        opt_d,
        label_space.sizes,
        weights=LossWeights.from_config(config),
        autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16),
    )
    image_size = config.model_sizes["image_size"]
    sampler = _Sampler(
        held_out or train_corpus, label_space, config.seed, run_dir / "samples", device, image_size
    )

    eval_columns = ["n_utterances"]
    if held_out is not None:
        eval_columns += [f"acc_real_{g}" for g in (*label_space.names, "mean")]
        eval_columns += [f"acc_converted_{g}" for g in (*label_space.names, "mean")]
        eval_columns += ["reconstruction_l1", "spectral_convergence"]
    resume_step = step if resume_from is not None else None
    log: CsvLog | _NoLog = _NoLog()
    eval_log: CsvLog | _NoLog = _NoLog()
    scalars: ScalarWriter | _NoLog = _NoLog()
    if main:
        log = CsvLog(
            run_dir / "log.csv", [*LOSS_COLUMNS, *_TIMING_COLUMNS], resume_step=resume_step
        )
        eval_log = CsvLog(run_dir / "eval.csv", eval_columns, resume_step=resume_step)
        scalars = ScalarWriter(
            run_dir / "tb", purge_step=step + 1 if resume_from is not None else None
        )
    progress = progress and main

    # A run bounded by wall time (the demo) has no meaningful step total: an open-ended bar
    # beats one that shows "0/1000000, ETA 6000 h".
    time_bounded = config.max_minutes is not None and config.steps >= 100_000
    reporter = ProgressReporter(
        total=None if time_bounded else config.steps,
        initial=step,
        enabled=progress,
        interval_s=progress_interval_s,
        desc=f"train (<= {config.max_minutes:g} min)" if time_bounded else "train",
    )
    global_batch = config.batch_size * ctx.world_size
    start_time = time.monotonic()
    train_seconds, steps_this_run = 0.0, 0
    window_seconds, window_steps = 0.0, 0
    losses: dict[str, float] = {}
    paths: dict[str, str | None] = {
        "checkpoint": str(resume_from) if resume_from else None,
        "sample_png": None,
        "sample_wav": None,
    }
    done = {"sample": -1, "eval": -1, "checkpoint": step if resume_from is not None else -1}
    stopped = "completed"

    def position() -> tuple[int, int]:
        return stream.epoch, stream.batch_index

    def do_sample() -> None:
        done["sample"] = step
        if not main:  # the other ranks go on to the next step's all-reduce and wait there
            return
        with _isolated_rng():
            png, wav = sampler.render(generator, step, config.bf16)
        paths["sample_png"] = str(png) if png else None
        paths["sample_wav"] = str(wav)

    def do_eval() -> None:
        nonlocal last_eval
        if held_out is None or not main:
            done["eval"] = step
            return
        with _isolated_rng():
            last_eval = evaluate(
                generator,
                discriminator,
                held_out,
                label_space,
                device=device,
                batch_size=max(config.batch_size, 4),
                seed=config.seed,
                bf16=config.bf16,
            )
        flat = flatten_metrics(last_eval)
        eval_log.write({"step": step, "n_utterances": last_eval["n_utterances"], **flat})
        scalars.scalars(flat, step, prefix="eval/")
        done["eval"] = step
        if progress:
            reporter.write(
                f"step {step} eval: accuracy real {flat['acc_real_mean']:.3f}, converted "
                f"{flat['acc_converted_mean']:.3f}, reconstruction L1 "
                f"{flat['reconstruction_l1']:.4f}, Griffin-Lim convergence "
                f"{flat['spectral_convergence']:.3f}"
            )

    def do_checkpoint(epoch_batch: tuple[int, int]) -> None:
        # Every rank's RNG states go to rank 0, which writes; the others wait at the barrier.
        rngs = gather_object(ctx, capture_rng_state())
        done["checkpoint"] = step
        if not main:
            barrier(ctx)
            return
        training_state = {
            "step": step,
            "epoch": epoch_batch[0],
            "batch_index": epoch_batch[1],
            "optimizer_g": opt_g.state_dict(),
            "optimizer_d": opt_d.state_dict(),
            "rng": rngs[0],
        }
        state = {
            "step": step,
            "epoch": epoch_batch[0],
            "batch_index": epoch_batch[1],
            "config": config.to_dict(),
            "label_space": label_space.to_dict(),
            "losses": losses,
            "eval": last_eval,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if ctx.distributed:  # the data position counts global batches of this world size
            training_state["world_size"] = state["world_size"] = ctx.world_size
            training_state["rng_per_rank"] = rngs
        path = save_checkpoint(
            checkpoints_dir,
            step,
            generator=generator,
            discriminator=discriminator,
            training_state=training_state,
            state=state,
            keep=config.keep_checkpoints,
        )
        paths["checkpoint"] = str(path)
        barrier(ctx)

    iteration_start = position()
    try:
        while step < config.steps:
            iteration_start = position()
            tick = time.perf_counter()
            for _ in range(config.n_critic):
                batch = _to_spectrograms(stream.next(), device, image_size, label_space)
                d_losses = stepper.values(stepper.d_step(batch))
            g_losses = stepper.values(stepper.g_step(batch))
            if ctx.distributed:
                _average_buffers(ctx, generator)
                _average_buffers(ctx, discriminator)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - tick
            step += 1
            steps_this_run += 1
            train_seconds += seconds
            window_seconds += seconds
            window_steps += 1
            losses = {**d_losses, **g_losses}
            time_up = (
                config.max_minutes is not None
                and time.monotonic() - start_time > 60 * config.max_minutes
            )
            if ctx.distributed and config.max_minutes is not None:  # all ranks stop together
                time_up = bool(all_reduce_mean(ctx, float(time_up)) > 0)
            reporter.update(step, losses, seconds, global_batch * config.n_critic)
            if step % config.log_every == 0 or step == config.steps or time_up:
                if ctx.distributed:  # the mean over the ranks (every rank reaches this line)
                    means = all_reduce_mean(ctx, torch.tensor(list(losses.values())))
                    losses = dict(zip(losses, means.tolist()))
                rate = window_steps / window_seconds
                row = {
                    **losses,
                    "seconds_per_step": window_seconds / window_steps,
                    "steps_per_s": rate,
                    "samples_per_s": rate * global_batch * config.n_critic,
                    "elapsed_s": time.monotonic() - start_time,
                }
                log.write({"step": step, **row})
                scalars.scalars(row, step, prefix="train/")
                window_seconds, window_steps = 0.0, 0
            if step % config.sample_every == 0:
                do_sample()
            if step % config.eval_every == 0:
                do_eval()
            if step % config.checkpoint_every == 0:
                do_checkpoint(position())
            if time_up:
                if step < config.steps:
                    stopped = "max_minutes"
                break
        final_position = position()
    except KeyboardInterrupt:
        if ctx.distributed:  # the ranks may stand at different points: no common checkpoint
            log.close()
            eval_log.close()
            scalars.close()
            raise
        # The interrupted iteration may have updated D already; the checkpoint keeps those
        # weights but records the data position at that iteration's start.
        stopped = "interrupted"
        final_position = iteration_start
        if progress:
            reporter.write(f"interrupted at step {step}; saving a checkpoint")
    except BaseException:
        log.close()
        eval_log.close()
        scalars.close()
        raise
    finally:
        reporter.close()
        stream.close()
    try:
        if steps_this_run > 0 or resume_from is None:
            if stopped != "interrupted":
                if done["sample"] != step:
                    do_sample()
                if done["eval"] != step:
                    do_eval()
            # A checkpoint already taken at this step is exact; an interrupted iteration must
            # not overwrite it with half-updated weights (nor save an untrained step 0).
            if done["checkpoint"] != step and not (stopped == "interrupted" and step == 0):
                do_checkpoint(final_position)
    finally:
        log.close()
        eval_log.close()
        scalars.close()
    # Samples over the slowest rank's training time, and each rank's own rate.
    throughput: dict[str, Any] = {"samples_per_s": None, "per_rank_samples_per_s": None}
    if train_seconds > 0:
        throughput = reduce_throughput(
            ctx, steps_this_run * config.batch_size * config.n_critic, train_seconds
        )
    barrier(ctx)  # rank 0's final sample, evaluation and checkpoint are done
    return {
        "run_dir": str(run_dir),
        "device": str(device),
        "world_size": ctx.world_size,
        "global_batch_size": global_batch,
        "steps": step,
        "steps_this_run": steps_this_run,
        "seconds_per_step": train_seconds / steps_this_run if steps_this_run else None,
        "samples_per_s": throughput["samples_per_s"],
        "per_rank_samples_per_s": throughput["per_rank_samples_per_s"],
        "wall_seconds": time.monotonic() - start_time,
        **_peak_memory(device),
        "losses": losses,
        "eval": last_eval,
        "stopped": stopped,
        "train_utterances": len(train_corpus.utterances),
        "skipped_files": len(corpus.skipped),
        "held_out_utterances": len(held_out.utterances) if held_out is not None else 0,
        "config": config.to_dict(),
        **paths,
    }
