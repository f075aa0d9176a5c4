"""Lean generator layers vs the PyTorch layers they replace, CPU, float32.

(a) ``LabelConcatConv2d`` -- StarGAN's first layer at paper size: 1 spectrogram channel plus
    1479 label channels -> 64, 7x7, padding 3, 256x256, batch 2 -- forward+backward (weight
    and bias gradients; the input needs none in G training) vs ``nn.Conv2d`` on
    ``cat(x, c tiled over H x W)``, what the official code does.
(b) The label-table kernels behind it on the same layer's output ([2, 64, 256, 256], table
    [2, 64, 7, 7]): ``label_table_add`` and its backward ``label_table_grad``, C++ (cpu)
    vs the plain-PyTorch references.
(c) ``InstanceNormReLUConv2d`` -- 256 channels, 64x64, 3x3 padding 1, batch 2 (the residual
    trunk's width) -- forward+backward (z, norm and conv parameter gradients) vs
    ``nn.InstanceNorm2d(affine=True, track_running_stats=True)`` + ``nn.ReLU`` + ``nn.Conv2d``;
    and its fused kernels (statistics, norm-ReLU forward, norm-ReLU train backward), C++ vs
    the references.

Timings through pytest-benchmark; ``test_extra_memory_table`` prints each path's peak memory
beyond its output, measured in a fresh process (conftest.measure_extra_memory), and for the
layers (a), (c) the bytes autograd keeps from forward to backward ("kept", unique storages
seen by saved_tensors_hooks, parameters and the layer's inputs excluded: the caller holds
those either way) -- what a layer adds to a network's activation memory, where the lean
layers win; a single layer's transient peak hides it (the lean unit recomputes in its
backward what the reference kept). Under
``--benchmark-disable`` (the CI smoke run) the spatial sizes drop (32x32 for (a)/(b), 16x16
for (c)) and the memory table measures only (c), so the run stays quick.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import BENCH_THREADS, conditions, measure_extra_memory

import vcfast  # noqa: F401  (registers the ops)
from vcfast import _extension
from vcfast.memory import measure_process_peak

BATCH = 2
LABELS = 1479
STEM_OUT = 64
TRUNK = 256

# Each case's setup code defines run() (used for timing here and for memory in a fresh
# process). {size} is the spatial size; the code is self-contained.
_COMMON = """
import torch
from torch import nn
import vcfast
torch.manual_seed(0)
"""

_SETUP = {
    ("label_conv", "vcfast-LabelConcatConv2d"): """
from vcfast.nn import LabelConcatConv2d
layer = LabelConcatConv2d(1, {labels}, {out}, 7, padding=3)
x = torch.rand({batch}, 1, {size}, {size})
c = (torch.rand({batch}, {labels}) < 0.003).float()
grad_out = torch.randn({batch}, {out}, {size}, {size})
inputs = (x, c)
def forward():
    return layer(x, c)
def run():
    layer.weight.grad = layer.bias.grad = None
    forward().backward(grad_out)
    return layer.weight.grad, layer.bias.grad
""",
    ("label_conv", "torch-conv-on-tiled"): """
layer = nn.Conv2d(1 + {labels}, {out}, 7, padding=3)
x = torch.rand({batch}, 1, {size}, {size})
c = (torch.rand({batch}, {labels}) < 0.003).float()
grad_out = torch.randn({batch}, {out}, {size}, {size})
inputs = (x, c)
def forward():
    tiled = c[:, :, None, None].expand(-1, -1, {size}, {size})
    return layer(torch.cat([x, tiled], 1))
def run():
    layer.weight.grad = layer.bias.grad = None
    forward().backward(grad_out)
    return layer.weight.grad, layer.bias.grad
""",
    ("table_add", "vcfast-cpu"): """
from vcfast.ops.label_conv import tap_patterns
rows, _ = tap_patterns({size}, 7, 1, 3)
cols, _ = tap_patterns({size}, 7, 1, 3)
conv_out = torch.randn({batch}, {out}, {size}, {size})
table = torch.randn({batch}, {out}, int(rows.max()) + 1, int(cols.max()) + 1)
def run():
    return torch.ops.vcfast.label_table_add(conv_out, table, rows, cols)
""",
    ("table_add", "vcfast-reference"): """
from vcfast.ops.label_conv import tap_patterns, label_table_add_reference
rows, _ = tap_patterns({size}, 7, 1, 3)
cols, _ = tap_patterns({size}, 7, 1, 3)
conv_out = torch.randn({batch}, {out}, {size}, {size})
table = torch.randn({batch}, {out}, int(rows.max()) + 1, int(cols.max()) + 1)
def run():
    return label_table_add_reference(conv_out, table, rows, cols)
""",
    ("table_grad", "vcfast-cpu"): """
