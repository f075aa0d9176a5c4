"""The contract users rely on, checked for every public differentiable op and module.

Each entry of ``CASES`` builds one public callable (a functional op bound to its options,
or a module) with tiny inputs, on every backend that runs on a CPU (``reference``, ``cpu``,
and ``triton`` under the interpreter). Every case is run through the same checks, in float64
(tight tolerances) and, where float32 takes other kernel paths, in float32 too:

* the same gradients through ``.backward()``, ``torch.autograd.grad`` and
  ``backward(inputs=...)``, twice from one graph with ``retain_graph=True``, and
  ``backward(inputs=[one leaf])`` fills only that leaf;
* ``torch.no_grad`` and ``torch.inference_mode`` give the same values, not tracked, and a
  call under inference_mode leaves the callable able to train;
* inputs with ``requires_grad=False`` give the same values and the same parameter gradients;
* non-contiguous inputs, and channels-last ones (and weights) where they are 4-D, give the
  same values and gradients as contiguous ones;
* any layout of the incoming gradient (``.sum()`` sends a stride-0 one) gives the same
  gradients;
* two calls give bit-identical values and gradients (CPU determinism);
* ``torch.compile(fullgraph=True)`` of the callable matches eager, values and gradients
  (``aot_eager``: proves Dynamo tracing without graph breaks and AOT autograd, with static
  shapes), updates buffers as eager does and leaves the callable working in eager;
* second derivatives (create_graph=True) are exact, or differentiating through the op
  raises a RuntimeError saying that it has none.

``torch.library.opcheck`` of the registered ops, one Inductor compile per op family and the
non-differentiable metric are in test_contract_registration.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcfast
from vcfast import _extension
from vcfast.models import StarGANDiscriminator, StarGANGenerator
from vcfast.nn import (
    InstanceNormReLUConv2d,
    LabelConcatConv2d,
    LeanResidualBlock,
    LogSpectrogram,
    MaskedMultiGroupBCE,
    MaskedMultiGroupSoftmaxCE,
    instance_norm_relu_conv,
)

F64 = torch.float64
F32 = torch.float32
# Checks that compare values run in float64 (tight); the ones users hit differently in
# float32 (kernel paths, determinism of threaded reductions) run in both.
TOLERANCE = {F64: dict(rtol=1e-12, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-5)}
HAS_CPU_KERNELS = _extension.EXTENSION_LOADED


def _triton_runs_on_cpu() -> bool:
    """The Triton backends run on CPU tensors only through the interpreter."""
    if not (_extension.triton_available() and _extension.triton_interpret()):
        return False
    from vcfast.ops import spectrogram_triton

    return spectrogram_triton._kernels_interpreted()


TRITON_ON_CPU = _triton_runs_on_cpu()
needs_cpu_kernels = pytest.mark.skipif(not HAS_CPU_KERNELS, reason="vcfast._C is not built")
needs_triton = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 "
                              "set before vcfast.kernels.* is imported")

# The interpreter warns about ln(0) at masked lanes of the spectrogram kernel; harmless.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One public callable with tiny inputs.

    ``build(dtype)`` returns ``(fn, inputs)`` or ``(fn, inputs, params)`` in that floating
    dtype: ``fn`` is the op bound to its options or the module itself (so compiling it
    compiles the module), ``inputs`` a tuple of tensors whose floating ones are
    differentiable unless listed in ``constant``, ``params`` the parameters a functional op
    closes over (a module's are found by itself).
    """

    build: Callable[[torch.dtype], tuple]
    constant: tuple[int, ...] = ()  # input positions that are labels/targets, never differentiated
    image_inputs: bool = False  # some input and output are 4-D [N, C, H, W]: channels-last applies
    scalar_output: bool = False  # a 0-dim loss: its gradient has no layout to vary
    # Second derivatives: "autograd" (plain PyTorch ops, exact by construction), "refused" (a
    # fused backward: differentiating it raises RuntimeError), or a function building the
    # plain-PyTorch equivalent of ``fn`` to compare with.
    second_derivatives: str | Callable = "autograd"
    # Slow to run (the Triton interpreter, a checkpointed model): only float64, and only the
    # checks where it can behave differently from its fast sibling case.
    slow: bool = False


