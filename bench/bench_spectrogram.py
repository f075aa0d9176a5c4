"""Fused log-spectrogram vs the torch.stft chain vs nnAudio, stargan_vc preset sizes.

Batch 16 x 66 304 float32 samples (16 clips of 4.1 s at 16 kHz) -> 16 x 256 x 256.
Forward and forward+backward timings through pytest-benchmark, plus the extra memory each
path allocates beyond its output, measured in a fresh process (see conftest.py).
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from conftest import BENCH_THREADS, conditions, measure_extra_memory

import vcfast

BATCH, SAMPLES = 16, 66304
CPU_IMPLS = ["vcfast-cpu", "torch.stft-chain", "nnAudio"]


def _nnaudio_chain():
    """What a user of nnAudio would write: its conv-based STFT restricted to bins 1..256."""
    nnaudio = pytest.importorskip("nnAudio.features",
                                  reason="pip install nnAudio (the bench extra)")
    stft = nnaudio.STFT(n_fft=1024, hop_length=256, window="hamming", center=False,
                        freq_bins=256, freq_scale="linear", fmin=15.625, fmax=4000.0, sr=16000,
                        output_format="Magnitude", trainable=False, verbose=False)
    floor = math.log(1e-3)

    def run(wave):
        magnitude = stft(wave) / 1024
        return (torch.log(magnitude.clamp_min(1e-3)) - floor) / -floor

    return run


def _impl(name: str, device: str = "cpu"):
    if name == "vcfast-cpu":
        return lambda wave: vcfast.log_spectrogram(wave, backend="cpu")
    if name == "vcfast-triton":
        return lambda wave: vcfast.log_spectrogram(wave, backend="triton")
    if name == "torch.stft-chain":
        return lambda wave: vcfast.log_spectrogram(wave, backend="reference")
    if name == "nnAudio":
        return _nnaudio_chain()
    raise ValueError(name)


def _wave(device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(0)
    wave = (torch.rand(BATCH, SAMPLES, generator=g) - 0.5).to(device)
    return wave.requires_grad_(requires_grad)


def _skip_unavailable(name):
    if name == "vcfast-cpu" and not vcfast.backends()["cpu"]:
        pytest.skip("vcfast._C not built")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_forward_cpu(benchmark, impl):
    _skip_unavailable(impl)
    run, wave = _impl(impl), _wave()
    benchmark.group = (f"log-spectrogram forward, {BATCH}x{SAMPLES} fp32, CPU, "
                       f"{BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()
    out = benchmark(run, wave)
    assert out.shape == (BATCH, 256, 256)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_forward_backward_cpu(benchmark, impl):
    _skip_unavailable(impl)
    run, wave = _impl(impl), _wave(requires_grad=True)
    weight = torch.rand(BATCH, 256, 256)
    benchmark.group = (f"log-spectrogram forward+backward, {BATCH}x{SAMPLES} fp32, CPU, "
                       f"{BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()

    def step():
        (grad,) = torch.autograd.grad((run(wave) * weight).sum(), wave)
        return grad

    grad = benchmark(step)
    assert grad.shape == wave.shape and torch.isfinite(grad).all()


_MEMORY_SETUP = {
    "vcfast-cpu": "import vcfast\nfn = lambda w: vcfast.log_spectrogram(w, backend='cpu')",
    "torch.stft-chain": ("import vcfast\n"
                         "fn = lambda w: vcfast.log_spectrogram(w, backend='reference')"),
    "nnAudio": textwrap.dedent("""
        import math, torch
        from nnAudio.features import STFT
        stft = STFT(n_fft=1024, hop_length=256, window='hamming', center=False, freq_bins=256,
                    freq_scale='linear', fmin=15.625, fmax=4000.0, sr=16000,
                    output_format='Magnitude', trainable=False, verbose=False)
        fl = math.log(1e-3)
        fn = lambda w: (torch.log((stft(w) / 1024).clamp_min(1e-3)) - fl) / -fl
        """),
}


def _memory_code(impl: str, backward: bool) -> str:
    body = _MEMORY_SETUP[impl] + textwrap.dedent(f"""
        import torch
        g = torch.Generator().manual_seed(0)
        wave = (torch.rand({BATCH}, {SAMPLES}, generator=g) - 0.5).requires_grad_({backward})
        def run():
            out = fn(wave)
            if {backward}:
                (grad,) = torch.autograd.grad(out.sum(), wave)
                return grad
            return out
        """)
    return body


def test_extra_memory_table(capsys):
    """Extra memory beyond the output: forward (output = spectrogram) and forward+backward
    (output = gradient). Printed as a table; pytest -s shows it, CI logs keep it."""
    rows = []
    for impl in CPU_IMPLS:
        if impl == "vcfast-cpu" and not vcfast.backends()["cpu"]:
            continue
        if impl == "nnAudio":
            pytest.importorskip("nnAudio.features")
        fwd = measure_extra_memory(_memory_code(impl, backward=False))
        bwd = measure_extra_memory(_memory_code(impl, backward=True))
        rows.append((impl, fwd["extra"], fwd["out_bytes"], bwd["extra"], bwd["out_bytes"]))
    mib = 2**20
    with capsys.disabled():
        print(f"\nextra memory beyond the output, {BATCH}x{SAMPLES} fp32 -> {BATCH}x256x256; "
              f"{conditions()}")
        print(f"{'impl':<18}{'fwd extra MiB':>14}{'fwd out MiB':>12}{'fwd+bwd extra MiB':>19}"
              f"{'grad MiB':>10}")
        for impl, fe, fo, be, bo in rows:
            print(f"{impl:<18}{fe / mib:>14.1f}{fo / mib:>12.1f}{be / mib:>19.1f}{bo / mib:>10.1f}")
    assert all(r[2] == BATCH * 256 * 256 * 4 for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["vcfast-triton", "vcfast-cuda", "torch.stft-chain"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_gpu(benchmark, impl, backward):
    if impl == "vcfast-cuda" and not vcfast.backends()["cuda"]:
        pytest.skip("vcfast._C built without CUDA")
    run = ((lambda w: vcfast.log_spectrogram(w, backend="cuda")) if impl == "vcfast-cuda"
           else _impl(impl))
    wave = _wave("cuda", requires_grad=backward)
    benchmark.group = (f"log-spectrogram {'fwd+bwd' if backward else 'forward'}, "
                       f"{BATCH}x{SAMPLES} fp32, CUDA")
    benchmark.extra_info["conditions"] = conditions()

    def step():
        out = run(wave)
        if backward:
            out = torch.autograd.grad(out.sum(), wave)[0]
        torch.cuda.synchronize()
        return out

    benchmark(step)
