"""Fused masked multi-group losses vs the plain-PyTorch code a user would write, default label
sizes.

Logits [N, 1476] float32 with groups (speaker 1421, birthplace 53, sex 2), about 20% of the
(sample, group) pairs unknown (all -1), float32 targets; N in {16, 256, 4096} (16 = the
paper's batch, 4096 = a large evaluation batch). Timings are forward+backward through
pytest-benchmark; the memory table gives the extra memory each path allocates beyond its
output (the gradient), measured in a fresh process (see conftest.py).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import BENCH_THREADS, conditions, measure_extra_memory

import vcfast  # noqa: F401  (registers the ops)
from vcfast import _extension
from vcfast.ops.classification import masked_multigroup_bce, masked_multigroup_softmax_ce

GROUPS = (1421, 53, 2)
C = sum(GROUPS)
SIZES = [16, 256, 4096]
P_UNKNOWN = 0.2
CPU_IMPLS = ["vcfast-cpu", "vcfast-reference", "torch-masked"]


def _data(n: int, one_hot: bool, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, C, generator=g) * 2
    columns = []
    for size in GROUPS:
        t = torch.zeros(n, size)
        t[torch.arange(n), torch.randint(0, size, (n,), generator=g)] = 1
        if not one_hot:  # multi-label entries are fine for the sigmoid loss
            t[torch.rand(n, size, generator=g) < 0.01] = 1
        t[torch.rand(n, generator=g) < P_UNKNOWN] = -1
        columns.append(t)
    return logits.to(device).requires_grad_(), torch.cat(columns, 1).to(device)


def torch_masked_bce(logits, targets):
    """What a user writes without vcfast: masked BCE-with-logits, per-group sums, mean over
    valid."""
    mask = targets != -1
    per_entry = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).float(),
                                                   reduction="none") * mask
    per_group = [part.sum() for part in per_entry.split(GROUPS, 1)]
    return sum(per_group) / mask.sum().clamp(min=1)


def torch_masked_softmax_ce(logits, targets):
    """Per-group F.cross_entropy over the samples whose group is known, mean over known pairs."""
    total, count = 0.0, 0
    for x, t in zip(logits.split(GROUPS, 1), targets.split(GROUPS, 1)):
        known = (t != -1).all(1)
        total = total + F.cross_entropy(x[known], t[known].argmax(1), reduction="sum")
        count = count + known.sum()
    return total / count.clamp(min=1)


def _impl(loss: str, name: str):
    fused = masked_multigroup_bce if loss == "bce" else masked_multigroup_softmax_ce
    if name == "vcfast-cpu":
        return lambda x, t: fused(x, t, GROUPS, backend="cpu")
    if name == "vcfast-cuda":
        return lambda x, t: fused(x, t, GROUPS, backend="cuda")
    if name == "vcfast-triton":
        return lambda x, t: fused(x, t, GROUPS, backend="triton")
    if name == "vcfast-reference":
        return lambda x, t: fused(x, t, GROUPS, backend="reference")
    if name == "torch-masked":
        return torch_masked_bce if loss == "bce" else torch_masked_softmax_ce
    raise ValueError(name)


def _skip_unavailable(name):
    if name == "vcfast-cpu" and not _extension.EXTENSION_LOADED:
        pytest.skip("vcfast._C not built")


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_forward_backward_cpu(benchmark, loss, n, impl):
    _skip_unavailable(impl)
    run = _impl(loss, impl)
    logits, targets = _data(n, one_hot=loss == "softmax")
    benchmark.group = (f"masked multi-group {loss} fwd+bwd, N={n} x C={C} fp32, CPU, "
                       f"{BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()

    def step():
        (grad,) = torch.autograd.grad(run(logits, targets), logits)
        return grad

    grad = benchmark(step)
    assert grad.shape == logits.shape and torch.isfinite(grad).all()


_MEMORY_SETUP = {
    "vcfast-cpu": "from vcfast.ops.classification import {fn} as fused\n"
                  "fn = lambda x, t: fused(x, t, {groups}, backend='cpu')",
    "vcfast-reference": "from vcfast.ops.classification import {fn} as fused\n"
                        "fn = lambda x, t: fused(x, t, {groups}, backend='reference')",
    "torch-masked": "import sys\nsys.path.insert(0, {bench_dir!r})\n"
                    "from bench_losses import {user} as fn",
}


def _memory_code(loss: str, impl: str, n: int) -> str:
    import os

    setup = _MEMORY_SETUP[impl].format(
        fn="masked_multigroup_bce" if loss == "bce" else "masked_multigroup_softmax_ce",
        user="torch_masked_bce" if loss == "bce" else "torch_masked_softmax_ce",
        groups=GROUPS, bench_dir=os.path.dirname(os.path.abspath(__file__)))
    return setup + textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from bench_losses import _data
        logits, targets = _data({n}, one_hot={loss == "softmax"})
        def run():
            (grad,) = torch.autograd.grad(fn(logits, targets), logits)
            return grad
        """)


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_extra_memory_table(capsys, loss):
    """Peak memory beyond the output (the gradient) of one forward+backward at N=4096."""
    n = SIZES[-1]
    rows = []
    for impl in CPU_IMPLS:
        if impl == "vcfast-cpu" and not _extension.EXTENSION_LOADED:
            continue
        figures = measure_extra_memory(_memory_code(loss, impl, n))
        rows.append((impl, figures["extra"], figures["out_bytes"]))
    mib = 2**20
    with capsys.disabled():
        print(f"\nmasked multi-group {loss}: extra memory of forward+backward beyond the "
              f"gradient, N={n} x C={C} fp32 (inputs {2 * n * C * 4 / mib:.1f} MiB); "
              f"{conditions()}")
        print(f"{'impl':<18}{'extra MiB':>10}{'grad MiB':>10}")
        for impl, extra, out in rows:
            print(f"{impl:<18}{extra / mib:>10.1f}{out / mib:>10.1f}")
    assert all(r[2] == n * C * 4 for r in rows)
    figures = dict((r[0], r[1]) for r in rows)
    if "vcfast-cpu" in figures:
        assert figures["vcfast-cpu"] < figures["vcfast-reference"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl",
                         ["vcfast-triton", "vcfast-cuda", "vcfast-reference", "torch-masked"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_forward_backward_gpu(benchmark, loss, n, impl):
    if impl == "vcfast-cuda" and not _extension.extension_has_cuda():
        pytest.skip("vcfast._C built without CUDA")
    if impl == "vcfast-triton" and not _extension.triton_available():
        pytest.skip("triton is not installed")
    run = _impl(loss, impl)
    logits, targets = _data(n, one_hot=loss == "softmax", device="cuda")
    benchmark.group = f"masked multi-group {loss} fwd+bwd, N={n} x C={C} fp32, CUDA"
    benchmark.extra_info["conditions"] = conditions()

    def step():
        (grad,) = torch.autograd.grad(run(logits, targets), logits)
        torch.cuda.synchronize()
        return grad

    benchmark(step)