SPEC_OPTIONS = dict(n_fft=32, hop=8, magnitude_scale=32.0, bin_lo=1, bin_hi=17)


def _wave(dtype: torch.dtype) -> torch.Tensor:
    return (torch.rand(2, 120, generator=gen(0), dtype=F64) - 0.5).to(dtype)


def _spectrogram(backend: str | None):
    def build(dtype):
        return ((lambda w: vcfast.log_spectrogram(w, backend=backend, **SPEC_OPTIONS)),
                (_wave(dtype),))
    return build


def _spectrogram_module(backend: str | None):
    def build(dtype):
        return LogSpectrogram(backend=backend, **SPEC_OPTIONS), (_wave(dtype),)
    return build


def _spectrogram_to_wave(dtype):
    spec = (torch.rand(2, 16, 9, generator=gen(1), dtype=F64) * 0.8 + 0.1).to(dtype)
    return (lambda s: vcfast.spectrogram_to_wave(s, n_iter=2, **SPEC_OPTIONS)), (spec,)


GROUPS = (5, 1, 3, 2)


def _logits(dtype: torch.dtype = F64) -> torch.Tensor:
    return (2 * torch.randn(4, sum(GROUPS), generator=gen(2), dtype=F64)).to(dtype)


def _bce_targets() -> torch.Tensor:
    g = gen(3)
    t = torch.randint(0, 2, (4, sum(GROUPS)), generator=g)
    t[torch.rand(4, sum(GROUPS), generator=g) < 0.3] = -1
    return t


def _onehot_targets() -> torch.Tensor:
    g = gen(4)
    blocks = []
    for size in GROUPS:
        block = torch.zeros(4, size, dtype=torch.int64)
        block[torch.arange(4), torch.randint(0, size, (4,), generator=g)] = 1
        blocks.append(block)
    t = torch.cat(blocks, 1)
    t[1, :5] = -1  # sample 1's first group unknown
    return t


def _pos_weight(dtype: torch.dtype) -> torch.Tensor:
    return (0.5 + torch.rand(sum(GROUPS), generator=gen(5), dtype=F64)).to(dtype)


def _bce(backend: str | None, reduction: str):
    def build(dtype):
        pw = _pos_weight(dtype)
        return ((lambda x, t: vcfast.masked_multigroup_bce(x, t, GROUPS, reduction, pw, backend)),
                (_logits(dtype), _bce_targets()))
    return build


def _softmax_ce(backend: str | None, reduction: str):
    def build(dtype):
        def loss(x, t):
            return vcfast.masked_multigroup_softmax_ce(x, t, GROUPS, reduction, backend)
        return loss, (_logits(dtype), _onehot_targets())
    return build


def _bce_module(backend: str | None):
    def build(dtype):
        return (MaskedMultiGroupBCE(GROUPS, "group_mean", _pos_weight(dtype), backend),
                (_logits(dtype), _bce_targets()))
    return build


def _softmax_ce_module(backend: str | None):
    def build(dtype):
        return (MaskedMultiGroupSoftmaxCE(GROUPS, "group_mean", backend),
                (_logits(dtype), _onehot_targets()))
    return build


def _label_conv(dtype):
    torch.manual_seed(6)
    module = LabelConcatConv2d(3, 5, 4, kernel_size=3, stride=2, padding=1).to(dtype)
    x = torch.randn(2, 3, 7, 6, generator=gen(7), dtype=F64).to(dtype)
    c = torch.randn(2, 5, generator=gen(8), dtype=F64).to(dtype)
    return module, (x, c)


