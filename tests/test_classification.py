"""Masked multi-group losses (docs/ops.md#masked-multi-group-losses) on every backend:
``reference`` (plain PyTorch), ``cpu`` and ``cuda`` (the C++ kernels in vcfast._C) and
``triton`` (vcfast.ops.classification_triton, kernels/classification.py).

The shared cases call the public functions and are parametrised by ``backend`` (FUSED_HERE,
BACKENDS_HERE: the backends that run on CPU tensors here): fused vs reference, the contract's
edge cases (all masked, every target dtype, half logits, strided inputs), gradients and bad
input. Then, grouped by backend: the cpu backend only (thread count, saved tensors), the C++
ops' registration (opcheck, meta, torch.compile), CUDA tensors (``cuda``, and one real-size
Triton case in TestTritonOps), and the Triton ops called directly (``TestTritonOps``: partial
losses and per-group counts against a float64 transcription of the contract, chunked groups,
the NaN marking, their own registration).

Without a GPU the Triton kernels run in the interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before any test module imports the kernels (Triton reads it when
``@triton.jit`` decorates a kernel). On a GPU machine it leaves the variable alone, so the
kernels compile for the GPU: the CPU-tensor Triton cases then skip and the CUDA tests run.
Triton inputs are tiny: the interpreter is slow.
"""

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F
from _triton_testing import (
    assert_compiled_matches_eager,
    interpreter_marker,
    pretend_triton_is_missing,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from vcfast import _extension
from vcfast.nn.classification import MaskedMultiGroupBCE, MaskedMultiGroupSoftmaxCE
from vcfast.ops.classification import (
    REDUCTIONS,
    _pick_backend,
    masked_multigroup_bce,
    masked_multigroup_bce_reference,
    masked_multigroup_softmax_ce,
    masked_multigroup_softmax_ce_reference,
)

try:
    import triton  # noqa: F401  (the Triton ops below need the package itself)

    from vcfast.ops import classification_triton as ct
except ImportError:
    ct = None

needs_extension = pytest.mark.skipif(
    not _extension.EXTENSION_LOADED,
    reason="vcfast._C is not built (pip install --no-build-isolation -e .)",
)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.extension_has_cuda()),
    reason="needs a CUDA GPU and vcfast._C built with CUDA",
)
needs_triton = pytest.mark.skipif(
    ct is None, reason="needs the triton package and vcfast.ops.classification_triton"
)
if ct is not None:
    INTERPRETED, needs_interpreter = interpreter_marker(ct, "classification")
else:
    INTERPRETED, needs_interpreter = False, needs_triton

# exp(-|x|) underflows for the extreme logits; numpy warns about it in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

# The backends that run on CPU tensors here: the Triton kernels only under the interpreter.
FUSED_HERE = [
    pytest.param("cpu", marks=needs_extension),
    pytest.param("triton", marks=needs_interpreter),
]
BACKENDS_HERE = ["reference"] + FUSED_HERE
# Where the Triton ops differ (extreme-logit tolerances, raw-op argument forms) or the
# interpreter is too slow (gradcheck): their own versions are in TestTritonOps. Error messages
# are one wording for every backend (vcfast/ops/_classification_common.py).
REFERENCE_AND_CPU = ["reference", pytest.param("cpu", marks=needs_extension)]

STARGAN = (1421, 53, 2)
REDUCTION_NAMES = tuple(REDUCTIONS)
TARGET_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64,
                 torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOSSES = {
    "bce": (masked_multigroup_bce, masked_multigroup_bce_reference),
    "softmax": (masked_multigroup_softmax_ce, masked_multigroup_softmax_ce_reference),
}


def make_targets(n, sizes, *, one_hot, p_unknown=0.2, p_masked_entry=0.1, seed=0,
                 dtype=torch.float32):
    """[n, C] targets: per (sample, group) unknown (all -1) with probability p_unknown; known
    groups are one-hot (one_hot=True) or random 0/1 with some -1 entries (sigmoid CE)."""
    g = torch.Generator().manual_seed(seed)
    columns = []
    for size in sizes:
        if one_hot:
            t = torch.zeros(n, size)
            t[torch.arange(n), torch.randint(0, size, (n,), generator=g)] = 1
        else:
            t = (torch.rand(n, size, generator=g) < 0.3).float()
            t[torch.rand(n, size, generator=g) < p_masked_entry] = -1
        t[torch.rand(n, generator=g) < p_unknown] = -1
        columns.append(t)
    return torch.cat(columns, 1).to(dtype)


def make_logits(n, c, *, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed + 1000)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)


def loss_and_grad(fn, logits, targets, sizes, reduction, weight_seed=0, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, sizes, reduction, **kwargs)
    if loss.dim() == 0:
        weight = torch.tensor(1.7, dtype=loss.dtype)
    else:
        g = torch.Generator().manual_seed(weight_seed)
        weight = torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)
    (grad,) = torch.autograd.grad((loss * weight).sum(), x)
    return loss.detach(), grad


def assert_matches_reference(
    name, logits, targets, sizes, reduction, backend="cpu", tol=None, **kw
):
    fused, reference = LOSSES[name]
    fused_fn = lambda x, t, s, r, **k: fused(x, t, s, r, backend=backend, **k)  # noqa: E731
    ref_fn = lambda x, t, s, r, **k: reference(x, t, s, r, **k)  # noqa: E731
    loss, grad = loss_and_grad(fused_fn, logits, targets, sizes, reduction, **kw)
    loss_ref, grad_ref = loss_and_grad(ref_fn, logits, targets, sizes, reduction, **kw)
    if tol is None:
        tol = 1e-10 if logits.dtype == torch.float64 else 2e-5
    assert loss.dtype == loss_ref.dtype and loss.shape == loss_ref.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss, loss_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, grad_ref, atol=tol, rtol=tol)
    return loss, grad


def test_extension_registers_the_losses():
    if _extension.EXTENSION_LOADED:
        for name in ("masked_multigroup_bce", "masked_multigroup_bce_backward",
                     "masked_multigroup_softmax_ce", "masked_multigroup_softmax_ce_backward"):
            assert hasattr(torch.ops.vcfast, name)


# --------------------------------------------------------------------------- reference


def test_reference_bce_equals_the_user_formulation():
    """The reference is the masked F.binary_cross_entropy_with_logits a user would write."""
    logits = make_logits(5, 30)
    targets = make_targets(5, (20, 7, 3), one_hot=False)
    mask = targets != -1
    per_entry = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).double(),
                                                   reduction="none") * mask
    expected_mean = per_entry.sum() / mask.sum()
    got = masked_multigroup_bce_reference(logits, targets, (20, 7, 3))
    torch.testing.assert_close(got, expected_mean)
    per_group = torch.stack([p.sum(1) for p in per_entry.split((20, 7, 3), 1)], 1)
    torch.testing.assert_close(
        masked_multigroup_bce_reference(logits, targets, (20, 7, 3), "none"), per_group
    )
    counts = torch.stack([m.sum() for m in mask.split((20, 7, 3), 1)]).double()
    torch.testing.assert_close(
        masked_multigroup_bce_reference(logits, targets, (20, 7, 3), "group_mean"),
        (per_group.sum(0) / counts).mean(),
    )


def test_reference_softmax_equals_cross_entropy_per_group():
    sizes = (6, 3, 2)
    logits = make_logits(7, 11)
    targets = make_targets(7, sizes, one_hot=True, p_unknown=0.3, seed=3)
    total, count = 0.0, 0
    for x, t in zip(logits.split(sizes, 1), targets.split(sizes, 1)):
        known = (t != -1).all(1)
        if known.any():
            total = total + F.cross_entropy(x[known], t[known].argmax(1), reduction="sum")
            count += int(known.sum())
    torch.testing.assert_close(
        masked_multigroup_softmax_ce_reference(logits, targets, sizes), total / count
    )


# ------------------------------------------------ shared cases: fused vs reference, every backend


@needs_extension
@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    reduction=st.sampled_from(REDUCTION_NAMES),
    target_dtype=st.sampled_from(TARGET_DTYPES),
    use_pos_weight=st.booleans(),
    p_unknown=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_bce_cpu_matches_reference_hypothesis(n, sizes, reduction, target_dtype, use_pos_weight,
                                              p_unknown, seed):
    c = sum(sizes)
    logits = make_logits(n, c, seed=seed)
    targets = make_targets(
        n, sizes, one_hot=False, p_unknown=p_unknown, seed=seed, dtype=target_dtype
    )
    pos_weight = (torch.rand(c, dtype=torch.float64) * 3) if use_pos_weight else None
    assert_matches_reference("bce", logits, targets, sizes, reduction, pos_weight=pos_weight)


