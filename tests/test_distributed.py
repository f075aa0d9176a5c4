"""vcfast.train.distributed: torchrun environment, data sharding, collectives, failures.

The multi-process tests run 2 CPU ranks (gloo, loopback) through ``run_ranks``; the rank
functions are module-level so that the spawned processes can unpickle them.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest
import torch

from vcfast.data.dataset import make_loader
from vcfast.train import distributed as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", D.TIMEOUT_ENV)


def _env(rank=0, local_rank=0, world=2, **extra):
    env = {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def fake_group(monkeypatch):
    """Record init_process_group's arguments instead of joining a group."""
    calls = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: calls.append(kw))
    return calls


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def test_no_env_is_single_process(clean_env, fake_group):
    assert D.read_env() is None
    ctx = D.init_from_env("cpu")
    assert ctx == D.DistributedContext(rank=0, local_rank=0, world_size=1,
                                       device=torch.device("cpu"), backend=None, is_main=True)
    assert not ctx.distributed and D.is_main(ctx)
    assert fake_group == []
    D.shutdown(ctx)  # nothing to destroy


def test_world_size_one_initialises_nothing(clean_env, fake_group):
    for name, value in _env(world=1).items():
        clean_env.setenv(name, value)
    ctx = D.init_from_env("cpu")
    assert (ctx.world_size, ctx.rank, ctx.backend, ctx.is_main) == (1, 0, None, True)
    assert fake_group == []


def test_cpu_world_uses_gloo_with_a_timeout(fake_group):
    ctx = D.init_from_env("cpu", environ=_env(rank=1, local_rank=1, world=2), timeout_s=7)
    assert (ctx.rank, ctx.local_rank, ctx.world_size) == (1, 1, 2)
    assert ctx.backend == "gloo" and ctx.device == torch.device("cpu")
    assert not ctx.is_main and ctx.distributed
    (call,) = fake_group
    assert call["backend"] == "gloo" and call["init_method"] == "env://"
    assert (call["rank"], call["world_size"]) == (1, 2)
    assert call["timeout"] == datetime.timedelta(seconds=7)


def test_timeout_from_env_and_default(fake_group):
    D.init_from_env("cpu", environ=_env(**{D.TIMEOUT_ENV: "12.5"}))
    D.init_from_env("cpu", environ=_env())
    assert fake_group[0]["timeout"] == datetime.timedelta(seconds=12.5)
    assert fake_group[1]["timeout"] == datetime.timedelta(seconds=D.DEFAULT_TIMEOUT_S)
    with pytest.raises(ValueError, match=D.TIMEOUT_ENV):
        D.init_from_env("cpu", environ=_env(**{D.TIMEOUT_ENV: "soon"}))


def test_cuda_world_uses_nccl_on_local_rank(monkeypatch, fake_group):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(D.dist, "is_nccl_available", lambda: True)
    ctx = D.init_from_env("cuda", environ=_env(rank=5, local_rank=3, world=8,
                                               LOCAL_WORLD_SIZE=4))
    assert ctx.device == torch.device("cuda", 3) and ctx.backend == "nccl"
    assert chosen == [torch.device("cuda", 3)]
    assert fake_group[0]["backend"] == "nccl"
    ctx = D.init_from_env("auto", environ=_env(rank=0, local_rank=0, world=2))
    assert ctx.device == torch.device("cuda", 0) and ctx.is_main
    # Fewer GPUs than local ranks.
    with pytest.raises(ValueError, match="LOCAL_RANK=3 needs 4 GPUs but this machine has 2"):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        D.init_from_env("cuda", environ=_env(rank=3, local_rank=3, world=4))
    with pytest.raises(ValueError, match="each rank uses cuda:LOCAL_RANK"):
        D.init_from_env("cuda:1", environ=_env())


def test_cuda_asked_without_cuda(monkeypatch, fake_group):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        D.init_from_env("cuda", environ=_env())
    assert D.init_from_env("auto", environ=_env()).backend == "gloo"