def _tiled_label_conv(module: LabelConcatConv2d) -> Callable:
    """What LabelConcatConv2d replaces: conv2d over x concatenated with the tiled labels."""
    def conv(x, c):
        tiled = c[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return F.conv2d(torch.cat([x, tiled], 1), module.weight, module.bias, module.stride,
                        module.padding)
    return conv


def _randomise_norm(norm: nn.InstanceNorm2d, seed: int) -> nn.InstanceNorm2d:
    """Affine parameters and running statistics away from their defaults (1, 0, 0, 1)."""
    g = gen(seed)
    with torch.no_grad():
        for t, scale, offset, draw in ((norm.weight, 0.3, 1.0, torch.randn),
                                       (norm.bias, 0.2, 0.0, torch.randn),
                                       (norm.running_mean, 0.1, 0.0, torch.randn),
                                       (norm.running_var, 1.0, 0.5, torch.rand)):
            t.copy_(offset + scale * draw(t.shape, generator=g, dtype=F64))
    return norm


def _norm_relu_conv(train: bool, transposed: bool = False):
    def build(dtype):
        torch.manual_seed(9)
        norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
        conv = (nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1) if transposed
                else nn.Conv2d(3, 4, 3, padding=1))
        module = InstanceNormReLUConv2d(_randomise_norm(norm, 10), conv).to(dtype)
        module.train(train)
        return module, (torch.randn(2, 3, 6, 5, generator=gen(11), dtype=F64).to(dtype),)
    return build


def _norm_relu_conv_functional(dtype):
    module, inputs = _norm_relu_conv(True)(dtype)
    return (lambda z: instance_norm_relu_conv(z, module.norm, module.conv)), inputs, list(
        module.parameters())


def _residual_block(train: bool):
    def build(dtype):
        torch.manual_seed(12)
        block = LeanResidualBlock(4, 4)
        for i, m in enumerate(block.modules()):
            if isinstance(m, nn.InstanceNorm2d):
                _randomise_norm(m, 13 + i)
        block.to(dtype).train(train)
        return block, (torch.randn(2, 4, 5, 6, generator=gen(14), dtype=F64).to(dtype),)
    return build


def _generator(checkpoint_residual_blocks: bool = False):
    def build(dtype):
        torch.manual_seed(15)
        model = StarGANGenerator(conv_dim=4, c_dim=3, repeat_num=1,
                                 checkpoint_residual_blocks=checkpoint_residual_blocks).to(dtype)
        x = torch.rand(2, 1, 8, 8, generator=gen(16), dtype=F64).to(dtype)
        c = (torch.rand(2, 3, generator=gen(17), dtype=F64) > 0.5).to(dtype)
        return model, (x, c)
    return build


def _discriminator(dtype):
    torch.manual_seed(18)
    model = StarGANDiscriminator(in_channels=1, image_size=8, conv_dim=4, repeat_num=2,
                                 n_classes=5).to(dtype)
    return model, (torch.rand(2, 1, 8, 8, generator=gen(19), dtype=F64).to(dtype),)


def _backends():
    return [pytest.param("reference", id="reference"),
            pytest.param("cpu", id="cpu", marks=needs_cpu_kernels),
            pytest.param("triton", id="triton", marks=needs_triton)]


