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

import contextlib
import importlib
from collections.abc import Sequence
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
                     import_error: str | None, interpreted: bool, module: str,
                     fallback: str) -> None:
    """Raises a RuntimeError saying why op ``name`` cannot run on ``t`` here, if it cannot."""
    if kernels is None:
        raise RuntimeError(f"{name}: the Triton backend needs the triton package, which failed to "
                           f"import ({import_error}); use {fallback}")
    if t.device.type == "cpu" and not interpreted:
        raise RuntimeError(f"{name}: CPU tensors need TRITON_INTERPRET=1 set before "
                           f"vcfast.kernels.{module} is imported (the Triton interpreter)")


def launch_device(t: torch.Tensor):
    """Context manager every Triton launch runs in: makes ``t``'s CUDA device current.

    A Triton launch goes to the *current* CUDA device (its stream, its compiled module), not
    to the device of the pointers it is given: tensors on cuda:1 launched while device 0 is
    current would run on GPU 0 against GPU 1's memory. CPU tensors (the interpreter) and
    fake tensors of other device types need no guard.
    """
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


# CUDA's launch limits on the grid, the same on every architecture vcfast targets: a kernel
# launched past them fails with an opaque "invalid configuration argument".
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535
# tl.dot needs every operand dimension >= 16 (the MMA instruction shapes).
MIN_DOT_DIM = 16


def check_grid(name: str, grid: Sequence) -> None:
    """Raises ValueError naming op ``name`` if ``grid`` exceeds CUDA's grid limits.

    Called by every Triton launcher before it launches, so an input too large for a kernel's
    tiling fails with the shape that caused it, on any device (the interpreter has no limit).
    Works on SymInts too (a guard under torch.compile).
    """
    limits = (MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ)
    torch._check_value(1 <= len(grid) <= 3,
                       lambda: f"{name}: a launch grid has 1 to 3 dimensions, got {tuple(grid)}")
    for axis, (size, limit) in enumerate(zip(grid, limits)):
        torch._check_value(
            size <= limit,
            lambda axis=axis, limit=limit: (
                f"{name}: the input needs a launch grid of {tuple(grid)} programs, but CUDA "
                f"allows at most {limit} along {'xyz'[axis]} (x <= {MAX_GRID_X}, y and z <= "
                f"{MAX_GRID_YZ}); split the input into smaller calls"))


def check_dot_tiles(name: str, **tiles: int) -> None:
    """Raises ValueError naming op ``name`` if a tile feeding ``tl.dot`` is under 16 wide."""
    for tile, size in tiles.items():
        torch._check_value(size >= MIN_DOT_DIM,
                           lambda tile=tile, size=size: f"{name}: tl.dot needs operand tiles >= "
                                                        f"{MIN_DOT_DIM}, got {tile}={size}")
