"""The slope-bit ops of the lean gradient penalty (leaky_relu_with_bits, scale_by_slope_bits,
penalty_terms) in every implementation: the plain-PyTorch references
(vcfast.ops.slope_bits), the C++ CPU ops (torch.ops.vcfast.*, csrc/cpu/gradient_penalty_cpu.cpp)
and the Triton ops (vcfast.ops.gradient_penalty_triton, kernels/gradient_penalty.py).

Layout:

* shared cases, parametrised by ``impl`` ("reference", "cpu", "triton"); the op-level cases
  (opcheck, meta shapes) by ``impl`` "cpu" / "triton", the references having no registered op;
* reference-only cases (bit packing, the reference against autograd's double backward);
* C++-only cases (the functional entries' dispatch, the C++ error messages);
* Triton-only cases (cross-check against the C++ ops, Triton's error messages, the GPU
  registration, a missing triton package, real-size CUDA tensors).

Triton without a GPU: the kernels run in the Triton interpreter on CPU tensors.
tests/conftest.py sets TRITON_INTERPRET=1 before any test module imports the kernels (Triton
reads it when ``@triton.jit`` decorates a kernel). On a GPU machine it leaves the variable
alone, so the kernels compile for the GPU: the CPU-tensor "triton" cases then skip and the
CUDA test runs. Inputs are small: the interpreter is slow. Without the triton package every
"triton" case skips; without the C++ slope-bit ops every "cpu" case skips.

Tolerances: leaky_relu_with_bits and scale_by_slope_bits are exact for every dtype (one
multiply in the compute dtype, one rounding), and the bits must equal the reference's byte
for byte. Triton's penalty_terms reduces in float32 (float64 for float64 g) in a different
order from torch.linalg.norm, so gp is compared with rtol 1e-5 (float32 / half inputs) or
1e-12 (float64), and u with the same in float32 / float64; half u may differ by one rounding
of the output dtype (assert_close's default float16 / bfloat16 tolerances). The C++ op
accumulates in float64 for every dtype, so it meets the same tolerances.
"""

import os
from types import SimpleNamespace

import pytest
import torch
from _triton_testing import interpreter_marker, pretend_triton_is_missing

from vcfast import _extension
from vcfast.ops import slope_bits as sb
from vcfast.ops.slope_bits import (
    leaky_relu_with_bits_reference,
    pack_bits_reference,
    penalty_terms_reference,
    scale_by_slope_bits_reference,
)

needs_kernels = pytest.mark.skipif(not _extension.has_op("leaky_relu_with_bits"),
                                   reason="vcfast._C without the slope-bit kernels (rebuild)")

try:
    import triton  # noqa: F401

    from vcfast.ops import gradient_penalty_triton as sbt
except ImportError as exc:
    sbt = None
    _TRITON_MISSING = f"triton or vcfast.ops.gradient_penalty_triton not importable: {exc}"
else:
    _TRITON_MISSING = ""

needs_triton = pytest.mark.skipif(sbt is None, reason=_TRITON_MISSING or "triton is importable")
if sbt is not None:
    INTERPRETED, needs_interpreter = interpreter_marker(sbt, "gradient_penalty")
else:
    INTERPRETED, needs_interpreter = False, needs_triton

# --- implementations -------------------------------------------------------------------------


def ops(impl: str) -> SimpleNamespace:
    """The three ops of one implementation, by the name of its ``impl`` parameter."""
    if impl == "reference":
        return SimpleNamespace(leaky_relu_with_bits=leaky_relu_with_bits_reference,
                               scale_by_slope_bits=scale_by_slope_bits_reference,
                               penalty_terms=penalty_terms_reference)
    if impl == "cpu":
        return SimpleNamespace(leaky_relu_with_bits=torch.ops.vcfast.leaky_relu_with_bits,
                               scale_by_slope_bits=torch.ops.vcfast.scale_by_slope_bits,
                               penalty_terms=torch.ops.vcfast.penalty_terms)
    assert impl == "triton", impl
    return SimpleNamespace(leaky_relu_with_bits=sbt.leaky_relu_with_bits_triton,
                           scale_by_slope_bits=sbt.scale_by_slope_bits_triton,
                           penalty_terms=sbt.penalty_terms_triton)


