"""The iteration estimator against the same iteration on real CPU tensors, exactly, on any CPU.

vcfast/estimate.py sizes a training iteration by running it on the meta device under the
live-bytes tracker of vcfast/tracking.py, which counts the storages aten ops allocate through
the dispatcher. These tests run the very same iteration (reduced size: conv_dim 16, 64x64
spectrograms, a 16-class label space, one D step + one G step, batch 2, fp32) on real CPU
tensors under the same tracker and require, byte for byte:

* the same baseline, iteration peak and per-phase peaks (no kernel-scratch model:
  ``workspace=None``, so nothing here depends on the CPU's instruction set, on oneDNN or on
  the process's resident size);
* for every call of a vcfast custom op the CPU iteration makes, the op's fake (meta)
  implementation returns what the CPU kernel returns: shapes, dtypes, strides, storage bytes,
  and the same outputs aliasing the same inputs (what the tracker counts);
* the same convolution calls (shapes, strides, dtypes, arguments): the calibrated estimate
  replays the calls recorded on meta on real tensors (vcfast.estimate.calibrate_conv_scratch);
* and that a wrong fake implementation breaks all of this.

Real memory, oneDNN scratch included, is compared in bench/bench_models.py
(test_memory_estimate_vs_real), where it depends on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vcfast.estimate import estimate_iteration, iteration_conv_calls
from vcfast.labels import LabelSpace
from vcfast.memory import ConvCallRecorder

REDUCED = dict(image_size=64, conv_dim=16, n_critic=1)
BATCH = 2
# The custom ops whose fakes the meta estimate relies on; the CPU iteration must call them,
# so that the per-op check below cannot pass by checking nothing.
CORE_OPS = {"vcfast.instance_norm_stats.default", "vcfast.norm_relu_forward.default",
            "vcfast.norm_relu_backward.default", "vcfast.masked_multigroup_bce.default",
            "vcfast.masked_multigroup_bce_backward.default", "vcfast.label_table_add.default"}


def _labels() -> LabelSpace:
    return LabelSpace([("speaker", 10), ("accent", 4), ("sex", 2)])


def _options(implementation: str, **extra) -> dict:
    return dict(implementation=implementation, label_space=_labels(), **REDUCED, **extra)


def _tensor_spec(t: torch.Tensor) -> tuple:
    return ("tensor", tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)


def _spec(value):
    if isinstance(value, torch.Tensor):
        return _tensor_spec(value)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    return value


def _outputs(out, args) -> tuple:
    """Per output: shape, dtype, strides, storage bytes, and which input it aliases (if any)."""
    inputs = [a.untyped_storage()._cdata if isinstance(a, torch.Tensor) else None
              for a in tree_leaves(args)]
    described = []
    for t in tree_leaves(out):
        if not isinstance(t, torch.Tensor):
            described.append(t)
            continue
        storage = t.untyped_storage()._cdata
        aliased = inputs.index(storage) if storage in inputs else None
        described.append((tuple(t.shape), t.dtype, tuple(t.stride()),
                          t.untyped_storage().nbytes(), aliased))
    return tuple(described)


class CustomOpCalls(TorchDispatchMode):
    """Each distinct call of a ``vcfast::`` op: its arguments (tensors by shape, strides,
    offset, dtype) -> what the real kernel returned (:func:`_outputs`)."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "vcfast":
            key = (func, _spec(args), tuple(sorted((k, _spec(v)) for k, v in kwargs.items())))
            self.calls.setdefault(key, _outputs(out, (args, kwargs)))
        return out


def _meta_argument(spec):
    if isinstance(spec, tuple) and spec[:1] == ("tensor",):
        _, shape, stride, offset, dtype = spec
        extent = (offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape)
                  else offset)
        return torch.empty(extent, dtype=dtype, device="meta").as_strided(shape, stride, offset)
    if isinstance(spec, tuple):
        return [_meta_argument(v) for v in spec]
    return spec


def fake_mismatches(calls: dict[tuple, tuple]) -> list[str]:
    """Replays each recorded call on meta tensors (the op's fake implementation) and lists
    the calls whose outputs differ from the real kernel's."""
    mismatches = []
    for (func, args_spec, kwargs_spec), real in calls.items():
        args = [_meta_argument(a) for a in args_spec]
        kwargs = {k: _meta_argument(v) for k, v in dict(kwargs_spec).items()}
        fake = _outputs(func(*args, **kwargs), (args, kwargs))
        if fake != real:
            mismatches.append(f"{func}: fake {fake} != real {real}")
    return mismatches


