"""The one backend resolver of the ops with the backends reference, cpu, cuda and triton.

Every public op that takes ``backend=`` (``masked_multigroup_bce``,
``masked_multigroup_softmax_ce``, ``log_spectrogram``) resolves it here, so the defaults and
the error messages are the same for all of them:

* CPU tensors: default ``cpu`` (``reference`` without vcfast._C); ``cuda`` is a ValueError,
  ``cpu`` without vcfast._C a RuntimeError, ``triton`` only under TRITON_INTERPRET=1.
* CUDA tensors: the default is the first of ``CUDA_ORDER`` (``cuda``, then ``triton``) that
  can run, else ``reference``; ``cpu`` is a ValueError, a ``cuda`` or ``triton`` that cannot
  run a RuntimeError.
* meta tensors (shapes only): default ``cpu`` with vcfast._C (the registered op's fake gives
  the shapes), else ``reference``; an explicit backend is kept.
* any other device: only ``reference``.

The availability checks go through ``vcfast._extension`` at call time (tests monkeypatch it).
"""

from __future__ import annotations

import torch

from vcfast import _extension

__all__ = ["BACKENDS", "CUDA_ORDER", "resolve_backend"]

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Preference order of the default backend on CUDA tensors: the C++ kernels were the faster
# ones on the H200 for every op with both (README.md, "Measured on a GPU"); Triton where the
# extension was built without CUDA.
CUDA_ORDER = ("cuda", "triton")


def _runs_on_cuda(backend: str) -> bool:
    if backend == "cuda":
        return _extension.extension_has_cuda()
    return _extension.triton_available()


def _default(device_type: str) -> str:
    if device_type == "cuda":
        return next((b for b in CUDA_ORDER if _runs_on_cuda(b)), "reference")
    return "cpu" if _extension.EXTENSION_LOADED else "reference"


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """The backend op ``op`` runs with on ``device``: ``backend``, or the default for ``None``.

    Raises ValueError for an unknown backend or one that cannot run on this device type, and
    RuntimeError for one whose kernels are missing here (see the module docstring).
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {BACKENDS}")
    kind = device.type
    if backend is None and kind in ("cpu", "cuda", "meta"):
        return _default(kind)
    if kind == "cpu":
        if backend == "cuda":
            raise ValueError(f"{op}: backend 'cuda' cannot run on a CPU tensor; use 'cpu' or "
                             "'reference', or move the tensors to a GPU")
        if backend == "cpu" and not _extension.EXTENSION_LOADED:
            why = _extension.build_info()["extension_error"]
            raise RuntimeError(f"{op}: backend 'cpu' needs the compiled extension vcfast._C, "
                               f"which failed to load: {why}")
        if backend == "triton" and not (_extension.triton_available()
                                        and _extension.triton_interpret()):
            raise ValueError(f"{op}: backend 'triton' runs on CPU tensors only under "
                             "TRITON_INTERPRET=1 (for testing); use 'cpu' or 'reference'")
        return backend
    if kind == "cuda":
        if backend == "cpu":
            raise ValueError(f"{op}: backend 'cpu' cannot run on a CUDA tensor; use 'triton', "
                             "'cuda' or 'reference', or move the tensors to the CPU")
        if backend == "cuda" and not _runs_on_cuda("cuda"):
            raise RuntimeError(f"{op}: backend 'cuda' needs vcfast._C built with CUDA "
                               f"({_extension.build_info()})")
        if backend == "triton" and not _runs_on_cuda("triton"):
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package")
        return backend
    if kind == "meta":
        return backend
    if backend not in (None, "reference"):
        raise ValueError(f"{op}: backend {backend!r} cannot run on a {kind} tensor; only "
                         "'reference' can")
    return "reference"
