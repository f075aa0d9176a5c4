"""Live tensor memory tracking: the core of the iteration memory estimator (vcfast/estimate.py).

This module depends on torch alone; ``vcfast.memory`` is the public face that adds the
estimator's entry point, so the estimator and the tracker import in one direction only.

:class:`LiveBytesTracker` is a ``TorchDispatchMode`` that sees every aten op (forward, autograd's
backward, optimizer steps) and counts the bytes of the tensor *storages* those ops create, each
storage once, until the storage is freed. It works on the ``meta`` device, where no memory is
used, so a paper-size model at batch 16 can be "run" on a laptop::

    model = build().to("meta")
    x = torch.empty(16, 1, 256, 256, device="meta")
    with LiveBytesTracker(baseline_bytes=tensor_bytes(model, x)) as t:
        with t.phase("forward"):
            loss = model(x).sum()
        with t.phase("backward"):
            loss.backward()
    t.peak_bytes, t.phase_peaks

How storages are followed: ``tensor.untyped_storage()`` returns one stable Python object per
storage for as long as the storage lives (PyTorch's PyObject preservation: when Python lets go of
the object while C++ still holds the storage, e.g. in an autograd saved tensor, the object is kept
alive and handed back later). A ``weakref.finalize`` on that object therefore fires exactly when
the storage itself is freed. The storage's C++ address (``_cdata``) is the key, so one storage
seen through many tensors (views, in-place results, ``out=``) is counted once.

What is counted: the storages ops return. An output whose storage is one of the op's input
storages (views, in-place ops, ``out=``) allocates nothing, except ``aten.lift_fresh``, which
hands on a tensor ``torch.tensor(data)`` filled outside the dispatcher. Not seen: scratch
memory a kernel allocates below the dispatcher (e.g. oneDNN/cuDNN workspaces) and allocator
rounding/caching; ``round_to`` (e.g. 512 for CUDA's caching allocator) approximates the
latter, a ``scratch`` model the former: :func:`onednn_conv_scratch` (fixed, fitted on one
AVX-512 CPU) or :class:`MeasuredConvScratch` (the convolution calls of a workload, recorded by
:class:`ConvCallRecorder` and measured on the machine at hand by :func:`measure_conv_scratch`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["ConvCallRecorder", "LiveBytesTracker", "MeasuredConvScratch", "conv_call_key",
           "measure_conv_scratch", "measure_process_peak", "onednn_conv_scratch",
           "peak_memory", "tensor_bytes"]


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, some subclasses
        return None


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
        for p in obj.parameters():
            if p.grad is not None:
                yield p.grad
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for v in obj:
            yield from _iter_tensors(v)


def tensor_bytes(*objs: Any) -> int:
    """Bytes of the distinct storages behind tensors, modules (parameters, buffers and existing
    ``.grad``), or nested lists/tuples/dicts of them. Shared storages count once."""
    seen: set[int] = set()
    total = 0
    for t in _iter_tensors(objs):
        s = _storage(t)
        if s is None:
            total += t.numel() * t.element_size()
            continue
        if s._cdata not in seen:
            seen.add(s._cdata)
            total += s.nbytes()
    return total


# torch.tensor(data) and friends fill a new tensor outside the dispatcher and then pass it
# through aten.lift_fresh, which returns its input: that is the one place the tracker can see
# the new storage, so it is counted there (it is skipped if already counted).
_LIFT_FRESH = torch.ops.aten.lift_fresh.default


def _mse_loss_bytes(args, kwargs, out: torch.Tensor) -> int | None:
    reduction = kwargs.get("reduction", args[2] if len(args) > 2 else 1)
    if reduction == 0:  # "none": the output is the unreduced loss already
        return None
    return torch.broadcast_shapes(args[0].shape, args[1].shape).numel() * out.element_size()


#: Ops whose real (CPU, CUDA) kernels return a storage larger than their meta kernels do:
#: op -> ``(args, kwargs, out) -> bytes`` of the real output storage (None: as on meta).
#: ``mse_loss`` with a reduction returns the reduced 0-dim loss as a view into its unreduced
#: element-wise buffer, which lives as long as the loss does (torch 2.14; meta: 4 bytes).
_META_STORAGE_BYTES = {torch.ops.aten.mse_loss.default: _mse_loss_bytes}


def _real_storage_bytes(func, args, kwargs, out: torch.Tensor) -> int | None:
    """The bytes the real kernel's output storage has, where the meta kernel's is smaller."""
    fix = _META_STORAGE_BYTES.get(func)
    if fix is None or out.device.type != "meta":
        return None
    return fix(args, kwargs, out)


class LiveBytesTracker(TorchDispatchMode):
    """Track the bytes of live tensor storages allocated by aten ops while the mode is active.

    ``baseline_bytes``: memory that exists before (parameters, inputs; see :func:`tensor_bytes`);
    it is included in ``current_bytes`` and ``peak_bytes``. ``round_to``: round each storage up to
    a multiple of this many bytes (1 = exact; 512 mimics CUDA's caching allocator).
    ``scratch``: optional ``scratch(func, args, kwargs, out) -> bytes`` modelling memory an op's
    kernel allocates and frees internally (invisible to the dispatcher); it counts toward the
    peak on top of the live bytes right after the op, e.g. :func:`onednn_conv_scratch`.

    Storages created while active stay counted until they are freed, even after the mode exits.
    """

    def __init__(self, baseline_bytes: int = 0, round_to: int = 1,
                 scratch: Callable[..., int] | None = None):
        super().__init__()
        self.scratch = scratch
        self.baseline_bytes = int(baseline_bytes)
        self.round_to = max(1, int(round_to))
        self._live: dict[int, int] = {}  # storage _cdata -> counted bytes
        self._allocated = 0  # live bytes of tracked storages
        self._peak_allocated = 0
        self._phases: dict[str, int] = {}  # name -> peak allocated bytes seen in the phase
        self._active_phases: list[str] = []
        self._lock = threading.Lock()
        self.num_allocations = 0

    # -- results -----------------------------------------------------------------------------
    @property
    def current_bytes(self) -> int:
        """Baseline plus the bytes of tracked storages still alive."""
        return self.baseline_bytes + self._allocated

    @property
    def peak_bytes(self) -> int:
        """Baseline plus the largest live total of tracked storages so far."""
        return self.baseline_bytes + self._peak_allocated

    @property
    def peak_allocated_bytes(self) -> int:
        """``peak_bytes`` minus the baseline: the most memory the tracked ops held at once."""
        return self._peak_allocated

    @property
    def phase_peaks(self) -> dict[str, int]:
        """Peak ``current_bytes`` (baseline included) within each named phase, in entry order."""
        return {k: self.baseline_bytes + v for k, v in self._phases.items()}

    def reset_peak(self) -> None:
        """Restart the peak from the present live total (as
        ``torch.cuda.reset_peak_memory_stats``)."""
        self._peak_allocated = self._allocated

    @contextlib.contextmanager
    def phase(self, name: str):
        """Record the peak live bytes between entering and leaving. Phases may nest; re-entering a
        name keeps the maximum over all its entries."""
        with self._lock:
            self._phases[name] = max(self._phases.get(name, 0), self._allocated)
            self._active_phases.append(name)
        try:
            yield self
        finally:
            with self._lock:
                self._active_phases.remove(name)

    def adopt(self, *objs: Any) -> None:
        """Follow storages that exist already and are counted in ``baseline_bytes`` (tensors,
        modules, optimizer states, as for :func:`tensor_bytes`): when one is freed, e.g. the
        gradient buffers ``zero_grad(set_to_none=True)`` drops, the live total falls by its
        bytes (it can go below the baseline), so re-allocating it later is not counted twice."""
        for t in _iter_tensors(objs):
            s = _storage(t)
            if s is None:
                continue
            key = s._cdata
            with self._lock:
                if key in self._live:
                    continue
                self._live[key] = s.nbytes()
            weakref.finalize(s, self._free, key)

    # -- bookkeeping -------------------------------------------------------------------------
    def _free(self, key: int) -> None:
        with self._lock:
            nbytes = self._live.pop(key, None)
            if nbytes is not None:
                self._allocated -= nbytes

    def _add(self, storage, nbytes: int | None = None) -> None:
        key = storage._cdata
        nbytes = storage.nbytes() if nbytes is None else nbytes
        if self.round_to > 1:
            nbytes = -(-nbytes // self.round_to) * self.round_to
        with self._lock:
            if key in self._live:
                return
            self._live[key] = nbytes
            self._allocated += nbytes
            self.num_allocations += 1
            if self._allocated > self._peak_allocated:
                self._peak_allocated = self._allocated
            for name in self._active_phases:
                if self._allocated > self._phases[name]:
                    self._phases[name] = self._allocated
        weakref.finalize(storage, self._free, key)

    def _transient(self, nbytes: int) -> None:
        with self._lock:
            level = self._allocated + nbytes
            if level > self._peak_allocated:
                self._peak_allocated = level
            for name in self._active_phases:
                if level > self._phases[name]:
                    self._phases[name] = level

    def _resize(self, storage) -> None:
        """A tracked storage resized in place (``resize_``, ``out=`` growth): adjust its count."""
        key = storage._cdata
        nbytes = storage.nbytes()
        if self.round_to > 1:
            nbytes = -(-nbytes // self.round_to) * self.round_to
        with self._lock:
            old = self._live.get(key)
            if old is None or old == nbytes:
                return
            self._live[key] = nbytes
            self._allocated += nbytes - old
            if self._allocated > self._peak_allocated:
                self._peak_allocated = self._allocated
            for name in self._active_phases:
                if self._allocated > self._phases[name]:
                    self._phases[name] = self._allocated

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = set()
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                s = _storage(t)
                if s is not None:
                    inputs.add(s._cdata)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = _storage(t)
            if s is None:
                continue
            if s._cdata in inputs and func is not _LIFT_FRESH:
                self._resize(s)  # view / in-place / out=: no new storage, maybe grown
            else:
                self._add(s, _real_storage_bytes(func, args, kwargs, t))
        if self.scratch is not None:
            extra = int(self.scratch(func, args, kwargs, out) or 0)
            if extra > 0:
                self._transient(extra)
        return out


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def onednn_conv_scratch(func, args, kwargs, out) -> int:
    """Scratch model of PyTorch's CPU (oneDNN) convolutions on contiguous (NCHW) tensors.

    Measured on torch 2.14 CPU, on one AVX-512 CPU (fresh process, glibc trimming as in
    ``bench/conftest.py``):
    oneDNN reorders NCHW activations and OIHW weights into blocked layouts inside the kernel,
    below the dispatcher. ``aten.convolution`` holds about max(input, output) + weight bytes
    of reordered copies, ``aten.convolution_backward`` about input + grad_output + weight
    bytes (the weight gradient is computed blocked, then reordered into the plain result).
    The activation terms were fitted on 3x3 convs (batch 2, 64-128 channels, 64-128 px); the
    weight term on the paper-size StarGAN D, whose 4x4 2048->1476 classifier head (185 MiB
    of weight, 128 KiB of input at batch 1) raises the peak by its weight size in both
    directions. Channels-last input or weight: no activation reorder, ~0 scratch measured on
    the small convs, so this returns 0. Other ops: 0.

    oneDNN picks other kernels, with other scratch, on other CPUs: with AVX2 only
    (``DNNL_MAX_CPU_ISA=AVX2``, or an AVX2 CPU) a reduced StarGAN iteration's real peak (64x64,
    conv_dim 16) is 15-22 % above this model's estimate, while the paper-size one still
    matches. For figures that hold on any CPU, measure the calls on the machine:
    :class:`MeasuredConvScratch` / ``vcfast.estimate.calibrate_conv_scratch``.
    """
    name = getattr(func, "__name__", "")
    if not name.startswith(("convolution.", "convolution_backward.")) or func.namespace != "aten":
        return 0
    if name.startswith("convolution."):
        x, w = args[0], args[1]
        return 0 if _channels_last(x, w) else max(_nbytes(x), _nbytes(out)) + _nbytes(w)
    grad_out, x, w = args[0], args[1], args[2]
    return 0 if _channels_last(x, w) else _nbytes(grad_out) + _nbytes(x) + _nbytes(w)


def _channels_last(x: torch.Tensor, w: torch.Tensor) -> bool:
    # As PyTorch's CPU conv: channels-last if the input or the weight is. (Meta kernels may
    # return contiguous outputs where CPU returns channels-last ones, so the weight decides too.)
    def cl(t):
        return (isinstance(t, torch.Tensor) and t.dim() == 4 and t.size(1) > 1
                and t.is_contiguous(memory_format=torch.channels_last)
                and not t.is_contiguous())
    return cl(x) or cl(w)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.nn.Module):
        if all(t.device == device for t in _iter_tensors(obj)):
            return obj
        return copy.deepcopy(obj).to(device) if device.type == "meta" else obj.to(device)
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if device.type == "meta":
            moved = torch.empty_strided(obj.shape, obj.stride(), dtype=obj.dtype, device=device)
        else:
            moved = obj.detach().to(device)
        return moved.requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def peak_memory(fn: Callable, *args: Any, device: str | torch.device | None = "meta",
                round_to: int = 1, scratch: Callable[..., int] | None = None,
                **kwargs: Any) -> dict:
    """Run ``fn(*args, **kwargs)`` under a :class:`LiveBytesTracker` and report its memory.

    ``device``: tensors and modules among ``fn`` (if it is a module) and ``args`` are moved there
    first (to ``meta`` by default: shapes only, no memory; a module is copied, the caller's stays
    as it is). ``None`` leaves everything where it is. For per-phase peaks use
    :class:`LiveBytesTracker` directly.

    Returns a dict: ``peak_bytes`` (baseline included), ``baseline_bytes`` (module state and
    tensor args), ``peak_allocated_bytes`` (beyond the baseline), ``end_bytes`` (live when ``fn``
    returned, its output included), ``output_bytes``, ``num_allocations``.
    """
    if device is not None:
        device = torch.device(device)
        if isinstance(fn, torch.nn.Module):
            fn = _to_device(fn, device)
        args = _to_device(args, device)
        kwargs = _to_device(kwargs, device)
    baseline = tensor_bytes(fn if isinstance(fn, torch.nn.Module) else (), args, kwargs)
    tracker = LiveBytesTracker(baseline_bytes=baseline, round_to=round_to, scratch=scratch)
    with tracker:
        out = fn(*args, **kwargs)
    result = {
        "peak_bytes": tracker.peak_bytes,
        "baseline_bytes": baseline,
        "peak_allocated_bytes": tracker.peak_allocated_bytes,
        "end_bytes": tracker.current_bytes,
        "output_bytes": tensor_bytes(out),
        "num_allocations": tracker.num_allocations,
    }
    del out
    return result


# ---------------------------------------------------------------------------------------------
# Real memory, for validating estimates and for the benchmarks

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, gc
    import torch
    torch.set_num_threads({threads})
    setup = {{}}
    exec({setup!r}, setup)
    run = setup["run"]
    def nbytes(out):
        return sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
    out_bytes = 0
    if {warmup!r}:
        out = run()      # warm-up: plans, thread pools, lazily created buffers
        out_bytes = nbytes(out)
        del out
    gc.collect()
    page = resource.getpagesize()
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    # ru_maxrss cannot be reset and imports peak above the steady state, which would hide a
    # smaller peak of the call. A touched ballast lifts the resident size to the high-water
    # mark, so any allocation by the call raises the mark by exactly what it adds.
    before_ballast = resident()
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gap = lifetime_peak - before_ballast
    ballast = torch.ones(gap // 4 + 4096) if gap > 0 else None
    baseline = resident()
    out = run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if not {warmup!r}:
        out_bytes = nbytes(out)
    print(json.dumps({{"baseline": baseline, "peak": peak, "out_bytes": out_bytes,
                      "resident_before_ballast": before_ballast, "info": setup.get("info", {{}})}}))
    """  # noqa: E501 (the child script's text is kept byte for byte)
)


