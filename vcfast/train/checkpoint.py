"""Crash-safe checkpoints of a training run.

Layout (``RUN/checkpoints``)::

    step_00000100/generator.safetensors      G weights and buffers (InstanceNorm running stats)
    step_00000100/discriminator.safetensors  D weights
    step_00000100/training_state.pt          optimiser states, RNG states, data position
    step_00000100/state.json                 step, config, label space, last losses
    LATEST                                   text: the newest complete checkpoint's dir name

A checkpoint is built in a temporary directory next to the final one (every file flushed
and fsynced), renamed into place with ``os.replace`` and only then named by ``LATEST``
(itself replaced atomically). A crash at any point leaves the previous checkpoint and
``LATEST`` as they were; stray temporary directories are removed by the next save.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "load_training_state",
    "load_weights",
    "read_state",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "write_atomically",
]

LATEST = "LATEST"
# Read once at import: os.umask can only be queried by setting it. mkstemp/mkdtemp create
# private (0600/0700) entries; the final files get the permissions an open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".old-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the run it is loaded into."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after G step ``step``."""
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes to a new file and force them to disk (used inside a temp dir)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same dir, fsync, os.replace)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from: torch CPU (+ CUDA), Python ``random``, numpy.

    Only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it back.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------
# Saving


def _tensors_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone to CPU, contiguous.
    return {
        name: t.detach().to("cpu").contiguous().clone() for name, t in module.state_dict().items()
    }


def _cleanup_stale(checkpoints_dir: Path) -> None:
    """Remove temporary/trash directories left by an earlier crash."""
    for entry in checkpoints_dir.iterdir():
        if entry.is_dir() and entry.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    step: int,
    *,
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    training_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``LATEST`` at it, keep the newest ``keep``.

    Returns the checkpoint directory. On any error (disk full, a failed write) the temporary
    directory is removed and the previous checkpoint and ``LATEST`` are untouched.
    """
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}")
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(checkpoints_dir)
    final = checkpoints_dir / checkpoint_name(step)
    temp = Path(tempfile.mkdtemp(dir=checkpoints_dir, prefix=f"{_TEMP_PREFIX}{final.name}-"))
    try:
        os.chmod(temp, 0o777 & ~_UMASK)
        _write_file(temp / "generator.safetensors", save(_tensors_for_safetensors(generator)))
        _write_file(
            temp / "discriminator.safetensors", save(_tensors_for_safetensors(discriminator))
        )
        buffer = io.BytesIO()
        torch.save(training_state, buffer)
        _write_file(temp / "training_state.pt", buffer.getvalue())
        _write_file(temp / "state.json", json.dumps(state, indent=2, sort_keys=True).encode())
        _fsync_dir(temp)
        if final.exists():
            # Same step saved again (e.g. interrupted right after a resume): move the old one
            # aside first, because os.replace cannot replace a non-empty directory.
            trash = checkpoints_dir / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
            os.replace(final, trash)
            os.replace(temp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    write_atomically(checkpoints_dir / LATEST, final.name + "\n")
    _prune(checkpoints_dir, keep, protect=final.name)
    return final


def _step_dirs(checkpoints_dir: Path) -> list[Path]:
    dirs = [p for p in checkpoints_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _prune(checkpoints_dir: Path, keep: int, protect: str) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one LATEST names)."""
    dirs = [p for p in _step_dirs(checkpoints_dir) if p.name != protect]
    for old in dirs[: max(0, len(dirs) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Loading


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``RUN/checkpoints/LATEST`` names, or None if there is none."""
    checkpoints_dir = Path(run_dir) / "checkpoints"
    pointer = checkpoints_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = checkpoints_dir / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory")
    return path


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a run directory (its latest checkpoint) or a checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if (path / "state.json").is_file() and (path / "generator.safetensors").is_file():
        return path
    if (path / "checkpoints").is_dir() or (path / LATEST).is_file():
        run_dir = path if (path / "checkpoints").is_dir() else path.parent
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            return latest
        raise CheckpointError(
            f"{str(path)!r} is a run directory without a checkpoint yet "
            f"(no {run_dir / 'checkpoints' / LATEST})"
        )
    raise CheckpointError(
        f"{str(path)!r} is neither a run directory (with checkpoints/LATEST) nor a "
        "checkpoint directory (with state.json and generator.safetensors)"
    )


def read_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``state.json``."""
    path = Path(checkpoint_dir) / "state.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint_dir)!r} has no state.json")
    return json.loads(path.read_text())


def load_weights(
    module: torch.nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> None:
    """Load a safetensors state dict into ``module`` (strict: names and shapes must match)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file {str(path)!r}")
    device = str(torch.device(map_location))
    tensors = load_file(str(path), device=device)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{str(path)!r} does not fit the model built from its config: {exc}"
        ) from None


def load_training_state(
    checkpoint_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Optimiser states, RNG states and data position of a checkpoint."""
    path = Path(checkpoint_dir) / "training_state.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(checkpoint_dir)!r} has no training_state.pt")
    return torch.load(path, map_location=map_location, weights_only=True)
