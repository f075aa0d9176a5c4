"""The fused instance-norm + ReLU ops (vcfast.ops.norm_act) on every backend, and the lean
IN -> ReLU -> conv units built on them (vcfast.nn.norm_act).

Backends (``impl``), one shared set of cases for all of them:

* ``reference``: the plain-PyTorch references in vcfast.ops.norm_act;
* ``cpp``: the C++ CPU kernels (csrc/cpu/norm_act_cpu.cpp), skipped when vcfast._C was built
  without them;
* ``triton``: the Triton kernels (vcfast.ops.norm_act_triton, kernels/norm_act.py) on CPU
  tensors in the interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU), skipped
  when the kernels were built for a GPU instead.

There is no C++ CUDA kernel for these ops; on CUDA tensors the public ops run the Triton
kernels (tests/test_gpu_no_sync.py and tests/test_kernel_ptx.py check them there).

Tolerances against the reference: float64 1e-12 (same math, different summation order: the
C++ plane sums are double, so they are at least as accurate as the reference's), float32 1e-5,
half types one rounding of the output dtype plus the reference's own float32 rounding
(assert_close's bf16 / fp16 defaults), gradients for gamma / beta in the accumulation dtype.
The kernels compute in the reference's order, so the ReLU mask matches element for element; a
wrong mask would show up as an O(1) difference in grad_z.

The lean units are checked in float64 against nn.InstanceNorm2d(affine=True,
track_running_stats=True) + nn.ReLU + nn.Conv2d / nn.ConvTranspose2d (tolerance 1e-12: same
math, different summation order). The memory tests count the bytes autograd saves for backward
(saved_tensors_hooks), deduplicated by storage (ReLU and the next conv save the same tensor in
the reference) and excluding parameters and the chain's input (held by the caller either way).
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from _triton_testing import interpreter_marker
from torch import nn

# The Triton op module imports without triton (its kernels are then None): only the
# ``triton`` cases skip then, not the whole module.
import vcfast.ops.norm_act_triton as nat
from vcfast import _extension
from vcfast.models.official import OfficialResidualBlock
from vcfast.nn.norm_act import (
    InstanceNormReLUConv2d,
    LeanResidualBlock,
    _conv_config,
    _NormReLUConvFn,
)
from vcfast.ops import norm_act as ops

needs_cpp = pytest.mark.skipif(
    not all(_extension.has_op(n)
            for n in ("instance_norm_stats", "norm_relu_forward", "norm_relu_backward")),
    reason="vcfast._C was built without the norm-act ops",
)
_, needs_interpreter = interpreter_marker(nat, "norm_act")

# Each backend's (stats, forward, backward) with the public ops' signatures. The Triton
# backend has no statistics kernel: on CUDA the public instance_norm_stats runs the reference.
# The C++ backward goes through the public wrapper (the C++ op on CPU tensors), which drops
# grad_gamma / grad_beta for a non-affine norm as the other backends do.
IMPLS = {
    "reference": SimpleNamespace(
        stats=ops.instance_norm_stats_reference,
        forward=ops.norm_relu_forward_reference,
        backward=ops.norm_relu_backward_reference,
    ),
    "cpp": SimpleNamespace(
        stats=lambda *a: torch.ops.vcfast.instance_norm_stats(*a),
        forward=lambda *a: torch.ops.vcfast.norm_relu_forward(*a),
        backward=ops.norm_relu_backward,
    ),
    "triton": SimpleNamespace(
        stats=ops.instance_norm_stats_reference,
        forward=nat.norm_relu_forward_triton,
        backward=nat.norm_relu_backward_triton,
    ),
}
_IMPL_MARKS = {"reference": (), "cpp": needs_cpp, "triton": needs_interpreter}


def _impls(*names):
    return [pytest.param(name, marks=_IMPL_MARKS[name], id=name) for name in names]


KERNELS = _impls("cpp", "triton")  # compared with the reference
ALL_IMPLS = _impls("reference", "cpp", "triton")  # checked against independent expectations

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)
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
    "1x1x2x1": (1, 1, 2, 1),
    "2x3x5x7": (2, 3, 5, 7),
    "1x2x33x40": (1, 2, 33, 40),  # 33 * 40 > the Triton BLOCK: multi-block rows
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


def _special_inputs(dtype):
    """Inputs whose pre-activation y holds NaN (z NaN, beta NaN) and -0.0 (z == mean, gamma < 0,
    beta = -0.0), with statistics given rather than computed, so the rest stays finite."""
    z, grad_a, gamma, beta = _data((2, 3, 4, 5), dtype)
    _, rstd, _ = ops.instance_norm_stats_reference(z, 1e-5)
    mean = torch.zeros_like(rstd)
    z[0, 0, 1, 2] = float("nan")
    z[1, 1] = 0.0  # == mean: xhat = +0.0, times gamma < 0 is -0.0
    gamma[1] = -1.5
    beta[1] = -0.0
    beta[2] = float("nan")
    return z, grad_a, mean, rstd, gamma, beta


# ---------------------------------------------------------------------------------------------
# The ops on every backend: one shared set of cases.


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("impl", KERNELS)
def test_forward_matches_reference(impl, shape, dtype, affine):
    z, _, gamma, beta = _data(shape, dtype, affine=affine)
    mean, rstd, _ = ops.instance_norm_stats_reference(z, 1e-5)
    got = IMPLS[impl].forward(z, mean, rstd, gamma, beta)
    want = ops.norm_relu_forward_reference(z, mean, rstd, gamma, beta)
    assert got.dtype == dtype and got.shape == z.shape
    torch.testing.assert_close(got, want, **TOLS[dtype])
    assert (got >= 0).all()
    if impl == "cpp":  # the public dispatcher uses the C++ op for CPU tensors
        dispatched = ops.norm_relu_forward(z, mean, rstd, gamma, beta)
        torch.testing.assert_close(dispatched, got, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("impl", KERNELS)
def test_backward_matches_reference(impl, shape, dtype, affine, mode):
    z, grad_a, gamma, beta = _data(shape, dtype, affine=affine)
    batch_stats = mode == "train"
    if batch_stats:
        mean, rstd, _ = ops.instance_norm_stats_reference(z, 1e-5)
    else:
        mean, rstd = _running_stats(z)
    got = IMPLS[impl].backward(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    want = ops.norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    assert got[0].dtype == dtype and got[0].shape == z.shape
    torch.testing.assert_close(got[0], want[0], **TOLS[dtype], msg="grad_z")
    if affine:
        for g, w, name in zip(got[1:], want[1:], ("grad_gamma", "grad_beta")):
            assert g.dtype == ops.acc_dtype(z) and g.shape == (shape[1],)
            torch.testing.assert_close(g, w, **_acc_tol(dtype), msg=name)
            # the sums run over N * HW elements of size ~1: relative to that scale as well (the
            # check above implies this one; kept as the bound the C++ tests were written to)
            scale = max(1.0, float(w.abs().max()))
            torch.testing.assert_close(g / scale, w / scale, **_acc_tol(dtype), msg=name)
    else:
        assert got[1] is None and got[2] is None


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_float64_backward_matches_autograd(impl, mode):
    """Independent of the reference: autograd through F.instance_norm + relu (train) or the
    affine map with constant statistics (eval)."""
    be = IMPLS[impl]
    z, grad_a, gamma, beta = _data((2, 3, 5, 7), F64)
    zr = z.clone().requires_grad_(True)
    gr = gamma.clone().requires_grad_(True)
    br = beta.clone().requires_grad_(True)
    if mode == "train":
        mean, rstd, _ = be.stats(z, 1e-5)
        a = torch.relu(torch.nn.functional.instance_norm(zr, weight=gr, bias=br, eps=1e-5))
    else:
        mean, rstd = _running_stats(z)
        a = torch.relu((zr - mean[..., None, None]) * rstd[..., None, None] * gr[:, None, None]
                       + br[:, None, None])
    a.backward(grad_a)
    gz, gg, gb = be.backward(grad_a, z, mean, rstd, gamma, beta, mode == "train")
    torch.testing.assert_close(be.forward(z, mean, rstd, gamma, beta), a.detach(),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, zr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gg, gr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, br.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_non_contiguous_inputs(impl):
    be = IMPLS[impl]
    z, grad_a, gamma, beta = _data((4, 3, 9, 8), torch.float32)
    zt = z.transpose(2, 3)  # non-contiguous [4, 3, 8, 9]
    gt = grad_a.transpose(2, 3)
    mean, rstd, _ = be.stats(zt, 1e-5)
    want_stats = ops.instance_norm_stats_reference(zt.contiguous(), 1e-5)
    torch.testing.assert_close(mean, want_stats[0], rtol=1e-5, atol=1e-5)
    # strided statistics (a column of a bigger tensor) and gamma (every other element)
    big = torch.zeros(4, 3, 2)
    big[..., 0] = mean
    mean_view = big[..., 0]
    gamma_view = torch.stack([gamma, gamma], 1)[:, 0]
    assert not mean_view.is_contiguous() and not gamma_view.is_contiguous()
    got = be.forward(zt, mean_view, rstd, gamma_view, beta)
    want = ops.norm_relu_forward_reference(zt, mean, rstd, gamma, beta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_b = be.backward(gt, zt, mean_view, rstd, gamma_view, beta, True)
    want_b = ops.norm_relu_backward_reference(gt.contiguous(), zt.contiguous(), mean, rstd,
                                              gamma, beta, True)
    for g, w in zip(got_b, want_b):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_relu_mask_and_nan_follow_pytorch(impl):
    # y exactly 0 (z == mean, beta 0): ReLU's derivative there is 0; NaN input stays NaN.
    be = IMPLS[impl]
    z = torch.tensor([[[0.0, 1.0, -1.0, float("nan")]]])
    mean = torch.zeros(1, 1)
    rstd = torch.ones(1, 1)
    a = be.forward(z, mean, rstd, None, None)
    assert a[0, 0, :3].tolist() == [0.0, 1.0, 0.0] and torch.isnan(a[0, 0, 3])
    gz, _, _ = be.backward(torch.ones_like(z), z, mean, rstd, None, None, False)
    assert gz[0, 0].tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_forward_keeps_nan_and_signed_zero_like_torch_relu(impl, dtype):
    z, _, mean, rstd, gamma, beta = _special_inputs(dtype)
    got = IMPLS[impl].forward(z, mean, rstd, gamma, beta)
    ref = ops.norm_relu_forward_reference(z, mean, rstd, gamma, beta)
    assert got[0, 0, 1, 2].isnan() and got[:, 2].isnan().all()
    torch.testing.assert_close(got, ref, equal_nan=True, **TOLS[dtype])
    assert torch.equal(got.signbit(), ref.signbit())  # relu(-0.0) is -0.0 in torch
    assert got[1, 1].signbit().all()


@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_backward_masks_nan_like_the_reference(impl, dtype, batch_stats):
    z, grad_a, mean, rstd, gamma, beta = _special_inputs(dtype)
    got = IMPLS[impl].backward(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    ref = ops.norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, batch_stats)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, equal_nan=True, **TOLS[dtype])
    if not batch_stats:  # y NaN fails y > 0: no gradient flows there, as in the reference
        assert got[0][:, 2].eq(0).all() and got[0][0, 0, 1, 2] == 0


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_grad_a_of_another_dtype_is_cast(impl):
    be = IMPLS[impl]
    z, grad_a, gamma, beta = _data((2, 3, 4, 4), torch.bfloat16)
    mean, rstd, _ = be.stats(z, 1e-5)
    got = be.backward(grad_a.float(), z, mean, rstd, gamma, beta, True)
    want = be.backward(grad_a, z, mean, rstd, gamma, beta, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# Registration: schema and fake (meta) kernels of each backend's registered ops. The C++ ops
# take an optional gamma / beta and have a statistics op; the Triton ops take both tensors.
OPCHECK_CASES = [
    *(pytest.param("cpp", d, marks=needs_cpp, id=f"cpp-{d}")
      for d in (torch.float32, torch.bfloat16, torch.float64)),
    *(pytest.param("triton", d, marks=needs_interpreter, id=f"triton-{d}")
      for d in (torch.float32, torch.float64)),
]


@pytest.mark.parametrize("impl, dtype", OPCHECK_CASES)
def test_opcheck(impl, dtype):
    z, grad_a, gamma, beta = _data((2, 3, 5, 4), dtype)
    mean, rstd, _ = IMPLS[impl].stats(z, 1e-5)
    if impl == "cpp":
        torch.library.opcheck(torch.ops.vcfast.instance_norm_stats.default, (z, 1e-5))
        fwd, bwd = torch.ops.vcfast.norm_relu_forward, torch.ops.vcfast.norm_relu_backward
        affines = ((gamma, beta), (None, None))
    else:
        fwd = torch.ops.vcfast.norm_relu_forward_triton
        bwd = torch.ops.vcfast.norm_relu_backward_triton
        affines = ((gamma, beta),)
    for g, b in affines:
        torch.library.opcheck(fwd.default, (z, mean, rstd, g, b))
        for batch_stats in (True, False):
            torch.library.opcheck(bwd.default, (grad_a, z, mean, rstd, g, b, batch_stats))


def _force_backend(monkeypatch, impl):
    """Make the public ops (and so the lean units) run ``impl`` on CPU tensors."""
    if impl != "cpp":  # CPU tensors go to the C++ ops first
        monkeypatch.setattr(ops, "_use_kernel", lambda t: False)
    monkeypatch.setattr(ops, "_use_triton", lambda t: impl == "triton")  # as on CUDA


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_module_through_backend(impl, monkeypatch):
    """The lean unit's autograd function driving each backend's ops is still exact."""
    ref, lean = _make_pair("conv4x4_s2", "affine_tracked")
    _force_backend(monkeypatch, impl)
    for step, train in enumerate([True, False]):
        ref.train(train)
        lean.train(train)
        z = torch.randn(2, 4, 6, 6, dtype=F64)
        out_r, gz_r = _step(ref, z, seed=step)
        out_l, gz_l = _step(lean, z, seed=step)
        torch.testing.assert_close(out_l, out_r, **TOL)
        torch.testing.assert_close(gz_l, gz_r, **TOL)
        _assert_same_state(ref, lean)


# ---------------------------------------------------------------------------------------------
# C++ backend only: the statistics op, argument checks of the raw ops, the meta kernels.


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_stats_match_reference(shape, dtype):
    z, _, _, _ = _data(shape, dtype)
    got = torch.ops.vcfast.instance_norm_stats(z, 1e-5)
    want = ops.instance_norm_stats_reference(z, 1e-5)
    for g, w, name in zip(got, want, ("mean", "rstd", "var_unbiased")):
        assert g.dtype == ops.acc_dtype(z) and g.shape == shape[:2], name
        torch.testing.assert_close(g, w, **_acc_tol(dtype), msg=name)


@needs_cpp
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


def test_empty_batch_reference_statistics():
    """The reference statistics (the Triton backend's too) take an empty batch."""
    mean, rstd, var_u = ops.instance_norm_stats_reference(torch.randn(0, 3, 4, 4), 1e-5)
    assert mean.shape == rstd.shape == var_u.shape == (0, 3)


@needs_cpp
def test_empty_batch():
    z = torch.randn(0, 3, 4, 4)
    mean, rstd, var_u = ops.instance_norm_stats(z, 1e-5)
    assert mean.shape == rstd.shape == var_u.shape == (0, 3)
    assert ops.norm_relu_forward(z, mean, rstd, None, None).shape == z.shape
    gz, gg, gb = ops.norm_relu_backward(z, z, mean, rstd, torch.ones(3), torch.zeros(3), True)
    assert gz.shape == z.shape and gg.tolist() == [0.0, 0.0, 0.0] and gb.tolist() == [0.0, 0.0, 0.0]


@needs_cpp
def test_bad_input_errors():
    # the Python wrappers name the argument; the raw ops raise too
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


@needs_cpp
def test_meta_device_shapes():
    z = torch.empty(2, 3, 8, 8, device="meta", dtype=torch.bfloat16)
    mean, rstd, var_u = torch.ops.vcfast.instance_norm_stats(z, 1e-5)
    assert mean.shape == (2, 3) and mean.dtype == torch.float32 and mean.device.type == "meta"
    a = torch.ops.vcfast.norm_relu_forward(z, mean, rstd, None, None)
    assert a.shape == z.shape and a.dtype == z.dtype
    gz, gg, gb = torch.ops.vcfast.norm_relu_backward(a, z, mean, rstd, None, None, True)
    assert gz.shape == z.shape and gg.shape == gb.shape == (3,) and gg.dtype == torch.float32


@needs_cpp
def test_lean_unit_uses_cpp_ops_and_matches_official():
    """The lean IN -> ReLU -> conv unit on CPU float32 (now on the C++ ops) against the
    nn.InstanceNorm2d + ReLU + Conv2d chain, train then eval."""
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


# ---------------------------------------------------------------------------------------------
# The lean units (vcfast.nn.norm_act) on the backend their device picks.


def _randomise_norm(norm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if norm.weight is not None:
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=g, dtype=F64) + 1)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g, dtype=F64) * 0.5)
        if norm.running_mean is not None:
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=g, dtype=F64))
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g, dtype=F64) + .5)


