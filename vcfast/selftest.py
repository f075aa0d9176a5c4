"""``vcfast selftest``: does every kernel give the right answer, and how fast, on this machine?

For each op, each backend that can run on the device (``reference``, ``cpu`` (C++), ``cuda``
(C++/CUDA), ``triton``; for the two layer-level ops ``vcfast`` = the lean path as a user calls
it), fp32 and bf16: the forward outputs and the backward gradients are compared with the
float64 reference (the op's ``reference`` formulation run on the same inputs in float64), then
the call (forward + backward) is timed against the reference backend and against the PyTorch
code a user would otherwise write (the "peer"). Last, one D step and one G step of the
paper-size models at batch 1, with their peak memory beside the estimator's figure
(:func:`vcfast.estimate.estimate_iteration`, which runs the very same step code on the meta
device).

Error metric: ``max |got - float64 truth| / max |float64 truth|`` over each output (the worst
output counts), so one tolerance per dtype fits every op whatever its scale. A wrong kernel
gives errors of order 1; rounding gives ~1e-7 (fp32) and ~1e-3 (bf16).

Exit status (``run_selftest``): 0 when every row is within its tolerance, 1 when any error is
above tolerance or any op or model step raised.

Triton on the CPU runs only in Triton's interpreter (``TRITON_INTERPRET=1`` set before the
process starts); without it the Triton rows are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import importlib
import json
import math
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BF16_TOLERANCE_CAP", "OP_CASES", "TOLERANCES", "bf16_tolerance", "check_names",
           "measure_peak", "run_selftest"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: Allowed ``max |err| / max |truth|`` per op and dtype. fp32 kernels land at 1e-7 .. 1e-6 and
#: bf16 ones at a few 1e-3 (one bf16 rounding is 2^-9 = 2e-3); each tolerance leaves about 10x
#: margin over what the CPU and interpreter kernels reach here, and a wrong kernel is ~1.
#: The label conv and the gradient penalty are mostly PyTorch convolutions, for which cuDNN
#: may pick FFT or Winograd algorithms (errors up to ~1e-4 in fp32), hence 1e-3 there; the
#: vcfast kernels inside them are held to 1e-5 .. 1e-6 by the label_table, leaky_relu_bits and
#: penalty_terms rows. In bf16 those two run under bf16 autocast with fp32 weights, as
#: training with ``--bf16`` does. In bf16 a row's bound also grows to twice the error of
#: the plain-PyTorch reference in bf16 on the same inputs (see :func:`bf16_tolerance`).
TOLERANCES: dict[str, dict[str, float]] = {
    "log_spectrogram": {"fp32": 1e-4, "bf16": 2e-2},
    "masked_multigroup_bce": {"fp32": 1e-5, "bf16": 2e-2},
    "masked_multigroup_softmax_ce": {"fp32": 1e-5, "bf16": 2e-2},
    "label_table": {"fp32": 1e-5, "bf16": 2e-2},
    "label_conv": {"fp32": 1e-3, "bf16": 5e-2},
    "norm_relu": {"fp32": 1e-4, "bf16": 2e-2},
    "leaky_relu_bits": {"fp32": 1e-6, "bf16": 2e-2},
    "penalty_terms": {"fp32": 1e-5, "bf16": 2e-2},
    "gradient_penalty": {"fp32": 1e-3, "bf16": 5e-2},
}

#: No bf16 row passes above this, whatever the reference's own bf16 error.
BF16_TOLERANCE_CAP = 0.5


def bf16_tolerance(base: float, reference_error: float | None) -> float:
    """The bound of a bf16 row: ``base``, or twice the plain-PyTorch reference's own bf16
    error where that is larger, at most :data:`BF16_TOLERANCE_CAP`.

    Some reference formulations lose more to bf16 than the fused kernels, which accumulate in
    fp32: the label-table gradient through autograd's indexing backward sums thousands of
    positions in bf16 (2.3e-2 at 2x64x128x128, growing with the image), and the official
    double-backward penalty's weight gradients under autocast are 0.18-0.20 off float64 at
    64x64 and 128x128 critics (their correlations cancel to a few percent of their bf16
    terms; the lean penalty agrees with it to 3e-3). A kernel is then held to "no worse than
    twice what PyTorch itself reaches in bf16"; a wrong one is still ~1.
    """
    if reference_error is None or not math.isfinite(reference_error):
        return base
    return min(max(base, 2 * reference_error), BF16_TOLERANCE_CAP)


# ---------------------------------------------------------------------------------------------
# Conditions


def cpu_model() -> str:
    """/proc/cpuinfo's "model name" (else what the platform module knows); the benchmarks
    print it too (bench/conftest.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


def conditions(device: torch.device) -> dict:
    """What the timings and errors depend on: versions, device, CPU, threads."""
    import vcfast

    info = {
        "vcfast": vcfast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vcfast_cpu_isa": vcfast.cpu_isa(),
        "threads": torch.get_num_threads(),
        # Other processes' load skews the timings (not the errors): a load above the core
        # count means the threads of these ops wait for cores.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "extension": vcfast.build_info(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device_name"] = info["cpu_model"]
    return info


def backend_status(device: torch.device) -> dict[str, str | None]:
    """Each backend that belongs to this device type -> None (it runs) or why it cannot.

    ``cpu`` kernels take CPU tensors only and ``cuda`` kernels CUDA tensors only, so each
    device lists three of the four.
    """
    from vcfast import _extension

    status: dict[str, str | None] = {"reference": None}
    if device.type == "cpu":
        status["cpu"] = (None if _extension.EXTENSION_LOADED else
                         f"the compiled extension vcfast._C did not load "
                         f"({_extension.build_info()['extension_error']})")
        if not _extension.triton_available():
            status["triton"] = "the triton package is not installed"
        elif not _extension.triton_interpret():
            status["triton"] = ("Triton runs on the CPU only in its interpreter: set "
                                "TRITON_INTERPRET=1 before starting (slow; for testing)")
        else:
            status["triton"] = None
    else:
        status["cuda"] = (None if _extension.extension_has_cuda() else
                          "vcfast._C was built without the CUDA kernels (rebuild with a CUDA "
                          "toolkit: pip install --no-build-isolation -e .)")
        status["triton"] = None if _extension.triton_available() else \
            "the triton package is not installed"
    status["vcfast"] = None  # the lean layer as users call it: always runs
    return status


# ---------------------------------------------------------------------------------------------
# Op cases


@dataclasses.dataclass
class Setting:
    """What a case's inputs depend on."""

    device: torch.device
    dtype: str  # "fp32" or "bf16"
    size: str  # "quick", "cpu" or "gpu"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def randn(self, *shape, gen: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Drawn on the CPU from a seeded generator: the same inputs on every device.
        return torch.randn(*shape, generator=gen).to(self.device, dtype or self.torch_dtype)

    def rand(self, *shape, gen: torch.Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(self.device, dtype or self.torch_dtype)

    def autocast_device(self) -> str | None:
        """For the cases that model training under ``--bf16`` (fp32 weights, bf16 autocast):
        the device type to autocast on in bf16, else None."""
        return self.device.type if self.dtype == "bf16" else None


def _autocast(inputs: dict):
    """``torch.autocast`` to bf16 where the inputs ask for it (``inputs["autocast"]``)."""
    device_type = inputs.get("autocast")
    if device_type is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


Outputs = dict[str, torch.Tensor]


@dataclasses.dataclass
class OpCase:
    """One op: inputs, a run per backend, and the peer to time against.

    ``run(backend, inputs)`` runs forward and backward and returns (forward outputs, backward
    outputs); it makes its own leaf tensors, so it can be called again on the same inputs.
    The float64 truth is ``run("reference", ...)`` on the inputs (tensors and modules)
    converted to float64.
    """

    op: str
    backends: tuple[str, ...]
    setup: Callable[[Setting], dict]
    run: Callable[[str, dict], tuple[Outputs, Outputs]]
    peer_name: str | None = None
    peer: Callable[[dict], object] | None = None
    describe: Callable[[dict], str] = dataclasses.field(default=lambda inputs: "")
    #: The peer is the reference backend itself (official layouts): timed once, not twice.
    peer_is_reference: bool = False


def _to_float64(inputs: dict) -> dict:
    """Floating tensors and modules as float64 copies, without autocast; the rest as is."""
    copied = copy.deepcopy({k: v for k, v in inputs.items() if isinstance(v, nn.Module)})
    out = {}
    for key, value in inputs.items():
        if isinstance(value, nn.Module):
            out[key] = copied[key].double()
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = value.detach().double()
        else:
            out[key] = value
    out["autocast"] = None  # the truth runs in float64 throughout
    return out


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


# --- log_spectrogram ---------------------------------------------------------------------------

_SPECTROGRAM_SIZES = {"quick": (1, 64), "cpu": (2, 256), "gpu": (16, 256)}  # (batch, frames)


def _spectrogram_setup(s: Setting) -> dict:
    from vcfast.ops.spectrogram import PRESETS

    config = PRESETS["stargan_vc"]
    batch, frames = _SPECTROGRAM_SIZES[s.size]
    gen = s.generator()
    wave = (s.rand(batch, config.samples_for_frames(frames), gen=gen, dtype=torch.float32) - 0.5)
    return {"wave": wave.to(s.torch_dtype),
            "grad": s.randn(batch, config.n_bins, frames, gen=gen, dtype=torch.float32)}


def _spectrogram_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    from vcfast.ops.spectrogram import log_spectrogram

    wave = _leaf(inputs["wave"])
    out = log_spectrogram(wave, backend=backend)
    out.backward(inputs["grad"].to(out.dtype))
    return {"spectrogram": out}, {"grad_wave": wave.grad}


def _spectrogram_peer(inputs: dict) -> None:
    # torch.stft and the plain chain after it, as users write it (float32: stft has no bf16).
    from vcfast.ops.spectrogram import PRESETS

    config = PRESETS["stargan_vc"]
    wave = _leaf(inputs["wave"].float())
    window = torch.hamming_window(config.n_fft, periodic=False, device=wave.device)
    spectrum = torch.stft(wave, config.n_fft, config.hop, window=window, center=False,
                          return_complex=True)
    lo, hi = config.kept_bins
    log_mag = torch.log(torch.clamp_min(spectrum[:, lo:hi].abs() / config.magnitude_scale,
                                        config.log_floor))
    range_lo, range_hi = config.resolved_log_range()
    out = torch.clamp((log_mag - range_lo) / (range_hi - range_lo), 0.0, 1.0)
    out.backward(inputs["grad"])


# --- masked multi-group losses -------------------------------------------------------------------

_GROUPS = (1421, 53, 2)  # speaker, birthplace, sex: the paper-size classifier
_LOSS_ROWS = {"quick": 16, "cpu": 64, "gpu": 256}


def _loss_setup(s: Setting, softmax: bool) -> dict:
    gen = s.generator()
    n = _LOSS_ROWS[s.size]
    logits = s.randn(n, sum(_GROUPS), gen=gen, dtype=torch.float32) * 3
    columns = []
    for size in _GROUPS:
        unknown = torch.rand(n, 1, generator=gen) < 0.3  # a third of the groups unknown
        if softmax:
            labels = torch.randint(0, size, (n,), generator=gen)
            values = F.one_hot(labels, size).to(torch.int8)
        else:
            values = torch.randint(-1, 2, (n, size), generator=gen, dtype=torch.int8)
        columns.append(torch.where(unknown, torch.full_like(values, -1), values))
    return {"logits": logits.to(s.torch_dtype), "targets": torch.cat(columns, 1).to(s.device),
            "grad": torch.tensor(0.7, device=s.device)}


def _bce_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    from vcfast.ops.classification import masked_multigroup_bce

    logits = _leaf(inputs["logits"])
    loss = masked_multigroup_bce(logits, inputs["targets"], _GROUPS, backend=backend)
    loss.backward(inputs["grad"].to(loss.dtype))
    return {"loss": loss}, {"grad_logits": logits.grad}


def _bce_peer(inputs: dict) -> None:
    # The plain masked formulation official-style code writes (-1 = unknown).
    logits = _leaf(inputs["logits"].float())
    targets = inputs["targets"]
    mask = targets != -1
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).to(logits.dtype),
                                              reduction="none")
    loss = (loss * mask).sum() / mask.sum().clamp_min(1)
    loss.backward(inputs["grad"])


def _softmax_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    from vcfast.ops.classification import masked_multigroup_softmax_ce

    logits = _leaf(inputs["logits"])
    loss = masked_multigroup_softmax_ce(logits, inputs["targets"], _GROUPS, backend=backend)
    loss.backward(inputs["grad"].to(loss.dtype))
    return {"loss": loss}, {"grad_logits": logits.grad}


def _softmax_peer(inputs: dict) -> None:
    # One F.cross_entropy per group, unknown rows ignored through ignore_index.
    logits = _leaf(inputs["logits"].float())
    total, known = 0.0, 0
    for x, t in zip(logits.split(_GROUPS, 1), inputs["targets"].split(_GROUPS, 1)):
        is_known = (t != -1).all(1)
        label = torch.where(is_known, t.argmax(1), -100)
        total = total + F.cross_entropy(x, label, ignore_index=-100, reduction="sum")
        known = known + is_known.sum()
    (total / known.clamp_min(1)).backward(inputs["grad"])


# --- label tables and the label-conditioned conv -------------------------------------------

_LABEL_TABLE_SIZES = {"quick": (1, 32), "cpu": (2, 128), "gpu": (16, 256)}  # (batch, side)
_LABEL_CONV_SIZES = {"quick": (1, 16), "cpu": (1, 64), "gpu": (2, 256)}
_STEM = dict(out=64, kernel=7, padding=3)  # StarGAN G's first layer


def _label_table_setup(s: Setting) -> dict:
    from vcfast.ops.label_conv import tap_patterns

    gen = s.generator()
    batch, side = _LABEL_TABLE_SIZES[s.size]
    k, p, o = _STEM["kernel"], _STEM["padding"], _STEM["out"]
    row_ids, row_patterns = tap_patterns(side, k, 1, p)
    col_ids, col_patterns = tap_patterns(side, k, 1, p)
    return {"conv_out": s.randn(batch, o, side, side, gen=gen),
            "table": s.randn(batch, o, row_patterns.shape[0], col_patterns.shape[0], gen=gen),
            "row_ids": row_ids.to(s.device), "col_ids": col_ids.to(s.device),
            "grad": s.randn(batch, o, side, side, gen=gen)}


def _layer_kernels(backend: str, names: tuple[str, ...], *, reference: str,
                   triton: str) -> tuple:
    """For each op in ``names``: the registered C++ op (``cpu``), the Triton launcher
    ``<name>_triton`` of ``vcfast.ops.<triton>`` (``triton``), or the plain-PyTorch
    ``<name>_reference`` of ``vcfast.ops.<reference>`` (``reference``). Imported when asked
    for: the Triton kernels decorate at their first import."""
    if backend == "cpu":
        return tuple(getattr(torch.ops.vcfast, name) for name in names)
    if backend == "triton":
        module = importlib.import_module(f"vcfast.ops.{triton}")
        return tuple(getattr(module, f"{name}_triton") for name in names)
    module = importlib.import_module(f"vcfast.ops.{reference}")
    return tuple(getattr(module, f"{name}_reference") for name in names)


def _label_table_impl(backend: str):
    return _layer_kernels(backend, ("label_table_add",), reference="label_conv",
                          triton="label_conv_triton")[0]


def _label_table_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    conv_out, table = _leaf(inputs["conv_out"]), _leaf(inputs["table"])
    out = _label_table_impl(backend)(conv_out, table, inputs["row_ids"], inputs["col_ids"])
    out.backward(inputs["grad"])
    return {"out": out}, {"grad_conv_out": conv_out.grad, "grad_table": table.grad}


def _label_conv_setup(s: Setting) -> dict:
    from vcfast.labels import LabelSpace
    from vcfast.nn import LabelConcatConv2d

    gen = s.generator()
    batch, side = _LABEL_CONV_SIZES[s.size]
    c_dim = LabelSpace().input_dim
    torch.manual_seed(s.seed)
    conv = nn.Conv2d(1 + c_dim, _STEM["out"], _STEM["kernel"], padding=_STEM["padding"])
    conv = conv.to(s.device)
    labels = (torch.rand(batch, c_dim, generator=gen) < 0.003).float()
    labels[:, 0] = 1.0  # at least one label set per sample
    # fp32 weights and inputs; "bf16" is bf16 autocast, as training with --bf16 runs the layer.
    return {"conv": conv, "layer": LabelConcatConv2d.from_conv(conv, c_dim),
            "x": s.rand(batch, 1, side, side, gen=gen, dtype=torch.float32),
            "c": labels.to(s.device),
            "grad": s.randn(batch, _STEM["out"], side, side, gen=gen, dtype=torch.float32),
            "autocast": s.autocast_device()}


def _tiled_conv(conv: nn.Conv2d, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The official layout: the label vector tiled over H x W and concatenated to x."""
    tiled = c.view(c.shape[0], c.shape[1], 1, 1).repeat(1, 1, x.shape[2], x.shape[3])
    return conv(torch.cat([x, tiled.to(x.dtype)], dim=1))


def _label_conv_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    conv = inputs["conv"]
    conv.zero_grad(set_to_none=True)  # the lean layer shares these Parameters
    x = _leaf(inputs["x"])
    with _autocast(inputs):
        if backend == "reference":
            out = _tiled_conv(conv, x, inputs["c"])
        else:
            out = inputs["layer"](x, inputs["c"])
    out.backward(inputs["grad"].to(out.dtype))
    return {"out": out}, {"grad_x": x.grad, "grad_weight": conv.weight.grad,
                          "grad_bias": conv.bias.grad}


# --- fused instance norm + ReLU --------------------------------------------------------------

_NORM_SIZES = {"quick": (2, 64, 16), "cpu": (2, 256, 64), "gpu": (16, 256, 64)}  # (N, C, side)
_EPS = 1e-5


def _norm_setup(s: Setting) -> dict:
    gen = s.generator()
    n, c, side = _NORM_SIZES[s.size]
    z = s.randn(n, c, side, side, gen=gen, dtype=torch.float32) * 2 + 0.5
    inputs = {"z": z.to(s.torch_dtype),
              # Norm parameters stay float32 (the ops' accumulation dtype), as in the models.
              "gamma": 1 + 0.1 * s.randn(c, gen=gen, dtype=torch.float32),
              "beta": 0.1 * s.randn(c, gen=gen, dtype=torch.float32),
              "grad": s.randn(n, c, side, side, gen=gen)}
    inputs["peer_norm"] = _norm_peer_module(inputs)
    return inputs


def _norm_impls(backend: str):
    # No Triton statistics kernel: on CUDA the lean unit takes them from PyTorch too.
    (stats,) = _layer_kernels("reference" if backend == "triton" else backend,
                              ("instance_norm_stats",), reference="norm_act",
                              triton="norm_act_triton")
    return (stats, *_layer_kernels(backend, ("norm_relu_forward", "norm_relu_backward"),
                                   reference="norm_act", triton="norm_act_triton"))


def _norm_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    stats, forward, backward = _norm_impls(backend)
    z, gamma, beta = inputs["z"], inputs["gamma"], inputs["beta"]
    mean, rstd, _ = stats(z, _EPS)
    a = forward(z, mean, rstd, gamma, beta)
    grad_z, grad_gamma, grad_beta = backward(inputs["grad"], z, mean, rstd, gamma, beta, True)
    return ({"a": a, "mean": mean, "rstd": rstd},
            {"grad_z": grad_z, "grad_gamma": grad_gamma, "grad_beta": grad_beta})


def _norm_peer_module(inputs: dict) -> nn.Module:
    """The layers a user would write, with the same affine parameters, in z's dtype."""
    z = inputs["z"]
    norm = nn.InstanceNorm2d(z.shape[1], affine=True, eps=_EPS).to(z.device)
    with torch.no_grad():
        norm.weight.copy_(inputs["gamma"])
        norm.bias.copy_(inputs["beta"])
    return norm.to(z.dtype)


def _norm_peer(inputs: dict) -> None:
    z = _leaf(inputs["z"])
    torch.relu(inputs["peer_norm"](z)).backward(inputs["grad"])


# --- slope bits and penalty terms (the lean gradient penalty's kernels) ----------------------

_SLOPE = 0.01  # StarGAN D's LeakyReLU
_BITS_SIZES = {"quick": (2, 64, 32), "cpu": (4, 64, 128), "gpu": (16, 64, 128)}
_PENALTY_SIZES = {"quick": (4, 64), "cpu": (8, 256), "gpu": (16, 256)}


def _bits_setup(s: Setting) -> dict:
    gen = s.generator()
    n, c, side = _BITS_SIZES[s.size]
    return {"z": s.randn(n, c, side, side, gen=gen), "grad": s.randn(n, c, side, side, gen=gen)}


def _bits_impls(backend: str):
    return _layer_kernels(backend, ("leaky_relu_with_bits", "scale_by_slope_bits"),
                          reference="slope_bits", triton="gradient_penalty_triton")


def _bits_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    forward, scale = _bits_impls(backend)
    a, bits = forward(inputs["z"].contiguous(), _SLOPE)
    grad_z = scale(inputs["grad"].contiguous(), bits, _SLOPE)
    return {"a": a, "bits": bits}, {"grad_z": grad_z}


def _bits_peer(inputs: dict) -> None:
    z = _leaf(inputs["z"])
    F.leaky_relu(z, _SLOPE).backward(inputs["grad"])


def _penalty_setup(s: Setting) -> dict:
    gen = s.generator()
    n, side = _PENALTY_SIZES[s.size]
    g = torch.randn(n, 1, side, side, generator=gen)
    # Per-sample norms spread around the target 1, as a critic's input gradients are.
    norms = g.flatten(1).norm(dim=1).view(n, 1, 1, 1)
    g = g / norms * (0.5 + torch.rand(n, 1, 1, 1, generator=gen))
    return {"g": g.to(s.device, s.torch_dtype)}


def _penalty_impl(backend: str):
    return _layer_kernels(backend, ("penalty_terms",), reference="slope_bits",
                          triton="gradient_penalty_triton")[0]


def _penalty_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    gp, u = _penalty_impl(backend)(inputs["g"].contiguous(), 1.0, 10.0)
    return {"gp": gp}, {"u": u}


def _penalty_peer(inputs: dict) -> None:
    g = _leaf(inputs["g"].float())
    norms = g.flatten(1).norm(dim=1)
    (10.0 * ((norms - 1.0) ** 2).mean()).backward()


# --- the whole gradient penalty ----------------------------------------------------------------

# (batch, image side, conv_dim); "gpu" is the paper-size D.
_PENALTY_CRITICS = {"quick": (2, 64, 8), "cpu": (2, 128, 32), "gpu": (4, 256, 64)}


def _gp_setup(s: Setting) -> dict:
    from vcfast.models import StarGANDiscriminator

    gen = s.generator()
    batch, side, conv_dim = _PENALTY_CRITICS[s.size]
    torch.manual_seed(s.seed)
    # The classifier head is not penalised; a narrow one keeps the float64 copy small.
    critic = StarGANDiscriminator(image_size=side, conv_dim=conv_dim, n_classes=8).to(s.device)
    return {"critic": critic,
            "x_real": s.rand(batch, 1, side, side, gen=gen, dtype=torch.float32),
            "x_fake": s.rand(batch, 1, side, side, gen=gen, dtype=torch.float32),
            "eps": s.rand(batch, gen=gen, dtype=torch.float32),
            "autocast": s.autocast_device()}


def _gp_run(backend: str, inputs: dict) -> tuple[Outputs, Outputs]:
    from vcfast.ops.gradient_penalty import gradient_penalty

    critic = inputs["critic"]
    critic.zero_grad(set_to_none=True)
    mode = "autograd" if backend == "reference" else "lean"
    with _autocast(inputs):
        gp = gradient_penalty(critic, inputs["x_real"], inputs["x_fake"], eps=inputs["eps"],
                              mode=mode)
    gp.backward()
    penalised = [m for m in critic.gradient_penalty_layers() if isinstance(m, nn.Conv2d)]
    return {"gp": gp}, {f"grad_weight_{i}": m.weight.grad for i, m in enumerate(penalised)}


def _gp_describe(inputs: dict) -> str:
    critic = inputs["critic"]
    return (f"D {tuple(inputs['x_real'].shape)}, conv_dim {critic.main[0].out_channels}, "
            "autograd = double backward")


def _describe_shapes(*names: str) -> Callable[[dict], str]:
    return lambda inputs: ", ".join(f"{n} {tuple(inputs[n].shape)}" for n in names)


OP_CASES: list[OpCase] = [
    OpCase("log_spectrogram", ("reference", "cpu", "cuda", "triton"), _spectrogram_setup,
           _spectrogram_run, "torch.stft + plain chain", _spectrogram_peer,
           describe=_describe_shapes("wave")),
    OpCase("masked_multigroup_bce", ("reference", "cpu", "cuda", "triton"),
           lambda s: _loss_setup(s, softmax=False), _bce_run, "masked BCE-with-logits",
           _bce_peer, describe=_describe_shapes("logits")),
    OpCase("masked_multigroup_softmax_ce", ("reference", "cpu", "cuda", "triton"),
           lambda s: _loss_setup(s, softmax=True), _softmax_run, "cross_entropy per group",
           _softmax_peer, describe=_describe_shapes("logits")),
    OpCase("label_table", ("reference", "cpu", "triton"), _label_table_setup, _label_table_run,
           describe=_describe_shapes("conv_out", "table")),
    OpCase("label_conv", ("reference", "vcfast"), _label_conv_setup, _label_conv_run,
           "conv on tiled labels", describe=_describe_shapes("x", "c"),
           peer_is_reference=True),
    OpCase("norm_relu", ("reference", "cpu", "triton"), _norm_setup, _norm_run,
           "nn.InstanceNorm2d + ReLU", _norm_peer, describe=_describe_shapes("z")),
    OpCase("leaky_relu_bits", ("reference", "cpu", "triton"), _bits_setup, _bits_run,
           "F.leaky_relu + autograd", _bits_peer, describe=_describe_shapes("z")),
    OpCase("penalty_terms", ("reference", "cpu", "triton"), _penalty_setup, _penalty_run,
           "autograd norm penalty", _penalty_peer, describe=_describe_shapes("g")),
    OpCase("gradient_penalty", ("reference", "vcfast"), _gp_setup, _gp_run,
           "mode='autograd' double backward", describe=_gp_describe, peer_is_reference=True),
]


def _lean_kernels(device: torch.device) -> str:
    """Which kernels the lean layers (``vcfast`` rows) dispatch to on this device."""
    from vcfast import _extension

    if device.type == "cpu":
        return "cpu" if _extension.EXTENSION_LOADED else "reference"
    return "triton" if _extension.triton_available() else "reference"


# ---------------------------------------------------------------------------------------------
# Measuring


@contextlib.contextmanager
def _strict_fp32():
    """TF32 off for cuDNN convolutions and cuBLAS matmuls (PyTorch turns it on for cuDNN by
    default): fp32 rows are then checked, and timed, at fp32 precision, not TF32's 10 bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class Repeats:
    """How often a call is timed: at least ``least`` times, then on until ``most`` calls or
    ``seconds`` of timing, so quick ops get many tries at a quiet moment and slow ones few."""

    least: int
    most: int
    seconds: float


_REPEATS = {"quick": Repeats(3, 20, 0.2), "full": Repeats(5, 50, 1.0)}


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: Repeats) -> float:
    """Best wall milliseconds of ``fn()`` (the caller warmed it up).

    The best, not the median: on a shared machine other processes only ever add time.
    """
    best, spent, calls = math.inf, 0.0, 0
    while calls < repeats.least or (calls < repeats.most and spent < repeats.seconds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best * 1e3


def relative_error(got: torch.Tensor | None, truth: torch.Tensor | None) -> float:
    """``max |got - truth| / max |truth|`` in float64 (inf for a missing or misshapen output).

    Integer outputs (packed slope bits) must match exactly: 0, or 1 for any difference.
    """
    if got is None or truth is None:
        return 0.0 if got is None and truth is None else math.inf
    if got.shape != truth.shape:
        return math.inf
    if not (got.is_floating_point() and truth.is_floating_point()):
        return 0.0 if torch.equal(got.cpu(), truth.cpu()) else 1.0
    got, truth = got.detach().double(), truth.detach().double().to(got.device)
    if got.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return math.inf
    scale = float(truth.abs().max())
    diff = float((got - truth).abs().max())
    return diff / scale if scale > 0 else diff


def _worst(got: Outputs, truth: Outputs) -> float:
    keys = set(got) | set(truth)
    return max((relative_error(got.get(k), truth.get(k)) for k in keys), default=0.0)


def _short_exception(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _run_case(case: OpCase, setting: Setting, status: dict[str, str | None], repeats: Repeats,
              skipped: list[dict]) -> list[dict]:
    """The rows of one op in one dtype: errors against the truth, then timings."""
    rows: list[dict] = []
    device = setting.device
    runnable = [b for b in case.backends if b in status]
    for backend in runnable:
        if status[backend] is not None:
            skipped.append({"op": case.op, "backend": backend, "dtype": setting.dtype,
                            "reason": status[backend]})
    runnable = [b for b in runnable if status[b] is None]
    if not runnable:
        return rows
    tolerance = TOLERANCES[case.op][setting.dtype]
    try:
        inputs = case.setup(setting)
        truth = case.run("reference", _to_float64(inputs))
    except Exception as exc:  # noqa: BLE001 - a broken reference fails every row of the op
        message = f"float64 reference failed: {_short_exception(exc)}"
        return [_row(case.op, b, setting.dtype, tolerance, exception=message,
                     detail=traceback.format_exc()) for b in runnable]
    shape = case.describe(inputs)
    peer_ms = None
    if case.peer is not None:
        try:
            case.peer(inputs)  # warm-up (first-call costs: kernel selection, allocator)
            peer_ms = _time_ms(lambda: case.peer(inputs), device, repeats)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is noted, not a failure
            peer_ms = None
            shape += f" (peer failed: {_short_exception(exc)})"
    reference_ms = None
    for backend in runnable:
        try:
            got_forward, got_backward = case.run(backend, inputs)  # also the warm-up
            forward_error = _worst(got_forward, truth[0])
            backward_error = _worst(got_backward, truth[1])
            del got_forward, got_backward
            ms = _time_ms(lambda: case.run(backend, inputs), device, repeats)
        except Exception as exc:  # noqa: BLE001 - an op that raises is a failed row
            rows.append(_row(case.op, backend, setting.dtype, tolerance,
                             exception=_short_exception(exc), detail=traceback.format_exc(),
                             shape=shape))
            continue
        if backend == "reference":
            reference_ms = ms
        row = _row(case.op, backend, setting.dtype, tolerance, forward_error=forward_error,
                   backward_error=backward_error, ms=ms, shape=shape)
        row.update(peer=case.peer_name, peer_ms=peer_ms)
        if backend == "vcfast":
            row["kernels"] = _lean_kernels(device)
        rows.append(row)
    if setting.dtype == "bf16":
        reference_error = next((r["error"] for r in rows if r["backend"] == "reference"), None)
        for row in rows:
            row["tolerance"] = bf16_tolerance(tolerance, reference_error)
            row["ok"] = row["error"] is not None and row["error"] <= row["tolerance"]
    for row in rows:
        row["reference_ms"] = reference_ms
        if case.peer_is_reference:
            row["peer_ms"] = reference_ms
        ms = row.get("ms")
        row["speedup_vs_reference"] = (reference_ms / ms) if ms and reference_ms else None
        row["speedup_vs_peer"] = (row.get("peer_ms") / ms) if ms and row.get("peer_ms") else None
    return rows


def _row(op: str, backend: str, dtype: str, tolerance: float, *, forward_error=None,
         backward_error=None, ms=None, exception=None, detail=None, shape="") -> dict:
    errors = [e for e in (forward_error, backward_error) if e is not None]
    error = max(errors) if errors and exception is None else None
    ok = exception is None and error is not None and error <= tolerance
    return {"op": op, "backend": backend, "dtype": dtype, "shape": shape,
            "forward_error": forward_error, "backward_error": backward_error, "error": error,
            "tolerance": tolerance, "base_tolerance": tolerance, "ok": ok,
            "exception": exception, "traceback": detail,
            "ms": ms, "peer": None, "peer_ms": None}


# ---------------------------------------------------------------------------------------------
# Model steps


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _release_free_memory() -> None:
    """Hands freed heap back to the OS (glibc), so a step's RSS rise is its own allocations."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_peak(step: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes) of ``step()``.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` during the call: every live tensor
    counts, those that existed before it included. On the CPU it is the rise of the process's
    high-water mark (ru_maxrss) above the resident size before the call: what the call adds.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
    # ru_maxrss cannot be reset and earlier work (the op checks, building the models) peaked
    # above the resident size now, which would hide the step's peak. A touched ballast lifts
    # the resident size to that high-water mark, so every byte the step adds raises the mark
    # (vcfast.memory.measure_process_peak does the same in a fresh process).
    _release_free_memory()
    gap = _max_rss_bytes() - _resident_bytes()
    ballast = torch.ones(gap // 4 + 4096) if gap > 0 else None
    resident = _resident_bytes()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = max(0, _max_rss_bytes() - resident)
    del ballast
    return seconds, peak


def _model_steps(device: torch.device, quick: bool) -> tuple[list[dict], str]:
    """One D step and one G step of the paper-size models at batch 1, time and peak memory.

    The steps are :class:`vcfast.estimate.TrainingIteration`'s, the code the estimator runs on
    the meta device, so the two figures describe the same computation: vcfast's models
    (StarGANGenerator = the paper G converted, StarGANDiscriminator.paper), lean penalty,
    fused loss, RMSprop.
    """
    from vcfast.estimate import build_iteration, estimate_iteration

    image_size, conv_dim, note = 256, 64, "paper size (1x256x256, conv_dim 64), batch 1"
    if quick and device.type == "cpu":
        # Paper-size weights alone take ~10 s per step on a small CPU; width and resolution
        # shrink so --quick stays under a minute. The estimator sizes the same models.
        image_size, conv_dim = 64, 16
        note = ("reduced size for --quick on CPU (1x64x64, conv_dim 16; paper: 1x256x256, "
                "conv_dim 64), batch 1")
    on_cuda = device.type == "cuda"
    estimate = estimate_iteration(1, implementation="vcfast", image_size=image_size,
                                  conv_dim=conv_dim, n_critic=1,
                                  workspace=None if on_cuda else "onednn")
    iteration = build_iteration(1, implementation="vcfast", image_size=image_size,
                                conv_dim=conv_dim, n_critic=1, device=device)
    if not quick:
        # First calls compile Triton kernels and pick cuDNN algorithms: not part of a step.
        iteration.d_step()
        iteration.g_step()
    _sync(device)
    rows = []
    for name, phase, step in (("D step", "d_step", iteration.d_step),
                              ("G step", "g_step", iteration.g_step)):
        row = {"step": name, "image_size": image_size, "conv_dim": conv_dim, "batch": 1}
        if on_cuda:
            row["estimated_bytes"] = estimate["phases"][phase]
            row["measure"] = "torch.cuda.max_memory_allocated (all live tensors)"
        else:
            # The RSS rise is what the step adds above weights, gradients, optimizer state
            # and batch, so it is compared with the estimator's peak minus that baseline.
            row["estimated_bytes"] = estimate["phases"][phase] - estimate["baseline_bytes"]
            row["measure"] = "process ru_maxrss rise above the resident size before the step"
        try:
            row["seconds"], row["peak_bytes"] = measure_peak(step, device)
        except Exception as exc:  # noqa: BLE001 - reported as a failed row
            row.update(ok=False, exception=_short_exception(exc), traceback=traceback.format_exc())
        else:
            estimated = row["estimated_bytes"]
            row["ratio"] = row["peak_bytes"] / estimated if estimated else None
            row.update(ok=True, exception=None)
        rows.append(row)
    del iteration
    if on_cuda:
        torch.cuda.empty_cache()
    return rows, note


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_error(value) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.1e}"


def _fmt_ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _fmt_speedup(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(report: dict) -> str:
    c = report["conditions"]
    lines = [
        f"vcfast selftest on {c['device']} ({c['device_name']})"
        f"{' --quick' if report['quick'] else ''}",
        f"vcfast {c['vcfast']}, torch {c['torch']} (CUDA {c['torch_cuda']}), triton "
        f"{c['triton'] or 'not installed'}{' (interpreter)' if c['triton_interpret'] else ''}, "
        f"Python {c['python']}",
        f"CPU {c['cpu_model']} ({c['cpu_cores']} cores), ISA {c['cpu_capability']}, "
        f"torch threads {c['threads']}, load average {c['load_average_1min']}",
    ]
    for backend, reason in report["backends"].items():
        if reason is not None:
            lines.append(f"skipped backend {backend}: {reason}")
    repeats = report["repeats"]
    lines.append("error = max |out - float64 reference| / max |reference| over the outputs; "
                 f"ms = forward + backward, best of {repeats['least']} to {repeats['most']} "
                 "calls; x = speed-up (their ms / ours); fp32 rows with TF32 off; bf16 "
                 "label_conv and gradient_penalty under bf16 autocast (fp32 weights); a bf16 "
                 "tol is at least twice the reference's own bf16 error")
    header = (f"{'op':29} {'backend':14} {'dtype':5} {'fwd err':>8} {'bwd err':>8} {'tol':>8} "
              f"{'ok':4} {'ms':>8} {'x ref':>7} {'x peer':>7}  peer")
    lines += ["", header, "-" * len(header)]
    for row in report["ops"]:
        backend = row["backend"] + (f"({row['kernels']})" if row.get("kernels") else "")
        verdict = "ok" if row["ok"] else "FAIL"
        if row["exception"]:
            lines.append(f"{row['op']:29} {backend:14} {row['dtype']:5} {'':>8} {'':>8} "
                         f"{row['tolerance']:>8.0e} {verdict:4} raised {row['exception']}")
            continue
        lines.append(
            f"{row['op']:29} {backend:14} {row['dtype']:5} {_fmt_error(row['forward_error']):>8} "
            f"{_fmt_error(row['backward_error']):>8} {row['tolerance']:>8.0e} {verdict:4} "
            f"{_fmt_ms(row['ms']):>8} {_fmt_speedup(row['speedup_vs_reference']):>7} "
            f"{_fmt_speedup(row['speedup_vs_peer']):>7}  {row['peer'] or '-'}")
    shapes = {}
    for row in report["ops"]:
        shapes.setdefault(row["op"], row["shape"])
    lines += ["", "shapes: " + "; ".join(f"{op}: {shape}" for op, shape in shapes.items() if shape)]
    models = report["models"]
    if models.get("skipped"):
        lines += ["", f"model steps: skipped, {models['skipped']}"]
    else:
        lines += ["", f"model steps: {models['note']}"]
    for row in models["rows"]:
        if row.get("exception"):
            lines.append(f"  {row['step']}: FAIL raised {row['exception']}")
            continue
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"  {row['step']}: {row['seconds']:.2f} s, "
                     f"peak {row['peak_bytes'] / 2**20:.0f} "
                     f"MiB, estimated {row['estimated_bytes'] / 2**20:.0f} MiB "
                     f"(measured / estimated {ratio})")
    if models["rows"]:
        lines.append(f"  peak = {models['rows'][0]['measure']}")
    failed = [r for r in report["ops"] if not r["ok"]] + \
        [r for r in models["rows"] if not r.get("ok")]
    n_rows = len(report["ops"]) + len(models["rows"])
    lines += ["", f"{n_rows - len(failed)} of {n_rows} checks passed in "
                  f"{report['seconds']:.0f} s" + ("" if not failed else
                                                  f"; {len(failed)} FAILED")]
    return "\n".join(lines)


def _json_safe(value):
    """inf / nan (JSON has neither) as strings, so the file parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_names() -> list[str]:
    """What ``ops=`` (``vcfast selftest --ops``) can name: every op, and "models"."""
    return [case.op for case in OP_CASES] + ["models"]


def run_selftest(device: str = "auto", quick: bool = False,
                 json_path: str | os.PathLike | None = None, ops: list[str] | None = None,
                 out=None) -> int:
    """Runs the checks (all, or those named in ``ops``, see :func:`check_names`), prints the
    table (to ``out``, default stdout) and writes the JSON report to ``json_path`` if given.

    Returns 0 when every result is right, 1 when an error is above its tolerance or an op or
    a model step raised. Raises ValueError for an unknown device or check name.
    """
    import vcfast  # noqa: F401  (registers the ops)

    unknown = sorted(set(ops or ()) - set(check_names()))
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(check_names())}")
    out = out or sys.stdout
    start = time.perf_counter()
    dev = resolve_device(device)
    size = "quick" if quick else ("gpu" if dev.type == "cuda" else "cpu")
    repeats = _REPEATS["quick" if quick else "full"]
    status = backend_status(dev)
    report: dict = {"quick": quick, "conditions": conditions(dev), "backends": status,
                    "repeats": dataclasses.asdict(repeats),
                    "ops": [], "skipped": [], "models": {"note": "", "rows": []}}
    print(f"vcfast selftest: {dev}, {'quick' if quick else 'full'} sizes ...", file=out, flush=True)
    with _strict_fp32():
        for case in OP_CASES:
            if ops and case.op not in ops:
                continue
            for dtype in _DTYPES:
                setting = Setting(dev, dtype, size)
                report["ops"] += _run_case(case, setting, status, repeats, report["skipped"])
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if not ops or "models" in ops:
        try:
            report["models"]["rows"], report["models"]["note"] = _model_steps(dev, quick)
        except Exception as exc:  # noqa: BLE001 - building the models failed: a failed check
            report["models"]["rows"] = [{"step": "build", "ok": False,
                                         "exception": _short_exception(exc),
                                         "traceback": traceback.format_exc()}]
    else:
        report["models"]["skipped"] = "not requested (--ops without models)"
    report["seconds"] = time.perf_counter() - start
    ok = all(r["ok"] for r in report["ops"]) and all(r.get("ok") for r in report["models"]["rows"])
    report["ok"] = ok
    print(format_table(report), file=out, flush=True)
    for row in report["ops"] + report["models"]["rows"]:
        if row.get("traceback") and not row.get("ok"):
            print(f"\n{row.get('op', row.get('step'))} {row.get('backend', '')} "
                  f"{row.get('dtype', '')}:\n{row['traceback']}", file=out)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(_json_safe(report), indent=2, default=str) + "\n")
    return 0 if ok else 1
