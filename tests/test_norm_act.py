"""C++ CPU kernels of the fused instance-norm + ReLU ops (csrc/cpu/norm_act_cpu.cpp) against the
plain-PyTorch references in vcfast.ops.norm_act.

Tolerances: float64 1e-12 (same math, different summation order: the C++ plane sums are
double, so they are at least as accurate as the reference's), float32 1e-5, half types one
rounding of the output dtype plus the reference's own float32 rounding (assert_close's bf16 /
fp16 defaults), gradients for gamma / beta in the accumulation dtype. The forward is written
in the reference's order, so the ReLU mask matches element for element; a wrong mask would
show up as an O(1) difference in grad_z.
"""

import pytest
import torch

from vcfast import _extension
from vcfast.ops import norm_act as ops

pytestmark = pytest.mark.skipif(
    not all(_extension.has_op(n)
            for n in ("instance_norm_stats", "norm_relu_forward", "norm_relu_backward")),
    reason="vcfast._C was built without the norm-act ops",
)

F64 = torch.float64
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOLS = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}
SHAPES = {
    "basic": (3, 4, 6, 5),
    "n1": (1, 4, 7, 9),
    "c1": (2, 1, 5, 5),
    "hw2": (2, 3, 1, 2),
    "odd_large": (2, 3, 33, 67),
    "1d_spatial": (2, 3, 11),
    "3d_spatial": (2, 2, 3, 4, 5),
}


def _acc_tol(dtype):
    return TOLS[ops.acc_dtype(torch.empty(0, dtype=dtype))]


def _data(shape, dtype, seed=0, affine=True):
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    acc = torch.float64 if dtype == F64 else torch.float32
    z = (torch.randn(shape, generator=gen, dtype=F64) * 2 + 0.7).to(dtype)
    grad_a = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    gamma = (torch.randn(c, generator=gen, dtype=F64) + 1).to(acc) if affine else None
    beta = (torch.randn(c, generator=gen, dtype=F64) * 0.5).to(acc) if affine else None
    return z, grad_a, gamma, beta


def _running_stats(z, seed=3):
    """Eval-mode statistics: constants unrelated to z, expanded to [N, C]."""
    gen = torch.Generator().manual_seed(seed)
    n, c = z.shape[:2]
    acc = ops.acc_dtype(z)
    mean = torch.randn(c, generator=gen, dtype=F64).to(acc).expand(n, c).contiguous()
    rstd = (torch.rand(c, generator=gen, dtype=F64) + 0.5).to(acc).expand(n, c).contiguous()
    return mean, rstd


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_stats_match_reference(shape, dtype):
    z, _, _, _ = _data(shape, dtype)
    got = torch.ops.vcfast.instance_norm_stats(z, 1e-5)
    want = ops.instance_norm_stats_reference(z, 1e-5)
    for g, w, name in zip(got, want, ("mean", "rstd", "var_unbiased")):
        assert g.dtype == ops.acc_dtype(z) and g.shape == shape[:2], name
        torch.testing.assert_close(g, w, **_acc_tol(dtype), msg=name)