CONVS = {
    "conv3x3": lambda c, o: nn.Conv2d(c, o, 3, padding=1),
    "conv3x3_nobias": lambda c, o: nn.Conv2d(c, o, 3, padding=1, bias=False),
    "conv4x4_s2": lambda c, o: nn.Conv2d(c, o, 4, stride=2, padding=1),
    "conv1x1_groups": lambda c, o: nn.Conv2d(c, o, 1, groups=2, bias=False),
    "convT4x4_s2": lambda c, o: nn.ConvTranspose2d(c, o, 4, stride=2, padding=1, bias=False),
    "convT3x3_s2_op1": lambda c, o: nn.ConvTranspose2d(c, o, 3, stride=2, padding=1,
                                                       output_padding=1),
}
NORMS = {
    "affine_tracked": dict(affine=True, track_running_stats=True),
    "affine_untracked": dict(affine=True, track_running_stats=False),
    "plain": dict(affine=False, track_running_stats=False),
    "momentum_none": dict(affine=True, track_running_stats=True, momentum=None),
    "momentum_0.3_eps": dict(affine=True, track_running_stats=True, momentum=0.3, eps=1e-3),
}


def _make_pair(conv_name, norm_name, c=4, o=6, seed=0):
    torch.manual_seed(seed)
    norm = nn.InstanceNorm2d(c, **NORMS[norm_name]).to(F64)
    _randomise_norm(norm, seed)
    conv = CONVS[conv_name](c, o).to(F64)
    ref = nn.Sequential(copy.deepcopy(norm), nn.ReLU(), copy.deepcopy(conv))
    lean = InstanceNormReLUConv2d(norm, conv)
    return ref, lean