def measure_process_peak(setup_code: str, threads: int = 2, warmup: bool = True) -> dict:
    """Peak bytes a call allocates beyond its output, measured in a fresh process.

    ``setup_code`` defines ``run()`` returning the output tensor(s), and optionally a dict
    ``info`` (JSON-serialisable) that comes back as ``result["info"]`` after the call. glibc is
    told to return freed memory at once (else it keeps it and hides peaks); the baseline is
    the resident size after a warm-up call (``warmup=False``: after the setup code alone, for
    calls too slow to run twice), lifted to the high-water mark by a ballast; the peak is
    ru_maxrss, so ``extra`` = peak - baseline - output is the transient working memory of one
    call. Also returned: ``baseline``, ``peak``, ``out_bytes``, ``resident_before_ballast``.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    code = _MEASURE.format(threads=threads, setup=setup_code, warmup=bool(warmup))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["extra"] = max(0, figures["peak"] - figures["baseline"] - figures["out_bytes"])
    return figures


# ---------------------------------------------------------------------------------------------
# Convolution scratch measured on this machine
#
# The scratch a CPU convolution allocates below the dispatcher depends on the kernels oneDNN
# picks for the CPU it runs on (AVX-512 and AVX2 builds reorder into different blocked
# layouts), so a fixed model fitted on one CPU can be off on another: onednn_conv_scratch,
# fitted on an AVX-512 CPU, reads a reduced StarGAN iteration (small convolutions) 15-22 % low
# on an AVX2-only one. Measuring the very convolution calls a workload makes, on the machine
# at hand, removes the guess.

_CONV_OPS = frozenset({"aten.convolution.default", "aten.convolution_backward.default"})


def _dense_strides(shape: tuple, channels_last: bool) -> tuple:
    order = [1, 3, 2, 0] if channels_last else list(range(len(shape) - 1, -1, -1))  # fastest first
    strides, step = [0] * len(shape), 1
    for dim in order:
        strides[dim] = step
        step *= max(shape[dim], 1)
    return tuple(strides)


def _describe_argument(value: Any, channels_last: bool) -> Any:
    if isinstance(value, torch.Tensor):
        # What decides the kernel and its scratch: shape, layout and dtype. Dense tensors get
        # canonical strides, because meta and CPU kernels may disagree on the strides of size-1
        # dims, and on layout: meta convolutions return contiguous outputs where CPU ones
        # return channels-last, and a CPU convolution runs channels-last (converting what is
        # not) when its input or weight is, so then every dense 4-D tensor is channels-last.
        shape = tuple(value.shape)
        dense_4d = value.dim() == 4 and (value.is_contiguous()
                                         or value.is_contiguous(memory_format=torch.channels_last))
        if channels_last and dense_4d:
            stride = _dense_strides(shape, channels_last=True)
        elif value.is_contiguous():
            stride = _dense_strides(shape, channels_last=False)
        else:
            stride = tuple(value.stride())
        return ("tensor", shape, stride, str(value.dtype).removeprefix("torch."))
    if isinstance(value, (list, tuple)):
        return tuple(_describe_argument(v, channels_last) for v in value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def conv_call_key(func, args, kwargs=None) -> tuple | None:
    """A hashable, ``repr``-able description of an aten convolution call: the op, then each
    argument (tensors as ``("tensor", shape, stride, dtype)``, lists as tuples). The same call
    on meta and on CPU tensors gets the same key (dense tensors get canonical strides, in the
    layout the CPU convolution runs in). ``None`` for any other op."""
    name = str(func)
    if name not in _CONV_OPS:
        return None
    x, w = (args[0], args[1]) if name == "aten.convolution.default" else (args[1], args[2])
    channels_last = _channels_last(x, w)
    described = tuple(_describe_argument(a, channels_last) for a in args)
    if kwargs:
        described += (("kwargs",) + tuple(sorted((k, _describe_argument(v, channels_last))
                                                 for k, v in kwargs.items())),)
    return (name,) + described


class ConvCallRecorder(TorchDispatchMode):
    """Records the distinct aten convolution calls made while active (on any device).

    ``calls``: :func:`conv_call_key` -> number of calls, in order of first call."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = conv_call_key(func, args, kwargs)
        if key is not None:
            self.calls[key] = self.calls.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


