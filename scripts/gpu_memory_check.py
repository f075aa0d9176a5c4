"""Real peak memory of StarGAN-VC training iterations beside vcfast's estimate (GPU validation).

Two checks, both on :class:`vcfast.estimate.TrainingIteration` (``n_critic`` D steps with the
gradient penalty + 1 G step, RMSprop or ``--optimizer adam``), whose steps are
:class:`vcfast.train.step.Stepper`'s: the code ``vcfast train`` runs and the estimator itself
runs on the meta device, so estimate and measurement describe the same computation:

``estimator``: vcfast's paper-size iteration at each batch and precision, the estimate
(:func:`vcfast.estimate.estimate_iteration`) against ``torch.cuda.max_memory_allocated`` of a
real iteration (after one warm-up iteration, which compiles the Triton kernels and allocates
the cuBLAS/cuDNN workspaces). Exit status 1 when any peak is off by more than ``--target``
(default 10 %).

``layouts``: one paper-size iteration of the official layout (labels tiled, InstanceNorm +
ReLU layers, double-backward penalty, plain masked BCE) and of vcfast at one batch: seconds
and peak memory side by side, with the estimates.

Precisions: ``fp32``; ``bf16`` = fp32 weights with bf16 autocast (what ``vcfast train --bf16``
runs); ``bf16-weights`` = the models themselves in bf16.

On the CPU (``--device cpu``, used by the dry run of scripts/gpu_validate.sh) the measurement
is the rise of the process's high-water mark during the iteration (vcfast.selftest.measure_peak)
and the estimate adds the oneDNN convolution scratch model; compare the figures above the
baseline there (weights, gradients, optimizer state and batch are not in an RSS rise).

    python scripts/gpu_memory_check.py estimator --batches 1,4,16 --precisions fp32,bf16
    python scripts/gpu_memory_check.py layouts --batch 16
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from vcfast.estimate import build_iteration, estimate_iteration
from vcfast.labels import DEFAULT_GROUPS, LabelSpace
from vcfast.selftest import measure_peak

MIB = 2**20
#: precision name -> estimate_iteration / build_iteration options
PRECISIONS = {"fp32": {"dtype": "fp32"},
              "bf16": {"dtype": "fp32", "autocast": "bf16"},
              "bf16-weights": {"dtype": "bf16"}}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_iteration(batch: int, implementation: str, precision: str, device: torch.device,
                      sizes: dict, warmup: bool) -> dict:
    """One real iteration: seconds, peak bytes (whole iteration and per phase), baseline."""
    iteration = build_iteration(batch, implementation=implementation, device=device, **sizes,
                                **PRECISIONS[precision])
    if warmup:
        iteration.run()
    phase_peaks = {}

    def between_phases():
        # The D steps' peak, then a fresh peak for the G step (CUDA's counter can be reset).
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            phase_peaks["d_step"] = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    _free(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    # Bound as a default: the name is deleted below, which pyflakes reads as undefined here.
    seconds, peak = measure_peak(lambda it=iteration: it.run(after_d_steps=between_phases),
                                 device)
    if device.type == "cuda":
        phase_peaks["g_step"] = peak
        peak = max(peak, phase_peaks["d_step"])
    del iteration
    _free(device)
    return {"seconds": seconds, "peak_bytes": peak, "baseline_bytes": baseline,
            "phases": phase_peaks}


def _estimate(batch: int, implementation: str, precision: str, device: torch.device,
              sizes: dict) -> dict:
    return estimate_iteration(batch, implementation=implementation, **sizes,
                              workspace=None if device.type == "cuda" else "onednn",
                              **PRECISIONS[precision])


def _sizes(args) -> dict:
    """Model and iteration sizes shared by the estimate and the measurement."""
    groups = DEFAULT_GROUPS if args.label_groups is None else \
        tuple((f"group{i}", size) for i, size in enumerate(args.label_groups))
    return {"image_size": args.image_size, "conv_dim": args.conv_dim, "n_critic": args.n_critic,
            "label_space": LabelSpace(groups), "optimizer": args.optimizer}


def _comparable(estimate: dict, device: torch.device) -> int:
    """The estimate's figure that the measurement on ``device`` reads (see the module doc)."""
    return estimate["peak_bytes"] if device.type == "cuda" else estimate["peak_allocated_bytes"]


def check_estimator(args, device: torch.device) -> tuple[list[dict], bool]:
    rows, all_within = [], True
    for precision in args.precisions:
        for batch in args.batches:
            row = {"precision": precision, "batch": batch}
            try:
                estimate = _estimate(batch, "vcfast", precision, device, _sizes(args))
                measured = measure_iteration(batch, "vcfast", precision, device, _sizes(args),
                                             args.warmup)
            except Exception as exc:  # noqa: BLE001 - recorded, the other configurations go on
                row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0], within=False)
                all_within = False
                _free(device)
                rows.append(row)
                print(f"{precision:13} batch {batch:3}: failed: {row['error']}", flush=True)
                continue
            expected = _comparable(estimate, device)
            ratio = measured["peak_bytes"] / expected
            within = abs(ratio - 1) <= args.target
            all_within &= within
            row.update(estimated_bytes=expected, measured_bytes=measured["peak_bytes"],
                       ratio=ratio, within=within, seconds=measured["seconds"],
                       estimated_baseline_bytes=estimate["baseline_bytes"],
                       measured_baseline_bytes=measured["baseline_bytes"],
                       estimated_phases=estimate["phases"], measured_phases=measured["phases"])
            rows.append(row)
            phases = ""
            if measured["phases"]:
                phases = "; " + ", ".join(
                    f"{p} {measured['phases'][p] / MIB:.0f} vs {estimate['phases'][p] / MIB:.0f}"
                    for p in ("d_step", "g_step"))
            print(f"{precision:13} batch {batch:3}: "
                  f"measured {measured['peak_bytes'] / MIB:8.0f} MiB, "
                  f"estimated {expected / MIB:8.0f} MiB, ratio {ratio:.3f} "
                  f"({'within' if within else 'OUTSIDE'} {args.target:.0%}){phases}; "
                  f"{measured['seconds']:.2f} s", flush=True)
    return rows, all_within