def _step(module, z, seed=1):
    z = z.detach().clone().requires_grad_(True)
    out = module(z)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(g)
    return out.detach(), z.grad


def _assert_same_state(ref, lean):
    ref_p = dict(ref.named_parameters())
    lean_p = dict(lean.named_parameters())
    key = {"0": "norm", "2": "conv"}
    for name, p in ref_p.items():
        mod, attr = name.split(".")
        q = lean_p[f"{key[mod]}.{attr}"]
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=f"grad of {name}")
    for name, b in ref.named_buffers():
        mod, attr = name.split(".")
        torch.testing.assert_close(dict(lean.named_buffers())[f"{key[mod]}.{attr}"], b, **TOL)


@pytest.mark.parametrize("norm_name", list(NORMS))
@pytest.mark.parametrize("conv_name", list(CONVS))
def test_matches_reference_train_then_eval(conv_name, norm_name):
    ref, lean = _make_pair(conv_name, norm_name)
    for step, train in enumerate([True, True, False]):
        ref.train(train)
        lean.train(train)
        z = torch.randn(3, 4, 6, 5, dtype=F64) * 2 + 0.3
        out_r, gz_r = _step(ref, z, seed=step)
        out_l, gz_l = _step(lean, z, seed=step)
        torch.testing.assert_close(out_l, out_r, **TOL)
        torch.testing.assert_close(gz_l, gz_r, **TOL)
        _assert_same_state(ref, lean)  # grads accumulate over the steps, running stats update
    # running stats really moved (where tracked with a momentum)
    norm = lean.norm
    if norm.track_running_stats and norm.momentum:
        assert not torch.allclose(norm.running_var, torch.ones_like(norm.running_var))


