"""The iteration estimator against a real CPU iteration (issue 5: within 15 %).

Reduced size so it runs in seconds: conv_dim 16 (G 16..64 channels, D 16..512), 64x64
spectrograms, a 16-class label space, one D step + one G step, batch 2, fp32.

How the real figure is measured (vcfast.estimate.measure_iteration ->
vcfast.memory.measure_process_peak): a fresh process with glibc told to hand freed memory
back at once (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 64 KiB) builds the models,
the optimizers with their state and the batch, runs one warm-up iteration (oneDNN kernels,
thread pools, lazily loaded code), lifts its resident size to the high-water mark with a
ballast, runs the iteration again and reads ru_maxrss: peak - baseline is what the iteration
adds. The estimate is the meta-device tracker's peak above the same baseline (weights,
gradients, optimizer state, batch), with the oneDNN convolution scratch model
(``workspace="onednn"``), which real CPU convolutions allocate below the dispatcher.
"""

import sys

import pytest

from vcfast.estimate import estimate_iteration, measure_iteration
from vcfast.labels import LabelSpace

REDUCED = dict(image_size=64, conv_dim=16, n_critic=1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and glibc malloc")
@pytest.mark.parametrize("implementation", ["reference", "vcfast"])
def test_estimate_matches_a_real_cpu_iteration(implementation):
    labels = LabelSpace([("speaker", 10), ("accent", 4), ("sex", 2)])
    kw = dict(implementation=implementation, label_space=labels, **REDUCED)
    estimate = estimate_iteration(2, workspace="onednn", **kw)
    real = measure_iteration(2, **kw)
    assert real["estimated_baseline_bytes"] == estimate["baseline_bytes"]  # same models, state, batch
    assert 10e6 < real["peak_allocated_bytes"] < 500e6
    error = (estimate["peak_allocated_bytes"] - real["peak_allocated_bytes"]) / real["peak_allocated_bytes"]
    assert abs(error) <= 0.15, (implementation, estimate["peak_allocated_bytes"], real["peak_allocated_bytes"])
