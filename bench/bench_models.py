"""StarGAN-VC training steps, official layout ("reference") vs vcfast, on CPU; and the
iteration-memory estimator's table.

Steps (docs/training.md#one-training-step): vcfast.estimate.TrainingIteration, whose D and G
steps are vcfast.train.step.Stepper's, the code `vcfast train` runs and the estimator runs on
meta:
* D step: D(real), D(G(real, c') under no_grad), masked BCE on the classifier, gradient
  penalty (reference: autograd double backward; vcfast: lean), backward, RMSprop step.
* G step (D frozen): G(real, c'), D on it (trunk once), reconstruction G(fake, c), identity
  G(real, c), feature matching, backward, RMSprop step. vcfast: LabelConcatConv2d (no tiled
  labels), norm-act units, the fused loss, identity term back-propagated on its own first.
Reference models: vcfast.models.OfficialGenerator + StarGANDiscriminator; vcfast: the
trainer's StarGANGenerator (the same architecture, what vcfast.convert_stargan makes of it).

Timed with pytest-benchmark at batch 1 and 2, paper size (1x256x256, conv_dim 64, 1479-wide
labels), fp32, CPU. Memory: one full iteration (5 D steps + 1 G step) measured for real in a
fresh process (vcfast.estimate.measure_iteration: glibc trimming, warm-up iteration, ballast,
ru_maxrss) next to the meta estimate plus the convolution scratch measured on this machine
(vcfast.estimate.calibrate_conv_scratch), at batch 1 and 2; the fixed oneDNN scratch model
(fitted on an AVX-512 CPU) and the tensors alone are printed beside it. The figures depend on
the CPU's instruction set, so every table carries the CPU model and the ATen / oneDNN ISA
(bench/conftest.py conditions(); to see the AVX2 path on an AVX-512 CPU, run with
ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2).
With --benchmark-disable (CI smoke) everything runs at a reduced size (64x64, conv_dim 16,
16 classes) and the memory comparison runs at batch 2 only.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import BENCH_THREADS, conditions

from vcfast.estimate import (
    build_iteration,
    calibrate_conv_scratch,
    estimate_iteration,
    largest_batches,
    measure_iteration,
)
from vcfast.labels import LabelSpace
from vcfast.memory import (
    ConvCallRecorder,
    MeasuredConvScratch,
    measure_conv_scratch,
    measure_process_peak,
    onednn_conv_scratch,
    peak_memory,
)
from vcfast.tracking import CONV_STACK_WORKLOAD

IMPLEMENTATIONS = ["reference", "vcfast"]
BATCHES = [1, 2]
GIB, MIB = 2**30, 2**20


@pytest.fixture(scope="module")
def size(request) -> dict:
    """Paper size when timing; reduced when benchmarks are disabled (the smoke run)."""
    if request.config.getoption("benchmark_disable", False):
        return dict(image_size=64, conv_dim=16,
                    label_space=LabelSpace([("speaker", 10), ("accent", 4), ("sex", 2)]),
                    paper=False)
    return dict(image_size=256, conv_dim=64, label_space=None, paper=True)


def _describe(size: dict) -> str:
    if size["paper"]:
        return "paper size (1x256x256, conv_dim 64, 1479-wide labels)"
    return (f"reduced size (1x{size['image_size']}x{size['image_size']}, "
            f"conv_dim {size['conv_dim']}, 16 classes)")


def _iteration(size: dict, implementation: str, batch: int):
    return build_iteration(batch, implementation=implementation, image_size=size["image_size"],
                           conv_dim=size["conv_dim"], label_space=size["label_space"], n_critic=1,
                           device="cpu")


def _load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("step", ["g_step", "d_step"])
def test_step_time(benchmark, step, implementation, batch, size):
    iteration = _iteration(size, implementation, batch)
    benchmark.group = (f"StarGAN {step.replace('_', ' ')}, {_describe(size)}, batch {batch}, "
                       f"fp32, CPU, {BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()
    benchmark.extra_info["load_before"] = _load()
    # the official G step at batch 2 takes over a minute on 2 cores: few rounds
    benchmark.pedantic(getattr(iteration, step), rounds=2 if size["paper"] else 1, iterations=1,
                       warmup_rounds=1)
    benchmark.extra_info["load_after"] = _load()
    assert all(torch.isfinite(p).all() for p in iteration.G.parameters())


def test_g_step_cpu_time_ratio(capsys, size):
    """CPU time (process time, all threads) and wall time of one G step at batch 2, reference
    vs vcfast: one warm-up step, then the best of two (the project's target: vcfast >= 3x
    faster)."""
    rows = {}
    for implementation in IMPLEMENTATIONS:
        iteration = _iteration(size, implementation, 2)
        iteration.g_step()
        best_cpu, best_wall = float("inf"), float("inf")
        for _ in range(2):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            iteration.g_step()
            best_cpu = min(best_cpu, time.process_time() - cpu0)
            best_wall = min(best_wall, time.perf_counter() - wall0)
        rows[implementation] = (best_cpu, best_wall, _load())
    with capsys.disabled():
        print(f"\nG step, {_describe(size)}, batch 2, fp32, CPU, {BENCH_THREADS} threads; "
              f"{conditions()}")
        print("| implementation | CPU time (s) | wall (s) | load after |")
        print("|---|---:|---:|---|")
        for implementation, (cpu, wall, load) in rows.items():
            print(f"| {implementation} | {cpu:.2f} | {wall:.2f} | {load} |")
        ref, lean = rows["reference"], rows["vcfast"]
        print(f"reference / vcfast: CPU time {ref[0] / lean[0]:.2f}x, wall {ref[1] / lean[1]:.2f}x")
    assert lean[0] > 0 and ref[0] > 0


#: The estimate with the convolution scratch measured on the machine (calibrate_conv_scratch)
#: came within 4 % of the real peak on both oneDNN paths (AVX-512 and AVX2-only, reduced and
#: paper size; vcfast/estimate.py has the figures); 10 % leaves room for allocator and
#: thread-pool noise while still failing on a real accounting error (the fixed AVX-512 model
#: misses the reduced size on AVX2 by 15-19 %).
CALIBRATED_TOLERANCE = 0.10


def _error(estimate_bytes: int, real_bytes: int) -> float:
    return (estimate_bytes - real_bytes) / real_bytes


def test_memory_estimate_vs_real(capsys, size):
    """One full iteration (5 D steps + 1 G step) for real in a fresh process vs the meta
    estimate; what the iteration adds above weights + gradients + optimizer state + batch, D
    steps alone and whole iteration.

    Real CPU convolutions allocate scratch below the dispatcher (oneDNN reorders, im2col
    buffers) that depends on the CPU's instruction set. The estimate that is asserted takes
    that scratch as measured on this machine: every distinct convolution call of the
    iterations, recorded on meta, replayed once in a fresh process (calibrate_conv_scratch).
    The fixed model fitted on an AVX-512 CPU (workspace="onednn") and the tensors alone are
    printed beside it."""
    batches = BATCHES if size["paper"] else [2]
    shape = dict(image_size=size["image_size"], conv_dim=size["conv_dim"],
                 label_space=size["label_space"])
    start = time.perf_counter()
    calibrated = calibrate_conv_scratch(batches, IMPLEMENTATIONS, threads=BENCH_THREADS, **shape)
    calibration_seconds = time.perf_counter() - start
    rows = []
    for batch in batches:
        for implementation in IMPLEMENTATIONS:
            kw = dict(implementation=implementation, **shape)
            estimate = estimate_iteration(batch, workspace=calibrated, **kw)
            fixed = estimate_iteration(batch, workspace="onednn", **kw)
            tensors_only = estimate_iteration(batch, **kw)
            start = time.perf_counter()
            real = measure_iteration(batch, threads=BENCH_THREADS, **kw)
            rows.append((batch, implementation, estimate, fixed, tensors_only, real,
                         time.perf_counter() - start, _load()))
    with capsys.disabled():
        print(f"\nOne training iteration, {_describe(size)}, fp32, CPU, {BENCH_THREADS} threads: "
              f"memory added above weights + grads + optimizer state + batch (MiB); "
              f"{conditions()}")
        print(f"convolution scratch measured on this machine: {len(calibrated.measured)} distinct "
              f"calls, {calibration_seconds:.0f} s")
        print("| batch | implementation | D steps: estimate / real | iteration: estimate / real "
              "| error | fixed AVX-512 scratch model: estimate, error | tensors only "
              "| total above process: estimate / real | wall (s), load |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
        for batch, implementation, est, fixed, plain, real, wall, load in rows:
            d_est = est["phases"]["d_step"] - est["baseline_bytes"]
            real_bytes = real["peak_allocated_bytes"]
            print(f"| {batch} | {implementation} | {d_est / MIB:.0f} "
                  f"/ {real['d_steps_allocated_bytes'] / MIB:.0f} "
                  f"| {est['peak_allocated_bytes'] / MIB:.0f} / {real_bytes / MIB:.0f} "
                  f"| {100 * _error(est['peak_allocated_bytes'], real_bytes):+.1f} % "
                  f"| {fixed['peak_allocated_bytes'] / MIB:.0f}, "
                  f"{100 * _error(fixed['peak_allocated_bytes'], real_bytes):+.1f} % "
                  f"| {plain['peak_allocated_bytes'] / MIB:.0f} "
                  f"| {est['peak_bytes'] / MIB:.0f} / {real['peak_bytes'] / MIB:.0f} "
                  f"| {wall:.0f}, {load} |")
    assert calibrated.misses == 0  # every convolution the estimates ran had been measured
    for batch, implementation, est, _fixed, _plain, real, _wall, _load_ in rows:
        # same models, state, batch
        assert real["estimated_baseline_bytes"] == est["baseline_bytes"]
        error = _error(est["peak_allocated_bytes"], real["peak_allocated_bytes"])
        assert abs(error) <= CALIBRATED_TOLERANCE, (batch, implementation, f"{100 * error:+.1f} %",
                                                    conditions())




@pytest.mark.parametrize("memory_format", ["channels_last", "contiguous_format"])
def test_conv_stack_memory_estimate_vs_real(capsys, memory_format):
    """3 x (conv3x3 + ReLU), 8 -> 64 -> 64 -> 64 channels, batch 2, 192 x 192, fp32, forward +
    backward: the tracker on meta (75.6 MB of tensors in both layouts) plus the convolution
    scratch measured on this machine, vs the real peak-RSS increase in a fresh process. NCHW
    convolutions reorder into oneDNN's blocked layouts below the dispatcher; channels-last
    ones hardly do."""
    namespace: dict = {}
    exec(CONV_STACK_WORKLOAD.format(memory_format=memory_format), namespace)
    net = namespace["net"].to("meta")
    x = namespace["x"].detach().to("meta").requires_grad_()

    def step():
        net.zero_grad(set_to_none=True)
        x.grad = None
        net(x).sum().backward()

    with ConvCallRecorder() as recorder:
        step()
    calibrated = MeasuredConvScratch(measure_conv_scratch(recorder.calls, threads=BENCH_THREADS))
    estimate = peak_memory(step, device=None, scratch=calibrated)["peak_allocated_bytes"]
    fixed = peak_memory(step, device=None, scratch=onednn_conv_scratch)["peak_allocated_bytes"]
    tensors_only = peak_memory(step, device=None)["peak_allocated_bytes"]
    real = measure_process_peak(CONV_STACK_WORKLOAD.format(memory_format=memory_format),
                                threads=BENCH_THREADS)["extra"]
    with capsys.disabled():
        print(f"\n3 x conv3x3, {memory_format}, batch 2, 192 x 192, fwd + bwd, MB: "
              f"estimate {estimate / 1e6:.1f} "
              f"({100 * _error(estimate, real):+.1f} %), fixed AVX-512 model {fixed / 1e6:.1f} "
              f"({100 * _error(fixed, real):+.1f} %), tensors only {tensors_only / 1e6:.1f}, "
              f"real {real / 1e6:.1f}; {conditions()}")
    assert calibrated.misses == 0
    assert abs(_error(estimate, real)) <= CALIBRATED_TOLERANCE, (estimate, real, conditions())


def test_estimator_table(benchmark, capsys, size):
    """The meta-device estimate at paper size: batch 1, 4, 16 fp32, plus bf16 autocast and
    residual-block checkpointing at batch 16, and the largest batch per budget (timed: one
    estimate of the reference at batch 16). Smoke run: paper channel widths at 64x64, no
    largest-batch search."""
    image_size = 256 if size["paper"] else 64
    shape = dict(image_size=image_size)
    benchmark.group = (f"iteration memory estimator (meta device), paper channels, "
                       f"{image_size}x{image_size}, batch 16")
    benchmark.pedantic(lambda: estimate_iteration(16, implementation="reference", **shape),
                       rounds=1, iterations=1)
    configs = [(b, {}, "fp32") for b in (1, 4, 16)]
    configs += [(16, {"autocast": "bf16"}, "fp32 weights, bf16 autocast"),
                (16, {"checkpoint_residual_blocks": True},
                 "fp32, residual-block checkpointing (vcfast)")]
    rows = []
    for batch, options, label in configs:
        ref_options = {k: v for k, v in options.items() if k != "checkpoint_residual_blocks"}
        ref = estimate_iteration(batch, implementation="reference", **ref_options, **shape)
        lean = estimate_iteration(batch, implementation="vcfast", **options, **shape)
        rows.append((batch, label, ref, lean))
    budgets = [6 * GIB, 8 * GIB, 12 * GIB, 24 * GIB]
    fits = ({impl: largest_batches(budgets, implementation=impl) for impl in IMPLEMENTATIONS}
            if size["paper"] else None)
    with capsys.disabled():
        print(f"\nEstimated peak of one training iteration (5 D steps with GP + 1 G step), "
              f"paper channel widths, 1x{image_size}x{image_size}, meta device (tensor bytes; "
              "no allocator rounding or kernel workspaces), GiB")
        print("| batch | precision / option | reference D step | reference G step | reference peak "
              "| vcfast D step | vcfast G step | vcfast peak | ratio |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for batch, label, ref, lean in rows:
            print(f"| {batch} | {label} | {ref['phases']['d_step'] / GIB:.2f} "
                  f"| {ref['phases']['g_step'] / GIB:.2f} "
                  f"| {ref['peak_bytes'] / GIB:.2f} | {lean['phases']['d_step'] / GIB:.2f} "
                  f"| {lean['phases']['g_step'] / GIB:.2f} | {lean['peak_bytes'] / GIB:.2f} "
                  f"| {ref['peak_bytes'] / lean['peak_bytes']:.2f}x |")
        if fits is not None:
            print("\n| largest batch (fp32) | 6 GiB | 8 GiB | 12 GiB | 24 GiB |\n"
                  "|---|---:|---:|---:|---:|")
            for impl in IMPLEMENTATIONS:
                print(f"| {impl} | " + " | ".join(str(fits[impl][b]) for b in budgets) + " |")
    paper = rows[2]
    assert paper[3]["peak_bytes"] < paper[2]["peak_bytes"]
