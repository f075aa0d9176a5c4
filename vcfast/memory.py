"""Memory of a StarGAN-VC training iteration: the tracker and the estimator, in one import.

The live-tensor tracker and the real-memory measurements are in :mod:`vcfast.tracking`; the
iteration estimator that runs the trainer's own step under that tracker on the ``meta`` device
is :mod:`vcfast.estimate`. This module re-exports both (``vcfast.memory.estimate`` is
:func:`vcfast.estimate.estimate_iteration`), and the two import in one direction only:
estimate -> tracking, never back.
"""

from __future__ import annotations

from typing import Any

from vcfast.estimate import estimate_iteration
from vcfast.tracking import (
    ConvCallRecorder,
    LiveBytesTracker,
    MeasuredConvScratch,
    conv_call_key,
    measure_conv_scratch,
    measure_process_peak,
    onednn_conv_scratch,
    peak_memory,
    tensor_bytes,
)

__all__ = ["ConvCallRecorder", "LiveBytesTracker", "MeasuredConvScratch", "conv_call_key",
           "estimate", "measure_conv_scratch", "measure_process_peak", "onednn_conv_scratch",
           "peak_memory", "tensor_bytes"]


def estimate(*args: Any, **kwargs: Any) -> dict:
    """Peak memory of one StarGAN-VC training iteration: :func:`vcfast.estimate.estimate_iteration`
    (same arguments, e.g. ``estimate(16, implementation="reference", dtype="fp32")``)."""
    return estimate_iteration(*args, **kwargs)
