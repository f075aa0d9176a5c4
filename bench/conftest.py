"""Shared conditions and memory measurement for the benchmarks.

Run: ``pytest bench`` (timings), ``pytest bench --benchmark-disable`` (one pass each, as CI does).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from vcfast.memory import measure_process_peak

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


def measure_extra_memory(setup_code: str, threads: int = BENCH_THREADS) -> dict:
    """Peak bytes a call allocates beyond its output, in a fresh process (see
    vcfast.memory.measure_process_peak for the method)."""
    return measure_process_peak(setup_code, threads)