@pytest.mark.parametrize("env, message", [
    (_env(rank=2, world=2), "RANK=2 must be < WORLD_SIZE=2"),
    (_env(rank=0, local_rank=2, world=2), "LOCAL_RANK=2 must be < WORLD_SIZE=2"),
    (_env(rank=1, local_rank=1, world=4, LOCAL_WORLD_SIZE=1),
     "LOCAL_RANK=1 must be < LOCAL_WORLD_SIZE=1"),
    (_env(LOCAL_WORLD_SIZE=3), "LOCAL_WORLD_SIZE=3 must be <= WORLD_SIZE=2"),
    (_env(world=0), "WORLD_SIZE=0 must be >= 1"),
    (_env(rank=-1), "RANK=-1 must be >= 0"),
    (_env(rank="one"), "RANK='one' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK not"),
    ({"LOCAL_RANK": "0"}, "RANK, WORLD_SIZE not"),
    ({k: v for k, v in _env().items() if k != "MASTER_ADDR"}, "MASTER_ADDR is not set"),
    ({k: v for k, v in _env().items() if k != "MASTER_PORT"}, "MASTER_PORT is not set"),
    (_env(MASTER_PORT=70000), "MASTER_PORT=70000 is not a TCP port"),
])
def test_inconsistent_env_raises(env, message, fake_group):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        D.read_env(env)
    with pytest.raises(ValueError):
        D.init_from_env("cpu", environ=env)
    assert fake_group == []