def _cases() -> list:
    cases = []

    def add(name, case, *marks):
        cases.append(pytest.param(case, id=name, marks=marks))

    for p in _backends():
        backend = p.values[0]
        marks = p.marks
        second = "autograd" if backend == "reference" else "refused"
        # The interpreter is slow: Triton gets the functional ops with the default reduction;
        # the modules pass `backend` through, and reductions are covered by the other backends.
        interpreted = backend == "triton"
        add(f"log_spectrogram-{backend}", Case(_spectrogram(backend), second_derivatives=second),
            *marks)
        if not interpreted:
            add(f"LogSpectrogram-{backend}",
                Case(_spectrogram_module(backend), second_derivatives=second), *marks)
        for reduction in ("mean",) if interpreted else ("mean", "none"):
            scalar = reduction != "none"
            add(f"masked_multigroup_bce-{reduction}-{backend}",
                Case(_bce(backend, reduction), constant=(1,), scalar_output=scalar,
                     second_derivatives=second, slow=interpreted), *marks)
            add(f"masked_multigroup_softmax_ce-{reduction}-{backend}",
                Case(_softmax_ce(backend, reduction), constant=(1,), scalar_output=scalar,
                     second_derivatives=second, slow=interpreted), *marks)
        if not interpreted:
            add(f"MaskedMultiGroupBCE-{backend}",
                Case(_bce_module(backend), constant=(1,), scalar_output=True,
                     second_derivatives=second), *marks)
            add(f"MaskedMultiGroupSoftmaxCE-{backend}",
                Case(_softmax_ce_module(backend), constant=(1,), scalar_output=True,
                     second_derivatives=second), *marks)
    add("spectrogram_to_wave", Case(_spectrogram_to_wave))
    add("LabelConcatConv2d", Case(_label_conv, image_inputs=True,
                                  second_derivatives=_tiled_label_conv))
    lean = dict(image_inputs=True, second_derivatives="refused")
    add("instance_norm_relu_conv", Case(_norm_relu_conv_functional, **lean))
    add("InstanceNormReLUConv2d-train", Case(_norm_relu_conv(True), **lean))
    add("InstanceNormReLUConv2d-eval", Case(_norm_relu_conv(False), **lean))
    add("InstanceNormReLUConv2d-transposed", Case(_norm_relu_conv(True, transposed=True), **lean))
    add("LeanResidualBlock-train", Case(_residual_block(True), **lean))
    add("LeanResidualBlock-eval", Case(_residual_block(False), **lean))
    add("StarGANGenerator", Case(_generator(), **lean))
    add("StarGANGenerator-checkpointed",
        Case(_generator(checkpoint_residual_blocks=True), slow=True, **lean))
    add("StarGANDiscriminator", Case(_discriminator, image_inputs=True))
    return cases


CASES = _cases()


def _select(*, slow: bool = True, where: Callable[[Case], bool] = lambda case: True) -> list:
    """The cases a check runs on: those ``where`` accepts, slow ones only if ``slow``."""
    return [c for c in CASES if where(c.values[0]) and (slow or not c.values[0].slow)]


def _with_dtypes(cases: list) -> list:
    """(case, dtype) parameters: float64 for every case, float32 too for the fast ones."""
    return [pytest.param(c.values[0], dtype, id=f"{c.id}-{dtype_id}", marks=c.marks)
            for c in cases for dtype, dtype_id in ((F64, "float64"), (F32, "float32"))
            if dtype == F64 or not c.values[0].slow]