from vcfast.ops.label_conv import tap_patterns
rows, _ = tap_patterns({size}, 7, 1, 3)
cols, _ = tap_patterns({size}, 7, 1, 3)
grad = torch.randn({batch}, {out}, {size}, {size})
R, S = int(rows.max()) + 1, int(cols.max()) + 1
def run():
    return torch.ops.vcfast.label_table_grad(grad, rows, cols, R, S)
""",
    ("table_grad", "vcfast-reference"): """
from vcfast.ops.label_conv import tap_patterns, label_table_grad_reference
rows, _ = tap_patterns({size}, 7, 1, 3)
cols, _ = tap_patterns({size}, 7, 1, 3)
grad = torch.randn({batch}, {out}, {size}, {size})
R, S = int(rows.max()) + 1, int(cols.max()) + 1
def run():
    return label_table_grad_reference(grad, rows, cols, R, S)
""",
    ("norm_relu_conv", "vcfast-InstanceNormReLUConv2d"): """
from vcfast.nn import InstanceNormReLUConv2d
unit = InstanceNormReLUConv2d.from_sizes({trunk}, {trunk}, 3, padding=1, bias=False)
z = torch.randn({batch}, {trunk}, {size}, {size}, requires_grad=True)
grad_out = torch.randn({batch}, {trunk}, {size}, {size})
inputs = (z,)
def forward():
    return unit(z)
def run():
    z.grad = None
    for p in unit.parameters():
        p.grad = None
    forward().backward(grad_out)
    return z.grad
""",
    ("norm_relu_conv", "torch-IN+ReLU+Conv2d"): """
unit = nn.Sequential(nn.InstanceNorm2d({trunk}, affine=True, track_running_stats=True), nn.ReLU(),
                     nn.Conv2d({trunk}, {trunk}, 3, padding=1, bias=False))
z = torch.randn({batch}, {trunk}, {size}, {size}, requires_grad=True)
grad_out = torch.randn({batch}, {trunk}, {size}, {size})
inputs = (z,)
def forward():
    return unit(z)
def run():
    z.grad = None
    for p in unit.parameters():
        p.grad = None
    forward().backward(grad_out)
    return z.grad
""",
}

_KERNEL_SETUP = """
from vcfast.ops import norm_act as ops
z = torch.randn({batch}, {trunk}, {size}, {size}) * 2 + 0.5
grad_a = torch.randn_like(z)
gamma = torch.rand({trunk}) + 0.5
beta = torch.randn({trunk}) * 0.5
mean, rstd, _ = ops.instance_norm_stats_reference(z, 1e-5)
"""
_KERNEL_RUN = {
    ("stats", "vcfast-cpu"): "torch.ops.vcfast.instance_norm_stats(z, 1e-5)",
    ("stats", "vcfast-reference"): "ops.instance_norm_stats_reference(z, 1e-5)",
    ("norm_relu_fwd", "vcfast-cpu"):
        "torch.ops.vcfast.norm_relu_forward(z, mean, rstd, gamma, beta)",
    ("norm_relu_fwd", "vcfast-reference"):
        "ops.norm_relu_forward_reference(z, mean, rstd, gamma, beta)",
    ("norm_relu_bwd", "vcfast-cpu"):
        "torch.ops.vcfast.norm_relu_backward(grad_a, z, mean, rstd, gamma, beta, True)",
    ("norm_relu_bwd", "vcfast-reference"):
        "ops.norm_relu_backward_reference(grad_a, z, mean, rstd, gamma, beta, True)",
}
for _key, _expr in _KERNEL_RUN.items():
    _SETUP[_key] = _KERNEL_SETUP + f"def run():\n    return {_expr}\n"

_NEEDS_EXTENSION = {"vcfast-cpu"}
_CASE_SIZE = {"label_conv": "stem", "table_add": "stem", "table_grad": "stem"}  # else "trunk"
_DESCRIPTION = {
    "label_conv": "first layer 1+{labels} -> {out} ch, 7x7 p3, fwd+bwd",
    "table_add": "label_table_add [B, {out}, H, W] + [B, {out}, 7, 7]",
    "table_grad": "label_table_grad [B, {out}, H, W] -> [B, {out}, 7, 7]",
    "norm_relu_conv": "IN -> ReLU -> conv3x3, {trunk} ch, fwd+bwd",
    "stats": "instance-norm stats, {trunk} ch",
    "norm_relu_fwd": "norm-ReLU forward, {trunk} ch",
    "norm_relu_bwd": "norm-ReLU backward (train), {trunk} ch",
}


def _sizes(smoke: bool) -> dict:
    return {"stem": 32 if smoke else 256, "trunk": 16 if smoke else 64}


def _code(case: str, impl: str, smoke: bool) -> str:
    size = _sizes(smoke)[_CASE_SIZE.get(case, "trunk")]
    return _COMMON + textwrap.dedent(_SETUP[case, impl]).format(
        size=size, batch=BATCH, labels=LABELS, out=STEM_OUT, trunk=TRUNK)


def _label(case: str, smoke: bool) -> str:
    size = _sizes(smoke)[_CASE_SIZE.get(case, "trunk")]
    what = _DESCRIPTION[case].format(labels=LABELS, out=STEM_OUT, trunk=TRUNK)
    return f"{what}, batch {BATCH}, {size}x{size}, fp32, CPU, {BENCH_THREADS} threads"


@pytest.fixture(scope="module")
def smoke(request) -> bool:
    return bool(request.config.getoption("benchmark_disable", False))


CASES = [(case, impl) for (case, impl) in _SETUP]


@pytest.mark.parametrize("case,impl", CASES, ids=[f"{c}-{i}" for c, i in CASES])
def test_layer_cpu(benchmark, case, impl, smoke):
    if impl in _NEEDS_EXTENSION and not _extension.EXTENSION_LOADED:
        pytest.skip("vcfast._C not built")
    namespace: dict = {}
    exec(_code(case, impl, smoke), namespace)
    run = namespace["run"]
    benchmark.group = _label(case, smoke)
    benchmark.extra_info["conditions"] = conditions()
    if case == "label_conv" and impl == "torch-conv-on-tiled" and not smoke:
        # ~2.4 TFLOP per call at paper size (the tile has 1480 channels): one round.
        out = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    elif case in ("label_conv", "norm_relu_conv") and not smoke:
        out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    else:
        out = benchmark(run)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(torch.isfinite(t).all() for t in outs)


def test_lean_layers_agree_with_peers(smoke):
    """The benchmarked pairs compute the same thing (float32 tolerance), so the timings compare
    like with like."""
    for case in ("label_conv", "norm_relu_conv", "table_add", "norm_relu_bwd"):
        impls = [impl for (c, impl) in CASES if c == case]
        if "vcfast-cpu" in impls and not _extension.EXTENSION_LOADED:
            continue
        results = []
        for impl in impls:
            namespace: dict = {}
            # each setup seeds 0 and creates same-shaped parameters in the same order, so
            # both sides get identical parameters and inputs
            code = _code(case, impl, smoke=True)
            exec(code, namespace)
            out = namespace["run"]()
            results.append(out if isinstance(out, tuple) else (out,))
        for got, want in zip(results[0], results[1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=case)


def _kept_for_backward(namespace: dict) -> int:
    """Bytes of the unique storages autograd saves in ``forward()``, minus parameters and inputs."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = namespace["forward"]()
    held = [namespace[k] for k in ("layer", "unit") if k in namespace][0]
    for t in [*held.parameters(), *held.buffers(), *namespace["inputs"]]:
        storages.pop(t.untyped_storage().data_ptr(), None)
    storages.pop(out.untyped_storage().data_ptr(), None)
    del out
    return sum(storages.values())