def test_only_some_grads_required():
    ref, lean = _make_pair("conv3x3", "affine_tracked")
    for m in (ref, lean):
        for p in m.parameters():
            p.requires_grad_(False)
    ref[2].weight.requires_grad_(True)
    lean.conv.weight.requires_grad_(True)
    z = torch.randn(2, 4, 5, 5, dtype=F64)
    out_r = ref(z)
    out_l = lean(z)
    out_r.sum().backward()
    out_l.sum().backward()
    torch.testing.assert_close(lean.conv.weight.grad, ref[2].weight.grad, **TOL)
    assert lean.norm.weight.grad is None


def test_state_dict_keys_and_sizes():
    lean = InstanceNormReLUConv2d.from_sizes(8, 16, 3, padding=1, bias=False)
    assert set(lean.state_dict()) == {"norm.weight", "norm.bias", "norm.running_mean",
                                      "norm.running_var", "norm.num_batches_tracked",
                                      "conv.weight"}
    out = lean(torch.randn(2, 8, 5, 5))
    assert out.shape == (2, 16, 5, 5)


def test_rejects_unsupported():
    norm = nn.InstanceNorm2d(4, affine=True)
    with pytest.raises(NotImplementedError):
        InstanceNormReLUConv2d(norm, nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError):
        InstanceNormReLUConv2d(norm, nn.Linear(4, 4))
    lean = InstanceNormReLUConv2d(norm, nn.Conv2d(4, 4, 1))
    with pytest.raises(ValueError):
        lean(torch.randn(2, 4, 1, 1))  # one spatial element in train mode, like nn.InstanceNorm2d


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck(train):
    _, lean = _make_pair("conv3x3", "affine_tracked", c=2, o=3)
    norm, conv = lean.norm, lean.conv
    cfg = _conv_config(conv)

    def f(z, gamma, beta, w, b):
        # the statistics are recomputed from z on every evaluation (train), as in the module
        if train:
            mean, rstd, _ = ops.instance_norm_stats(z.detach(), norm.eps)
        else:
            mean = norm.running_mean.expand(z.shape[0], -1).contiguous()
            rstd = torch.rsqrt(norm.running_var + norm.eps).expand(z.shape[0], -1).contiguous()
        return _NormReLUConvFn.apply(z, mean, rstd, gamma, beta, w, b, cfg, train)

    z = torch.randn(2, 2, 3, 4, dtype=F64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True)
                   for p in (norm.weight, norm.bias, conv.weight, conv.bias))
    assert torch.autograd.gradcheck(f, (z, *params), eps=1e-6, atol=1e-7)


