"""Every Triton launch runs with its tensors' CUDA device current.

A Triton launch goes to the current CUDA device, not to the device of the pointers it gets,
so each launch site must enter ``vcfast.ops._triton.launch_device``. Without a GPU this is
checked with fake cuda:1 tensors (FakeTensorMode needs no device): ``torch.cuda.device`` and
``torch.library.wrap_triton`` are replaced by recorders, the op implementations run as they
would on a GPU, and every recorded launch must have happened inside a guard for cuda:1.
An AST check makes sure no launch site is missed by the runtime cases below.
"""

import ast
import contextlib
import pathlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from vcfast.ops import _triton

pytest.importorskip("triton")

OPS_DIR = pathlib.Path(__file__).resolve().parents[1] / "vcfast" / "ops"
DEVICE = torch.device("cuda", 1)


def test_launch_device_is_a_no_op_off_cuda(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d))
    with _triton.launch_device(torch.zeros(2)):
        pass
    with _triton.launch_device(torch.zeros(2, device="meta")):
        pass
    assert entered == []


def _launch_calls_outside_guard(tree: ast.AST) -> list[int]:
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call)
                and getattr(item.context_expr.func, "id", None) == "launch_device"
                for item in node.items):
            guarded |= {id(n) for n in ast.walk(node)}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "wrap_triton"
            and id(node) not in guarded]


@pytest.mark.parametrize("path", sorted(OPS_DIR.glob("*_triton.py")), ids=lambda p: p.name)
def test_every_launch_site_is_guarded(path):
    assert _launch_calls_outside_guard(ast.parse(path.read_text())) == []


@pytest.fixture
def recorded(monkeypatch):
    """(fake, launches): fake(*shape, dtype=) makes a cuda:1 fake tensor; launches lists the
    device current at each launch (None = no guard)."""
    current: list = [None]
    launches: list = []

    @contextlib.contextmanager
    def device(d):
        previous, current[0] = current[0], torch.device(d)
        try:
            yield
        finally:
            current[0] = previous

    class Launcher:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(current[0])

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.library, "wrap_triton", Launcher)
    mode = FakeTensorMode()

    def fake(*shape, dtype=torch.float32):
        return FakeTensor(mode, torch.empty(shape, dtype=dtype, device="meta"), DEVICE)

    with mode:
        yield fake, launches


def _run_norm_act(fake):
    from vcfast.ops import norm_act_triton as m
    z = fake(2, 3, 4, 5)
    m._forward_impl(z, fake(6), fake(6), fake(3), fake(3))
    m._backward_impl(fake(2, 3, 4, 5), z, fake(6), fake(6), fake(3), fake(3), True)
    return 2


def _run_spectrogram(fake):
    from vcfast.ops import spectrogram_triton as m
    wave = fake(2, 256)
    args = (fake(64), fake(16), fake(16), 64, 16, 4, 20, 1.0, 2.0, 1e-6, 1e-10, -50.0, 50.0,
            "ieee")
    out = m._forward_impl(wave, *args)
    m._backward_impl(fake(*out.shape), wave, *args)
    return 3


def _run_gradient_penalty(fake):
    from vcfast.ops import gradient_penalty_triton as m
    z = fake(4, 9)
    _, bits = m._leaky_relu_with_bits_impl(z, 0.2)
    m._scale_by_slope_bits_impl(z, bits, 0.2)
    m._penalty_terms_impl(fake(3, 40), 1.0, 10.0)
    return 4


def _run_label_conv(fake):
    from vcfast.ops import label_conv_triton as m
    ids = fake(5, dtype=torch.int64)
    m._label_table_add_impl(fake(2, 3, 5, 5), fake(2, 3, 4, 4), ids, ids)
    m._label_table_grad_impl(fake(2, 3, 5, 5), ids, ids, 4, 4)
    return 3


def _run_classification(fake):
    from vcfast.ops import classification_triton as m
    logits, targets, groups = fake(4, 5), fake(4, 5), [2, 3]
    m._bce_forward_impl(logits, targets, groups, fake(5), 1)
    m._bce_backward_impl(fake(), logits, targets, groups, fake(5), 1, fake(2))
    m._sce_forward_impl(logits, targets, groups, 1)
    m._sce_backward_impl(fake(), logits, targets, groups, 1, fake(2))
    return 4


@pytest.mark.parametrize("run", [_run_norm_act, _run_spectrogram, _run_gradient_penalty,
                                 _run_label_conv, _run_classification],
                         ids=lambda f: f.__name__[5:])
def test_launches_run_on_the_tensors_device(recorded, run):
    fake, launches = recorded
    expected = run(fake)
    assert launches == [DEVICE] * expected


def test_only_conftest_turns_the_interpreter_on():
    """A test module setting TRITON_INTERPRET at import would, on a GPU machine, make every
    later-imported kernel an interpreter object run on CUDA tensors: the GPU run of the suite
    would then never compile a kernel (it happened: tests/conftest.py is the one place)."""
    tests_dir = pathlib.Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests_dir.glob("*.py")):
        if path.name == "conftest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("setdefault", "__setitem__", "putenv")
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value == "TRITON_INTERPRET"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"set TRITON_INTERPRET only in tests/conftest.py: {offenders}"