# ---------------------------------------------------------------------------------------------
# Running a case


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _weights(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fixed random weights, so every output element gets its own gradient."""
    return [torch.rand(o.shape, generator=gen(100 + i), dtype=o.dtype)
            for i, o in enumerate(outputs)]


def _objective(outputs: list[torch.Tensor]) -> torch.Tensor:
    return sum((o * w).sum() for o, w in zip(outputs, _weights(outputs)))


def _build(case: Case, dtype: torch.dtype = F64) -> tuple[Callable, tuple, list[torch.Tensor]]:
    built = case.build(dtype)
    fn, inputs = built[:2]
    params = built[2] if len(built) == 3 else (
        list(fn.parameters()) if isinstance(fn, nn.Module) else [])
    return fn, inputs, [p for p in params if p.requires_grad]


def _diff_inputs(case: Case, inputs: tuple) -> tuple:
    """Copies of the inputs, the differentiable ones as fresh leaves that require grad."""
    return tuple(
        t.detach().clone().requires_grad_(i not in case.constant and t.is_floating_point())
        for i, t in enumerate(inputs))


def _leaves(inputs: tuple, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in inputs if t.requires_grad] + params


def _forward_backward(fn, inputs: tuple, params: list[torch.Tensor], leaves: tuple | None = None):
    """(detached outputs, gradients of every leaf) through ``.backward()``; ``leaves``: the
    tensors the inputs were made from, when they are views of them."""
    for p in params:
        p.grad = None
    outputs = _outputs(fn(*inputs))
    _objective(outputs).backward()
    leaves = inputs if leaves is None else leaves
    return [o.detach() for o in outputs], [t.grad for t in _leaves(leaves, params)]


def _assert_same(actual: list, expected: list, **tol) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a is not None and e is not None
        torch.testing.assert_close(a, e, **tol)


def _assert_identical(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e), f"max difference {(a - e).abs().max().item():g}"


def _reference_run(case: Case, dtype: torch.dtype = F64):
    fn, inputs, params = _build(case, dtype)
    return _forward_backward(fn, _diff_inputs(case, inputs), params)


# ---------------------------------------------------------------------------------------------
# The checks


@pytest.mark.parametrize("case, dtype", _with_dtypes(CASES))
def test_gradient_paths_agree(case: Case, dtype: torch.dtype):
    fn, inputs, params = _build(case, dtype)
    inputs = _diff_inputs(case, inputs)
    leaves = _leaves(inputs, params)
    assert leaves, "a differentiable case must have something to differentiate"

    _, by_backward = _forward_backward(fn, inputs, params)

    for t in leaves:
        t.grad = None
    by_grad = torch.autograd.grad(_objective(_outputs(fn(*inputs))), leaves)

    _objective(_outputs(fn(*inputs))).backward(inputs=leaves)
    by_inputs = [t.grad for t in leaves]

    _assert_identical(list(by_grad), by_backward)
    _assert_identical(by_inputs, by_backward)

    # One graph, two backward passes (retain_graph=True): the same gradients twice.
    for t in leaves:
        t.grad = None
    objective = _objective(_outputs(fn(*inputs)))
    first = torch.autograd.grad(objective, leaves, retain_graph=True)
    objective.backward()
    _assert_identical(list(first), by_backward)
    _assert_identical([t.grad for t in leaves], by_backward)

    # backward(inputs=[one leaf]) accumulates into that leaf only.
    for t in leaves:
        t.grad = None
    _objective(_outputs(fn(*inputs))).backward(inputs=[leaves[0]])
    _assert_identical([leaves[0].grad], [by_backward[0]])
    assert all(t.grad is None for t in leaves[1:])


def _squared_objective(fn, inputs: tuple) -> torch.Tensor:
    """Nonlinear in the outputs: the incoming gradient of every output depends on the leaves."""
    outputs = _outputs(fn(*inputs))
    return sum((o * o * w).sum() for o, w in zip(outputs, _weights(outputs)))


def _second_derivatives(fn, inputs: tuple, leaves: list) -> list:
    """d/d(leaves) of <d/d(leaves) objective, r>."""
    grads = torch.autograd.grad(_squared_objective(fn, inputs), leaves, create_graph=True)
    probe = sum((g * torch.rand(g.shape, generator=gen(200 + i), dtype=g.dtype)).sum()
                for i, g in enumerate(grads))
    return list(torch.autograd.grad(probe, leaves, allow_unused=True))


SECOND_DERIVATIVE_CASES = _select(where=lambda c: c.second_derivatives != "autograd")


@pytest.mark.parametrize("case", SECOND_DERIVATIVE_CASES)
def test_second_derivatives_are_exact_or_refused(case: Case):
    # A double backward (create_graph=True, e.g. a gradient penalty) must either be right or
    # raise: a backward without a graph of its own would silently drop terms.
    fn, inputs, params = _build(case)
    inputs = _diff_inputs(case, inputs)
    leaves = _leaves(inputs, params)
    if case.second_derivatives == "refused":
        # create_graph=True alone is fine: the first derivatives are the usual ones.
        first = torch.autograd.grad(_squared_objective(fn, inputs), leaves, create_graph=True)
        _assert_same([g.detach() for g in first],
                     list(torch.autograd.grad(_squared_objective(fn, inputs), leaves)),
                     rtol=1e-15, atol=0)
        with pytest.raises(RuntimeError, match="second derivatives"):
            _second_derivatives(fn, inputs, leaves)
        return
    expected = _second_derivatives(case.second_derivatives(fn), inputs, leaves)
    assert all(e is not None for e in expected)
    _assert_same(_second_derivatives(fn, inputs, leaves), expected, **TOLERANCE[F64])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("case", CASES)
def test_without_autograd(case: Case, mode: str):
    expected, _ = _reference_run(case)
    fn, inputs, _ = _build(case)
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        outputs = _outputs(fn(*inputs))
    assert all(not o.requires_grad for o in outputs)
    _assert_identical(outputs, expected)


@pytest.mark.parametrize("case", _select(slow=False))
def test_trains_after_inference_mode(case: Case):
    # Whatever a callable caches during an inference_mode call must not be an inference
    # tensor that a later training call would try to save for backward.
    expected, expected_grads = _reference_run(case)
    fn, inputs, params = _build(case)
    with torch.inference_mode():
        fn(*inputs)
    if isinstance(fn, nn.Module):
        # Undo the running-statistics update of the inference call.
        fresh, _, _ = _build(case)
        fn.load_state_dict(fresh.state_dict())
    outputs, grads = _forward_backward(fn, _diff_inputs(case, inputs), params)
    _assert_identical(outputs, expected)
    _assert_identical(grads, expected_grads)


@pytest.mark.parametrize("case", _select(slow=False))
def test_inputs_without_requires_grad(case: Case):
    expected, expected_grads = _reference_run(case)
    fn, inputs, params = _build(case)
    assert not any(t.requires_grad for t in inputs)
    outputs = _outputs(fn(*inputs))
    _assert_identical([o.detach() for o in outputs], expected)
    if not params:
        assert all(not o.requires_grad for o in outputs)
        return
    # Parameters still get exactly the gradients they get when the inputs require grad.
    _objective(outputs).backward()
    n_inputs = len(expected_grads) - len(params)
    _assert_identical([p.grad for p in params], expected_grads[n_inputs:])


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a strided view: every other element of a twice-as-wide buffer."""
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    wide[..., ::2] = t
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


def _check_layout(case: Case, convert: Callable[[torch.Tensor], torch.Tensor],
                  dtype: torch.dtype) -> None:
    expected, expected_grads = _reference_run(case, dtype)
    fn, inputs, params = _build(case, dtype)
    leaves = _diff_inputs(case, inputs)
    converted = tuple(convert(t) for t in leaves)
    # Another layout may take another kernel (another summation order): close, not identical.
    outputs, grads = _forward_backward(fn, converted, params, leaves)
    _assert_same(outputs, expected, **TOLERANCE[dtype])
    _assert_same(grads, expected_grads, **TOLERANCE[dtype])


@pytest.mark.parametrize("case, dtype", _with_dtypes(CASES))
def test_non_contiguous_inputs(case: Case, dtype: torch.dtype):
    # Constant inputs (targets) become non-contiguous too; the view is a differentiable
    # function of the leaf, so the leaf's gradient is the one to compare.
    _check_layout(case, _non_contiguous, dtype)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last) if t.dim() == 4 else t


