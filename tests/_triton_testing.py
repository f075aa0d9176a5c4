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
