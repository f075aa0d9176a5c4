"""Loads the compiled extension vcfast._C and reports which backends can run.

`import vcfast` must work without the extension (for example on a machine where the
build was skipped or failed): the reference and Triton backends need only PyTorch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

_load_error: str | None = None

try:
    importlib.import_module("vcfast._C")
    EXTENSION_LOADED = True
except ImportError as exc:  # the build was skipped, failed, or is for another torch
    EXTENSION_LOADED = False
    _load_error = str(exc)
    warnings.warn(
        "vcfast: the compiled extension vcfast._C could not be loaded "
        f"({exc}); the 'cpu' and 'cuda' backends are unavailable, 'reference' (and 'triton' "
        "where Triton runs) remain. Rebuild with: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_has_cuda() -> bool:
    """True when vcfast._C was compiled with the CUDA kernels."""
    return EXTENSION_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vcfast::log_spectrogram", "CUDA"
    )


# Checked once at import: a plain bool is also what torch.compile can trace without a cache.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the triton package is installed (GPU launch or TRITON_INTERPRET=1 on CPU)."""
    return _TRITON_AVAILABLE


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> dict[str, bool]:
    """Which backends can run here.

    - ``reference``: plain PyTorch, always.
    - ``cpu``: the C++ kernels in vcfast._C.
    - ``cuda``: the CUDA C++ kernels (compiled in and a GPU visible).
    - ``triton``: Triton kernels on a GPU, or on CPU tensors under TRITON_INTERPRET=1.
    """
    gpu = torch.cuda.is_available()
    return {
        "reference": True,
        "cpu": EXTENSION_LOADED,
        "cuda": extension_has_cuda() and gpu,
        "triton": triton_available() and (gpu or triton_interpret()),
    }


def build_info() -> dict[str, object]:
    """What was compiled and why a backend is missing, for bug reports."""
    return {
        "extension_loaded": EXTENSION_LOADED,
        "extension_error": _load_error,
        "extension_has_cuda": extension_has_cuda(),
        "cuda_available": torch.cuda.is_available(),
        "triton_available": triton_available(),
        "triton_interpret": triton_interpret(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


_HAS_OP: dict[str, bool] = {}


def has_op(name: str) -> bool:
    """True when vcfast._C registered ``vcfast::<name>`` (builds may predate newer ops)."""
    if name not in _HAS_OP:
        try:
            getattr(torch.ops.vcfast, name)
            _HAS_OP[name] = EXTENSION_LOADED
        except (AttributeError, RuntimeError):
            _HAS_OP[name] = False
    return _HAS_OP[name]