@pytest.mark.parametrize("case, dtype", _with_dtypes(_select(where=lambda c: c.image_inputs)))
def test_channels_last_inputs(case: Case, dtype: torch.dtype):
    _, inputs, _ = _build(case, dtype)
    assert any(_channels_last(t).stride() != t.stride() for t in inputs)
    _check_layout(case, _channels_last, dtype)


def _gradient_layout(layout: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(t):
        if layout == "non_contiguous" and t.dim() > 0:
            return _non_contiguous(t)
        return _channels_last(t) if layout == "channels_last" else t
    return convert


def _expanded_ones(t: torch.Tensor) -> torch.Tensor:
    """Ones with every stride 0: the gradient ``output.sum().backward()`` sends."""
    return torch.ones((), dtype=t.dtype).expand(t.shape)


GRADIENT_LAYOUTS = (
    [pytest.param(c.values[0], "expanded", id=f"{c.id}-expanded", marks=c.marks) for c in CASES]
    + [pytest.param(c.values[0], "non_contiguous", id=f"{c.id}-non_contiguous", marks=c.marks)
       for c in _select(slow=False, where=lambda c: not c.scalar_output)]
    + [pytest.param(c.values[0], "channels_last", id=f"{c.id}-channels_last", marks=c.marks)
       for c in _select(slow=False, where=lambda c: c.image_inputs)])


@pytest.mark.parametrize("case, layout", GRADIENT_LAYOUTS)
def test_any_gradient_layout(case: Case, layout: str):
    # The incoming gradient of an output can have any strides (``.sum()`` sends a stride-0
    # one); the backward must read it by its strides.
    fn, inputs, params = _build(case)
    inputs = _diff_inputs(case, inputs)
    leaves = _leaves(inputs, params)
    outputs = _outputs(fn(*inputs))
    if layout == "expanded":
        grads_out = [_expanded_ones(o) for o in outputs]
        dense = [g.contiguous() for g in grads_out]
    else:
        dense = _weights(outputs)
        grads_out = [_gradient_layout(layout)(g) for g in dense]
        assert any(a.stride() != b.stride() for a, b in zip(grads_out, dense))
    expected = torch.autograd.grad(outputs, leaves, dense, retain_graph=True)
    got = torch.autograd.grad(outputs, leaves, grads_out)
    _assert_same(list(got), list(expected), **TOLERANCE[F64])


@pytest.mark.parametrize("case", _select(slow=False, where=lambda c: c.image_inputs))
def test_channels_last_inputs_and_weights(case: Case):
    # What module.to(memory_format=torch.channels_last) does to the 4-D weights.
    expected, expected_grads = _reference_run(case)
    fn, inputs, params = _build(case)
    for p in params:
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in params)
    leaves = _diff_inputs(case, inputs)
    converted = tuple(_channels_last(t) for t in leaves)
    outputs, grads = _forward_backward(fn, converted, params, leaves)
    _assert_same(outputs, expected, **TOLERANCE[F64])
    _assert_same(grads, expected_grads, **TOLERANCE[F64])


@pytest.mark.parametrize("case, dtype", _with_dtypes(CASES))
def test_repeated_calls_are_bit_identical(case: Case, dtype: torch.dtype):
    first = _reference_run(case, dtype)
    second = _reference_run(case, dtype)
    _assert_identical(first[0], second[0])
    _assert_identical(first[1], second[1])


def _aot_eager_with_static_shapes(gm: torch.fx.GraphModule, example_inputs):
    """``aot_eager`` that first fails on a data-dependent (unbacked) size in the traced graph:
    Inductor cannot always compile those (it failed on torch.unique's pattern count), and
    they force a host sync."""
    from torch._dynamo.backends.registry import lookup_backend
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, torch.Tensor) and free_unbacked_symbols(v):
                raise AssertionError(f"data-dependent shape {tuple(v.shape)} from "
                                     f"{node.format_node()}")
    return lookup_backend("aot_eager")(gm, example_inputs)


@pytest.mark.parametrize("case", CASES)
def test_torch_compile_fullgraph_matches_eager(case: Case):
    torch._dynamo.reset()
    expected, expected_grads = _reference_run(case)
    fn, inputs, params = _build(case)
    compiled = torch.compile(fn, backend=_aot_eager_with_static_shapes, fullgraph=True)
    outputs, grads = _forward_backward(compiled, _diff_inputs(case, inputs), params)
    _assert_same(outputs, expected, **TOLERANCE[F64])
    _assert_same(grads, expected_grads, **TOLERANCE[F64])
    if isinstance(fn, nn.Module):
        # Buffers (running statistics) advance exactly as one eager call advances them.
        eager_fn, eager_inputs, _ = _build(case)
        eager_fn(*eager_inputs)
        _assert_same(list(fn.state_dict().values()), list(eager_fn.state_dict().values()),
                     **TOLERANCE[F64])
        fn.load_state_dict(_build(case)[0].state_dict())
    # What the compiled call left behind (caches, buffers) keeps eager calls working.
    outputs, grads = _forward_backward(fn, _diff_inputs(case, inputs), params)
    _assert_identical(outputs, expected)
    _assert_identical(grads, expected_grads)
