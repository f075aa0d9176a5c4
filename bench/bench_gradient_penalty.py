"""Lean vs autograd (official StarGAN) gradient penalty on the paper-size StarGAN D.

One full D step: D(x_real) -> -mean src + masked BCE on the classifier, D(x_fake) -> +mean src,
the gradient penalty on x_hat, one backward; CPU, float32, batch 4, 1x256x256 (docs/models.md,
93.1 M parameters). Timed with pytest-benchmark; peak extra memory measured in a fresh
process (bench/conftest.py), for the whole step and for the penalty alone. With
--benchmark-disable (the CI smoke run) the resolution drops to 64x64 so it stays quick.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import BENCH_THREADS, conditions, measure_extra_memory

BATCH = 4
MODES = ["lean", "autograd"]

_SETUP = textwrap.dedent(
    """
    import torch
    import vcfast
    from vcfast.models import StarGANDiscriminator
    torch.manual_seed(0)
    size, batch, mode = {size}, {batch}, {mode!r}
    D = StarGANDiscriminator.paper(image_size=size)
    for p in D.parameters():          # persistent gradient buffers, as in a training loop
        p.grad = torch.zeros_like(p)
    x_real, x_fake = torch.rand(batch, 1, size, size), torch.rand(batch, 1, size, size)
    targets = torch.randint(-1, 2, (batch, 1476), dtype=torch.int8)
    groups = (1421, 53, 2)

    def classification_loss(logits):
        try:
            return vcfast.masked_multigroup_bce(logits, targets, groups)
        except AttributeError:  # older checkout without the fused loss
            mask = targets != -1
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, targets.clamp(min=0).float(), reduction="none")
            return (loss * mask).sum() / mask.sum().clamp_min(1)

    def d_step():
        src_real, cls_real = D(x_real)
        src_fake, _ = D(x_fake)
        gp = vcfast.gradient_penalty(D, x_real, x_fake, mode=mode)
        loss = -src_real.mean() + src_fake.mean() + classification_loss(cls_real) + gp
        loss.backward()
        return loss.detach()

    def gp_only():
        gp = vcfast.gradient_penalty(D, x_real, x_fake, mode=mode)
        gp.backward()
        return gp.detach()
    """
)


@pytest.fixture(scope="module")
def image_size(request):
    return 64 if request.config.getoption("benchmark_disable", False) else 256


@pytest.mark.parametrize("mode", MODES)
def test_d_step(benchmark, mode, image_size):
    namespace: dict = {}
    exec(_SETUP.format(size=image_size, batch=BATCH, mode=mode), namespace)
    benchmark.group = (f"StarGAN D step (real, fake, GP, cls, backward), paper-size D, "
                       f"batch {BATCH}, {image_size}x{image_size}, fp32, CPU, "
                       f"{BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()
    loss = benchmark.pedantic(namespace["d_step"], rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss)


def test_memory_table(capsys, image_size):
    rows = []
    for mode in MODES:
        setup = _SETUP.format(size=image_size, batch=BATCH, mode=mode)
        step = measure_extra_memory(setup + "\nrun = d_step\n")
        penalty = measure_extra_memory(setup + "\nrun = gp_only\n")
        rows.append((mode, step["extra"], penalty["extra"]))
    mib = 2**20
    with capsys.disabled():
        print(f"\npeak extra memory beyond model + gradient buffers, paper-size StarGAN D, "
              f"batch {BATCH}, {image_size}x{image_size} fp32; {conditions()}")
        print(f"{'mode':<10}{'whole D step MiB':>18}{'penalty fwd+bwd MiB':>22}")
        for mode, step, penalty in rows:
            print(f"{mode:<10}{step / mib:>18.0f}{penalty / mib:>22.0f}")
        lean, ref = rows[0], rows[1]
        print(f"autograd / lean: whole step {ref[1] / max(lean[1], 1):.2f}x, "
              f"penalty {ref[2] / max(lean[2], 1):.2f}x")
    assert all(r[1] > 0 and r[2] > 0 for r in rows)
