"""The training-iteration memory estimator and `vcfast memory` (meta device, no real memory)."""

import pytest

from vcfast.cli import main
from vcfast.estimate import estimate_iteration, largest_batches

SMALL = dict(image_size=64, n_critic=1)  # paper channel widths, small images: seconds on meta


def test_vcfast_needs_less_than_the_official_layout():
    ref = estimate_iteration(2, implementation="reference", **SMALL)
    lean = estimate_iteration(2, implementation="vcfast", **SMALL)
    assert ref["baseline_bytes"] == lean["baseline_bytes"]  # same models, same optimizer state
    assert set(ref["phases"]) == {"d_step", "g_step"}
    # the tiled 1479-channel label input alone is 1479*64*64*4 bytes per sample
    assert ref["peak_bytes"] - lean["peak_bytes"] > 2 * 1479 * 64 * 64 * 4
    assert lean["peak_bytes"] > lean["baseline_bytes"]


def test_peak_is_affine_in_the_batch_and_budgets_are_consistent():
    peaks = [estimate_iteration(b, implementation="vcfast", **SMALL)["peak_bytes"] for b in (1, 2, 3)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert abs((peaks[2] - peaks[1]) - (peaks[1] - peaks[0])) <= 0.02 * (peaks[1] - peaks[0])
    budget = peaks[1] + (peaks[2] - peaks[1]) // 2  # fits 2, not 3
    assert largest_batches([budget, peaks[0] - 1], implementation="vcfast", **SMALL) == {budget: 2, peaks[0] - 1: 0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="implementation"):
        estimate_iteration(1, implementation="official")
    with pytest.raises(ValueError, match="dtype"):
        estimate_iteration(1, dtype="fp64")
    with pytest.raises(ValueError, match="batch"):
        estimate_iteration(0)


def test_memory_command(capsys):
    assert main(["memory", "--batch", "2", "--image-size", "64", "--n-critic", "1", "--fits", ""]) == 0
    out = capsys.readouterr().out
    assert "iteration peak" in out and "reference (official)" in out