def test_bad_device_names(fake_group):
    with pytest.raises(ValueError, match="not a torch device"):
        D.init_from_env("gpu0", environ={})
    with pytest.raises(ValueError, match="'cpu' \\(gloo\\) or 'cuda'"):
        D.init_from_env("meta", environ=_env())


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (17, 4), (8, 8), (5, 2)])
def test_shards_are_disjoint_equal_and_strided(n, world):
    perm = D.shard_indices(n, epoch=3, seed=11, rank=0, world_size=1)
    assert sorted(perm) == list(range(n))
    shards = [D.shard_indices(n, 3, 11, rank, world) for rank in range(world)]
    assert all(len(shard) == n // world for shard in shards)
    flat = [i for shard in shards for i in shard]
    assert len(set(flat)) == len(flat) == (n // world) * world
    for rank, shard in enumerate(shards):
        assert shard == perm[rank::world][:n // world]
    # The dropped items are the permutation's tail.
    assert set(perm) - set(flat) == set(perm[(n // world) * world:])


def test_shards_are_deterministic_and_follow_the_epoch():
    a = D.shard_indices(50, epoch=0, seed=1, rank=1, world_size=2)
    assert a == D.shard_indices(50, epoch=0, seed=1, rank=1, world_size=2)
    assert a != D.shard_indices(50, epoch=1, seed=1, rank=1, world_size=2)
    assert a != D.shard_indices(50, epoch=0, seed=2, rank=1, world_size=2)
    # The global RNG is not moved.
    state = torch.get_rng_state()
    D.shard_indices(50, epoch=0, seed=1, rank=1, world_size=2)
    assert torch.equal(state, torch.get_rng_state())


def test_world_size_one_is_the_single_process_order():
    """The same permutation as make_loader's, so one process is unchanged by sharding."""
    data = list(range(13))
    loader = make_loader(data, batch_size=1, seed=5, epoch=2)
    assert list(loader.sampler) == D.shard_indices(13, epoch=2, seed=5, rank=0, world_size=1)


def test_global_batches_match_one_process_with_the_whole_batch():
    n, world, batch = 40, 4, 3
    perm = D.shard_indices(n, 0, 9, 0, 1)
    shards = [D.shard_indices(n, 0, 9, r, world) for r in range(world)]
    for step in range((n // world) // batch):
        together = {i for s in shards for i in s[step * batch:(step + 1) * batch]}
        assert together == set(perm[step * batch * world:(step + 1) * batch * world])


def test_shards_without_drop_last_pad_with_the_head():
    perm = D.shard_indices(10, 0, 0, 0, 1)
    shards = [D.shard_indices(10, 0, 0, r, 4, drop_last=False) for r in range(4)]
    assert all(len(s) == 3 for s in shards)
    assert {i for s in shards for i in s} == set(range(10))
    assert shards[2] == (perm + perm[:2])[2::4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_items=1, world_size=2), "every rank would get no item"),
    (dict(rank=2, world_size=2), "rank=2 must be < world_size=2"),
    (dict(n_items=0), "n_items must be an int >= 1"),
    (dict(epoch=-1), "epoch must be"),
    (dict(seed=1.5), "seed must be"),
    (dict(world_size=0), "world_size must be"),
])
def test_shard_indices_rejects_bad_arguments(kwargs, message):
    args = dict(n_items=10, epoch=0, seed=0, rank=0, world_size=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        D.shard_indices(**args)


# ---------------------------------------------------------------------------------------------
# Single-process helpers (no group: identities)
# ---------------------------------------------------------------------------------------------

def test_helpers_in_one_process():
    ctx = D.DistributedContext()
    D.barrier(ctx)
    assert D.broadcast_object(ctx, {"step": 4}) == {"step": 4}
    x = torch.tensor([1, 2, 3])
    mean = D.all_reduce_mean(ctx, x)
    assert mean.dtype == torch.float32 and mean.tolist() == [1.0, 2.0, 3.0]
    assert D.reduce_throughput(ctx, 10, 4.0) == {
        "samples": 10.0, "seconds": 4.0, "samples_per_s": 2.5,
        "per_rank_samples_per_s": [2.5], "world_size": 1}
    calls = []
    assert D.main_process_only(ctx)(lambda v: calls.append(v) or v)(7) == 7
    other = D.DistributedContext(rank=1, world_size=1, is_main=False)
    assert D.main_process_only(other)(lambda v: calls.append(v) or v)(8) is None
    assert calls == [7]


def test_rank_errors_names_the_rank(capsys):
    ctx = D.DistributedContext(rank=3, world_size=4, is_main=False)
    with pytest.raises(KeyError):
        with D.rank_errors(ctx):
            raise KeyError("lost")
    err = capsys.readouterr().err
    assert "[vcfast rank 3 of 4] failed: KeyError: 'lost'" in err and "Traceback" in err


# ---------------------------------------------------------------------------------------------
# Two ranks (gloo, loopback)
# ---------------------------------------------------------------------------------------------

def _collectives(ctx):
    losses = torch.tensor([1.0, 10.0]) * (ctx.rank + 1)
    mean = D.all_reduce_mean(ctx, losses)
    assert torch.equal(losses, torch.tensor([1.0, 10.0]) * (ctx.rank + 1))  # input kept
    resume = D.broadcast_object(ctx, {"step": 42, "rank": ctx.rank} if ctx.is_main else None)
    written = D.main_process_only(ctx)(lambda: f"written by {ctx.rank}")()
    agreed = D.main_process_only(ctx, broadcast=True)(lambda: ctx.rank + 100)()
    D.barrier(ctx)
    speed = D.reduce_throughput(ctx, samples=8 * (ctx.rank + 1), seconds=2.0 + ctx.rank)
    return {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend,
            "mean": mean.tolist(), "resume": resume, "written": written, "agreed": agreed,
            "speed": speed}


def _fail_on_rank_one(ctx):
    if ctx.rank == 1:
        raise ValueError("boom")
    D.barrier(ctx)  # rank 1 never arrives
    time.sleep(120)
    return "rank 0 should not get here"


def test_two_ranks_collectives():
    r0, r1 = D.run_ranks(_collectives, 2, timeout_s=60)
    for r, out in enumerate((r0, r1)):
        assert (out["rank"], out["world"], out["backend"]) == (r, 2, "gloo")
        assert out["mean"] == [1.5, 15.0]
        assert out["resume"] == {"step": 42, "rank": 0}
        assert out["agreed"] == 100
        assert out["speed"] == {"samples": 24.0, "seconds": 3.0, "samples_per_s": 8.0,
                                "per_rank_samples_per_s": [4.0, 16.0 / 3.0], "world_size": 2}
    assert (r0["written"], r1["written"]) == ("written by 0", None)


def test_one_failing_rank_ends_the_job(capfd):
    start = time.monotonic()
    with pytest.raises(D.RankFailedError) as info:
        D.run_ranks(_fail_on_rank_one, 2, timeout_s=60)
    elapsed = time.monotonic() - start
    # Most of the time is the ranks' start (importing torch and vcfast); from rank 1's error
    # to the end of the job (rank 0 ended too) takes about a second.
    assert elapsed < 45, f"the job took {elapsed:.1f} s to end"
    assert info.value.rank == 1
    after_error = time.time() - info.value.failed_at
    assert 0 <= after_error < 10, f"the job ended {after_error:.1f} s after rank 1 raised"
    assert "rank 1 of 2 failed: ValueError: boom" in str(info.value)
    assert "[vcfast rank 1 of 2] failed: ValueError: boom" in capfd.readouterr().err
    print(f"job ended in {elapsed:.1f} s, {after_error:.2f} s after rank 1 raised")


def test_run_ranks_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still running after 3 s"):
        D.run_ranks(_sleep, 1, args=(60,), timeout_s=3)
    assert time.monotonic() - start < 10


def _sleep(ctx, seconds):
    time.sleep(seconds)


# ---------------------------------------------------------------------------------------------
# python -m vcfast
# ---------------------------------------------------------------------------------------------

def test_python_m_vcfast_help():
    out = subprocess.run([sys.executable, "-m", "vcfast", "--help"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout
