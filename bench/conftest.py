"""Shared conditions and memory measurement for the benchmarks.

Run: ``pytest bench`` (timings), ``pytest bench --benchmark-disable`` (one pass each, as CI does).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

BENCH_THREADS = int(os.environ.get("VCFAST_BENCH_THREADS", "2"))


def conditions() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"torch {torch.__version__}, CPU {cpu} ({os.cpu_count()} cores), "
            f"threads {BENCH_THREADS}, GPU {gpu}")


@pytest.fixture(autouse=True)
def _bench_threads():
    """Every benchmark runs with BENCH_THREADS intra-op threads (2, as on CI machines)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(BENCH_THREADS)
    yield
    torch.set_num_threads(previous)


def pytest_report_header(config):
    return f"vcfast bench conditions: {conditions()}"


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, gc
    import torch
    torch.set_num_threads({threads})
    setup = {{}}
    exec({setup!r}, setup)
    run = setup["run"]
    out = run()          # warm-up: plans, thread pools, lazily created buffers
    out_bytes = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
    del out
    gc.collect()
    page = resource.getpagesize()
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    # ru_maxrss cannot be reset and imports peak above the steady state, which would hide a
    # smaller peak of the call. A touched ballast lifts the resident size to the high-water
    # mark, so any allocation by the call raises the mark by exactly what it adds.
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gap = lifetime_peak - resident()
    ballast = torch.ones(gap // 4 + 4096) if gap > 0 else None
    baseline = resident()
    out = run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({{"baseline": baseline, "peak": peak, "out_bytes": out_bytes}}))
    """
)


def measure_extra_memory(setup_code: str, threads: int = BENCH_THREADS) -> dict:
    """Peak bytes a call allocates beyond its output, measured in a fresh process.

    ``setup_code`` defines ``run()`` returning the output tensor(s). glibc is told to return
    freed memory at once (else it keeps it and hides peaks); the baseline is the resident
    size after a warm-up call (lifted to the high-water mark by a ballast), the peak is
    ru_maxrss, so peak - baseline - output is the transient working memory of one call.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    code = _MEASURE.format(threads=threads, setup=setup_code)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["extra"] = max(0, figures["peak"] - figures["baseline"] - figures["out_bytes"])
    return figures
