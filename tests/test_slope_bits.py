"""Slope-bit kernels of the lean gradient penalty against their plain-PyTorch references."""

import pytest
import torch

from vcfast import _extension
from vcfast.ops import slope_bits as sb

needs_kernels = pytest.mark.skipif(not _extension.has_op("leaky_relu_with_bits"),
                                   reason="vcfast._C without the slope-bit kernels (rebuild)")

SHAPES = [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 64, 33, 33)]


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000):
        mask = torch.rand(n, generator=g) > 0.5
        bits = sb.pack_bits_reference(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
        assert torch.equal(sb.unpack_bits_reference(bits, n), mask)
    # element e is bit e % 8 of byte e // 8
    assert sb.pack_bits_reference(
        torch.tensor([True, False, True] + [False] * 5 + [True])).tolist() == [5, 1]


def test_reference_penalty_terms_match_autograd():
    g = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    gp_auto = 10 * ((g.reshape(3, -1).norm(dim=1) - 1) ** 2).mean()
    (u_auto,) = torch.autograd.grad(gp_auto, g)
    gp, u = sb.penalty_terms_reference(g.detach(), 1.0, 10.0)
    torch.testing.assert_close(gp, gp_auto.detach())
    torch.testing.assert_close(u, u_auto)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2])
def test_kernels_match_reference(shape, dtype, slope):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=g).to(dtype)
    z.view(-1)[0] = 0.0  # exactly on the kink: PyTorch uses the negative slope there
    out, bits = torch.ops.vcfast.leaky_relu_with_bits(z, slope)
    ref_out, ref_bits = sb.leaky_relu_with_bits_reference(z, slope)
    assert torch.equal(bits, ref_bits)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.nn.functional.leaky_relu(z, slope), rtol=0, atol=0)
    x = torch.randn(shape, generator=g).to(dtype)
    torch.testing.assert_close(torch.ops.vcfast.scale_by_slope_bits(x, bits, slope),
                               sb.scale_by_slope_bits_reference(x, bits, slope), rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (4, 3, 17, 17), (5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_penalty_terms_kernel(shape, dtype):
    g = (torch.randn(shape, dtype=torch.float64) * 0.3).to(dtype)
    gp, u = torch.ops.vcfast.penalty_terms(g, 1.0, 10.0)
    gp_ref, u_ref = sb.penalty_terms_reference(g, 1.0, 10.0)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(gp, gp_ref.to(gp.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(u.double(), u_ref.double(), rtol=tol,
                               atol=tol * u_ref.abs().max().item())
    zero = torch.zeros(2, 3, dtype=dtype)
    gp0, u0 = torch.ops.vcfast.penalty_terms(zero, 1.0, 10.0)
    assert gp0.item() == pytest.approx(10.0) and torch.equal(u0, torch.zeros_like(zero))


@needs_kernels
def test_non_contiguous_inputs_and_errors():
    z = torch.randn(6, 10)[:, ::2]
    out, bits = sb.leaky_relu_with_bits(z, 0.01)
    torch.testing.assert_close(out, torch.nn.functional.leaky_relu(z, 0.01))
    with pytest.raises(ValueError, match="fewer than x's"):
        sb.scale_by_slope_bits(torch.randn(100), bits, 0.01)
    with pytest.raises(TypeError, match="floating point"):
        torch.ops.vcfast.leaky_relu_with_bits(torch.ones(3, dtype=torch.int32), 0.1)
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.vcfast.scale_by_slope_bits(torch.ones(3), torch.ones(1, dtype=torch.int32), 0.1)
    with pytest.raises(ValueError, match=r"N >= 1"):
        torch.ops.vcfast.penalty_terms(torch.ones(0, 3), 1.0, 10.0)


@needs_kernels
def test_opcheck():
    z = torch.randn(3, 11)
    torch.library.opcheck(torch.ops.vcfast.leaky_relu_with_bits.default, (z, 0.2))
    _, bits = torch.ops.vcfast.leaky_relu_with_bits(z, 0.2)
    torch.library.opcheck(torch.ops.vcfast.scale_by_slope_bits.default,
                          (torch.randn(3, 11), bits, 0.2))
    torch.library.opcheck(torch.ops.vcfast.penalty_terms.default, (torch.randn(4, 5), 1.0, 10.0))
