"""The training-iteration memory estimator and `vcfast memory` (meta device, no real memory)."""

import pytest

from vcfast.cli import main
from vcfast.estimate import estimate_iteration, iteration_conv_calls, largest_batches
from vcfast.memory import MeasuredConvScratch

SMALL = dict(image_size=64, n_critic=1)  # paper channel widths, small images: seconds on meta


def test_vcfast_needs_less_than_the_official_layout():
    ref = estimate_iteration(2, implementation="reference", **SMALL)
    lean = estimate_iteration(2, implementation="vcfast", **SMALL)
    assert ref["baseline_bytes"] == lean["baseline_bytes"]  # same models, same optimizer state
    assert set(ref["phases"]) == {"d_step", "g_step"}
    # the tiled 1479-channel label input alone is 1479*64*64*4 bytes per sample, in the G step
    # (at paper widths on 64x64 images the D step's weight-sized buffers set the peak of both)
    assert ref["phases"]["g_step"] - lean["phases"]["g_step"] > 2 * 1479 * 64 * 64 * 4
    assert ref["peak_bytes"] > lean["peak_bytes"]
    assert lean["peak_bytes"] > lean["baseline_bytes"]


def test_peak_is_affine_in_the_batch_and_budgets_are_consistent():
    peaks = [estimate_iteration(b, implementation="vcfast", **SMALL)["peak_bytes"]
             for b in (1, 2, 3)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert abs((peaks[2] - peaks[1]) - (peaks[1] - peaks[0])) <= 0.02 * (peaks[1] - peaks[0])
    budget = peaks[1] + (peaks[2] - peaks[1]) // 2  # fits 2, not 3
    assert (largest_batches([budget, peaks[0] - 1], implementation="vcfast", **SMALL)
            == {budget: 2, peaks[0] - 1: 0})


def test_bad_arguments():
    with pytest.raises(ValueError, match="implementation"):
        estimate_iteration(1, implementation="official")
    with pytest.raises(ValueError, match="dtype"):
        estimate_iteration(1, dtype="fp64")
    with pytest.raises(ValueError, match="batch"):
        estimate_iteration(0)


def test_memory_command(capsys):
    assert main(["memory", "--batch", "2", "--image-size", "64", "--n-critic", "1",
                 "--fits", ""]) == 0
    out = capsys.readouterr().out
    assert "iteration peak" in out and "reference (official)" in out


TINY = dict(image_size=64, conv_dim=16, n_critic=1)


def _tiny_labels():
    from vcfast.labels import LabelSpace

    return LabelSpace([("speaker", 10), ("accent", 4), ("sex", 2)])


def test_memory_estimate_is_the_estimator():
    from vcfast.memory import estimate

    assert (estimate(2, implementation="vcfast", **SMALL)
            == estimate_iteration(2, implementation="vcfast", **SMALL))


@pytest.mark.parametrize("implementation", ["reference", "vcfast"])
def test_meta_autocast_emulation_matches_real_cpu_autocast(implementation):
    """On meta, bf16 autocast is emulated (autocast ignores meta tensors); on CPU the same
    iteration runs under torch.autocast itself, on real tensors. The tracked bytes agree."""
    kw = dict(implementation=implementation, label_space=_tiny_labels(), autocast="bf16", **TINY)
    meta = estimate_iteration(2, **kw)
    cpu = estimate_iteration(2, device="cpu", **kw)
    fp32 = estimate_iteration(2, implementation=implementation, label_space=_tiny_labels(), **TINY)
    assert abs(meta["peak_bytes"] - cpu["peak_bytes"]) <= 0.01 * cpu["peak_allocated_bytes"]
    for phase in ("d_step", "g_step"):
        assert (abs(meta["phases"][phase] - cpu["phases"][phase])
                <= 0.01 * cpu["peak_allocated_bytes"])
    assert meta["baseline_bytes"] == fp32["baseline_bytes"]  # fp32 weights, grads, optimizer state
    # bf16 lowers the trainer's tiny iteration (at TINY, 16 classes, weight-sized buffers
    # dominate, and the G step casts the frozen D's weights at every call)
    tiny = dict(implementation=implementation, label_space=_tiny_labels(), size="tiny",
                n_critic=1)
    assert (estimate_iteration(2, autocast="bf16", **tiny)["peak_allocated_bytes"]
            < 0.8 * estimate_iteration(2, **tiny)["peak_allocated_bytes"])


def test_checkpointing_lowers_the_g_step_only():
    plain = estimate_iteration(2, implementation="vcfast", **SMALL)
    ckpt = estimate_iteration(2, implementation="vcfast", checkpoint_residual_blocks=True, **SMALL)
    assert ckpt["phases"]["d_step"] == plain["phases"]["d_step"]
    assert ckpt["phases"]["g_step"] < plain["phases"]["g_step"]
    with pytest.raises(ValueError, match="checkpoint_residual_blocks"):
        estimate_iteration(1, implementation="reference", checkpoint_residual_blocks=True, **SMALL)
    with pytest.raises(ValueError, match="meta"):
        estimate_iteration(1, checkpoint_residual_blocks=True, autocast="bf16", **SMALL)


def test_onednn_workspace_only_adds():
    plain = estimate_iteration(1, implementation="reference", **SMALL)
    scratch = estimate_iteration(1, implementation="reference", workspace="onednn", **SMALL)
    assert scratch["baseline_bytes"] == plain["baseline_bytes"]
    assert scratch["peak_bytes"] > plain["peak_bytes"]


def test_a_scratch_model_plugs_into_the_estimate():
    """``workspace`` takes any scratch model, e.g. the measured one of calibrate_conv_scratch
    (vcfast.memory.MeasuredConvScratch): measured calls cost what they measured, the others
    fall back to the fixed oneDNN model."""
    kw = dict(implementation="reference", label_space=_tiny_labels(), **TINY)
    calls = iteration_conv_calls(1, **kw)
    plain = estimate_iteration(1, **kw)
    fixed = estimate_iteration(1, workspace="onednn", **kw)
    measured_as_free = MeasuredConvScratch({key: 0 for key in calls})
    assert (estimate_iteration(1, workspace=measured_as_free, **kw)["peak_bytes"]
            == plain["peak_bytes"])
    assert measured_as_free.misses == 0
    unmeasured = MeasuredConvScratch({})
    with_fallback = estimate_iteration(1, workspace=unmeasured, **kw)
    assert with_fallback["peak_bytes"] == fixed["peak_bytes"] > plain["peak_bytes"]
    assert unmeasured.misses == sum(calls.values())
    assert with_fallback["workspace"] == "MeasuredConvScratch"


def test_bad_option_arguments():
    with pytest.raises(ValueError, match="autocast"):
        estimate_iteration(1, autocast="fp8", **SMALL)
    with pytest.raises(ValueError, match="dtype"):
        estimate_iteration(1, autocast="bf16", dtype="bf16", **SMALL)
    with pytest.raises(ValueError, match="workspace"):
        estimate_iteration(1, workspace="cudnn", **SMALL)
    with pytest.raises(ValueError, match="image_size"):
        estimate_iteration(1, image_size=100)


def test_memory_command_options(capsys):
    assert main(["memory", "--batch", "2", "--image-size", "64", "--n-critic", "1", "--fits", "",
                 "--checkpoint"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "iteration peak" in out
    assert main(["memory", "--batch", "2", "--image-size", "64", "--n-critic", "1", "--fits", "",
                 "--autocast", "bf16"]) == 0
    assert "bf16 autocast" in capsys.readouterr().out


def test_ddp_adds_one_gradient_sized_bucket_set_per_rank():
    """One rank of a DDP run: the reducer's buckets hold as many bytes as the gradients of G's
    and D's trainable parameters, for the whole run, so every figure grows by exactly that."""
    from vcfast.estimate import build_iteration

    plain = estimate_iteration(2, implementation="vcfast", **SMALL)
    ddp = estimate_iteration(2, implementation="vcfast", ddp=True, **SMALL)
    iteration = build_iteration(2, implementation="vcfast", **SMALL)
    buckets = sum(p.numel() * p.element_size() for net in (iteration.G, iteration.D)
                  for p in net.parameters() if p.requires_grad)
    assert buckets > 0 and ddp["ddp_bucket_bytes"] == buckets and plain["ddp_bucket_bytes"] == 0
    assert ddp["peak_bytes"] == plain["peak_bytes"] + buckets
    assert ddp["baseline_bytes"] == plain["baseline_bytes"] + buckets
    assert ddp["phases"] == {k: v + buckets for k, v in plain["phases"].items()}


def test_memory_command_keeps_headroom_for_workspaces(capsys):
    """--fits sizes each budget less --headroom: more headroom, never a larger batch."""
    # Paper-size models at 64x64: 0.93 GiB at batch 1, ~14 MiB more per sample.
    args = ["memory", "--batch", "1", "--image-size", "64", "--n-critic", "1", "--fits", "1"]

    def vcfast_batch(headroom: str) -> int:
        assert main([*args, "--headroom", headroom]) == 0
        row = capsys.readouterr().out.strip().splitlines()[-1]
        return int(row.split()[-1])

    assert vcfast_batch("0") > 1
    assert vcfast_batch("0.2") == 0  # 1 GiB / 1.2 is below batch 1's 0.93 GiB
    with pytest.raises(SystemExit, match="headroom"):
        main([*args, "--headroom", "-0.5"])
