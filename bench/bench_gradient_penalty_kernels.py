"""The lean gradient penalty's kernels on their own, against the PyTorch a user would write.

The lean penalty (docs/ops.md#gradient-penalty) replaces autograd's double backward with
three kernels, timed here one by one:

* ``leaky_relu_with_bits``: LeakyReLU and its slope as packed bits (1 bit per element), vs
  ``F.leaky_relu`` plus the ``z > 0`` mask autograd would keep (1 byte per element);
* ``scale_by_slope_bits``: x times the recorded slope, vs ``torch.where(mask, x, slope * x)``;
* ``penalty_terms``: the per-sample gradient norms, the penalty and its gradient ``u`` in one
  kernel, vs ``norm`` + mean + ``torch.autograd.grad``.

Activations are a critic's first layer at batch 16: [16, 64, 64, 64] float32 on the CPU
(4.2 M elements) and the paper size [16, 64, 128, 128] on a GPU; the penalty's input gradient
is [16, 1, 256, 256]. Implementations: ``vcfast-cpu`` (C++), ``vcfast-triton`` (GPU),
``vcfast-reference`` (vcfast's plain-PyTorch reference) and ``torch`` (the user's code).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BENCH_THREADS, conditions

from vcfast import _extension
from vcfast.ops import slope_bits

SLOPE = 0.01
TARGET, WEIGHT = 1.0, 10.0
KERNELS = ["leaky_relu_with_bits", "scale_by_slope_bits", "penalty_terms"]


def _shape(kernel: str, device: str) -> tuple[int, ...]:
    if kernel == "penalty_terms":
        return (16, 1, 256, 256)
    return (16, 64, 64, 64) if device == "cpu" else (16, 64, 128, 128)


def _torch_penalty_terms(g: torch.Tensor):
    g = g.detach().requires_grad_()
    norms = g.flatten(1).norm(dim=1)
    gp = WEIGHT * ((norms - TARGET) ** 2).mean()
    (u,) = torch.autograd.grad(gp, g)
    return gp.detach(), u


def _runner(kernel: str, impl: str, device: str):
    """A zero-argument callable running ``kernel`` with ``impl`` on fresh-enough inputs."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(_shape(kernel, device), generator=gen).to(device)
    if kernel == "penalty_terms":
        if impl == "torch":
            return lambda: _torch_penalty_terms(z)
        if impl == "vcfast-reference":
            return lambda: slope_bits.penalty_terms_reference(z, TARGET, WEIGHT)
        if impl == "vcfast-cpu":
            return lambda: torch.ops.vcfast.penalty_terms(z, TARGET, WEIGHT)
        from vcfast.ops.gradient_penalty_triton import penalty_terms_triton

        return lambda: penalty_terms_triton(z, TARGET, WEIGHT)
    if kernel == "leaky_relu_with_bits":
        if impl == "torch":
            return lambda: (F.leaky_relu(z, SLOPE), z > 0)
        if impl == "vcfast-reference":
            return lambda: slope_bits.leaky_relu_with_bits_reference(z, SLOPE)
        if impl == "vcfast-cpu":
            return lambda: torch.ops.vcfast.leaky_relu_with_bits(z, SLOPE)
        from vcfast.ops.gradient_penalty_triton import leaky_relu_with_bits_triton

        return lambda: leaky_relu_with_bits_triton(z, SLOPE)
    # scale_by_slope_bits: the bits (or the mask) come from a forward done once, outside.
    x = torch.randn(z.shape, generator=gen).to(device)
    if impl == "torch":
        mask = z > 0
        return lambda: torch.where(mask, x, x * SLOPE)
    _, bits = slope_bits.leaky_relu_with_bits_reference(z, SLOPE)
    if impl == "vcfast-reference":
        return lambda: slope_bits.scale_by_slope_bits_reference(x, bits, SLOPE)
    if impl == "vcfast-cpu":
        return lambda: torch.ops.vcfast.scale_by_slope_bits(x, bits, SLOPE)
    from vcfast.ops.gradient_penalty_triton import scale_by_slope_bits_triton

    return lambda: scale_by_slope_bits_triton(x, bits, SLOPE)


def _reference_result(kernel: str, device: str):
    return _runner(kernel, "vcfast-reference", device)()


def _assert_matches(kernel: str, impl: str, got, device: str) -> None:
    """Every implementation computes the same thing (bits compared bit for bit)."""
    want = _reference_result(kernel, device)
    if kernel == "leaky_relu_with_bits" and impl == "torch":
        out, mask = got
        want_out, want_bits = want
        torch.testing.assert_close(out, want_out)
        assert torch.equal(slope_bits.pack_bits_reference(mask), want_bits)
        return
    for a, b in zip(got, want) if isinstance(got, tuple) else [(got, want)]:
        if a.dtype == torch.uint8:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["vcfast-cpu", "vcfast-reference", "torch"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_cpu(benchmark, kernel, impl):
    if impl == "vcfast-cpu" and not _extension.has_op(kernel):
        pytest.skip("vcfast._C not built")
    run = _runner(kernel, impl, "cpu")
    benchmark.group = (f"penalty kernel {kernel}, {'x'.join(map(str, _shape(kernel, 'cpu')))} "
                       f"fp32, CPU, {BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()
    got = benchmark(run)
    _assert_matches(kernel, impl, got, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["vcfast-triton", "vcfast-reference", "torch"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_gpu(benchmark, kernel, impl):
    if impl == "vcfast-triton" and not _extension.triton_available():
        pytest.skip("triton is not installed")
    run = _runner(kernel, impl, "cuda")
    benchmark.group = (f"penalty kernel {kernel}, {'x'.join(map(str, _shape(kernel, 'cuda')))} "
                       f"fp32, CUDA")
    benchmark.extra_info["conditions"] = conditions()

    def step():
        out = run()
        torch.cuda.synchronize()
        return out

    got = benchmark(step)
    _assert_matches(kernel, impl, got, "cuda")
