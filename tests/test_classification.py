"""Masked multi-group losses (docs/ops.md#masked-multi-group-losses): C++ kernels vs the
plain-PyTorch reference, the contract's edge cases (all masked, extreme logits, every target dtype),
gradients, registration (opcheck, torch.compile, meta) and bad input."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
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

needs_extension = pytest.mark.skipif(
    not _extension.EXTENSION_LOADED,
    reason="vcfast._C is not built (pip install --no-build-isolation -e .)",
)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.extension_has_cuda()),
    reason="needs a CUDA GPU and vcfast._C built with CUDA",
)

STARGAN = (1421, 53, 2)
REDUCTION_NAMES = tuple(REDUCTIONS)
TARGET_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64]
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


# --------------------------------------------------------------------------- fused vs reference


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
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("sizes", [(1,), (7,), (3, 1, 5), (1, 1, 1, 1), (257, 3)], ids=str)
@pytest.mark.parametrize("n", [1, 3])
def test_odd_sizes_and_single_sample(name, sizes, n):
    logits = make_logits(n, sum(sizes), seed=n)
    targets = make_targets(n, sizes, one_hot=name == "softmax", p_unknown=0.3, seed=sum(sizes))
    for reduction in REDUCTION_NAMES:
        assert_matches_reference(name, logits, targets, sizes, reduction)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
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
def test_every_target_dtype_gives_the_same_result(name, target_dtype):
    sizes = (13, 5, 2)
    logits = make_logits(6, 20, dtype=torch.float32)
    targets = make_targets(6, sizes, one_hot=name == "softmax", seed=2)
    fused = LOSSES[name][0]
    expected = fused(logits, targets, sizes, "none", backend="cpu")
    got = fused(logits, targets.to(target_dtype), sizes, "none", backend="cpu")
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert_matches_reference(name, logits, targets.to(target_dtype), sizes, "mean")


@needs_extension
@pytest.mark.parametrize("reduction", REDUCTION_NAMES)
def test_bce_pos_weight(reduction):
    sizes = (9, 4, 2)
    logits = make_logits(5, 15)
    targets = make_targets(5, sizes, one_hot=False, seed=4)
    pos_weight = torch.linspace(0.2, 4.0, 15, dtype=torch.float64)
    assert_matches_reference("bce", logits, targets, sizes, reduction, pos_weight=pos_weight)
    # a float32 pos_weight with float64 logits is converted, not rejected
    assert_matches_reference(
        "bce", logits, targets, sizes, reduction, pos_weight=pos_weight.float(), tol=1e-6
    )
    plain = masked_multigroup_bce(logits, targets, sizes, reduction, backend="cpu")
    ones = masked_multigroup_bce(
        logits, targets, sizes, reduction, pos_weight=torch.ones(15).double(), backend="cpu"
    )
    torch.testing.assert_close(plain, ones)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("reduction", REDUCTION_NAMES)
def test_gradcheck_float64(name, reduction):
    sizes = (4, 3, 1)
    logits = make_logits(3, 8, seed=9).requires_grad_()
    targets = make_targets(3, sizes, one_hot=name == "softmax", p_unknown=0.3, seed=9)
    fused = LOSSES[name][0]
    kwargs = (
        {"pos_weight": torch.linspace(0.5, 2.0, 8, dtype=torch.float64)} if name == "bce" else {}
    )
    assert torch.autograd.gradcheck(
        lambda x: fused(x, targets, sizes, reduction, backend="cpu", **kwargs), (logits,)
    )
    assert torch.autograd.gradcheck(
        lambda x: fused(x, targets, sizes, reduction, backend="reference", **kwargs), (logits,)
    )


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_are_computed_in_float32(name, dtype):
    sizes = STARGAN
    logits = make_logits(8, sum(sizes), dtype=dtype)
    targets = make_targets(8, sizes, one_hot=name == "softmax", seed=6)
    fused, reference = LOSSES[name]
    for reduction in REDUCTION_NAMES:
        x = logits.clone().requires_grad_()
        loss = fused(x, targets, sizes, reduction, backend="cpu")
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
def test_non_contiguous_inputs(name):
    sizes = (11, 4, 2)
    base_logits = make_logits(17, 6)
    logits = base_logits.t()  # [6, 17], transposed view
    targets = make_targets(6, sizes, one_hot=name == "softmax", seed=8)
    wide = torch.zeros(6, 34)
    wide[:, ::2] = targets
    strided_targets = wide[:, ::2]
    assert not logits.is_contiguous() and not strided_targets.is_contiguous()
    for reduction in REDUCTION_NAMES:
        assert_matches_reference(name, logits, strided_targets, sizes, reduction)


@needs_extension
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_backward_accepts_any_gradient_layout(name):
    sizes = (5, 3)
    logits = make_logits(4, 8).requires_grad_()
    targets = make_targets(4, sizes, one_hot=name == "softmax", seed=1)
    fused, reference = LOSSES[name]
    weight_t = torch.randn(2, 4, dtype=torch.float64)
    for reduce in (lambda y: y.sum(), lambda y: (y.t() * weight_t).sum(), lambda y: y[::2].sum()):
        (g,) = torch.autograd.grad(
            reduce(fused(logits, targets, sizes, "none", backend="cpu")), logits
        )
        (g_ref,) = torch.autograd.grad(reduce(reference(logits, targets, sizes, "none")), logits)
        torch.testing.assert_close(g, g_ref)


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


# --------------------------------------------------------------------------- bad input

BACKENDS_HERE = ["reference", pytest.param("cpu", marks=needs_extension)]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
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


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float64])
def test_integer_and_double_targets_are_validated_exactly(backend, dtype):
    sizes = (5, 5)
    targets = make_targets(3, sizes, one_hot=False, p_unknown=0.0).to(dtype)
    targets[1, 7] = 2 if not dtype.is_floating_point else 1.0000000001
    with pytest.raises(ValueError, match="sample 1, column 7"):
        masked_multigroup_bce(make_logits(3, 10), targets, sizes, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
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


# --------------------------------------------------------------------------- other backends


@pytest.mark.skipif(importlib.util.find_spec("vcfast.ops.classification_triton") is None
                    or not _extension.triton_available(),
                    reason="the Triton classification kernels are not installed")
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