def _block_step(block, x, seed):
    x = x.detach().clone().requires_grad_(True)
    out = block(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                             dtype=out.dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("direction", ["official_to_lean", "lean_to_official", "shared"])
def test_residual_block_matches_official(direction):
    torch.manual_seed(0)
    official = OfficialResidualBlock(5, 5).to(F64)
    _randomise_norm(official.main[1], 1)
    _randomise_norm(official.main[4], 2)
    if direction == "official_to_lean":
        lean = LeanResidualBlock(5, 5).to(F64)
        lean.load_state_dict(official.state_dict())
    elif direction == "lean_to_official":
        lean = LeanResidualBlock(5, 5).to(F64)
        _randomise_norm(lean.main[1], 3)
        _randomise_norm(lean.main[4], 4)
        official.load_state_dict(lean.state_dict())
    else:
        lean = LeanResidualBlock.from_official(copy.deepcopy(official))
        official = copy.deepcopy(official)
    assert list(lean.state_dict()) == list(official.state_dict())
    for step, train in enumerate([True, True, False]):
        official.train(train)
        lean.train(train)
        x = torch.randn(2, 5, 6, 7, dtype=F64)
        out_o, gx_o = _block_step(official, x, step)
        out_l, gx_l = _block_step(lean, x, step)
        torch.testing.assert_close(out_l, out_o, **TOL)
        torch.testing.assert_close(gx_l, gx_o, **TOL)
        for (name, p), q in zip(official.named_parameters(), lean.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)
        for (name, b), c in zip(official.named_buffers(), lean.buffers()):
            torch.testing.assert_close(c, b, **TOL, msg=name)


# --- memory ------------------------------------------------------------------------------


def _saved_bytes(fn, exclude):
    """Bytes of distinct storages autograd saves while ``fn`` runs (``exclude``d ones skipped)."""
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def _chain(lean: bool, n_blocks: int = 2, c: int = 16):
    """conv -> [IN -> ReLU -> conv] * n_blocks, official layout or lean units (same params)."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(n_blocks + 1)]
    norms = [nn.InstanceNorm2d(c, affine=True, track_running_stats=True) for _ in range(n_blocks)]
    if lean:
        layers = [convs[0]] + [InstanceNormReLUConv2d(n, k) for n, k in zip(norms, convs[1:])]
    else:
        layers = [convs[0]]
        for n, k in zip(norms, convs[1:]):
            layers += [n, nn.ReLU(inplace=True), k]
    return nn.Sequential(*layers)


def test_lean_chain_saves_about_half():
    x = torch.randn(2, 16, 32, 32)
    ref, lean = _chain(False), _chain(True)
    ref_bytes, out_r = _saved_bytes(lambda: ref(x), [x, *ref.parameters()])
    lean_bytes, out_l = _saved_bytes(lambda: lean(x), [x, *lean.parameters()])
    torch.testing.assert_close(out_l, out_r, rtol=1e-5, atol=1e-5)
    act = x.numel() * x.element_size()
    # reference: z and a per block (2 activations); lean: z + [N, C] statistics
    assert ref_bytes >= 2 * 2 * act
    assert lean_bytes <= 0.55 * ref_bytes, (lean_bytes, ref_bytes)
    assert lean_bytes < 2 * act + 4096


def test_lean_residual_block_saves_one_activation_less():
    x = torch.randn(2, 16, 32, 32)
    official = OfficialResidualBlock(16, 16)
    lean = LeanResidualBlock.from_official(copy.deepcopy(official))
    ref_bytes, _ = _saved_bytes(lambda: official(x), [*official.parameters()])
    lean_bytes, _ = _saved_bytes(lambda: lean(x), [*lean.parameters()])
    act = x.numel() * x.element_size()
    # official: x, z1, a1, z2; lean: x, z1, z2 (+ small statistics)
    assert ref_bytes >= 4 * act
    assert lean_bytes <= 3 * act + 4096
    assert lean_bytes <= 0.76 * ref_bytes