# Registered op names (torch.ops.vcfast.<name>) by implementation: the references have none.
OP_SUFFIX = {"cpu": "", "triton": "_triton"}

REFERENCE = pytest.param("reference", id="reference")
CPU = pytest.param("cpu", id="cpu", marks=needs_kernels)
TRITON = pytest.param("triton", id="triton", marks=[needs_triton, needs_interpreter])
IMPLS = [REFERENCE, CPU, TRITON]
OP_IMPLS = [CPU, TRITON]

# --- inputs ----------------------------------------------------------------------------------

SHAPES = [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 16, 9, 9)]
# test_kernels_match_reference's shapes: one real-size activation (2, 64, 33, 33).
KERNEL_SHAPES = [(1,), (7,), (8,), (9,), (3, 5, 7), (2, 64, 33, 33)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SLOPES = [0.0, 0.01, 0.2]

shape_ids = ["x".join(map(str, s)) for s in SHAPES]
dtype_ids = [str(d).removeprefix("torch.") for d in DTYPES]


def rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def with_kinks(z):
    """Every third element exactly 0 (and one -0.0): the kink gets the negative slope, bit 0."""
    flat = z.reshape(-1)
    flat[::3] = 0.0
    if flat.numel() > 1:
        flat[1] = -0.0
    return z


def assert_equal(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got, ref), (got - ref).abs().max()


def _penalty_tolerances(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-12, atol=1e-14)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6), dict(rtol=1e-5, atol=1e-7)
    return dict(rtol=1e-5, atol=1e-6), {}  # u: the default half tolerances


# --- shared cases: every implementation --------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_penalty_terms_match_autograd(impl):
    g = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    gp_auto = 10 * ((g.reshape(3, -1).norm(dim=1) - 1) ** 2).mean()
    (u_auto,) = torch.autograd.grad(gp_auto, g)
    gp, u = ops(impl).penalty_terms(g.detach(), 1.0, 10.0)
    torch.testing.assert_close(gp, gp_auto.detach())
    torch.testing.assert_close(u, u_auto)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2])
