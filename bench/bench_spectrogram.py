"""Fused log-spectrogram vs the torch.stft chain vs nnAudio, stargan_vc preset sizes.

Batch 16 x 66 304 float32 samples (16 clips of 4.1 s at 16 kHz) -> 16 x 256 x 256.
Forward and forward+backward timings through pytest-benchmark, plus the extra memory each
path allocates beyond its output, measured in a fresh process (see conftest.py).
"""

from __future__ import annotations

import importlib.util
import math
import textwrap

import pytest
import torch
from conftest import BENCH_THREADS, conditions, print_memory_rows, waveform_memory_rows

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


def test_extra_memory_table(capsys):
    """Extra memory beyond the output: forward (output = spectrogram) and forward+backward
    (output = gradient). Printed as a table; pytest -s shows it, CI logs keep it."""
    setups = dict(_MEMORY_SETUP)
    if not vcfast.backends()["cpu"]:
        del setups["vcfast-cpu"]
    if importlib.util.find_spec("nnAudio") is None:
        pytest.skip("pip install nnAudio (the bench extra)")
    rows = waveform_memory_rows({k: setups[k] for k in CPU_IMPLS if k in setups}, BATCH, SAMPLES)
    with capsys.disabled():
        print_memory_rows(f"{BATCH}x{SAMPLES} fp32 -> {BATCH}x256x256", rows)
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