def _run_on_cpu(implementation: str, **extra) -> dict:
    """The tracker's figures for the iteration on real CPU tensors, with its custom-op and
    convolution calls."""
    with CustomOpCalls() as custom, ConvCallRecorder() as convs:
        figures = estimate_iteration(BATCH, device="cpu", **_options(implementation, **extra))
    return {"figures": figures, "custom_op_calls": custom.calls, "conv_calls": convs.calls}


@pytest.fixture(scope="module")
def cpu_runs() -> dict:
    """One real CPU iteration per configuration, shared by the tests (about 0.3 s each)."""
    runs: dict = {}

    def get(implementation: str, **extra) -> dict:
        key = (implementation, tuple(sorted(extra.items())))
        if key not in runs:
            runs[key] = _run_on_cpu(implementation, **extra)
        return runs[key]

    return get


def _tracked_figures(result: dict) -> dict:
    return {"baseline_bytes": result["baseline_bytes"], "peak_bytes": result["peak_bytes"],
            "phases": result["phases"]}


@pytest.mark.parametrize("implementation, extra", [
    ("reference", {}),
    ("vcfast", {}),
    ("vcfast", {"checkpoint_residual_blocks": True}),
])
def test_meta_estimate_equals_the_tracker_on_real_cpu_tensors(cpu_runs, implementation, extra):
    """fp32 only: for bf16 tensors PyTorch's own meta kernel of native_batch_norm returns
    float32 saved statistics where the CPU kernel returns bf16 ones (a few hundred bytes per
    call), so bf16 figures agree only to that (tests/test_estimate.py checks autocast)."""
    meta = estimate_iteration(BATCH, **_options(implementation, **extra))
    cpu = cpu_runs(implementation, **extra)["figures"]
    assert cpu["peak_allocated_bytes"] > 10 * 2**20  # a real iteration ran
    assert _tracked_figures(meta) == _tracked_figures(cpu)


@pytest.mark.parametrize("implementation", ["reference", "vcfast"])
def test_meta_iteration_makes_the_cpu_iteration_convolution_calls(cpu_runs, implementation):
    meta_calls = iteration_conv_calls(BATCH, **_options(implementation))
    cpu_calls = cpu_runs(implementation)["conv_calls"]
    assert len(cpu_calls) > 10
    assert meta_calls == cpu_calls  # same calls, same number of times


def test_fake_implementations_match_the_cpu_kernels_on_the_iteration_calls(cpu_runs):
    calls = cpu_runs("vcfast")["custom_op_calls"]
    called = {str(func) for func, _args, _kwargs in calls}
    assert CORE_OPS <= called, CORE_OPS - called
    assert fake_mismatches(calls) == []


def _calls_of(run: dict, op: str) -> dict:
    calls = {k: v for k, v in run["custom_op_calls"].items() if str(k[0]) == op}
    assert calls, op
    return calls


def test_a_wrong_fake_is_caught(cpu_runs):
    """A fake of vcfast::instance_norm_stats returning the right shapes on twice the storage
    (a silent over-count of statistics autograd keeps for backward) breaks the per-op check
    and the meta == CPU equality; a fake of vcfast::norm_relu_forward returning a wrong shape
    breaks the per-op check."""
    run = cpu_runs("vcfast")
    stats_calls = _calls_of(run, "vcfast.instance_norm_stats.default")
    with torch.library._scoped_library("vcfast", "FRAGMENT") as lib:
        torch.library.register_fake(
            "vcfast::instance_norm_stats",
            lambda z, eps: tuple(z.new_empty((2, z.shape[0], z.shape[1]))[0] for _ in range(3)),
            lib=lib)
        assert len(fake_mismatches(stats_calls)) == len(stats_calls)
        meta = estimate_iteration(BATCH, **_options("vcfast"))
    # The over-count shows in the G step, where the norm-act units run with gradients (in
    # the trainer's D step G runs without them, and that step is the larger one here).
    assert meta["phases"]["g_step"] > run["figures"]["phases"]["g_step"]

    norm_relu_calls = _calls_of(run, "vcfast.norm_relu_forward.default")
    with torch.library._scoped_library("vcfast", "FRAGMENT") as lib:
        torch.library.register_fake(
            "vcfast::norm_relu_forward",
            lambda z, *_: z.new_empty((z.shape[0], z.shape[1] + 1, *z.shape[2:])), lib=lib)
        assert len(fake_mismatches(norm_relu_calls)) == len(norm_relu_calls)
    # the registered fakes are back
    assert fake_mismatches(stats_calls) == fake_mismatches(norm_relu_calls) == []