def test_stats_large_mean_is_numerically_sound():
    # A plane with mean 1e4 and spread 1e-2: a one-pass float32 E[x^2] - E[x]^2 would lose all
    # digits; the two-pass double kernel matches the float64 statistics to float32 rounding.
    gen = torch.Generator().manual_seed(0)
    z64 = 1e4 + 1e-2 * torch.randn(2, 3, 64, 64, generator=gen, dtype=F64)
    z = z64.float()
    mean, rstd, var_u = torch.ops.vcfast.instance_norm_stats(z, 1e-5)
    exact = z.double().reshape(2, 3, -1)
    torch.testing.assert_close(mean.double(), exact.mean(2), rtol=1e-7, atol=0)
    torch.testing.assert_close(var_u.double(), exact.var(2, correction=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(exact.var(2, correction=0) + 1e-5),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_forward_matches_reference(shape, dtype, affine):
    z, _, gamma, beta = _data(shape, dtype, affine=affine)
    mean, rstd, _ = ops.instance_norm_stats_reference(z, 1e-5)
    got = torch.ops.vcfast.norm_relu_forward(z, mean, rstd, gamma, beta)
    want = ops.norm_relu_forward_reference(z, mean, rstd, gamma, beta)
    assert got.dtype == dtype and got.shape == z.shape
    torch.testing.assert_close(got, want, **TOLS[dtype])
    assert (got >= 0).all()
    # the public dispatcher uses the C++ op for CPU tensors
    dispatched = ops.norm_relu_forward(z, mean, rstd, gamma, beta)
    torch.testing.assert_close(dispatched, got, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_backward_matches_reference(shape, dtype, affine, mode):
    z, grad_a, gamma, beta = _data(shape, dtype, affine=affine)
    batch_stats = mode == "train"
    if batch_stats:
        mean, rstd, _ = ops.instance_norm_stats_reference(z, 1e-5)
    else:
        mean, rstd = _running_stats(z)
    got = ops.norm_relu_backward(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    want = ops.norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    assert got[0].dtype == dtype and got[0].shape == z.shape
    torch.testing.assert_close(got[0], want[0], **TOLS[dtype], msg="grad_z")
    if affine:
        for g, w, name in zip(got[1:], want[1:], ("grad_gamma", "grad_beta")):
            assert g.dtype == ops.acc_dtype(z) and g.shape == (shape[1],)
            # the sums run over N * HW elements of size ~1: compare relative to that scale
            scale = max(1.0, float(w.abs().max()))
            torch.testing.assert_close(g / scale, w / scale, **_acc_tol(dtype), msg=name)
    else:
        assert got[1] is None and got[2] is None


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_float64_backward_matches_autograd(mode):
    """Independent of the reference: autograd through F.instance_norm + relu (train) or the
    affine map with constant statistics (eval)."""
    z, grad_a, gamma, beta = _data((2, 3, 5, 7), F64)
    zr = z.clone().requires_grad_(True)
    gr = gamma.clone().requires_grad_(True)
    br = beta.clone().requires_grad_(True)
    if mode == "train":
        mean, rstd, _ = torch.ops.vcfast.instance_norm_stats(z, 1e-5)
        a = torch.relu(torch.nn.functional.instance_norm(zr, weight=gr, bias=br, eps=1e-5))
    else:
        mean, rstd = _running_stats(z)
        a = torch.relu((zr - mean[..., None, None]) * rstd[..., None, None] * gr[:, None, None]
                       + br[:, None, None])
    a.backward(grad_a)
    gz, gg, gb = ops.norm_relu_backward(grad_a, z, mean, rstd, gamma, beta, mode == "train")
    torch.testing.assert_close(ops.norm_relu_forward(z, mean, rstd, gamma, beta), a.detach(),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, zr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gg, gr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, br.grad, rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs():
    z, grad_a, gamma, beta = _data((4, 3, 9, 8), torch.float32)
    zt = z.transpose(2, 3)  # non-contiguous [4, 3, 8, 9]
    gt = grad_a.transpose(2, 3)
    mean, rstd, _ = ops.instance_norm_stats(zt, 1e-5)
    want_stats = ops.instance_norm_stats_reference(zt.contiguous(), 1e-5)
    torch.testing.assert_close(mean, want_stats[0], rtol=1e-5, atol=1e-5)
    # strided statistics (a column of a bigger tensor) and gamma (every other element)
    big = torch.zeros(4, 3, 2)
    big[..., 0] = mean
    mean_view = big[..., 0]
    gamma_view = torch.stack([gamma, gamma], 1)[:, 0]
    assert not mean_view.is_contiguous() and not gamma_view.is_contiguous()
    got = ops.norm_relu_forward(zt, mean_view, rstd, gamma_view, beta)
    want = ops.norm_relu_forward_reference(zt, mean, rstd, gamma, beta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_b = ops.norm_relu_backward(gt, zt, mean_view, rstd, gamma_view, beta, True)
    want_b = ops.norm_relu_backward_reference(gt.contiguous(), zt.contiguous(), mean, rstd,
                                              gamma, beta, True)
    for g, w in zip(got_b, want_b):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_relu_mask_and_nan_follow_pytorch():
    # y exactly 0 (z == mean, beta 0): ReLU's derivative there is 0; NaN input stays NaN.
    z = torch.tensor([[[0.0, 1.0, -1.0, float("nan")]]])
    mean = torch.zeros(1, 1)
    rstd = torch.ones(1, 1)
    a = ops.norm_relu_forward(z, mean, rstd, None, None)
    assert a[0, 0, :3].tolist() == [0.0, 1.0, 0.0] and torch.isnan(a[0, 0, 3])
    gz, _, _ = ops.norm_relu_backward(torch.ones_like(z), z, mean, rstd, None, None, False)
    assert gz[0, 0].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_empty_batch():
    z = torch.randn(0, 3, 4, 4)
    mean, rstd, var_u = ops.instance_norm_stats(z, 1e-5)
    assert mean.shape == rstd.shape == var_u.shape == (0, 3)
    assert ops.norm_relu_forward(z, mean, rstd, None, None).shape == z.shape
    gz, gg, gb = ops.norm_relu_backward(z, z, mean, rstd, torch.ones(3), torch.zeros(3), True)
    assert gz.shape == z.shape and gg.tolist() == [0.0, 0.0, 0.0] and gb.tolist() == [0.0, 0.0, 0.0]


def test_grad_a_of_another_dtype_is_cast():
    z, grad_a, gamma, beta = _data((2, 3, 4, 4), torch.bfloat16)
    mean, rstd, _ = ops.instance_norm_stats(z, 1e-5)
    got = ops.norm_relu_backward(grad_a.float(), z, mean, rstd, gamma, beta, True)
    want = ops.norm_relu_backward(grad_a, z, mean, rstd, gamma, beta, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: the Python wrappers name the argument; the raw ops raise too.


def test_bad_input_errors():
    z = torch.randn(2, 3, 4, 4)
    mean, rstd, _ = ops.instance_norm_stats(z, 1e-5)
    with pytest.raises(TypeError, match="z must be float16, bfloat16, float32 or float64"):
        ops.instance_norm_stats(z.to(torch.int32), 1e-5)
    with pytest.raises(ValueError, match=r"z must be \[N, C, \*spatial\]"):
        ops.norm_relu_forward(z[0, 0], mean, rstd, None, None)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        ops.instance_norm_stats(torch.randn(2, 3, 1, 1), 1e-5)
    with pytest.raises(ValueError, match="mean must have 6 elements"):
        ops.norm_relu_forward(z, mean[:1], rstd, None, None)
    with pytest.raises(ValueError, match="gamma must have 3 elements"):
        ops.norm_relu_forward(z, mean, rstd, torch.ones(4), None)
    with pytest.raises(TypeError, match="rstd must be floating point"):
        ops.norm_relu_forward(z, mean, rstd.to(torch.int64), None, None)
    with pytest.raises(ValueError, match="grad_a .* must have z's shape"):
        ops.norm_relu_backward(z[:1], z, mean, rstd, None, None, True)
    with pytest.raises(ValueError, match="beta is on meta"):
        ops.norm_relu_forward(z, mean, rstd, None, torch.zeros(3, device="meta"))
    # the raw C++ ops check as well (TORCH_CHECK_TYPE / _VALUE map to TypeError / ValueError)
    with pytest.raises(TypeError, match="z must be float16"):
        torch.ops.vcfast.norm_relu_forward(z.to(torch.int64), mean, rstd, None, None)
    with pytest.raises(ValueError, match="rstd must have N \\* C = 6 elements"):
        torch.ops.vcfast.norm_relu_forward(z, mean, rstd[:, :1], None, None)
    with pytest.raises(TypeError, match="grad_a dtype"):
        torch.ops.vcfast.norm_relu_backward(z.double(), z, mean, rstd, None, None, True)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        torch.ops.vcfast.instance_norm_stats(torch.randn(2, 3, 1), 1e-5)


# ---------------------------------------------------------------------------------------------
# Registration: schema, fake (meta) kernels, dispatch consistency.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    z, grad_a, gamma, beta = _data((2, 3, 5, 4), dtype)
    mean, rstd, _ = ops.instance_norm_stats(z, 1e-5)
    torch.library.opcheck(torch.ops.vcfast.instance_norm_stats.default, (z, 1e-5))
    for g, b in ((gamma, beta), (None, None)):
        torch.library.opcheck(torch.ops.vcfast.norm_relu_forward.default, (z, mean, rstd, g, b))
        for batch_stats in (True, False):
            torch.library.opcheck(torch.ops.vcfast.norm_relu_backward.default,
                                  (grad_a, z, mean, rstd, g, b, batch_stats))


def test_meta_device_shapes():
    z = torch.empty(2, 3, 8, 8, device="meta", dtype=torch.bfloat16)
    mean, rstd, var_u = torch.ops.vcfast.instance_norm_stats(z, 1e-5)
    assert mean.shape == (2, 3) and mean.dtype == torch.float32 and mean.device.type == "meta"
    a = torch.ops.vcfast.norm_relu_forward(z, mean, rstd, None, None)
    assert a.shape == z.shape and a.dtype == z.dtype
    gz, gg, gb = torch.ops.vcfast.norm_relu_backward(a, z, mean, rstd, None, None, True)
    assert gz.shape == z.shape and gg.shape == gb.shape == (3,) and gg.dtype == torch.float32


def test_lean_unit_uses_cpp_ops_and_matches_official():
    """The lean IN -> ReLU -> conv unit on CPU float32 (now on the C++ ops) against the
    nn.InstanceNorm2d + ReLU + Conv2d chain, train then eval."""
    import copy

    from torch import nn

    from vcfast.nn.norm_act import InstanceNormReLUConv2d

    torch.manual_seed(0)
    lean = InstanceNormReLUConv2d.from_sizes(6, 5, 3, padding=1)
    with torch.no_grad():
        lean.norm.weight.uniform_(0.5, 1.5)
        lean.norm.bias.uniform_(-0.5, 0.5)
    ref = nn.Sequential(copy.deepcopy(lean.norm), nn.ReLU(), copy.deepcopy(lean.conv))
    for train in (True, False):
        lean.train(train)
        ref.train(train)
        z = torch.randn(2, 6, 9, 11)
        outs = []
        for m in (lean, ref):
            zz = z.clone().requires_grad_(True)
            out = m(zz)
            out.backward(torch.ones_like(out))
            outs.append((out.detach(), zz.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lean.norm.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lean.norm.running_var, ref[0].running_var, rtol=1e-5, atol=1e-6)
