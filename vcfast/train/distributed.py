"""Plumbing for training in several processes: torchrun + DDP.

The plan: docs/training.md#several-processes-ddp.

Nothing here trains: these are the pieces the trainer uses to run under ``torchrun``.

* :func:`init_from_env` reads torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``) and returns a :class:`DistributedContext`. Without that
  environment, or with a world size of 1, it initialises nothing and returns a single-process
  context, so one code path serves both. :func:`shutdown` ends the process group.
* :func:`shard_indices` is the data sharding rule, a pure function of
  ``(n_items, epoch, seed, rank, world_size)``.
* :func:`is_main`, :func:`main_process_only`, :func:`barrier`, :func:`broadcast_object`,
  :func:`all_reduce_mean` and :func:`reduce_throughput`: rank-0-only work and the few
  collectives the trainer needs; each is a no-op (or the identity) in a single process.
* :func:`rank_errors` logs an exception with its rank before re-raising it;
  :func:`run_ranks` runs a function on N local CPU ranks (gloo, loopback) for tests.

Failure propagation: when one rank raises, the job must end within seconds with that rank's
error shown, never hang. Under torchrun the elastic agent sees the failed process, tears the
other ranks down and exits non-zero; the trainer's entry runs inside :func:`rank_errors`, so
the error is printed with its rank first, and the process group has a timeout
(:data:`DEFAULT_TIMEOUT_S`, ``VCFAST_DIST_TIMEOUT_S`` overrides it), so a collective whose
peer is gone fails instead of blocking forever. :func:`run_ranks` does the agent's job for
tests: the first rank to fail ends the others and its error is raised in the caller.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from vcfast.data.dataset import _TAG_ORDER, _mixed_seed

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedContext",
    "RankFailedError",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "free_port",
    "gather_object",
    "init_from_env",
    "is_main",
    "main_process_only",
    "rank_errors",
    "read_env",
    "reduce_throughput",
    "run_ranks",
    "shard_indices",
    "shutdown",
]


# Seconds a collective may wait for its peers before it fails (torch's own default for NCCL).
# Long enough for rank 0 to write a checkpoint or score the held-out set while the others wait
# at a barrier; VCFAST_DIST_TIMEOUT_S overrides it.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "VCFAST_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job.

    ``backend`` is ``None`` in a single process (no process group), ``"nccl"`` for CUDA and
    ``"gloo"`` for CPU otherwise. ``device`` is the device this rank trains on
    (``cuda:LOCAL_RANK`` under torchrun on GPUs).
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    is_main: bool = True

    @property
    def distributed(self) -> bool:
        """True when a process group was initialised (world size > 1)."""
        return self.backend is not None


class RankFailedError(RuntimeError):
    """A rank of :func:`run_ranks` raised; ``rank`` is the first one that failed.

    ``failed_at`` is when it raised (``time.time()`` seconds), or ``None`` when the rank died
    without raising (a signal, ``os._exit``).
    """

    def __init__(self, rank: int, world_size: int, message: str,
                 failed_at: Optional[float] = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.world_size = world_size
        self.failed_at = failed_at


# ---------------------------------------------------------------------------------------------
# Environment and process group
# ---------------------------------------------------------------------------------------------

_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def _env_int(environ: Mapping[str, str], name: str, minimum: int) -> int:
    raw = environ[name]
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def read_env(environ: Optional[Mapping[str, str]] = None) -> Optional[tuple[int, int, int]]:
    """``(rank, local_rank, world_size)`` from torchrun's variables, or ``None`` when unset.

    ``None`` means a plain single process: none of ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``
    is set. ``LOCAL_WORLD_SIZE`` is checked too when present. For a world size above 1,
    ``MASTER_ADDR`` and ``MASTER_PORT`` must be set (the ``env://`` rendezvous).

    Raises:
        ValueError: some but not all of the three are set, a value is not an integer, or the
            values are inconsistent (``RANK >= WORLD_SIZE``, ``LOCAL_RANK >= LOCAL_WORLD_SIZE``,
            ``LOCAL_RANK >= WORLD_SIZE``, ``LOCAL_WORLD_SIZE > WORLD_SIZE``, no master
            address or a bad port).
    """
    environ = os.environ if environ is None else environ
    present = [name for name in _RANK_VARS if environ.get(name, "") != ""]
    if not present:
        return None
    missing = [name for name in _RANK_VARS if name not in present]
    if missing:
        raise ValueError(
            f"{', '.join(present)} set but {', '.join(missing)} not: run several processes "
            f"with torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) or set none of them"
        )
    world_size = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local_rank = _env_int(environ, "LOCAL_RANK", 0)
    if rank >= world_size:
        raise ValueError(f"RANK={rank} must be < WORLD_SIZE={world_size}")
    if local_rank >= world_size:
        raise ValueError(f"LOCAL_RANK={local_rank} must be < WORLD_SIZE={world_size}")
    if environ.get("LOCAL_WORLD_SIZE", "") != "":
        local_world = _env_int(environ, "LOCAL_WORLD_SIZE", 1)
        if local_world > world_size:
            raise ValueError(
                f"LOCAL_WORLD_SIZE={local_world} must be <= WORLD_SIZE={world_size}")
        if local_rank >= local_world:
            raise ValueError(
                f"LOCAL_RANK={local_rank} must be < LOCAL_WORLD_SIZE={local_world}")
    if world_size > 1:
        if environ.get("MASTER_ADDR", "") == "":
            raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set "
                             f"(torchrun sets it; or set MASTER_ADDR and MASTER_PORT)")
        if environ.get("MASTER_PORT", "") == "":
            raise ValueError(f"WORLD_SIZE={world_size} but MASTER_PORT is not set")
        port = _env_int(environ, "MASTER_PORT", 1)
        if port > 65535:
            raise ValueError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return rank, local_rank, world_size


def _timeout_seconds(timeout_s: Optional[float], environ: Mapping[str, str]) -> float:
    if timeout_s is None:
        raw = environ.get(TIMEOUT_ENV, "")
        if raw == "":
            return DEFAULT_TIMEOUT_S
        try:
            timeout_s = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not timeout_s > 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout_s!r}")
    return float(timeout_s)


def _parse_device(device_name: str) -> torch.device:
    if device_name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device_name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device_name!r} is not a torch device ({exc})") from None


def init_from_env(device_name: str = "auto", *, timeout_s: Optional[float] = None,
                  environ: Optional[Mapping[str, str]] = None) -> DistributedContext:
    """The :class:`DistributedContext` of this process; joins the process group under torchrun.

    Without torchrun's variables (see :func:`read_env`), or with ``WORLD_SIZE=1``, nothing is
    initialised: the context is rank 0 of 1 on ``device_name`` (``"auto"``: CUDA when
    available). Otherwise ``torch.distributed.init_process_group`` is called with the
    ``env://`` rendezvous, NCCL for CUDA (the rank's device is ``cuda:LOCAL_RANK``, made
    current with ``torch.cuda.set_device``) and gloo for CPU, and a timeout (``timeout_s``,
    else ``VCFAST_DIST_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`) after which a collective
    whose peers do not arrive fails instead of blocking forever.

    Args:
        device_name: ``"auto"``, ``"cpu"`` or ``"cuda"``; with several processes a CUDA index
            (``"cuda:1"``) is refused, each rank takes ``cuda:LOCAL_RANK``.
        timeout_s: collective timeout in seconds.
        environ: the environment to read (default ``os.environ``); the process group itself
            always reads ``os.environ``.

    Raises:
        ValueError: inconsistent torchrun variables (:func:`read_env`), a device that is not
            one, CUDA asked for where there is none or fewer GPUs than ``LOCAL_RANK + 1``, a
            device other than CPU or CUDA with several processes, or NCCL not built.
    """
    environ = os.environ if environ is None else environ
    spec = read_env(environ)
    device = _parse_device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device_name!r} was asked for but CUDA is not available here; "
            f"use 'cpu' or 'auto'")
    if spec is None or spec[2] == 1:
        rank, local_rank = (0, 0) if spec is None else spec[:2]
        return DistributedContext(rank=rank, local_rank=local_rank, world_size=1, device=device,
                                  backend=None, is_main=True)
    rank, local_rank, world_size = spec
    timeout = _timeout_seconds(timeout_s, environ)
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"device {device_name!r}: with several processes give 'cuda' (or 'auto'), "
                f"each rank uses cuda:LOCAL_RANK")
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise ValueError(
                f"LOCAL_RANK={local_rank} needs {local_rank + 1} GPUs but this machine has "
                f"{n_gpus}: start at most {n_gpus} processes per node (--nproc_per_node)")
        if not dist.is_nccl_available():
            raise ValueError("this torch build has no NCCL, which CUDA training in several "
                             "processes uses")
        backend = "nccl"
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"device {device_name!r}: training in several processes runs on "
                         f"'cpu' (gloo) or 'cuda' (NCCL)")
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise ValueError(
                f"a process group is already initialised as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says rank {rank} of "
                f"{world_size}")
    else:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size,
                              device=device, backend=backend, is_main=rank == 0)


def shutdown(ctx: DistributedContext) -> None:
    """Destroy the process group of ``ctx`` (nothing in a single process; safe to repeat)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Data sharding
# ---------------------------------------------------------------------------------------------

def _check_index(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def shard_indices(n_items: int, epoch: int, seed: int, rank: int, world_size: int,
                  drop_last: bool = True) -> list[int]:
    """The dataset indices rank ``rank`` of ``world_size`` reads in epoch ``epoch``, in order.

    The epoch's order is one permutation ``perm`` of ``range(n_items)`` drawn by a
    ``torch.Generator`` seeded from ``(seed, epoch)`` only: the same generator and seed mixing
    as :func:`vcfast.data.make_loader`, so with ``world_size=1`` the order is exactly a single
    process's. Rank ``r`` takes the strided slice ``perm[r::world_size]``, cut to
    ``n_items // world_size`` items: the ranks' lists are disjoint and of equal length (every
    rank must run the same number of steps, or the others would wait for it in a collective),
    and the last ``n_items % world_size`` positions of the permutation are dropped this epoch.
    They are different items each epoch, since the permutation changes. With
    ``drop_last=False`` nothing is dropped: the permutation is padded with its own head to a
    multiple of ``world_size`` (up to ``world_size - 1`` items are read twice).

    Identity of the items: the item at position ``p`` of the epoch is dataset index
    ``perm[p]``, and :class:`vcfast.data.StarGANPairDataset` draws every random number of
    index ``i`` in epoch ``e`` from ``(seed, e, i)``. What an item contains therefore depends
    only on ``(seed, epoch, index)``: not on which rank or loader worker reads it, nor on the
    number of workers or ranks. The world size only decides who reads which position: with a
    batch of ``B`` per rank, step ``k``'s batches over all ranks are exactly positions
    ``k*B*W .. (k+1)*B*W - 1`` of the permutation, the batch a single process with a batch of
    ``B*W`` would read at step ``k``.

    Raises:
        ValueError: a negative or non-int argument, ``world_size < 1``,
            ``rank >= world_size``, no items, or (with ``drop_last``) fewer items than ranks.
    """
    n_items = _check_index("n_items", n_items, 1)
    epoch = _check_index("epoch", epoch, 0)
    seed = _check_index("seed", seed, 0)
    world_size = _check_index("world_size", world_size, 1)
    rank = _check_index("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank={rank} must be < world_size={world_size}")
    if drop_last and n_items < world_size:
        raise ValueError(f"{n_items} items for {world_size} ranks with drop_last: every rank "
                         f"would get no item")
    gen = torch.Generator().manual_seed(_mixed_seed(_TAG_ORDER, seed, epoch))
    perm = torch.randperm(n_items, generator=gen).tolist()
    if drop_last:
        per_rank = n_items // world_size
    else:
        per_rank = -(-n_items // world_size)
        padded = per_rank * world_size
        while len(perm) < padded:
            perm += perm[:padded - len(perm)]
    return perm[rank::world_size][:per_rank]


# ---------------------------------------------------------------------------------------------
# Rank-0-only work and collectives
# ---------------------------------------------------------------------------------------------

def is_main(ctx: DistributedContext) -> bool:
    """True on rank 0, the process that writes files (logs, samples, checkpoints)."""
    return ctx.is_main


def main_process_only(ctx: DistributedContext, *, broadcast: bool = False) -> Callable:
    """Decorator: the function runs on rank 0 only; other ranks get ``None``.

    With ``broadcast=True`` every rank calls the decorated function (a collective, so all must),
    rank 0 runs it and its return value is sent to all ranks (e.g. the step to resume from)::

        @main_process_only(ctx)
        def write_log(row): ...

    An exception on rank 0 propagates there only; the other ranks then fail at their next
    collective (or are ended by torchrun).
    """
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs) if ctx.is_main else None
            if broadcast:
                result = broadcast_object(ctx, result)
            return result
        return wrapper
    return decorate


def barrier(ctx: DistributedContext) -> None:
    """Wait until every rank arrives (nothing in a single process)."""
    if not ctx.distributed:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def broadcast_object(ctx: DistributedContext, obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable object; the identity in one process).

    Every rank must call it; the ``obj`` of the other ranks is ignored.
    """
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    device = ctx.device if ctx.backend == "nccl" else None
    dist.broadcast_object_list(box, src=src, device=device)
    return box[0]


def gather_object(ctx: DistributedContext, obj: Any, dst: int = 0) -> Optional[list]:
    """Every rank's ``obj``, by rank, on rank ``dst``; ``None`` on the others (``[obj]`` in one
    process). Every rank must call it. For the checkpoint: each rank's RNG states."""
    if not ctx.distributed:
        return [obj]
    if ctx.backend == "nccl":  # NCCL has no gather of objects: all-gather instead
        out: list = [None] * ctx.world_size
        dist.all_gather_object(out, obj)
        return out if ctx.rank == dst else None
    out = [None] * ctx.world_size if ctx.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_reduce_mean(ctx: DistributedContext, tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks, on every rank (a new tensor; the input is kept).

    For logging: each rank passes its losses (a tensor or a number) and all get the averages.
    Integer and bool tensors are averaged in float32; the result is on the input's device.
    """
    tensor = torch.as_tensor(tensor)
    out = tensor.detach().clone()
    if not out.is_floating_point() and not out.is_complex():
        out = out.to(torch.float32)
    if not ctx.distributed:
        return out
    home = out.device
    work = out.to(ctx.device) if ctx.backend == "nccl" else out.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    work /= ctx.world_size
    return work.to(home)


def reduce_throughput(ctx: DistributedContext, samples: float, seconds: float) -> dict:
    """Throughput of the job from each rank's ``samples`` processed in ``seconds``.

    Every rank must call it; every rank gets the same dict:

    * ``samples``: the sum over ranks; ``seconds``: the slowest rank's time (the job's);
    * ``samples_per_s``: ``samples / seconds``, the job's throughput;
    * ``per_rank_samples_per_s``: each rank's own, by rank; ``world_size``.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    mine = torch.tensor([float(samples), float(seconds)], dtype=torch.float64)
    if ctx.distributed:
        if ctx.backend == "nccl":
            mine = mine.to(ctx.device)
        rows = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(rows, mine)
        table = torch.stack(rows).cpu()
    else:
        table = mine.unsqueeze(0)
    total = float(table[:, 0].sum())
    slowest = float(table[:, 1].max())
    return {
        "samples": total,
        "seconds": slowest,
        "samples_per_s": total / slowest,
        "per_rank_samples_per_s": [float(s / t) for s, t in table.tolist()],
        "world_size": ctx.world_size,
    }


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def rank_errors(ctx: DistributedContext):
    """Wrap a rank's work: an exception is printed to stderr with its rank, then re-raised.

    The trainer's entry runs in it, so that under torchrun the log says which rank failed
    first (the others then fail at a collective or are ended by torchrun's agent)::

        ctx = init_from_env(config.device)
        with rank_errors(ctx):
            train(...)
    """
    try:
        yield ctx
    except Exception as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(f"[vcfast rank {ctx.rank} of {ctx.world_size}] failed: {type(exc).__name__}: "
              f"{exc}\n{text}", file=sys.stderr, end="", flush=True)
        raise


def free_port() -> int:
    """A TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, out_dir: str,
               args: tuple, timeout_s: float) -> None:
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    })
    torch.set_num_threads(1)
    ctx = init_from_env("cpu", timeout_s=timeout_s)
    try:
        with rank_errors(ctx):
            try:
                result = fn(ctx, *args)
            except Exception as exc:
                text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                # The time first: the rank that failed first is the one to report (the others
                # usually fail next, in a collective whose peer is gone).
                _write_atomic(os.path.join(out_dir, f"error_{rank}.txt"),
                              f"{time.time_ns()}\n{type(exc).__name__}: {exc}\n\n{text}".encode())
                raise
        _write_atomic(os.path.join(out_dir, f"result_{rank}.pkl"), pickle.dumps(result))
    finally:
        shutdown(ctx)


def _write_atomic(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def run_ranks(fn: Callable, world_size: int, args: Sequence = (), timeout_s: float = 60.0
              ) -> list:
    """Run ``fn(ctx, *args)`` on ``world_size`` local CPU ranks; their results, by rank.

    For tests: each rank is a process started by ``torch.multiprocessing`` (spawn) with
    torchrun's variables set (loopback, a free port), joins a gloo group through
    :func:`init_from_env` (``timeout_s`` is also the group's timeout), uses one intra-op
    thread, and leaves the group after ``fn``. ``fn`` must be picklable (a module-level
    function), like its ``args`` and result.

    When a rank raises, the other ranks are ended (SIGTERM, then SIGKILL after a second: what
    torchrun's agent does) and
    :class:`RankFailedError` is raised here, naming the first rank that failed and carrying its
    error and traceback; its error is also printed by the rank (:func:`rank_errors`).

    Raises:
        RankFailedError: a rank raised or died.
        TimeoutError: the ranks were still running after ``timeout_s`` (they are ended).
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    world_size = _check_index("world_size", world_size, 1)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    out_dir = tempfile.mkdtemp(prefix="vcfast-ranks-")
    try:
        procs = mp.start_processes(
            _rank_main, args=(fn, world_size, free_port(), out_dir, tuple(args), timeout_s),
            nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not procs.join(timeout=0.2, grace_period=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size} ranks still running after {timeout_s:g} s")
        except ProcessException as exc:
            raise _rank_failure(exc, world_size, out_dir) from None
        finally:
            for proc in procs.processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"result_{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _rank_failure(exc, world_size: int, out_dir: str) -> RankFailedError:
    """The error of the first rank that failed (by its error file, else by the spawn error)."""
    failed = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"error_{rank}.txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                stamp, _, detail = f.read().partition("\n")
            failed.append((int(stamp), rank, detail))
    failed_at = None
    if failed:
        stamp, rank, detail = min(failed)
        failed_at = stamp / 1e9
    else:
        rank, detail = exc.error_index, str(exc)
    return RankFailedError(rank, world_size,
                           f"rank {rank} of {world_size} failed: {detail.rstrip()}", failed_at)
