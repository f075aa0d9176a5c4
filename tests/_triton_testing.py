"""Shared by the Triton test modules: skip what needs kernels built for the interpreter."""

import pytest


def interpreter_marker(op_module, kernels_name: str):
    """``(interpreted, needs_interpreter)`` for a ``vcfast.ops.*_triton`` module.

    ``interpreted`` says whether its kernels were built for the Triton interpreter (CPU
    tensors); ``needs_interpreter`` skips a test when they were not, saying why.
    """
    interpreted = op_module._kernels_interpreted()
    needs_interpreter = pytest.mark.skipif(
        not interpreted,
        reason=f"Triton kernels were not built for the interpreter: TRITON_INTERPRET=1 must be "
               f"set before vcfast.kernels.{kernels_name} is first imported (set it in "
               f"conftest.py or the environment), or it was set to 0 explicitly",
    )
    return interpreted, needs_interpreter


def pretend_triton_is_missing(monkeypatch, launcher_module) -> None:
    """Makes a ``vcfast.ops.*_triton`` module behave as if ``import triton`` had failed."""
    monkeypatch.setattr(launcher_module, "_kernels", None)
    monkeypatch.setattr(launcher_module, "TRITON_IMPORT_ERROR",
                        "ModuleNotFoundError: No module named 'triton'")


def assert_compiled_matches_eager(f, x, atol: float) -> None:
    """``f(x)`` (a scalar) and its gradient through ``torch.compile(fullgraph=True)``
    (aot_eager) equal eager's to ``atol``."""
    import torch

    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    yc = torch.compile(f, backend="aot_eager", fullgraph=True)(xc)
    ye = f(xe)
    yc.backward()
    ye.backward()
    torch.testing.assert_close(yc, ye, atol=atol, rtol=0)
    torch.testing.assert_close(xc.grad, xe.grad, atol=atol, rtol=0)
