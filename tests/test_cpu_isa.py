"""Every instruction-set level of the C++ CPU kernels this machine can execute gives the
reference's answer (csrc/include/vcfast/cpu_isa.h, docs/architecture.md#cpu-instruction-sets).

The hot loops are compiled for AVX-512, AVX2 + FMA and baseline x86-64; one run of the suite
takes only the best level, so these tests switch to each level the CPU supports in turn and
compare the ops that use them (the two losses, forward and backward, fp32/fp64/bf16 and
awkward shapes; the slope-bit kernels; the penalty terms; the spectrogram forward) with
their plain-PyTorch references at the tolerances of the ops' own test files.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vcfast
from vcfast import _extension
from vcfast.ops import slope_bits
from vcfast.ops.classification import (
    masked_multigroup_bce,
    masked_multigroup_bce_reference,
    masked_multigroup_softmax_ce,
    masked_multigroup_softmax_ce_reference,
)
from vcfast.ops.spectrogram import log_spectrogram

pytestmark = pytest.mark.skipif(not _extension.EXTENSION_LOADED, reason="vcfast._C not built")

LEVELS = ("baseline", "avx2", "avx512")


def _runnable_levels() -> list[str]:
    if not _extension.EXTENSION_LOADED:
        return []
    best = _extension.cpu_isa_supported()
    return list(LEVELS[: LEVELS.index(best) + 1])


@pytest.fixture(params=LEVELS)
def level(request):
    """Runs the test with the C++ CPU kernels at one level; skipped where the CPU lacks it."""
    if request.param not in _runnable_levels():
        pytest.skip(f"this CPU does not execute {request.param} code "
                    f"(best: {_extension.cpu_isa_supported()})")
    previous = vcfast.set_cpu_isa(request.param)
    assert vcfast.cpu_isa() == request.param
    yield request.param
    vcfast.set_cpu_isa(previous)


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _loss_case(n, groups, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = sum(groups)
    logits = (torch.randn(n, c, generator=g) * 4).to(dtype)
    # Softmax targets: one positive per known group, some groups unknown (-1).
    targets = torch.full((n, c), -1.0)
    start = 0
    for size in groups:
        known = torch.rand(n, generator=g) > 0.2
        cls = torch.randint(0, size, (n,), generator=g)
        block = torch.zeros(n, size)
        block[torch.arange(n), cls] = 1.0
        targets[:, start:start + size] = torch.where(known[:, None], block, -1.0)
        start += size
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n, groups", [(1, (1,)), (7, (3, 5, 17)), (33, (1476,)), (5, (300, 1))])
@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_losses_match_the_reference_at_every_level(level, loss, n, groups, dtype):
    logits, targets = _loss_case(n, groups, dtype)
    fused = masked_multigroup_bce if loss == "bce" else masked_multigroup_softmax_ce
    reference = (masked_multigroup_bce_reference if loss == "bce"
                 else masked_multigroup_softmax_ce_reference)
    pos_weight = (torch.rand(sum(groups), dtype=torch.float32 if dtype == torch.bfloat16
                             else dtype) + 0.5) if loss == "bce" else None
    extra = {"pos_weight": pos_weight} if loss == "bce" else {}
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().to(torch.float64 if dtype == torch.bfloat16 else dtype).requires_grad_()
    got = fused(x1, targets.to(dtype), groups, backend="cpu", **extra)
    want = reference(x2, targets.to(x2.dtype), groups,
                     **({"pos_weight": pos_weight.to(x2.dtype)} if loss == "bce" else {}))
    torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])
    (g1,) = torch.autograd.grad(got, x1)
    (g2,) = torch.autograd.grad(want, x2)
    torch.testing.assert_close(g1.double(), g2.double(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 4096 * 8 + 3])
def test_slope_bit_kernels_match_the_reference_at_every_level(level, numel, dtype):
    z = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(dtype)
    z[::5] = 0.0  # the boundary: z > 0 is false at 0
    out, bits = slope_bits.leaky_relu_with_bits(z, 0.01)
    want_out, want_bits = slope_bits.leaky_relu_with_bits_reference(z, 0.01)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(bits, want_bits, rtol=0, atol=0)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.testing.assert_close(slope_bits.scale_by_slope_bits(x, bits, 0.01),
                               slope_bits.scale_by_slope_bits_reference(x, bits, 0.01),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1, 5, 7), (4, 1, 64, 64)])
def test_penalty_terms_match_the_reference_at_every_level(level, shape, dtype):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    gp, u = slope_bits.penalty_terms(g, 1.0, 10.0)
    want_gp, want_u = slope_bits.penalty_terms_reference(g, 1.0, 10.0)
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp.double(), want_gp.double(), **tol)
    torch.testing.assert_close(u.double(), want_u.double(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("samples", [1024, 8000, 66304])
def test_spectrogram_matches_the_reference_at_every_level(level, samples, dtype):
    wave = torch.randn(2, samples, generator=torch.Generator().manual_seed(3), dtype=dtype) * 0.1
    got = log_spectrogram(wave, backend="cpu")
    want = log_spectrogram(wave, backend="reference")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, want, **tol)
    # The backward's per-bin loop is dispatched too.
    weight = torch.rand(got.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    grads = []
    for backend in ("cpu", "reference"):
        w = wave.clone().requires_grad_()
        (g,) = torch.autograd.grad((log_spectrogram(w, backend=backend) * weight).sum(), w)
        grads.append(g)
    grad_tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-8,
                                                                               atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], **grad_tol)
    wave[0, samples // 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        log_spectrogram(wave, backend="cpu", nan_policy="raise")


def test_level_names_and_errors():
    best = vcfast.build_info()["cpu_isa_supported"]
    assert best in LEVELS
    assert vcfast.cpu_isa() in LEVELS
    previous = vcfast.set_cpu_isa("baseline")
    try:
        assert vcfast.cpu_isa() == "baseline"
        assert vcfast.set_cpu_isa("auto") == "baseline"
    finally:
        vcfast.set_cpu_isa(previous)
    with pytest.raises(ValueError, match="isa must be 'auto', 'baseline', 'avx2' or 'avx512'"):
        vcfast.set_cpu_isa("sse4")
    with pytest.raises(TypeError, match="isa must be a str"):
        vcfast.set_cpu_isa(2)
    if best != "avx512":
        with pytest.raises(ValueError, match="cannot execute 'avx512'"):
            vcfast.set_cpu_isa("avx512")


@pytest.mark.parametrize("env, cap", [({"ATEN_CPU_CAPABILITY": "avx2"}, "avx2"),
                                      ({"ATEN_CPU_CAPABILITY": "default"}, "baseline"),
                                      ({"VCFAST_CPU_ISA": "baseline"}, "baseline")])
def test_the_environment_caps_the_level(env, cap):
    """Forcing PyTorch's AVX2 path (ATEN_CPU_CAPABILITY) forces the C++ kernels' too."""
    best = _extension.cpu_isa_supported()
    expected = LEVELS[min(LEVELS.index(best), LEVELS.index(cap))]
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ATEN_CPU_CAPABILITY", "VCFAST_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", "import vcfast; print(vcfast.cpu_isa())"],
                         env={**clean, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected
