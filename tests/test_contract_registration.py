"""The contract, continued: registered ops, Inductor, and the metric.

* ``torch.library.opcheck`` of every ``vcfast::`` op a public callable dispatches to, with
  the arguments it really passes (recorded while it runs forward and backward), for
  contiguous, non-contiguous and channels-last inputs: schema, fake (meta) kernel and its
  strides, autograd registration, AOT dispatch. The Triton twins of the C++ ops
  (same schema) get the same arguments under the interpreter.
* one ``inductor`` compile per op family (the other compiled checks use ``aot_eager``).
* ``vcfast.multigroup_accuracy`` (no gradient): no_grad, inference_mode, repeated calls,
  strided inputs, torch.compile.

Without the compiled extension the C++ sources skip; without the interpreter, the Triton ones.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_contract import (
    CASES,
    GROUPS,
    TRITON_ON_CPU,
    Case,
    _assert_same,
    _bce,
    _build,
    _channels_last,
    _diff_inputs,
    _forward_backward,
    _label_conv,
    _logits,
    _non_contiguous,
    _norm_relu_conv,
    _onehot_targets,
    _outputs,
    _reference_run,
    _spectrogram,
    _weights,
    needs_cpu_kernels,
)
from torch.utils._python_dispatch import TorchDispatchMode

import vcfast

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

CASES_BY_ID = {p.id: p for p in CASES}


# ---------------------------------------------------------------------------------------------
# opcheck on the arguments the public callables really pass


class _RecordVcfastCalls(TorchDispatchMode):
    """Records every ``vcfast::`` op call as (op, args, kwargs, phase) while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "vcfast":
            def detach(a):
                return a.detach() if isinstance(a, torch.Tensor) else a

            self.calls.append((func, tuple(detach(a) for a in args),
                               {k: detach(v) for k, v in kwargs.items()}, self.phase))
        return func(*args, **kwargs)


def _recorded_calls(case: Case, layout) -> list:
    """The vcfast op calls of a forward and backward with inputs and output gradients in
    ``layout``."""
    fn, inputs, params = _build(case)
    leaves = _diff_inputs(case, inputs)
    with _RecordVcfastCalls() as recorder:
        outputs = _outputs(fn(*(layout(t) for t in leaves)))
        grads = [layout(w) if w.dim() > 0 else w for w in _weights(outputs)]
        recorder.phase = "backward"
        torch.autograd.backward(outputs, grads)
    return recorder.calls


def _has_autograd_formula(op) -> bool:
    """An op from ``torch.library.custom_op`` always has an Autograd kernel (one that raises
    without a formula), so ask its definition; a C++ op has one only when a formula was
    registered for it."""
    from torch._library.custom_ops import _maybe_get_opdef

    definition = _maybe_get_opdef(op.name())
    if definition is not None:
        return definition._backward_fn is not None
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd")


def _requiring_grad(args: tuple) -> tuple:
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in args)


def _triton_twin(op):
    """``vcfast::<name>_triton`` when it takes exactly the C++ op's arguments, else None."""
    if not TRITON_ON_CPU:
        return None
    from vcfast.ops import label_conv_triton, norm_act_triton  # noqa: F401  (registers them)

    packet = getattr(torch.ops.vcfast, op.name().split("::")[1] + "_triton", None)
    if packet is None:
        return None
    twin = packet.default
    names = [a.name for a in twin._schema.arguments]
    return twin if names == [a.name for a in op._schema.arguments] else None


ALL_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
                "test_aot_dispatch_dynamic")

# Cases whose calls reach every registered op (the modules reach the C++ ops only when the
# extension is built; otherwise they run the plain-PyTorch references).
OPCHECK_SOURCES = [
    pytest.param(case_id, marks=[*CASES_BY_ID[case_id].marks, *extra], id=case_id)
    for case_id, extra in (
        ("log_spectrogram-cpu", ()), ("log_spectrogram-triton", ()),
        ("masked_multigroup_bce-mean-cpu", ()), ("masked_multigroup_bce-none-cpu", ()),
        ("masked_multigroup_softmax_ce-mean-cpu", ()),
        ("masked_multigroup_bce-mean-triton", ()), ("masked_multigroup_softmax_ce-mean-triton", ()),
        ("LabelConcatConv2d", (needs_cpu_kernels,)),
        ("InstanceNormReLUConv2d-train", (needs_cpu_kernels,)),
        ("InstanceNormReLUConv2d-eval", (needs_cpu_kernels,)),
    )
]