_MEASURE_CONVS = textwrap.dedent(
    """
    import ast, gc, json, resource
    import torch
    torch.set_num_threads({threads})
    keys = ast.literal_eval({keys!r})
    page = resource.getpagesize()

    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def max_rss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def materialize(spec):
        if isinstance(spec, tuple) and spec[:1] == ("tensor",):
            _, shape, stride, dtype = spec
            # as many elements as the strides reach (stride 0, an expanded gradient, shares one)
            extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
            return torch.randn(extent, dtype=getattr(torch, dtype)).as_strided(shape, stride)
        if isinstance(spec, tuple):
            return [materialize(v) for v in spec]
        return spec

    def new_bytes(out, args):
        inputs = {{a.untyped_storage()._cdata for a in args if isinstance(a, torch.Tensor)}}
        seen, total = set(), 0
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs | seen:
                seen.add(t.untyped_storage()._cdata)
                total += t.untyped_storage().nbytes()
        return total

    results = []
    for key in keys:
        namespace, name, overload = key[0].split(".")
        op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
        described = key[1:]
        kwargs = {{}}
        if described and isinstance(described[-1], tuple) and described[-1][:1] == ("kwargs",):
            kwargs = {{keyword: materialize(v) for keyword, v in described[-1][1:]}}
            described = described[:-1]
        args = [materialize(a) for a in described]
        out = op(*args, **kwargs)  # warm-up: oneDNN primitives, thread pools
        del out
        gc.collect()
        # As in measure_process_peak: a touched ballast lifts the resident size to the
        # high-water mark, so ru_maxrss rises with the call's first allocated byte.
        gap = max_rss() - resident()
        ballast = torch.ones(gap // 4 + 4096) if gap > 0 else None
        baseline = resident()
        out = op(*args, **kwargs)
        peak = max_rss()
        results.append(max(0, peak - baseline - new_bytes(out, [*args, *kwargs.values()])))
        del out, ballast, args, kwargs
        gc.collect()
    print(json.dumps(results))
    """
)


