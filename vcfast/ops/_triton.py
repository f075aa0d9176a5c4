"""What every Triton-backed op module needs: a guarded kernel import and op registration.

Two modes, decided once per kernel module:
* compiled kernels (a GPU): ops are ``torch.library.triton_op`` with launches through
  ``wrap_triton``, so torch.compile can see and fuse the kernels;
* ``TRITON_INTERPRET=1`` (CPU tests): ``@triton.jit`` yields interpreter objects that
  ``wrap_triton`` cannot trace (it hands them back unwrapped and launching one on a fake or
  functional tensor fails), so the same Python implementations are registered with
  ``torch.library.custom_op`` and an explicit fake instead; torch.compile keeps them opaque.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

try:  # the host code of the op modules uses triton.cdiv / next_power_of_2
    import triton
except ImportError:
    triton = None


def load_kernels(name: str) -> tuple[ModuleType | None, str | None]:
    """Imports ``vcfast.kernels.<name>``: (module, None), or (None, why) when triton is missing.

    Kernel modules must be imported lazily: Triton reads TRITON_INTERPRET when ``@triton.jit``
    decorates, i.e. at this import.
    """
    try:
        importlib.import_module("triton")
        return importlib.import_module(f"vcfast.kernels.{name}"), None
    except ImportError as exc:  # triton missing (or broken): the op module still imports
        return None, f"{type(exc).__name__}: {exc}"


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` runs in Triton's CPU interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def define_op(name: str, impl, *, use_triton_op: bool):
    """Registers ``impl`` as op ``name`` (no mutated arguments) in the mode chosen above.

    In custom_op mode the caller must add a fake with ``op.register_fake``; triton_op traces
    ``impl`` itself for fake tensors.
    """
    register = torch.library.triton_op if use_triton_op else torch.library.custom_op
    return register(name, impl, mutates_args=())


def require_runnable(name: str, t: torch.Tensor, *, kernels: ModuleType | None,
                     import_error: str | None, interpreted: bool, module: str, fallback: str) -> None:
    """Raises a RuntimeError saying why op ``name`` cannot run on ``t`` here, if it cannot."""
    if kernels is None:
        raise RuntimeError(f"{name}: the Triton backend needs the triton package, which failed to "
                           f"import ({import_error}); use {fallback}")
    if t.device.type == "cpu" and not interpreted:
        raise RuntimeError(f"{name}: CPU tensors need TRITON_INTERPRET=1 set before "
                           f"vcfast.kernels.{module} is imported (the Triton interpreter)")