@needs_extension
@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 6),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    reduction=st.sampled_from(REDUCTION_NAMES),
    target_dtype=st.sampled_from(TARGET_DTYPES),
    p_unknown=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
    logits_dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_softmax_cpu_matches_reference_hypothesis(n, sizes, reduction, target_dtype, p_unknown,
                                                  seed, logits_dtype):
    c = sum(sizes)
    logits = make_logits(n, c, seed=seed, dtype=logits_dtype)
    targets = make_targets(
        n, sizes, one_hot=True, p_unknown=p_unknown, seed=seed, dtype=target_dtype
    )
    assert_matches_reference("softmax", logits, targets, sizes, reduction)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", REDUCTION_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stargan_sizes_match_reference(name, reduction, dtype):
    n = 37
    logits = make_logits(n, sum(STARGAN), dtype=dtype)
    targets = make_targets(n, STARGAN, one_hot=name == "softmax", seed=5)
    loss, _ = assert_matches_reference(name, logits, targets, STARGAN, reduction)
    if reduction == "none":
        assert loss.shape == (n, 3)


@needs_extension
@pytest.mark.parametrize("backend", FUSED_HERE)
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("sizes", [(1,), (7,), (3, 1, 5), (1, 1, 1, 1), (257, 3)], ids=str)
@pytest.mark.parametrize("n", [1, 3])
def test_odd_sizes_and_single_sample(backend, name, sizes, n):
    logits = make_logits(n, sum(sizes), seed=n)
    targets = make_targets(n, sizes, one_hot=name == "softmax", p_unknown=0.3, seed=sum(sizes))
    for reduction in REDUCTION_NAMES:
        assert_matches_reference(name, logits, targets, sizes, reduction, backend)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_everything_masked_gives_zero_loss_and_zero_grad(name, backend):
    fused = LOSSES[name][0]
    sizes = (5, 3, 2)
    logits = make_logits(4, 10).float()
    targets = make_targets(4, sizes, one_hot=name == "softmax", p_unknown=0.0)
    targets[1] = -1  # a whole sample unknown
    targets[:, 5:8] = -1  # a whole group unknown for every sample
    all_masked = torch.full_like(targets, -1)
    for t in (targets, all_masked):
        for reduction in REDUCTION_NAMES:
            x = logits.clone().requires_grad_()
            loss = fused(x, t, sizes, reduction, backend=backend)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert (grad[1] == 0).all() and (grad[:, 5:8] == 0).all()
            if reduction == "none":
                assert (loss[1] == 0).all() and (loss[:, 1] == 0).all()
            if t is all_masked:
                assert float(loss.detach().sum()) == 0.0 and (grad == 0).all()
    # an empty batch
    empty = torch.zeros(0, 10, requires_grad=True)
    loss = fused(empty, torch.zeros(0, 10), sizes, "mean", backend=backend)
    assert float(loss.detach()) == 0.0
    assert fused(empty, torch.zeros(0, 10), sizes, "none", backend=backend).shape == (0, 3)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_are_finite_and_match_reference(name, dtype):
    sizes = (6, 4, 2)
    logits = torch.tensor([[1e4, -1e4, 0.0, 30.0, -30.0, 1e4, -1e4, 1e4, 0.5, -0.5, -1e4, 1e4]] * 3,
                          dtype=dtype)
    if name == "softmax":
        targets = torch.tensor([[0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1],
                                [1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
                                [-1, -1, -1, -1, -1, -1, 0, 0, 1, 0, -1, -1]], dtype=torch.float32)
    else:
        targets = torch.tensor([[0, 1, 0, 1, 0, 1, 1, 0, -1, 0, 0, 1],
                                [1, 0, 1, 0, 1, 0, 0, 1, 1, -1, 1, 0],
                                [-1, -1, 0, 1, 0, 1, -1, 1, 0, 1, -1, -1]], dtype=torch.float32)
    fused, reference = LOSSES[name]
    for reduction in REDUCTION_NAMES:
        loss, grad = loss_and_grad(lambda *a: fused(*a, backend="cpu"), logits, targets, sizes,
                                   reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert loss.abs().max() > 1e3  # the confidently wrong entries cost ~1e4
        # Against the float64 reference: in float32 the reference itself is off by ~1e-4 in
        # the softmax gradient here (logsumexp of 1e4 rounds to a 1e-3 grid), the kernel is not.
        loss_ref, grad_ref = loss_and_grad(reference, logits.double(), targets, sizes, reduction)
        torch.testing.assert_close(loss.double(), loss_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad.double(), grad_ref, atol=1e-6, rtol=1e-6)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("backend", FUSED_HERE)
def test_every_target_dtype_gives_the_same_result(name, target_dtype, backend):
    sizes = (13, 5, 2)
    logits = make_logits(6, 20, dtype=torch.float32)
    targets = make_targets(6, sizes, one_hot=name == "softmax", seed=2)
    fused = LOSSES[name][0]
    expected = fused(logits, targets, sizes, "none", backend=backend)
    got = fused(logits, targets.to(target_dtype), sizes, "none", backend=backend)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert_matches_reference(name, logits, targets.to(target_dtype), sizes, "mean", backend)


@needs_extension
@pytest.mark.parametrize("reduction", REDUCTION_NAMES)
@pytest.mark.parametrize("backend", FUSED_HERE)
def test_bce_pos_weight(reduction, backend):
    sizes = (9, 4, 2)
    logits = make_logits(5, 15)
    targets = make_targets(5, sizes, one_hot=False, seed=4)
    pos_weight = torch.linspace(0.2, 4.0, 15, dtype=torch.float64)
    assert_matches_reference(
        "bce", logits, targets, sizes, reduction, backend, pos_weight=pos_weight
    )
    # a float32 pos_weight with float64 logits is converted, not rejected
    assert_matches_reference(
        "bce", logits, targets, sizes, reduction, backend, pos_weight=pos_weight.float(),
        tol=1e-6,
    )
    plain = masked_multigroup_bce(logits, targets, sizes, reduction, backend=backend)
    ones = masked_multigroup_bce(
        logits, targets, sizes, reduction, pos_weight=torch.ones(15).double(), backend=backend
    )
    torch.testing.assert_close(plain, ones)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", REDUCTION_NAMES)
@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
def test_gradcheck_float64(name, reduction, backend):
    sizes = (4, 3, 1)
    logits = make_logits(3, 8, seed=9).requires_grad_()
    targets = make_targets(3, sizes, one_hot=name == "softmax", p_unknown=0.3, seed=9)
    fused = LOSSES[name][0]
    kwargs = (
        {"pos_weight": torch.linspace(0.5, 2.0, 8, dtype=torch.float64)} if name == "bce" else {}
    )
    assert torch.autograd.gradcheck(
        lambda x: fused(x, targets, sizes, reduction, backend=backend, **kwargs), (logits,)
    )


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED_HERE)
def test_half_logits_are_computed_in_float32(name, dtype, backend):
    sizes = STARGAN
    logits = make_logits(8, sum(sizes), dtype=dtype)
    targets = make_targets(8, sizes, one_hot=name == "softmax", seed=6)
    fused, reference = LOSSES[name]
    for reduction in REDUCTION_NAMES:
        x = logits.clone().requires_grad_()
        loss = fused(x, targets, sizes, reduction, backend=backend)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert grad.dtype == dtype
        x32 = logits.float().requires_grad_()  # the rounded logits, in fp32
        loss_ref = reference(x32, targets, sizes, reduction)
        (grad_ref,) = torch.autograd.grad(loss_ref.sum(), x32)
        torch.testing.assert_close(loss, loss_ref, atol=2e-5, rtol=2e-5)
        # the gradient is rounded to the logits' dtype once
        torch.testing.assert_close(grad.float(), grad_ref, atol=1e-6,
                                   rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("backend", FUSED_HERE)
def test_non_contiguous_inputs(name, backend):
    sizes = (11, 4, 2)
    base_logits = make_logits(17, 6)
    logits = base_logits.t()  # [6, 17], transposed view
    targets = make_targets(6, sizes, one_hot=name == "softmax", seed=8)
    wide = torch.zeros(6, 34)
    wide[:, ::2] = targets
    strided_targets = wide[:, ::2]
    assert not logits.is_contiguous() and not strided_targets.is_contiguous()
    for reduction in REDUCTION_NAMES:
        assert_matches_reference(name, logits, strided_targets, sizes, reduction, backend)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("backend", FUSED_HERE)
def test_backward_accepts_any_gradient_layout(name, backend):
    sizes = (5, 3)
    logits = make_logits(4, 8).requires_grad_()
    targets = make_targets(4, sizes, one_hot=name == "softmax", seed=1)
    fused, reference = LOSSES[name]
    weight_t = torch.randn(2, 4, dtype=torch.float64)
    for reduce in (lambda y: y.sum(), lambda y: (y.t() * weight_t).sum(), lambda y: y[::2].sum()):
        (g,) = torch.autograd.grad(
            reduce(fused(logits, targets, sizes, "none", backend=backend)), logits
        )
        (g_ref,) = torch.autograd.grad(reduce(reference(logits, targets, sizes, "none")), logits)
        torch.testing.assert_close(g, g_ref)


# --------------------------------------------------------------------------- cpu backend only


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_result_does_not_depend_on_thread_count(name):
    sizes = STARGAN
    logits = make_logits(300, sum(sizes), dtype=torch.float32)
    targets = make_targets(300, sizes, one_hot=name == "softmax", seed=11)
    fused = LOSSES[name][0]
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x = logits.clone().requires_grad_()
            loss = fused(x, targets, sizes, "mean", backend="cpu")
            results.append((loss, torch.autograd.grad(loss, x)[0]))
    finally:
        torch.set_num_threads(previous)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@needs_extension
def test_backward_saves_only_inputs_and_counts():
    sizes = STARGAN
    logits = make_logits(64, sum(sizes), dtype=torch.float32).requires_grad_()
    targets = make_targets(64, sizes, one_hot=False)
    for loss in (masked_multigroup_bce(logits, targets, sizes, backend="cpu"),
                 masked_multigroup_softmax_ce(logits, make_targets(64, sizes, one_hot=True), sizes,
                                              backend="cpu")):
        saved = []
        stack = [loss.grad_fn]
        while stack:  # the custom op's node may sit behind a getitem/view node
            node = stack.pop()
            if node is None:
                continue
            for attr in dir(node):
                if attr.startswith("_saved_") or attr == "saved_tensors":
                    value = getattr(node, attr, None)
                    values = value if isinstance(value, tuple) else (value,)
                    saved += [v for v in values if isinstance(v, torch.Tensor)]
            stack += [f for f, _ in node.next_functions]
        big = [t for t in saved if t.numel() >= logits.numel()]
        assert all(t.numel() <= logits.numel() for t in saved)
        assert len(big) <= 2  # logits and targets themselves, nothing derived from them


# --------------------------------------------------------------------------- registration


def _op_args(name, dtype=torch.float32, reduction=2, requires_grad=False):
    sizes = [5, 3, 2]
    logits = make_logits(4, 10, dtype=dtype).requires_grad_(requires_grad)
    targets = make_targets(4, sizes, one_hot=name == "softmax", seed=3)
    if name == "bce":
        return (logits, targets, sizes, torch.linspace(0.5, 2, 10, dtype=dtype), reduction)
    return (logits, targets, sizes, reduction)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_opcheck(name):
    op = getattr(torch.ops.vcfast, f"masked_multigroup_{'bce' if name == 'bce' else 'softmax_ce'}")
    backward = getattr(torch.ops.vcfast, op._qualified_op_name.split("::")[1] + "_backward")
    for dtype in (torch.float32, torch.float64):
        for reduction in (0, 2, 3):
            for requires_grad in (False, True):
                args = _op_args(name, dtype, reduction, requires_grad)
                torch.library.opcheck(op.default, args)
            args = _op_args(name, dtype, reduction)
            loss, counts = op(*args)
            grad = torch.ones_like(loss)
            torch.library.opcheck(backward.default, (grad,) + args + (counts,))


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_meta_tensors_give_shapes(name):
    fused = LOSSES[name][0]
    logits = torch.empty(4096, 1476, device="meta")
    targets = torch.empty(4096, 1476, dtype=torch.int8, device="meta")
    assert fused(logits, targets, STARGAN).shape == ()
    out = fused(logits.double(), targets, STARGAN, "none")
    assert out.device.type == "meta" and out.shape == (4096, 3) and out.dtype == torch.float64


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_torch_compile_module_fullgraph(name):
    torch._dynamo.reset()
    sizes = (9, 4, 2)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 15)
            self.loss = (
                MaskedMultiGroupBCE(sizes) if name == "bce" else MaskedMultiGroupSoftmaxCE(sizes)
            )

        def forward(self, features, targets):
            return self.loss(self.linear(features), targets)

    model = Head()
    compiled = torch.compile(model, fullgraph=True)
    features = torch.randn(6, 8)
    targets = make_targets(6, sizes, one_hot=name == "softmax", seed=2)
    loss = compiled(features, targets)
    torch.testing.assert_close(loss, model(features, targets))
    (g_compiled,) = torch.autograd.grad(loss, model.linear.weight)
    (g_eager,) = torch.autograd.grad(model(features, targets), model.linear.weight)
    torch.testing.assert_close(g_compiled, g_eager)


def test_module_wrappers():
    sizes = (5, 3, 2)
    pos_weight = torch.linspace(0.5, 2, 10)
    bce = MaskedMultiGroupBCE(list(sizes), reduction="sum", pos_weight=pos_weight)
    assert set(bce.state_dict()) == {"pos_weight"} and bce.groups == sizes
    assert "groups=(5, 3, 2)" in repr(bce)
    logits = make_logits(3, 10, dtype=torch.float32)
    targets = make_targets(3, sizes, one_hot=False)
    torch.testing.assert_close(bce(logits, targets), masked_multigroup_bce_reference(
        logits, targets, sizes, "sum", pos_weight))
    softmax = MaskedMultiGroupSoftmaxCE(sizes)
    one_hot = make_targets(3, sizes, one_hot=True)
    torch.testing.assert_close(softmax(logits, one_hot),
                               masked_multigroup_softmax_ce_reference(logits, one_hot, sizes))
    with pytest.raises(ValueError, match="reduction"):
        MaskedMultiGroupBCE(sizes, reduction="avg")
    with pytest.raises(ValueError, match="pos_weight"):
        MaskedMultiGroupBCE(sizes, pos_weight=torch.ones(3))
    with pytest.raises(ValueError, match="group size"):
        MaskedMultiGroupSoftmaxCE((3, 0))


def test_groups_accept_a_label_space_like_object():
    class LabelSpace:
        sizes = (5, 3, 2)

    logits = make_logits(3, 10)
    targets = make_targets(3, LabelSpace.sizes, one_hot=True)
    expected = masked_multigroup_softmax_ce(logits, targets, [5, 3, 2])
    torch.testing.assert_close(
        masked_multigroup_softmax_ce(logits, targets, LabelSpace()), expected
    )
    assert MaskedMultiGroupSoftmaxCE(LabelSpace()).groups == (5, 3, 2)


def test_default_backend_and_device_mismatch(monkeypatch):
    assert _pick_backend("op", None, torch.device("cpu")) == (
        "cpu" if _extension.EXTENSION_LOADED else "reference"
    )
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on a CPU tensor"):
        masked_multigroup_bce(torch.zeros(2, 3), torch.zeros(2, 3), [3], backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        masked_multigroup_bce(torch.zeros(2, 3), torch.zeros(2, 3), [3], backend="gpu")
    with pytest.raises(ValueError, match="backend 'cpu' cannot run on a CUDA tensor"):
        _pick_backend("op", "cpu", torch.device("cuda"))
    # CUDA tensors: the C++ kernels first (faster on the H200), Triton without them.
    expected_on_cuda = ("cuda" if _extension.extension_has_cuda()
                        else "triton" if _extension.triton_available() else "reference")
    assert _pick_backend("op", None, torch.device("cuda")) == expected_on_cuda
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        masked_multigroup_softmax_ce(torch.zeros(2, 3), torch.zeros(2, 3), [3], backend="triton")


# ----------------------------------------------------------- shared cases: bad input, every backend


@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
@pytest.mark.parametrize("bad_value", [2.0, -2.0, 0.5, math.nan, math.inf])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_target_values_outside_the_label_set_raise(backend, bad_value, name):
    sizes = (5, 3, 2)
    targets = make_targets(4, sizes, one_hot=name == "softmax", p_unknown=0.0)
    targets[2, 6] = bad_value
    fused = LOSSES[name][0]
    if name == "softmax":
        match = r"sample 2, group 1 \(columns 5\.\.7\) holds a value outside \{-1, 0, 1\}"
        match += r" \(found 2 at column 6\)" if bad_value == 2.0 else ""
    else:
        match = r"must hold only -1 \(unknown\), 0 or 1; found "
        match += "2 at sample 2, column 6" if bad_value == 2.0 else ""
    with pytest.raises(ValueError, match=match):
        fused(make_logits(4, 10), targets, sizes, backend=backend)


@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float64])
def test_integer_and_double_targets_are_validated_exactly(backend, dtype):
    sizes = (5, 5)
    targets = make_targets(3, sizes, one_hot=False, p_unknown=0.0).to(dtype)
    targets[1, 7] = 2 if not dtype.is_floating_point else 1.0000000001
    with pytest.raises(ValueError, match="sample 1, column 7"):
        masked_multigroup_bce(make_logits(3, 10), targets, sizes, backend=backend)