def compare_layouts(args, device: torch.device) -> tuple[list[dict], bool]:
    rows, vcfast_ok = [], True
    for implementation in ("reference", "vcfast"):
        row = {"implementation": implementation, "batch": args.batch, "precision": args.precision}
        try:
            estimate = _estimate(args.batch, implementation, args.precision, device,
                                 _sizes(args))
            row["estimated_bytes"] = _comparable(estimate, device)
            row.update(measure_iteration(args.batch, implementation, args.precision, device,
                                         _sizes(args), args.warmup))
        except torch.cuda.OutOfMemoryError:
            # The official layout not fitting is a result, not a failure of the check.
            row["error"] = "out of memory"
            vcfast_ok &= implementation != "vcfast"
            _free(device)
        except Exception as exc:  # noqa: BLE001 - recorded
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            vcfast_ok &= implementation != "vcfast"
            _free(device)
        rows.append(row)
    print(f"one iteration ({args.n_critic} D steps + 1 G step), batch {args.batch}, "
          f"{args.precision}, 1x{args.image_size}x{args.image_size}, conv_dim {args.conv_dim}")
    print(f"{'layout':22}{'seconds':>10}{'peak MiB':>12}{'estimated MiB':>15}")
    for row in rows:
        name = "official (reference)" if row["implementation"] == "reference" else "vcfast"
        if "error" in row:
            print(f"{name:22}{row['error']:>37}")
            continue
        print(f"{name:22}{row['seconds']:>10.2f}{row['peak_bytes'] / MIB:>12.0f}"
              f"{row['estimated_bytes'] / MIB:>15.0f}")
    return rows, vcfast_ok


def _parse_list(text: str, kind=str) -> list:
    return [kind(v.strip()) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["estimator", "layouts"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=lambda t: _parse_list(t, int), default=[1, 4, 16],
                        help="estimator: batches (default 1,4,16)")
    parser.add_argument("--precisions", type=_parse_list, default=["fp32", "bf16"],
                        help=f"estimator: precisions, of {', '.join(PRECISIONS)} "
                             "(default fp32,bf16)")
    parser.add_argument("--batch", type=int, default=16, help="layouts: batch (default 16)")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="layouts: precision (default fp32)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--conv-dim", type=int, default=64)
    parser.add_argument("--n-critic", type=int, default=5)
    parser.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adam"],
                        help="the trainer's optimizer (vcfast train --optimizer)")
    parser.add_argument("--label-groups", type=lambda t: _parse_list(t, int), default=None,
                        help="label group sizes (default: the paper's 1421,53,2); small groups "
                             "make the tiny CPU dry run quick")
    parser.add_argument("--target", type=float, default=0.10,
                        help="estimator: largest accepted |measured / estimated - 1| "
                             "(default 0.10)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="measure the first iteration (includes kernel compilation)")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; choose from {sorted(PRECISIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu for a CPU run")
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    conditions = {"torch": torch.__version__, "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
                  "image_size": args.image_size, "conv_dim": args.conv_dim,
                  "n_critic": args.n_critic,
                  "label_groups": list(_sizes(args)["label_space"].sizes),
                  "measure": ("torch.cuda.max_memory_allocated" if on_cuda else
                              "ru_maxrss rise, against the estimate above the baseline with "
                              "the oneDNN scratch model")}
    start = time.perf_counter()
    if args.mode == "estimator":
        rows, ok = check_estimator(args, device)
        worst = max((abs(r["ratio"] - 1) for r in rows if "ratio" in r), default=float("nan"))
        verdict = (f"verdict: {sum(bool(r.get('within')) for r in rows)} of {len(rows)} "
                   f"within {args.target:.0%} (worst {worst:.1%})")
    else:
        rows, ok = compare_layouts(args, device)
        done = {r["implementation"]: r for r in rows}
        parts = []
        for name, label in (("reference", "official"), ("vcfast", "vcfast")):
            r = done[name]
            parts.append(f"{label} {r['error']}" if "error" in r else
                         f"{label} {r['seconds']:.2f} s {r['peak_bytes'] / MIB:.0f} MiB")
        verdict = "verdict: " + ", ".join(parts)
    print(verdict)
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": args.mode, "conditions": conditions,
                                               "rows": rows, "ok": ok,
                                               "seconds": time.perf_counter() - start},
                                              indent=2, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