def test_extra_memory_table(capsys, smoke):
    """Peak memory beyond the output of one call, each path in a fresh process; bytes kept
    for backward by the layers."""
    cases = ["norm_relu_conv"] if smoke else list(dict.fromkeys(c for c, _ in CASES))
    rows = []
    for case in cases:
        for (c, impl) in CASES:
            if c != case or (impl in _NEEDS_EXTENSION and not _extension.EXTENSION_LOADED):
                continue
            code = _code(case, impl, smoke)
            if case == "label_conv" and impl == "torch-conv-on-tiled" and not smoke:
                # too slow to run twice: baseline after the setup instead of after a warm-up
                figures = measure_process_peak(code, BENCH_THREADS, warmup=False)
            else:
                figures = measure_extra_memory(code)
            kept = None
            if case in ("label_conv", "norm_relu_conv"):
                namespace: dict = {}
                exec(code, namespace)
                kept = _kept_for_backward(namespace)
                del namespace
            rows.append((case, impl, figures["extra"], figures["out_bytes"], kept))
    mib = 2**20
    with capsys.disabled():
        print(f"\nextra (peak) memory of one call beyond its output, and bytes kept from "
              f"forward to backward, fp32, batch {BATCH}; {conditions()}")
        print(f"{'case':<16}{'impl':<32}{'extra MiB':>10}{'output MiB':>12}{'kept MiB':>10}")
        for case, impl, extra, out, kept in rows:
            kept_text = "-" if kept is None else f"{kept / mib:.1f}"
            print(f"{case:<16}{impl:<32}{extra / mib:>10.1f}{out / mib:>12.1f}{kept_text:>10}")
    assert all(r[3] > 0 for r in rows)
    by = {(r[0], r[1]): r[2] for r in rows}
    lean_key = ("norm_relu_conv", "vcfast-InstanceNormReLUConv2d")
    ref_key = ("norm_relu_conv", "torch-IN+ReLU+Conv2d")
    assert by[lean_key] <= by[ref_key] * 1.1 + 2**20, (by[lean_key], by[ref_key])
    kept = {(r[0], r[1]): r[4] for r in rows if r[4] is not None}
    # the lean unit keeps only z (an input) and [N, C] statistics; the reference also keeps
    # the ReLU output
    assert kept[lean_key] < kept[ref_key]