@pytest.mark.parametrize("backend", REFERENCE_AND_CPU)
@pytest.mark.parametrize("row, reason", [
    ([0, 1, 1, 0, 0], "two or more positives"),
    ([0, 0, 0, 0, 0], "no positive"),
    ([-1, 1, 0, 0, 0], "mixes -1 with 0/1"),
    ([-1, -1, 0, -1, -1], "mixes -1 with 0/1"),
    ([0, 3, 0, 0, 0], r"outside \{-1, 0, 1\}"),
])
def test_softmax_groups_must_be_one_hot_or_unknown(backend, row, reason):
    sizes = (3, 5, 2)
    targets = make_targets(4, sizes, one_hot=True, p_unknown=0.0)
    targets[2, 3:8] = torch.tensor(row, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"sample 2, group 1 \(columns 3\.\.7\) .*{reason}"):
        masked_multigroup_softmax_ce(make_logits(4, 10), targets, sizes, backend=backend)
    # an unknown group (all -1) is fine
    targets[2, 3:8] = -1
    masked_multigroup_softmax_ce(make_logits(4, 10), targets, sizes, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_arguments_raise_clear_errors(backend, name):
    fused = LOSSES[name][0]
    logits, targets = make_logits(2, 10), make_targets(2, (5, 5), one_hot=True)
    with pytest.raises(ValueError, match=r"`groups` \[4, 5\] sum to 9, but `logits` have C=10"):
        fused(logits, targets, [4, 5], backend=backend)
    with pytest.raises(ValueError, match="at least one group"):
        fused(logits, targets, [], backend=backend)
    with pytest.raises(ValueError, match="group size must be >= 1"):
        fused(logits, targets, [10, 0], backend=backend)
    with pytest.raises(TypeError, match="`groups` must"):
        fused(logits, targets, 10, backend=backend)
    with pytest.raises(ValueError, match="`targets` shape"):
        fused(logits, targets[:, :9], [5, 5], backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        fused(logits[0], targets[0], [5, 5], backend=backend)
    with pytest.raises(TypeError, match="`logits` must be a floating tensor"):
        fused(logits.long(), targets, [5, 5], backend=backend)
    for bad_dtype in (torch.uint8, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="`targets` must be"):
            fused(logits, targets.abs().to(bad_dtype), [5, 5], backend=backend)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused(logits, targets, [5, 5], "avg", backend=backend)
    if name == "bce":
        with pytest.raises(ValueError, match=r"`pos_weight` must have shape \[C\]=\[10\]"):
            fused(logits, targets, [5, 5], pos_weight=torch.ones(9), backend=backend)
    with pytest.raises(ValueError, match="on meta but `logits` on cpu"):
        fused(logits, targets.to("meta"), [5, 5], backend=backend)


@needs_extension
def test_registered_ops_reject_bad_arguments_without_crashing():
    op = torch.ops.vcfast.masked_multigroup_bce
    logits, targets = make_logits(2, 10), make_targets(2, (5, 5), one_hot=False)
    with pytest.raises(ValueError, match="sum to 9"):
        op(logits, targets, [4, 5], None, 2)
    with pytest.raises(ValueError, match="reduction code"):
        op(logits, targets, [5, 5], None, 7)
    with pytest.raises(TypeError, match="`targets` must be"):
        op(logits, targets.to(torch.uint8), [5, 5], None, 2)
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.vcfast.masked_multigroup_bce_backward(torch.zeros(3, 3), logits, targets, [5, 5],
                                                        None, 0, torch.ones(2))
    with pytest.raises(ValueError, match="group_counts must have shape"):
        torch.ops.vcfast.masked_multigroup_softmax_ce_backward(torch.tensor(1.0), logits, targets,
                                                               [5, 5], 2, torch.ones(3))


# ------------------------------------- the triton backend through the public functions; cuda


@pytest.mark.skipif(importlib.util.find_spec("vcfast.ops.classification_triton") is None
                    or not _extension.triton_available(),
                    reason="the Triton classification kernels are not installed")
@needs_interpreter  # on a GPU machine the kernels are compiled, not interpreted
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_triton_backend_under_the_interpreter(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sizes = (9, 4, 2)
    logits = make_logits(3, 15, dtype=torch.float32)
    targets = make_targets(3, sizes, one_hot=name == "softmax", seed=1)
    for reduction in REDUCTION_NAMES:
        assert_matches_reference(
            name, logits, targets, sizes, reduction, backend="triton", tol=1e-5
        )


@needs_cuda
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("target_dtype", [torch.int8, torch.float32])
def test_cuda_kernel_matches_reference(name, dtype, target_dtype):
    sizes = STARGAN
    logits = make_logits(33, sum(sizes), dtype=dtype).cuda()
    targets = make_targets(33, sizes, one_hot=name == "softmax", seed=7, dtype=target_dtype).cuda()
    fused, reference = LOSSES[name]
    for reduction in REDUCTION_NAMES:
        x = logits.clone().requires_grad_()
        loss = fused(x, targets, sizes, reduction, backend="cuda")
        (grad,) = torch.autograd.grad(loss.sum(), x)
        xr = logits.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        loss_ref = reference(xr, targets, sizes, reduction)
        (grad_ref,) = torch.autograd.grad(loss_ref.sum(), xr)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(loss, loss_ref, atol=tol, rtol=tol)
        torch.testing.assert_close(grad.to(grad_ref.dtype), grad_ref, atol=tol,
                                   rtol=2 ** -7 if dtype == torch.bfloat16 else tol)


@needs_cuda
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cuda_kernel_edge_cases(name):
    fused = LOSSES[name][0]
    sizes = (5, 3, 2)
    all_masked = torch.full((4, 10), -1.0, device="cuda")
    x = torch.randn(4, 10, device="cuda", requires_grad=True)
    loss = fused(x, all_masked, sizes, backend="cuda")
    (grad,) = torch.autograd.grad(loss, x)
    assert float(loss) == 0.0 and (grad == 0).all()
    bad = make_targets(4, sizes, one_hot=True, p_unknown=0.0).cuda()
    bad[2, 6] = 2
    with pytest.raises(ValueError, match="sample 2"):
        fused(x, bad, sizes, backend="cuda")
    assert fused(x[:0], all_masked[:0], sizes, "none", backend="cuda").shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# Triton ops: a float64 transcription of the contract (differentiable in x) and tiny inputs

NONE, SUM, MEAN, GROUP_MEAN = 0, 1, 2, 3  # the reduction codes the Triton ops take
REDUCTION_CODES = [NONE, SUM, MEAN, GROUP_MEAN]


def _ranges(groups):
    lo = 0
    for size in groups:
        yield lo, lo + size
        lo += size


def ref_bce_partials(x, t, groups, pos_weight=None):
    x = x.double()
    t = t.double()
    valid = t != -1
    tt = torch.where(valid, t, torch.zeros_like(t))
    pw = torch.ones(x.shape[1], dtype=torch.float64) if pos_weight is None else pos_weight.double()
    c = 1 + (pw - 1) * tt
    # softplus(-x) = log(1 + exp(-x)) = log1p(exp(-|x|)) + max(-x, 0), gradient -sigmoid(-x).
    loss_terms = (1 - tt) * x + c * torch.logaddexp(torch.zeros_like(x), -x)
    loss_terms = torch.where(valid, loss_terms, torch.zeros_like(loss_terms))
    s = torch.stack([loss_terms[:, a:b].sum(1) for a, b in _ranges(groups)], 1)
    k = torch.stack([valid[:, a:b].sum(1) for a, b in _ranges(groups)], 1)
    return s, k


def ref_softmax_partials(x, t, groups):
    x = x.double()
    t = t.double()
    s_cols, k_cols = [], []
    for a, b in _ranges(groups):
        xg, tg = x[:, a:b], t[:, a:b]
        unknown = (tg == -1).all(1)
        sg = torch.logsumexp(xg, 1) - (xg * (tg == 1)).sum(1)
        s_cols.append(torch.where(unknown, torch.zeros_like(sg), sg))
        k_cols.append((~unknown).long())
    return torch.stack(s_cols, 1), torch.stack(k_cols, 1)


def ref_reduce(s, k, reduction):
    counts = k.sum(0)
    if reduction == NONE:
        return s, counts
    if reduction == SUM:
        return s.sum(), counts
    if reduction == MEAN:
        total = int(counts.sum())
        return (s.sum() / total if total else s.sum() * 0), counts
    present = [g for g in range(s.shape[1]) if counts[g] > 0]
    if not present:
        return s.sum() * 0, counts
    return sum(s[:, g].sum() / int(counts[g]) for g in present) / len(present), counts


def ref_bce(x, t, groups, pos_weight, reduction):
    return ref_reduce(*ref_bce_partials(x, t, groups, pos_weight), reduction)


def ref_softmax(x, t, groups, reduction):
    return ref_reduce(*ref_softmax_partials(x, t, groups), reduction)


# ---------------------------------------------------------------------------------------------
# Inputs


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def raw_logits(n, c, dtype=torch.float64, seed=0, scale=2.0):
    return (scale * torch.randn(n, c, generator=gen(seed), dtype=torch.float64)).to(dtype)


def bce_targets(n, c, dtype=torch.int64, seed=1, p_unknown=0.3):
    g = gen(seed)
    t = torch.randint(0, 2, (n, c), generator=g)
    t[torch.rand(n, c, generator=g) < p_unknown] = -1
    return t.to(dtype)


def onehot_targets(n, groups, dtype=torch.int64, seed=2, unknown=()):
    """One-hot per (sample, group); the (n, g) pairs in ``unknown`` are all -1."""
    g = gen(seed)
    cols = []
    for gi, size in enumerate(groups):
        block = torch.zeros(n, size, dtype=torch.int64)
        block[torch.arange(n), torch.randint(0, size, (n,), generator=g)] = 1
        for (ni, gj) in unknown:
            if gj == gi:
                block[ni] = -1
        cols.append(block)
    return torch.cat(cols, 1).to(dtype)


def raw_pos_weight(c, dtype=torch.float64, seed=4):
    return (0.25 + 3 * torch.rand(c, generator=gen(seed), dtype=torch.float64)).to(dtype)


GROUPS = (5, 1, 3, 2)  # C = 11, odd, and a group of size 1


def upstream_grad(reduction, n, n_groups, dtype, seed=7):
    shape = (n, n_groups) if reduction == NONE else ()
    return torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def assert_grads(fn_triton, fn_ref, x, reduction, n_groups, atol, rtol):
    """Compare d(loss * g)/dx of the Triton op with the reference's autograd gradient."""
    xt = x.clone().requires_grad_()
    xr = x.detach().double().requires_grad_()
    lt, _ = fn_triton(xt)
    lr, _ = fn_ref(xr)
    g = upstream_grad(reduction, x.shape[0], n_groups, lt.dtype)
    (lt * g).sum().backward()
    (lr * g.double()).sum().backward()
    assert xt.grad.dtype == x.dtype and xt.grad.shape == x.shape
    torch.testing.assert_close(xt.grad.double(), xr.grad, atol=atol, rtol=rtol)
    return xt.grad


SM_UNKNOWN = ((0, 1), (2, 0), (1, 3))  # (sample, group) pairs that are all -1

def _bce_args(reduction=MEAN, requires_grad=False, dtype=torch.float64):
    x = raw_logits(3, 11, dtype).requires_grad_(requires_grad)
    return (x, bce_targets(3, 11, dtype=torch.int8), list(GROUPS), raw_pos_weight(11), reduction)


def _sce_args(reduction=MEAN, requires_grad=False, dtype=torch.float64):
    x = raw_logits(3, 11, dtype).requires_grad_(requires_grad)
    return (x, onehot_targets(3, GROUPS, unknown=((0, 1),)), list(GROUPS), reduction)


@needs_triton
class TestTritonOps:
    """The Triton ops called directly (vcfast.ops.classification_triton): the partial losses
    and per-group counts against the float64 contract reference above (ref_bce, ref_softmax)."""

    # ---------------------------------------------------------------------------------------------
    # BCE

    @needs_interpreter
    @pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
    @pytest.mark.parametrize("with_pw", [False, True], ids=["no_pw", "pw"])
    def test_bce_forward_all_reductions(self, dtype, atol, with_pw):
        x = raw_logits(4, 11, dtype)
        t = bce_targets(4, 11)
        pw = raw_pos_weight(11, dtype) if with_pw else None
        for reduction in REDUCTION_CODES:
            loss, counts = ct.masked_multigroup_bce_triton(x, t, GROUPS, pw, reduction)
            ref, ref_counts = ref_bce(x, t, GROUPS, pw, reduction)
            assert loss.dtype == dtype and loss.shape == ref.shape
            assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
            torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=atol)

    @needs_interpreter
    @pytest.mark.parametrize("reduction", REDUCTION_CODES)
    @pytest.mark.parametrize("with_pw", [False, True], ids=["no_pw", "pw"])
    def test_bce_gradient_matches_reference_fp64(self, reduction, with_pw):
        x = raw_logits(3, 11)
        t = bce_targets(3, 11, seed=5)
        pw = raw_pos_weight(11) if with_pw else None
        assert_grads(lambda v: ct.masked_multigroup_bce_triton(v, t, GROUPS, pw, reduction),
                     lambda v: ref_bce(v, t, GROUPS, pw, reduction),
                     x, reduction, len(GROUPS), atol=1e-12, rtol=1e-10)

    @needs_interpreter
    @pytest.mark.parametrize("reduction", [NONE, GROUP_MEAN])
    def test_bce_gradcheck_fp64(self, reduction):
        groups = (3, 2)
        x = raw_logits(2, 5).requires_grad_()
        t = bce_targets(2, 5, seed=3)
        pw = raw_pos_weight(5)
        assert torch.autograd.gradcheck(
            lambda v: ct.masked_multigroup_bce_triton(v, t, groups, pw, reduction)[0], (x,),
            eps=1e-6, atol=1e-8)

    @needs_interpreter
    def test_bce_chunked_groups_and_strided_inputs(self, monkeypatch):
        # Force BLOCK = 16 so the 37-wide group takes 3 chunks; inputs are non-contiguous views.
        monkeypatch.setattr(ct, "_MAX_BLOCK", 16)
        groups = (37, 2, 1, 17)
        c = sum(groups)
        base = raw_logits(c, 6, seed=9)
        x = base.t()[::2]  # [3, c], strides (2, 6)
        t = bce_targets(c, 3, dtype=torch.int32, seed=8).t()  # [3, c], strides (1, 3)
        assert not x.is_contiguous() and not t.is_contiguous()
        pw = raw_pos_weight(2 * c)[::2]  # stride 2
        for reduction in (NONE, MEAN):
            loss, counts = ct.masked_multigroup_bce_triton(x, t, groups, pw, reduction)
            ref, ref_counts = ref_bce(x, t, groups, pw, reduction)
            torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
            assert torch.equal(counts, ref_counts)
        assert_grads(lambda v: ct.masked_multigroup_bce_triton(v, t, groups, pw, SUM),
                     lambda v: ref_bce(v, t, groups, pw, SUM), x, SUM, len(groups),
                     atol=1e-12, rtol=1e-10)

    @needs_interpreter
    @pytest.mark.parametrize("tdtype", TARGET_DTYPES, ids=str)
    def test_bce_target_dtypes(self, tdtype):
        x = raw_logits(2, 11, torch.float32)
        t = bce_targets(2, 11)
        ref, ref_counts = ref_bce(x, t, GROUPS, None, NONE)
        loss, counts = ct.masked_multigroup_bce_triton(x, t.to(tdtype), GROUPS, None, NONE)
        torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
        assert torch.equal(counts, ref_counts)

    @needs_interpreter
    def test_bce_extreme_logits(self):
        # |x| = 1e4: exp(-|x|) underflows; the stable form gives exactly |x| or 0 per entry.
        x = torch.tensor([[1e4, -1e4, 1e4, -1e4, 3.0], [-1e4, 1e4, 0.5, 1e4, -1e4]])
        t = torch.tensor([[0, 1, 1, 0, -1], [1, 0, -1, 1, 0]], dtype=torch.int8)
        pw = torch.tensor([2.0, 0.5, 1.0, 3.0, 1.0])
        groups = (2, 3)
        loss, _ = ct.masked_multigroup_bce_triton(x, t, groups, pw, NONE)
        ref, _ = ref_bce(x, t, groups, pw, NONE)
        assert torch.isfinite(loss).all()
        torch.testing.assert_close(loss.double(), ref, atol=1e-3, rtol=1e-6)
        assert loss[0, 0].item() == pytest.approx(1e4 + 0.5 * 1e4)
        grad = assert_grads(lambda v: ct.masked_multigroup_bce_triton(v, t, groups, pw, MEAN),
                            lambda v: ref_bce(v, t, groups, pw, MEAN), x, MEAN, 2,
                            atol=1e-6, rtol=1e-5)
        assert torch.isfinite(grad).all()

    @needs_interpreter
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_bce_half_logits(self, dtype):
        x = raw_logits(3, 11, dtype)
        t = bce_targets(3, 11, dtype=torch.float16)
        pw = raw_pos_weight(11, torch.float32)
        loss, _ = ct.masked_multigroup_bce_triton(x, t, GROUPS, pw, GROUP_MEAN)
        assert loss.dtype == torch.float32
        ref, _ = ref_bce(x, t, GROUPS, pw, GROUP_MEAN)  # on the same (rounded) logits, in fp64
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        # The gradient is computed in fp32 and rounded once to the logits dtype.
        rtol = 2 ** -8 if dtype == torch.float16 else 2 ** -7
        assert_grads(lambda v: ct.masked_multigroup_bce_triton(v, t, GROUPS, pw, NONE),
                     lambda v: ref_bce(v, t, GROUPS, pw, NONE), x, NONE, len(GROUPS),
                     atol=1e-4, rtol=rtol)

    @needs_interpreter
    def test_bce_single_row_single_group(self):
        x = raw_logits(1, 3)
        t = torch.tensor([[1.0, -1.0, 0.0]])
        for reduction in REDUCTION_CODES:
            loss, counts = ct.masked_multigroup_bce_triton(x, t, (3,), None, reduction)
            ref, _ = ref_bce(x, t, (3,), None, reduction)
            torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
            assert counts.tolist() == [2]

    @needs_interpreter
    @pytest.mark.parametrize("reduction", REDUCTION_CODES)
    def test_bce_all_masked(self, reduction):
        x = raw_logits(2, 11, torch.float32).requires_grad_()
        x.data[0, 0] = float("nan")  # a NaN logit under a -1 target must not leak either
        t = torch.full((2, 11), -1, dtype=torch.int8)
        pw = raw_pos_weight(11, torch.float32)
        loss, counts = ct.masked_multigroup_bce_triton(x, t, GROUPS, pw, reduction)
        assert (loss == 0).all() and counts.tolist() == [0] * len(GROUPS)
        loss.sum().backward()
        assert (x.grad == 0).all()

    @needs_interpreter
    def test_bce_group_mean_skips_empty_groups(self):
        x = raw_logits(3, 11)
        t = bce_targets(3, 11, seed=6)
        t[:, 5] = -1  # group 1 (size 1) is empty over the batch
        loss, counts = ct.masked_multigroup_bce_triton(x, t, GROUPS, None, GROUP_MEAN)
        assert counts[1] == 0
        torch.testing.assert_close(loss, ref_bce(x, t, GROUPS, None, GROUP_MEAN)[0],
                                   atol=1e-12, rtol=1e-12)

    @needs_interpreter
    @pytest.mark.parametrize("bad,tdtype", [(2, torch.int64), (-2, torch.int8),
                                            (0.5, torch.float32), (float("nan"), torch.float32)],
                             ids=str)
    def test_bce_bad_targets_raise(self, bad, tdtype):
        t = bce_targets(3, 11).to(tdtype)
        t[2, 7] = bad  # sample 2, group 2 (columns 6..8)
        with pytest.raises(ValueError, match=r"must hold only -1 \(unknown\), 0 or 1; found "
                                             r"\S+ at sample 2, column 7"):
            ct.masked_multigroup_bce_triton(raw_logits(3, 11), t, GROUPS, None, MEAN)

    # ---------------------------------------------------------------------------------------------
    # Softmax CE

    @needs_interpreter
    @pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
    def test_softmax_forward_all_reductions(self, dtype, atol):
        x = raw_logits(4, 11, dtype)
        t = onehot_targets(4, GROUPS, unknown=SM_UNKNOWN)
        for reduction in REDUCTION_CODES:
            loss, counts = ct.masked_multigroup_softmax_ce_triton(x, t, GROUPS, reduction)
            ref, ref_counts = ref_softmax(x, t, GROUPS, reduction)
            assert loss.dtype == dtype and loss.shape == ref.shape
            assert torch.equal(counts, ref_counts)
            torch.testing.assert_close(loss.double(), ref, atol=atol, rtol=atol)

    @needs_interpreter
    @pytest.mark.parametrize("reduction", REDUCTION_CODES)
    def test_softmax_gradient_matches_reference_fp64(self, reduction):
        x = raw_logits(3, 11, seed=3)
        t = onehot_targets(3, GROUPS, unknown=SM_UNKNOWN[:2])
        assert_grads(lambda v: ct.masked_multigroup_softmax_ce_triton(v, t, GROUPS, reduction),
                     lambda v: ref_softmax(v, t, GROUPS, reduction),
                     x, reduction, len(GROUPS), atol=1e-12, rtol=1e-10)

    @needs_interpreter
    @pytest.mark.parametrize("reduction", [NONE, MEAN])
    def test_softmax_gradcheck_fp64(self, reduction):
        groups = (3, 2)
        x = raw_logits(2, 5).requires_grad_()
        t = onehot_targets(2, groups, unknown=((1, 1),))
        assert torch.autograd.gradcheck(
            lambda v: ct.masked_multigroup_softmax_ce_triton(v, t, groups, reduction)[0], (x,),
            eps=1e-6, atol=1e-8)

    @needs_interpreter
    def test_softmax_chunked_online_max(self, monkeypatch):
        # BLOCK = 16: the 40-wide group takes 3 chunks and its maximum sits in the last chunk
        # (the running sum is rescaled), with logits large enough to overflow a naive exp.
        monkeypatch.setattr(ct, "_MAX_BLOCK", 16)
        groups = (40, 2, 19)
        x = raw_logits(2, 61, torch.float32, scale=3.0)
        x[0, 35] = 120.0
        x[1, 3] = 95.0
        x[1, 50] = -200.0
        t = onehot_targets(2, groups, dtype=torch.float32, unknown=((1, 1),))
        t[0, :40] = 0
        t[0, 35] = 1
        for reduction in (NONE, GROUP_MEAN):
            loss, counts = ct.masked_multigroup_softmax_ce_triton(x, t, groups, reduction)
            ref, ref_counts = ref_softmax(x, t, groups, reduction)
            torch.testing.assert_close(loss.double(), ref, atol=3e-5, rtol=1e-5)
            assert torch.equal(counts, ref_counts)
        xs = x.t().contiguous().t()  # column-major
        assert_grads(lambda v: ct.masked_multigroup_softmax_ce_triton(v, t, groups, SUM),
                     lambda v: ref_softmax(v, t, groups, SUM), xs, SUM, 3, atol=1e-6, rtol=1e-5)

    @needs_interpreter
    @pytest.mark.parametrize("tdtype", TARGET_DTYPES, ids=str)
    def test_softmax_target_dtypes(self, tdtype):
        x = raw_logits(2, 11, torch.float32)
        t = onehot_targets(2, GROUPS, unknown=((1, 2),))
        ref, ref_counts = ref_softmax(x, t, GROUPS, NONE)
        loss, counts = ct.masked_multigroup_softmax_ce_triton(x, t.to(tdtype), GROUPS, NONE)
        torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=2e-5)
        assert torch.equal(counts, ref_counts)

    @needs_interpreter
    def test_softmax_extreme_logits(self):
        x = torch.tensor([[1e4, -1e4, 0.0, -1e4, 1e4], [-1e4, -1e4, 1e4, 1e4, 1e4]])
        t = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, -1, -1]])
        groups = (3, 2)
        loss, counts = ct.masked_multigroup_softmax_ce_triton(x, t, groups, NONE)
        ref, _ = ref_softmax(x, t, groups, NONE)
        assert torch.isfinite(loss).all() and counts.tolist() == [2, 1]
        torch.testing.assert_close(loss.double(), ref, atol=1e-3, rtol=1e-6)
        grad = assert_grads(lambda v: ct.masked_multigroup_softmax_ce_triton(v, t, groups, MEAN),
                            lambda v: ref_softmax(v, t, groups, MEAN), x, MEAN, 2,
                            atol=1e-6, rtol=1e-5)
        assert torch.isfinite(grad).all()

    @needs_interpreter
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_softmax_half_logits(self, dtype):
        x = raw_logits(3, 11, dtype)
        t = onehot_targets(3, GROUPS, dtype=torch.bfloat16, unknown=((0, 0),))
        loss, _ = ct.masked_multigroup_softmax_ce_triton(x, t, GROUPS, MEAN)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref_softmax(x, t, GROUPS, MEAN)[0],
                                   atol=1e-5, rtol=1e-5)
        rtol = 2 ** -8 if dtype == torch.float16 else 2 ** -7
        assert_grads(lambda v: ct.masked_multigroup_softmax_ce_triton(v, t, GROUPS, NONE),
                     lambda v: ref_softmax(v, t, GROUPS, NONE), x, NONE, len(GROUPS),
                     atol=1e-4, rtol=rtol)

    @needs_interpreter
    @pytest.mark.parametrize("reduction", REDUCTION_CODES)
    def test_softmax_all_unknown(self, reduction):
        x = raw_logits(1, 11).requires_grad_()
        t = torch.full((1, 11), -1.0)
        loss, counts = ct.masked_multigroup_softmax_ce_triton(x, t, GROUPS, reduction)
        assert (loss == 0).all() and counts.tolist() == [0] * len(GROUPS)
        loss.sum().backward()
        assert (x.grad == 0).all()

    @needs_interpreter
    @pytest.mark.parametrize("row,match", [
        ([1, 1, 0, 0, 0], "two or more positives"),
        ([0, 0, 0, 0, 0], "no positive"),
        ([1, -1, 0, 0, 0], "mixes -1 with 0/1"),
        ([-1, -1, -1, -1, 0], "mixes -1 with 0/1"),
        ([1, 0, 2, 0, 0], "outside"),
        ([1, 0, float("nan"), 0, 0], "outside"),
    ], ids=["two_pos", "no_pos", "mixed", "mixed_no_pos", "value_2", "nan"])
    def test_softmax_one_hot_violations_raise(self, row, match):
        t = onehot_targets(3, GROUPS, dtype=torch.float32)
        t[1, 0:5] = torch.tensor(row)  # sample 1, group 0
        with pytest.raises(ValueError, match=rf"sample 1, group 0 \(columns 0..4\) .*{match}"):
            ct.masked_multigroup_softmax_ce_triton(raw_logits(3, 11), t, GROUPS, SUM)

    @needs_interpreter
    def test_violations_give_nan_where_the_host_check_is_skipped(self, monkeypatch):
        # Under torch.compile with the real GPU kernels (triton_op) the host check cannot run;
        # the kernels then mark every violating (sample, group) with a NaN partial loss.
        monkeypatch.setattr(ct, "_not_tracing", lambda *tensors: False)
        t = onehot_targets(3, GROUPS, dtype=torch.float32)
        t[1, 0:2] = 1  # sample 1, group 0: two positives
        loss, _ = ct.masked_multigroup_softmax_ce_triton(raw_logits(3, 11), t, GROUPS, NONE)
        bad = torch.zeros(3, 4, dtype=torch.bool)
        bad[1, 0] = True
        assert torch.equal(loss.isnan(), bad)
        tb = bce_targets(3, 11)
        tb[2, 4] = 5  # sample 2, group 0
        loss, _ = ct.masked_multigroup_bce_triton(raw_logits(3, 11), tb, GROUPS, None, NONE)
        bad = torch.zeros(3, 4, dtype=torch.bool)
        bad[2, 0] = True
        assert torch.equal(loss.isnan(), bad)
        assert ct.masked_multigroup_bce_triton(raw_logits(3, 11), tb, GROUPS, None, MEAN)[0].isnan()

    # ---------------------------------------------------------------------------------------------
    # Argument errors, op registration, compile, missing triton, the project reference, CUDA

    @needs_interpreter
    @pytest.mark.parametrize("softmax", [False, True], ids=["bce", "softmax"])
    def test_bad_arguments(self, softmax):
        def call(x, t, groups, reduction=MEAN, pw=None):
            if softmax:
                return ct.masked_multigroup_softmax_ce_triton(x, t, groups, reduction)
            return ct.masked_multigroup_bce_triton(x, t, groups, pw, reduction)

        x = raw_logits(2, 5)
        t = torch.zeros(2, 5, dtype=torch.int64)
        t[:, 0] = 1
        t[:, 3] = 1
        with pytest.raises(ValueError, match="groups must sum to C"):
            call(x, t, (3, 3))
        with pytest.raises(ValueError, match="groups"):
            call(x, t, ())
        with pytest.raises(ValueError, match="group size"):
            call(x, t, (5, 0))
        with pytest.raises(ValueError, match="same shape"):
            call(x, t[:, :4], (3, 2))
        with pytest.raises(ValueError, match="2-D"):
            call(x[0], t[0], (3, 2))
        with pytest.raises(TypeError, match="logits"):
            call(t, t, (3, 2))
        for bad_dtype in (torch.uint8, torch.bool, torch.complex64):
            with pytest.raises(TypeError, match="targets"):
                call(x, t.to(bad_dtype), (3, 2))
        with pytest.raises(ValueError, match="device"):
            call(x, t.to("meta"), (3, 2))
        with pytest.raises(ValueError, match="reduction"):
            call(x, t, (3, 2), reduction=4)
        if not softmax:
            with pytest.raises(ValueError, match="pos_weight"):
                call(x, t, (3, 2), pw=torch.ones(4, dtype=torch.float64))
            with pytest.raises(ValueError, match="pos_weight"):
                call(x, t, (3, 2), pw=torch.ones(1, 5, dtype=torch.float64))

    @needs_interpreter
    def test_opcheck(self):
        ops = torch.ops.vcfast
        # Forward ops: every check (schema, autograd registration, fake tensors, AOT dispatch
        # static/dynamic, which also runs the registered backward through AOT autograd).
        torch.library.opcheck(ops.masked_multigroup_bce_triton.default,
                              _bce_args(NONE, requires_grad=True))
        torch.library.opcheck(ops.masked_multigroup_bce_triton.default,
                              _bce_args(GROUP_MEAN, dtype=torch.float32))
        torch.library.opcheck(ops.masked_multigroup_softmax_ce_triton.default,
                              _sce_args(SUM, requires_grad=True))
        # The backward ops have no autograd formula of their own (no double backward), so the
        # checks that differentiate through them (test_aot_dispatch_*) do not apply.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        args = _bce_args(MEAN)
        counts = ct.masked_multigroup_bce_triton(*args)[1]
        grad = torch.tensor(0.7, dtype=torch.float64)
        torch.library.opcheck(ops.masked_multigroup_bce_triton_backward.default,
                              (grad, args[0], args[1], args[2], args[3], args[4], counts),
                              test_utils=utils)
        args = _sce_args(NONE)
        counts = ct.masked_multigroup_softmax_ce_triton(*args)[1]
        grad = torch.randn(3, len(GROUPS), dtype=torch.float64, generator=gen(3))
        torch.library.opcheck(ops.masked_multigroup_softmax_ce_triton_backward.default,
                              (grad, args[0], args[1], args[2], args[3], counts), test_utils=utils)

    @needs_interpreter
    def test_meta_shapes(self):
        x = torch.empty(3, 11, device="meta")
        t = torch.empty(3, 11, dtype=torch.int8, device="meta")
        loss, counts = torch.ops.vcfast.masked_multigroup_bce_triton(x, t, list(GROUPS), None, NONE)
        assert loss.shape == (3, 4) and loss.dtype == torch.float32 and counts.shape == (4,)
        loss, counts = torch.ops.vcfast.masked_multigroup_softmax_ce_triton(
            x.double(), t, list(GROUPS), MEAN)
        assert loss.shape == () and loss.dtype == torch.float64 and counts.dtype == torch.int64
        g = torch.ops.vcfast.masked_multigroup_bce_triton_backward(
            torch.empty((), device="meta"), x.half(), t, list(GROUPS), None, SUM, counts)
        assert g.shape == (3, 11) and g.dtype == torch.float16

    @needs_interpreter
    def test_torch_compile(self):
        # Under the interpreter the ops are opaque custom ops (module docstring), so this checks
        # Dynamo + fake tensors + AOT autograd; "aot_eager" keeps it fast.
        tb = bce_targets(3, 11, dtype=torch.int8)
        ts = onehot_targets(3, GROUPS, unknown=((2, 2),))
        pw = raw_pos_weight(11)

        def f(x):
            a, _ = ct.masked_multigroup_bce_triton(x, tb, GROUPS, pw, MEAN)
            b, _ = ct.masked_multigroup_softmax_ce_triton(x, ts, GROUPS, GROUP_MEAN)
            return a + 2 * b

        assert_compiled_matches_eager(f, raw_logits(3, 11), atol=1e-12)

    @needs_interpreter
    def test_empty_batch(self):
        x = torch.empty(0, 11, requires_grad=True)
        t = torch.empty(0, 11, dtype=torch.int8)
        for reduction in REDUCTION_CODES:
            loss, counts = ct.masked_multigroup_bce_triton(x, t, GROUPS, None, reduction)
            assert (loss == 0).all() and counts.tolist() == [0] * 4
            loss2, _ = ct.masked_multigroup_softmax_ce_triton(x, t, GROUPS, reduction)
            (loss.sum() + loss2.sum()).backward()
            assert x.grad.shape == (0, 11)

    @needs_interpreter
    def test_matches_project_reference_if_present(self):
        ref_mod = pytest.importorskip("vcfast.ops.classification")
        bce_ref = getattr(ref_mod, "masked_multigroup_bce_reference", None)
        sce_ref = getattr(ref_mod, "masked_multigroup_softmax_ce_reference", None)
        if bce_ref is None and sce_ref is None:
            pytest.skip("vcfast.ops.classification has no *_reference functions yet")
        names = {v: k for k, v in ct.REDUCTIONS.items()}
        x = raw_logits(3, 11)
        checked = 0
        for reduction in REDUCTION_CODES:
            cases = []
            if bce_ref is not None:
                t = bce_targets(3, 11)
                pw = raw_pos_weight(11)
                cases.append((bce_ref, (x, t, GROUPS, pw),
                              ct.masked_multigroup_bce_triton(x, t, GROUPS, pw, reduction)))
            if sce_ref is not None:
                t = onehot_targets(3, GROUPS, unknown=SM_UNKNOWN[:2])
                cases.append((sce_ref, (x, t, GROUPS),
                              ct.masked_multigroup_softmax_ce_triton(x, t, GROUPS, reduction)))
            for fn, fn_args, (loss, counts) in cases:
                out = None
                # The reference's signature is not fixed yet: try the likely spellings.
                head, rest = fn_args[:3], fn_args[3:]
                attempts = []
                for red in (names[reduction], reduction):
                    for groups in (GROUPS, list(GROUPS)):
                        if rest:  # bce: pos_weight positional or keyword
                            attempts.append(lambda g=groups, r=red: fn(*head[:2], g, *rest,
                                                                       reduction=r))
                            attempts.append(lambda g=groups, r=red: fn(*head[:2], g, reduction=r,
                                                                       pos_weight=rest[0]))
                        attempts.append(lambda g=groups, r=red: fn(*head[:2], g, *rest, r))
                for attempt in attempts:
                    try:
                        out = attempt()
                        break
                    except (TypeError, ValueError, KeyError):
                        continue
                if out is None:
                    pytest.skip(f"could not call {fn.__name__} with a recognised signature")
                ref_loss = out[0] if isinstance(out, tuple) else out
                torch.testing.assert_close(loss, ref_loss.to(loss.dtype), atol=1e-10, rtol=1e-10)
                if isinstance(out, tuple) and len(out) > 1:
                    assert torch.equal(counts, out[1].to(counts.dtype))
                checked += 1
        assert checked

    def test_missing_triton_raises_clear_error(self, monkeypatch):
        pretend_triton_is_missing(monkeypatch, ct)
        x = torch.zeros(1, 3)
        with pytest.raises(RuntimeError, match="needs the triton package"):
            ct.masked_multigroup_bce_triton(x, x, (3,), None, MEAN)
        with pytest.raises(RuntimeError, match="needs the triton package"):
            ct.masked_multigroup_softmax_ce_triton(x, x, (3,), MEAN)

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    @pytest.mark.skipif(INTERPRETED, reason="the real-size GPU test needs compiled kernels: run "
                                            "with TRITON_INTERPRET=0")
    def test_cuda_realistic_groups(self):
        # Group sizes of a real label space (a 1421-way group next to 2-way ones), fp32 and bf16.
        torch.manual_seed(0)
        groups = (1421, 2, 2, 7, 2)
        n, c = 64, sum(groups)
        x = 3 * torch.randn(n, c, device="cuda")
        tb = torch.randint(-1, 2, (n, c), device="cuda", dtype=torch.int8)
        ts = onehot_targets(n, groups, unknown=((0, 0), (5, 2))).to("cuda", torch.int8)
        pw = raw_pos_weight(c).to("cuda", torch.float32)
        for reduction in REDUCTION_CODES:
            for fn, args, ref_fn in (
                    (ct.masked_multigroup_bce_triton, (tb, groups, pw, reduction),
                     lambda v: ref_bce(v.cpu(), tb.cpu(), groups, pw.cpu(), reduction)),
                    (ct.masked_multigroup_softmax_ce_triton, (ts, groups, reduction),
                     lambda v: ref_softmax(v.cpu(), ts.cpu(), groups, reduction))):
                for dtype in (torch.float32, torch.float64, torch.bfloat16):
                    # Fresh leaves: x.to(float32) is x itself, so requires_grad_() on it would
                    # make every later x.to(dtype) a non-leaf without .grad.
                    xt = x.to(dtype).clone().requires_grad_()
                    loss, counts = fn(xt, *args)
                    xr = x.to(dtype).cpu().double().requires_grad_()
                    ref, ref_counts = ref_fn(xr)
                    tol = 1e-10 if dtype == torch.float64 else 1e-4
                    torch.testing.assert_close(loss.double().cpu(), ref, atol=tol, rtol=tol)
                    assert torch.equal(counts.cpu(), ref_counts)
                    g = torch.randn(loss.shape, device="cuda", dtype=loss.dtype)
                    (loss * g).sum().backward()
                    (ref * g.cpu().double()).sum().backward()
                    gtol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32
                                                                 else 1e-2)
                    torch.testing.assert_close(xt.grad.double().cpu(), xr.grad, atol=gtol,
                                               rtol=max(gtol, 1e-4))
        # Bad targets are still caught on the GPU (eager host check).
        tb[3, 1425] = 3  # group 3 (columns 1425:1432)
        with pytest.raises(ValueError, match="sample 3, group 3"):
            ct.masked_multigroup_bce_triton(x, tb, groups, None, MEAN)

    def test_module_imports_without_triton(self):
        # A fresh interpreter where `import triton` fails: the module imports, calls raise.
        import subprocess
        import sys

        code = (
            "import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from vcfast.ops import classification_triton as ct\n"
            "assert ct.TRITON_IMPORT_ERROR and not ct.USES_TRITON_OP\n"
            "x = torch.zeros(1, 3)\n"
            "try:\n"
            "    ct.masked_multigroup_softmax_ce_triton(x, x, (3,), 2)\n"
            "except RuntimeError as e:\n"
            "    assert 'needs the triton package' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error')\n"
        )
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