def test_kernels_match_reference(impl, shape, dtype, slope):
    op = ops(impl)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(shape, generator=g).to(dtype)
    z.view(-1)[0] = 0.0  # exactly on the kink: PyTorch uses the negative slope there
    out, bits = op.leaky_relu_with_bits(z, slope)
    ref_out, ref_bits = sb.leaky_relu_with_bits_reference(z, slope)
    assert torch.equal(bits, ref_bits)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.nn.functional.leaky_relu(z, slope), rtol=0, atol=0)
    x = torch.randn(shape, generator=g).to(dtype)
    torch.testing.assert_close(op.scale_by_slope_bits(x, bits, slope),
                               sb.scale_by_slope_bits_reference(x, bits, slope), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (4, 3, 17, 17), (5, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_penalty_terms_kernel(impl, shape, dtype):
    op = ops(impl)
    g = (torch.randn(shape, dtype=torch.float64) * 0.3).to(dtype)
    gp, u = op.penalty_terms(g, 1.0, 10.0)
    gp_ref, u_ref = sb.penalty_terms_reference(g, 1.0, 10.0)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(gp, gp_ref.to(gp.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(u.double(), u_ref.double(), rtol=tol,
                               atol=tol * u_ref.abs().max().item())
    zero = torch.zeros(2, 3, dtype=dtype)
    gp0, u0 = op.penalty_terms(zero, 1.0, 10.0)
    assert gp0.item() == pytest.approx(10.0) and torch.equal(u0, torch.zeros_like(zero))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
def test_leaky_relu_with_bits_matches_reference(impl, shape, dtype, slope):
    z = with_kinks(rand(shape, dtype))
    out, bits = ops(impl).leaky_relu_with_bits(z, slope)
    ref_out, ref_bits = leaky_relu_with_bits_reference(z, slope)
    assert bits.dtype == torch.uint8 and bits.shape == ((z.numel() + 7) // 8,)
    assert_equal(bits, ref_bits)
    assert_equal(out, ref_out)
    # Kinks: exactly zero in, zero out with the bit clear.
    kinks = (z.reshape(-1) == 0)
    assert kinks.any()
    positive = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:z.numel()]
    assert (positive[kinks] == 0).all()
    assert (out.reshape(-1)[kinks] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
def test_scale_by_slope_bits_matches_reference(impl, shape, dtype, slope):
    x = rand(shape, dtype, seed=1)
    mask = rand(shape, torch.float64, seed=2) > 0
    bits = pack_bits_reference(mask)
    # Padding bits of the last byte are set: they must be ignored.
    n = x.numel()
    if n % 8:
        bits[-1] |= (0xFF << (n % 8)) & 0xFF
    out = ops(impl).scale_by_slope_bits(x, bits, slope)
    assert_equal(out, scale_by_slope_bits_reference(x, bits, slope))
    assert_equal(out, torch.where(mask, x, x * slope))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("target,weight", [(1.0, 10.0), (0.5, 2.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
def test_penalty_terms_matches_reference(impl, shape, dtype, target, weight):
    g = rand(shape, dtype, seed=3)
    if shape[0] > 1:
        g[1] = 0  # a zero-norm sample: u must be 0 there, not NaN
    gp, u = ops(impl).penalty_terms(g, target, weight)
    ref_gp, ref_u = penalty_terms_reference(g, target, weight)
    loss_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert gp.shape == () and gp.dtype == loss_dtype == ref_gp.dtype
    assert u.shape == g.shape and u.dtype == dtype
    tol_gp, tol_u = _penalty_tolerances(dtype)
    torch.testing.assert_close(gp, ref_gp, **tol_gp)
    torch.testing.assert_close(u, ref_u, **tol_u)
    assert not u.isnan().any()
    if shape[0] > 1:
        assert (u[1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_penalty_terms_all_zero_and_empty_samples(impl, dtype):
    op = ops(impl)
    g = torch.zeros(3, 4, 5, dtype=dtype)
    gp, u = op.penalty_terms(g, 1.0, 10.0)
    assert gp.item() == 10.0 and (u == 0).all() and not u.isnan().any()
    g = torch.zeros(3, 0, dtype=dtype)  # zero elements per sample: norms 0
    gp, u = op.penalty_terms(g, 1.0, 10.0)
    torch.testing.assert_close(gp, penalty_terms_reference(g, 1.0, 10.0)[0])
    assert u.shape == (3, 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_several_programs_and_chunks(impl, dtype):
    # Sizes chosen for the Triton kernels' blocking; the other implementations get the same.
    op = ops(impl)
    # Elementwise: 5003 elements = 626 bytes > one program's 256 bytes, ragged tail.
    z = with_kinks(rand((5003,), dtype, seed=4))
    out, bits = op.leaky_relu_with_bits(z, 0.2)
    ref_out, ref_bits = leaky_relu_with_bits_reference(z, 0.2)
    assert_equal(bits, ref_bits)
    assert_equal(out, ref_out)
    x = rand((5003,), dtype, seed=5)
    assert_equal(op.scale_by_slope_bits(x, bits, 0.2),
                 scale_by_slope_bits_reference(x, ref_bits, 0.2))
    # Penalty: 2 samples of 40 000 elements = 3 sum-of-squares chunks (16 384) each.
    g = rand((2, 40000), dtype, seed=6) * 0.01
    gp, u = op.penalty_terms(g, 1.0, 10.0)
    ref_gp, ref_u = penalty_terms_reference(g, 1.0, 10.0)
    tol_gp, tol_u = _penalty_tolerances(dtype)
    torch.testing.assert_close(gp, ref_gp, **tol_gp)
    torch.testing.assert_close(u, ref_u, **tol_u)


@pytest.mark.parametrize("impl", IMPLS)
def test_noncontiguous_and_long_bits(impl):
    op = ops(impl)
    base = rand((6, 10), torch.float32, seed=7)
    z = base.t()  # [10, 6], not contiguous: the op works on the flattened contiguous copy
    assert not z.is_contiguous()
    out, bits = op.leaky_relu_with_bits(z, 0.01)
    ref_out, ref_bits = leaky_relu_with_bits_reference(z, 0.01)
    assert_equal(out, ref_out)
    assert_equal(bits, ref_bits)
    # bits longer than needed (e.g. a reused buffer): only the first ceil(n / 8) bytes count.
    long_bits = torch.cat([ref_bits, torch.full((5,), 0xFF, dtype=torch.uint8)])
    assert_equal(op.scale_by_slope_bits(z, long_bits, 0.01),
                 scale_by_slope_bits_reference(z.contiguous(), ref_bits, 0.01))
    # A strided bits view is accepted too.
    strided = torch.stack([ref_bits, ref_bits], 1).reshape(-1)[::2]
    assert not strided.is_contiguous()
    assert_equal(op.scale_by_slope_bits(z, strided, 0.01),
                 scale_by_slope_bits_reference(z.contiguous(), ref_bits, 0.01))


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf(impl):
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -2.0, 3.0, -0.0, 1e-30, 5.0])
    out, bits = ops(impl).leaky_relu_with_bits(z, 0.1)
    ref_out, ref_bits = leaky_relu_with_bits_reference(z, 0.1)
    assert_equal(bits, ref_bits)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_tensors(impl):
    op = ops(impl)
    z = torch.empty(0, 3)
    out, bits = op.leaky_relu_with_bits(z, 0.2)
    assert out.shape == (0, 3) and bits.shape == (0,) and bits.dtype == torch.uint8
    assert op.scale_by_slope_bits(z, bits, 0.2).shape == (0, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile(impl):
    # For the C++ and the interpreted Triton ops (opaque custom ops) this checks Dynamo + fake
    # tensors through the three ops chained as the lean penalty uses them.
    op = ops(impl)

    def f(z, g):
        a, bits = op.leaky_relu_with_bits(z, 0.2)
        back = op.scale_by_slope_bits(g, bits, 0.2)
        gp, u = op.penalty_terms(back, 1.0, 10.0)
        return a, gp, u

    z = with_kinks(rand((2, 3, 7), torch.float32, seed=10))
    g = rand((2, 3, 7), torch.float32, seed=11)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(z, g)
    ref = f(z, g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- shared cases: the registered ops (C++ and Triton) -----------------------------------------


@pytest.mark.parametrize("impl", OP_IMPLS)
def test_meta_shapes(impl):
    vc, sfx = torch.ops.vcfast, OP_SUFFIX[impl]
    z = torch.empty(3, 5, 7, dtype=torch.bfloat16, device="meta")
    out, bits = getattr(vc, "leaky_relu_with_bits" + sfx)(z, 0.2)
    assert out.shape == z.shape and out.dtype == z.dtype and bits.shape == (14,)
    assert bits.dtype == torch.uint8 and bits.device.type == "meta"
    assert getattr(vc, "scale_by_slope_bits" + sfx)(z, bits, 0.2).shape == z.shape
    gp, u = getattr(vc, "penalty_terms" + sfx)(z, 1.0, 10.0)
    assert gp.shape == () and gp.dtype == torch.float32 and u.shape == z.shape
    assert u.dtype == torch.bfloat16


# opcheck: the ops have no autograd formula (the lean penalty calls them under no_grad), so
# inputs do not require grad. Under the interpreter the Triton ops are opaque custom ops (see
# the module docstring of vcfast.ops.gradient_penalty_triton): every default check applies
# there, test_aot_dispatch_dynamic included (it traces through the registered fake kernels).
OPCHECK_CASES = [
    pytest.param("leaky_relu_with_bits", lambda d: (with_kinks(rand((3, 5, 7), d)), 0.2),
                 id="leaky_relu_with_bits"),
    pytest.param("scale_by_slope_bits",
                 lambda d: (rand((3, 5, 7), d), pack_bits_reference(rand((105,), d, 1) > 0), 0.2),
                 id="scale_by_slope_bits"),
    pytest.param("penalty_terms", lambda d: (rand((3, 5, 7), d), 1.0, 10.0),
                 id="penalty_terms"),
]


@pytest.mark.parametrize("impl", OP_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,make_args", OPCHECK_CASES)
def test_opcheck(impl, name, make_args, dtype):
    op = getattr(torch.ops.vcfast, name + OP_SUFFIX[impl])
    torch.library.opcheck(op.default, make_args(dtype))


# --- reference only ---------------------------------------------------------------------------


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


# --- C++ only ---------------------------------------------------------------------------------


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
def test_opcheck_cpu_chained():
    # opcheck of scale_by_slope_bits on the bits leaky_relu_with_bits produced.
    z = torch.randn(3, 11)
    torch.library.opcheck(torch.ops.vcfast.leaky_relu_with_bits.default, (z, 0.2))
    _, bits = torch.ops.vcfast.leaky_relu_with_bits(z, 0.2)
    torch.library.opcheck(torch.ops.vcfast.scale_by_slope_bits.default,
                          (torch.randn(3, 11), bits, 0.2))
    torch.library.opcheck(torch.ops.vcfast.penalty_terms.default, (torch.randn(4, 5), 1.0, 10.0))


# --- Triton only ------------------------------------------------------------------------------


@needs_triton
@needs_interpreter
def test_triton_matches_cpp_cpu_ops():
    if not _extension.has_op("leaky_relu_with_bits"):
        pytest.skip("vcfast._C has no slope-bit ops")
    for dtype in DTYPES:
        z = with_kinks(rand((3, 5, 7), dtype, seed=8))
        out, bits = sbt.leaky_relu_with_bits_triton(z, 0.2)
        c_out, c_bits = torch.ops.vcfast.leaky_relu_with_bits(z, 0.2)
        assert_equal(out, c_out)
        assert_equal(bits, c_bits)
        x = rand((3, 5, 7), dtype, seed=9)
        assert_equal(sbt.scale_by_slope_bits_triton(x, bits, 0.2),
                     torch.ops.vcfast.scale_by_slope_bits(x, c_bits, 0.2))
        gp, u = sbt.penalty_terms_triton(x, 1.0, 10.0)
        c_gp, c_u = torch.ops.vcfast.penalty_terms(x, 1.0, 10.0)  # float64 sums on CPU
        tol_gp, tol_u = _penalty_tolerances(dtype)
        torch.testing.assert_close(gp, c_gp, **tol_gp)
        torch.testing.assert_close(u, c_u, **tol_u)


@needs_triton
@needs_interpreter
def test_triton_bad_arguments():
    z = torch.randn(9)
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
        sbt.leaky_relu_with_bits_triton(torch.arange(9), 0.2)
    with pytest.raises(TypeError, match="must be float16"):
        sbt.scale_by_slope_bits_triton(torch.arange(9), torch.zeros(2, dtype=torch.uint8), 0.2)
    with pytest.raises(TypeError, match="bits must be uint8"):
        sbt.scale_by_slope_bits_triton(z, torch.zeros(2, dtype=torch.int32), 0.2)
    with pytest.raises(ValueError, match="bits holds 8 flags, fewer than x's 9 elements"):
        sbt.scale_by_slope_bits_triton(z, torch.zeros(1, dtype=torch.uint8), 0.2)
    with pytest.raises(TypeError, match="must be float16"):
        sbt.penalty_terms_triton(torch.ones(2, 3, dtype=torch.int64), 1.0, 10.0)
    with pytest.raises(ValueError, match=r"g must be \[N, ...\] with N >= 1"):
        sbt.penalty_terms_triton(torch.tensor(1.0), 1.0, 10.0)
    with pytest.raises(ValueError, match=r"N >= 1"):
        sbt.penalty_terms_triton(torch.zeros(0, 3), 1.0, 10.0)


_TRITON_OP_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from vcfast.ops import gradient_penalty_triton as sbt
assert sbt.USES_TRITON_OP and not sbt._kernels_interpreted()
ops = torch.ops.vcfast
with FakeTensorMode():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        z = torch.empty(3, 5, 7, dtype=dtype)
        out, bits = ops.leaky_relu_with_bits_triton(z, 0.2)
        assert out.shape == z.shape and out.dtype == dtype and bits.shape == (14,)
        assert ops.scale_by_slope_bits_triton(z, bits, 0.2).shape == z.shape
        gp, u = ops.penalty_terms_triton(z, 1.0, 10.0)
        assert gp.shape == () and u.shape == z.shape and u.dtype == dtype
        assert gp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
print("ok")
"""


@needs_triton
def test_triton_op_registration_traces_without_gpu():
    # The GPU registration (torch.library.triton_op, kernels compiled, not interpreted) is
    # traced as its own fake kernel: run that under FakeTensorMode in a fresh interpreter
    # with TRITON_INTERPRET=0 (no kernel is launched, so no GPU is needed).
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _TRITON_OP_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@needs_triton
def test_missing_triton_raises_clear_error(monkeypatch):
    pretend_triton_is_missing(monkeypatch, sbt)
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        sbt.leaky_relu_with_bits_triton(x, 0.2)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        sbt.scale_by_slope_bits_triton(x, torch.zeros(1, dtype=torch.uint8), 0.2)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        sbt.penalty_terms_triton(x, 1.0, 10.0)


@needs_triton
@pytest.mark.skipif(INTERPRETED and torch.cuda.is_available(),
                    reason="the CUDA test needs compiled kernels: run with TRITON_INTERPRET=0")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_triton_cuda_matches_reference(dtype):
    # Real sizes of the paper-size critic's largest activation and of its input gradient;
    # odd sizes for the ragged tails.
    torch.manual_seed(0)
    z = torch.randn(16, 64, 18, 128, device="cuda").to(dtype)
    z.view(-1)[::5] = 0
    for n in (z.numel(), 1_000_003, 9):
        zz = z.reshape(-1)[:n]
        out, bits = sbt.leaky_relu_with_bits_triton(zz, 0.01)
        ref_out, ref_bits = leaky_relu_with_bits_reference(zz, 0.01)
        assert_equal(bits, ref_bits)
        assert_equal(out, ref_out)
        x = torch.randn_like(zz)
        assert_equal(sbt.scale_by_slope_bits_triton(x, bits, 0.01),
                     scale_by_slope_bits_reference(x, ref_bits, 0.01))
    for shape in ((16, 1, 36, 256), (4, 300_001), (3, 5)):
        g = torch.randn(shape, device="cuda").to(dtype)
        g[1] = 0
        gp, u = sbt.penalty_terms_triton(g, 1.0, 10.0)
        ref_gp, ref_u = penalty_terms_reference(g, 1.0, 10.0)
        tol_gp, tol_u = _penalty_tolerances(dtype)
        torch.testing.assert_close(gp, ref_gp, **tol_gp)
        torch.testing.assert_close(u, ref_u, **tol_u)
        assert (u[1] == 0).all()