@pytest.mark.parametrize("case_id", OPCHECK_SOURCES)
def test_opcheck_of_the_ops_a_public_call_dispatches_to(case_id: str):
    case = CASES_BY_ID[case_id].values[0]
    layouts = [lambda t: t, _non_contiguous]
    if case.image_inputs:
        layouts.append(_channels_last)
    checked = set()
    for i, layout in enumerate(layouts):
        # Strided arguments need the schema and the fake kernel's output strides checked;
        # the full check (AOT dispatch compiles) runs once, on dense arguments.
        test_utils = ALL_OPCHECKS if i == 0 else ("test_schema", "test_faketensor")
        calls = _recorded_calls(case, layout)
        assert calls, f"{case_id} dispatched to no vcfast op"
        for op, args, kwargs, phase in calls:
            # One check per op and argument layout (repeated calls add nothing).
            key = (op.name(), tuple((a.shape, a.stride(), a.dtype) for a in args
                                    if isinstance(a, torch.Tensor)))
            if key in checked:
                continue
            checked.add(key)
            ops = [op] + [t for t in (_triton_twin(op),) if t is not None]
            for target in ops:
                torch.library.opcheck(target, args, kwargs, test_utils=test_utils)
                # Backward ops are differentiable only where second derivatives are
                # supported; the second-derivative contract test covers them.
                if phase == "forward" and _has_autograd_formula(target):
                    torch.library.opcheck(target, _requiring_grad(args), kwargs,
                                          test_utils=test_utils)


# ---------------------------------------------------------------------------------------------
# Inductor: one case per op family


INDUCTOR_CASES = [
    pytest.param(Case(_spectrogram("cpu")), id="log_spectrogram-cpu", marks=needs_cpu_kernels),
    pytest.param(Case(_bce("cpu", "mean"), constant=(1,)), id="masked_multigroup_bce-cpu",
                 marks=needs_cpu_kernels),
    pytest.param(Case(_label_conv, image_inputs=True), id="LabelConcatConv2d"),
    pytest.param(Case(_norm_relu_conv(True), image_inputs=True), id="InstanceNormReLUConv2d"),
]


@pytest.fixture
def inductor_cache_per_cpu_capability(monkeypatch):
    """Inductor's on-disk cache does not key on the vector ISA: a graph compiled in a run with
    AVX-512 was reused by a later run with ATEN_CPU_CAPABILITY=avx2 and gave wrong numbers
    (and the other way round crashed). One cache folder per capability keeps such runs apart."""
    from torch._inductor.runtime.runtime_utils import cache_dir

    folder = os.path.join(cache_dir(), f"cpu-{torch.backends.cpu.get_cpu_capability()}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", folder)


@pytest.mark.usefixtures("inductor_cache_per_cpu_capability")
@pytest.mark.parametrize("case", INDUCTOR_CASES)
def test_torch_compile_inductor_matches_eager(case: Case):
    torch._dynamo.reset()
    expected, expected_grads = _reference_run(case)
    fn, inputs, params = _build(case)
    compiled = torch.compile(fn, fullgraph=True)
    outputs, grads = _forward_backward(compiled, _diff_inputs(case, inputs), params)
    # Inductor may reorder float64 arithmetic: close, not identical.
    _assert_same(outputs, expected, rtol=1e-10, atol=1e-10)
    _assert_same(grads, expected_grads, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# multigroup_accuracy: no gradient, Python numbers out


def _accuracy_inputs():
    return _logits(), _onehot_targets()


def test_multigroup_accuracy_without_autograd_and_repeated():
    logits, targets = _accuracy_inputs()
    expected = vcfast.multigroup_accuracy(logits, targets, GROUPS)
    assert expected["group1"]["count"] == 4 and expected["group0"]["count"] == 3
    with torch.no_grad():
        assert vcfast.multigroup_accuracy(logits, targets, GROUPS) == expected
    with torch.inference_mode():
        assert vcfast.multigroup_accuracy(logits, targets, GROUPS) == expected
    tracked = logits.clone().requires_grad_()
    assert vcfast.multigroup_accuracy(tracked, targets, GROUPS) == expected
    assert vcfast.multigroup_accuracy(_non_contiguous(logits), _non_contiguous(targets),
                                      GROUPS) == expected


def test_multigroup_accuracy_in_a_compiled_function_with_graph_breaks():
    # It returns Python numbers, so it syncs with the host: a compiled evaluation step that
    # calls it breaks the graph there and must still give the eager result.
    torch._dynamo.reset()
    logits, targets = _accuracy_inputs()

    def evaluate(x, t):
        return vcfast.multigroup_accuracy(x * 2, t, GROUPS)

    compiled = torch.compile(evaluate, backend="aot_eager")
    assert compiled(logits, targets) == evaluate(logits, targets)


def test_multigroup_accuracy_under_fullgraph_compile_raises_a_clear_error():
    torch._dynamo.reset()
    logits, targets = _accuracy_inputs()
    compiled = torch.compile(vcfast.multigroup_accuracy, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="multigroup_accuracy.*torch.compile"):
        compiled(logits, targets, GROUPS)
