"""Shared conditions and memory measurement for the benchmarks.

Run: ``pytest bench`` (timings), ``pytest bench --benchmark-disable`` (one pass each, as CI does).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vcfast.memory import measure_process_peak
from vcfast.selftest import cpu_model

BENCH_THREADS = int(os.environ.get("VCFAST_BENCH_THREADS", "2"))


@functools.cache
def onednn_isa() -> str:
    """The instruction set oneDNN's CPU kernels use here, as oneDNN itself reports it (one
    convolution in a fresh process with ONEDNN_VERBOSE=1; DNNL_MAX_CPU_ISA caps it)."""
    code = ("import torch\n"
            "torch.nn.functional.conv2d(torch.randn(2, 64, 32, 32), torch.randn(64, 64, 3, 3))\n")
    try:
        result = subprocess.run([sys.executable, "-c", code],
                                env=dict(os.environ, ONEDNN_VERBOSE="1"),
                                capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in result.stdout.splitlines():
        if ",cpu,isa:" in line:
            return line.split(",cpu,isa:", 1)[1].strip()
    return "unknown"


def cpu_isa() -> str:
    """ATen's vectorised-kernel level (ATEN_CPU_CAPABILITY can lower it) and oneDNN's ISA,
    with the environment caps that were set: they decide which kernels, and which kernel
    scratch, the CPU measurements see."""
    isa = f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN {onednn_isa()}"
    caps = [f"{name}={os.environ[name]}"
            for name in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")
            if os.environ.get(name)]
    import vcfast

    ours = f", vcfast C++ kernels {vcfast.cpu_isa() or 'not built'}"
    return isa + ours + (f" ({', '.join(caps)})" if caps else "")


def conditions() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"torch {torch.__version__}, CPU {cpu_model()} ({os.cpu_count()} cores), "
            f"ISA {cpu_isa()}, threads {BENCH_THREADS}, GPU {gpu}")


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


def waveform_memory_rows(setups: dict[str, str], batch: int, samples: int) -> list[tuple]:
    """Extra memory of a waveform op in fresh processes, forward and forward+backward.

    ``setups``: name -> source defining ``fn(wave)``; each runs on a ``[batch, samples]``
    float32 wave (its output, then the wave's gradient of ``fn(wave).sum()``). Returns rows
    (name, forward extra, output bytes, forward+backward extra, gradient bytes)."""
    rows = []
    for name, setup in setups.items():
        measured = []
        for backward in (False, True):
            code = setup + textwrap.dedent(f"""
                import torch
                g = torch.Generator().manual_seed(0)
                wave = torch.rand({batch}, {samples}, generator=g) - 0.5
                wave.requires_grad_({backward})
                def run():
                    out = fn(wave)
                    if {backward}:
                        (grad,) = torch.autograd.grad(out.sum(), wave)
                        return grad
                    return out
                """)
            measured.append(measure_extra_memory(code))
        rows.append((name, measured[0]["extra"], measured[0]["out_bytes"], measured[1]["extra"],
                     measured[1]["out_bytes"]))
    return rows


def print_memory_rows(title: str, rows: list[tuple]) -> None:
    """The table of :func:`waveform_memory_rows`, with the conditions."""
    mib = 2**20
    print(f"\nextra memory beyond the output, {title}; {conditions()}")
    print(f"{'impl':<18}{'fwd extra MiB':>14}{'fwd out MiB':>12}{'fwd+bwd extra MiB':>19}"
          f"{'grad MiB':>10}")
    for impl, fe, fo, be, bo in rows:
        print(f"{impl:<18}{fe / mib:>14.1f}{fo / mib:>12.1f}{be / mib:>19.1f}{bo / mib:>10.1f}")
