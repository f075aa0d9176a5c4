"""``vcfast train`` command-line arguments and entry point (wired into :mod:`vcfast.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vcfast.train.config import OPTIMIZERS, SIZES, TrainConfig

__all__ = ["add_train_arguments", "cmd_train", "config_from_args"]

# CLI flag destination -> TrainConfig field. Every flag defaults to None ("not given") so
# that precedence is: defaults < saved run config (on --resume) < --config FILE < flags.
_FLAG_FIELDS = {
    "size": "size",
    "steps": "steps",
    "batch_size": "batch_size",
    "n_critic": "n_critic",
    "optimizer": "optimizer",
    "lr": "lr",
    "bf16": "bf16",
    "checkpoint_blocks": "checkpoint_blocks",
    "device": "device",
    "seed": "seed",
    "workers": "workers",
    "max_minutes": "max_minutes",
    "log_every": "log_every",
    "sample_every": "sample_every",
    "checkpoint_every": "checkpoint_every",
    "eval_every": "eval_every",
    "held_out_per_speaker": "held_out_per_speaker",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``vcfast train``'s options to ``parser`` (a subcommand parser)."""
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="corpus folder (a folder per speaker, or VCTK); default: the bundled demo corpus",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="run directory (checkpoints, logs, samples)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="JSON file of TrainConfig fields; flags given on the command line override it",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (exactly)",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="model size: paper (SPEC §4, default), small (CPU demo), tiny (tests)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="G steps to train in total (default 1000)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per batch, per process under torchrun (default 2)",
    )
    parser.add_argument(
        "--n-critic", type=int, default=None, help="D updates per G update (default 5)"
    )
    parser.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        default=None,
        help="rmsprop (SPEC §5, lr 1e-5; default) or adam (paper: lr 1e-4, betas 0.5/0.999)",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: the optimiser's)"
    )
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    parser.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        default=None,
        help="recompute G's residual blocks in backward (less memory, more time)",
    )
    parser.add_argument(
        "--device", default=None, help="auto (default: cuda when available), cpu, cuda, cuda:1 ..."
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of weights, data order and crops (default 0)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="data loader worker processes (default 0)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop cleanly (with a checkpoint) after this many minutes",
    )
    parser.add_argument(
        "--log-every", type=int, default=None, help="steps between log rows (default 10)"
    )
    parser.add_argument(
        "--sample-every", type=int, default=None, help="steps between sample PNG/WAV (default 100)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 100)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=None, help="steps between evaluations (default 100)"
    )
    parser.add_argument(
        "--held-out-per-speaker",
        type=int,
        default=None,
        help="utterances per speaker kept out of training for evaluation (default 1; 0: none)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: defaults, then the saved run config when resuming, then
    ``--config FILE``, then the flags given on the command line."""
    base = TrainConfig()
    saved = Path(args.out) / "config.json"
    if getattr(args, "resume", False) and saved.is_file():
        base = TrainConfig.from_json_file(saved)
    if args.config is not None:
        base = TrainConfig.from_json_file(args.config, base=base)
    overrides: dict[str, Any] = {}
    for dest, field in _FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[field] = value
    return TrainConfig.from_dict(overrides, base=base, source="command-line flags")


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``vcfast train``: print the corpus summary, train, print the run summary.

    Returns the exit code (0, or 130 when interrupted with Ctrl-C after saving a checkpoint).
    Under torchrun (``WORLD_SIZE > 1``) every process runs it; rank 0 alone prints.
    """
    from vcfast.train.distributed import init_from_env, rank_errors, shutdown

    config = config_from_args(args)
    # Under torchrun: join the process group (docs/training.md#several-processes-ddp); without
    # its variables this is one process, as before. A rank's error is printed with its rank.
    ctx = init_from_env(config.device)
    try:
        with rank_errors(ctx):
            return _train_command(args, config, ctx)
    finally:
        shutdown(ctx)


def _train_command(args: argparse.Namespace, config: TrainConfig, ctx) -> int:
    from vcfast.data import demo_corpus_dir, load_corpus
    from vcfast.train.loop import train

    main = ctx.is_main
    data = args.data
    saved_corpus = Path(args.out) / "corpus.json"
    if data is None and args.resume and saved_corpus.is_file():
        data = Path(json.loads(saved_corpus.read_text())["root"])  # the corpus the run started on
    if data is None:
        data = demo_corpus_dir()
    corpus = load_corpus(data)
    if main:
        print(corpus.summary(), flush=True)
        batch = f"batch {config.batch_size}"
        if ctx.world_size > 1:
            batch = (
                f"batch {config.batch_size} per process x {ctx.world_size} processes = "
                f"{config.batch_size * ctx.world_size}"
            )
        print(
            f"training {config.size} models on {ctx.device if ctx.distributed else config.device}"
            f": {config.steps} G steps x {config.n_critic} D steps, {batch}, {config.optimizer} "
            f"lr {config.learning_rate:g} -> {args.out}",
            flush=True,
        )
    summary = train(
        config,
        corpus,
        args.out,
        resume=args.resume,
        progress=not args.no_progress,
        dist_ctx=ctx,
    )
    if main:
        shown = {k: v for k, v in summary.items() if k not in ("config",)}
        print(json.dumps(shown, indent=2, default=str))
        if ctx.world_size > 1 and summary["samples_per_s"] is not None:
            per_rank = ", ".join(f"{v:.2f}" for v in summary["per_rank_samples_per_s"])
            print(
                f"throughput: {summary['samples_per_s']:.2f} samples/s on {ctx.world_size} "
                f"processes (global batch {summary['global_batch_size']}); per process: "
                f"{per_rank}",
                flush=True,
            )
    if summary["stopped"] == "interrupted":
        if main:
            print(
                f"interrupted; continue with: vcfast train --out {args.out} --resume",
                file=sys.stderr,
            )
        return 130
    return 0