def _footprint(key: tuple) -> int:
    def walk(spec):
        if isinstance(spec, tuple) and spec[:1] == ("tensor",):
            _, shape, _stride, dtype = spec
            numel = 1
            for n in shape:
                numel *= n
            return numel * getattr(torch, dtype).itemsize
        if isinstance(spec, tuple):
            return sum(walk(v) for v in spec)
        return 0
    return walk(key[1:])


def measure_conv_scratch(keys: Iterable[tuple], threads: int = 2) -> dict[tuple, int]:
    """Bytes each convolution call (:func:`conv_call_key`) allocates beyond its inputs and
    outputs, measured on this CPU in one fresh process.

    Each call is replayed on random tensors of the recorded shapes, strides and dtypes: one
    warm-up call, then the resident size is lifted to the high-water mark by a ballast and the
    rise of ru_maxrss over the call, less its outputs, is its scratch (glibc returns freed
    memory at once, as in :func:`measure_process_peak`). Calls run smallest first, so the
    ballasts stay small. Linux only (``/proc``, glibc).
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("measure_conv_scratch needs Linux (/proc/self/statm and glibc malloc)")
    ordered = sorted(dict.fromkeys(keys), key=_footprint)
    if not ordered:
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    code = _MEASURE_CONVS.format(threads=threads, keys=repr(ordered))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"convolution scratch measurement failed:\n{result.stderr[-3000:]}")
    return dict(zip(ordered, json.loads(result.stdout.strip().splitlines()[-1])))


class MeasuredConvScratch:
    """A ``scratch`` model for :class:`LiveBytesTracker` made of measured convolution calls
    (:func:`measure_conv_scratch`): a recorded call costs what it measured; a convolution that
    was not measured falls back to ``fallback`` (default :func:`onednn_conv_scratch`) and is
    counted in ``misses``; other ops cost 0."""

    def __init__(self, measured: dict[tuple, int],
                 fallback: Callable[..., int] | None = onednn_conv_scratch):
        self.measured = dict(measured)
        self.fallback = fallback
        self.misses = 0

    def __call__(self, func, args, kwargs, out) -> int:
        key = conv_call_key(func, args, kwargs)
        if key is None:
            return 0
        if key in self.measured:
            return self.measured[key]
        self.misses += 1
        return int(self.fallback(func, args, kwargs, out)) if self.fallback is not None else 0


# A small convolution workload, as source for measure_process_peak (a fresh process) or exec:
# 3 x (conv3x3 + ReLU), 8 -> 64 -> 64 -> 64 channels, batch 2, 192 x 192, fp32, forward +
# backward in run(). Format it with memory_format ("channels_last" or "contiguous_format").
# The tracker's tests and the estimator's benchmark check themselves against it.
CONV_STACK_WORKLOAD = """
import torch
torch.manual_seed(0)
mf = torch.{memory_format}
net = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
    torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()).to(memory_format=mf)
x = torch.randn(2, 8, 192, 192).to(memory_format=mf).requires_grad_()
def run():
    net.zero_grad(set_to_none=True)
    x.grad = None
    net(x).sum().backward()
    return torch.zeros(0)
"""
