"""Log-mel spectrogram: vcfast cpu (the fused C++ kernel) vs fast vs reference vs the plain chain
a user writes vs nnAudio, esc50_mel preset sizes (docs/ops.md#log-mel-spectrogram).

Batch 16 x 220 500 float32 samples (16 clips of 5 s at 44.1 kHz) -> 16 x 128 x 431, on the
CPU, forward and forward+backward through pytest-benchmark. Every implementation is checked
against the float64 reference chain in the same run before it is timed.
"""

from __future__ import annotations

import functools
import importlib.util
import textwrap

import pytest
import torch
from conftest import BENCH_THREADS, conditions, print_memory_rows, waveform_memory_rows

import vcfast

BATCH, SAMPLES = 16, 5 * 44100
N_MELS, N_FRAMES = 128, 431
IMPLS = ["vcfast-cpu", "vcfast-fast", "vcfast-reference", "torch.stft-chain", "nnAudio"]
PRESET = vcfast.MEL_PRESETS["esc50_mel"]  # Slaney scale and area norm, natural log


def _user_chain():
    """What a user writes: torch.stft, |X|^2, a mel matrix (here vcfast's, as they would take
    librosa's or torchaudio's), log."""
    window = torch.hann_window(PRESET.n_fft)
    fb_t = vcfast.mel_filterbank(PRESET.n_freqs, 0.0, 22050.0, N_MELS, 44100, "slaney",
                                 "slaney").T.contiguous()

    def run(wave):
        spec = torch.stft(wave, PRESET.n_fft, PRESET.hop, window=window, center=True,
                          pad_mode="reflect", return_complex=True)
        return torch.log(torch.clamp(fb_t @ spec.abs().pow(2), min=1e-10))

    return run


def _nnaudio_chain():
    nnaudio = pytest.importorskip("nnAudio.features",
                                  reason="pip install nnAudio (the bench extra)")
    # norm=1 is Slaney's area norm, htk=False Slaney's scale; periodic Hann, reflect padding.
    mel = nnaudio.MelSpectrogram(sr=44100, n_fft=PRESET.n_fft, n_mels=N_MELS,
                                 hop_length=PRESET.hop, window="hann", center=True,
                                 pad_mode="reflect", power=2.0, htk=False, fmin=0.0,
                                 fmax=None, norm=1, trainable_mel=False, trainable_STFT=False,
                                 verbose=False)
    return lambda wave: torch.log(torch.clamp(mel(wave), min=1e-10))


def _impl(name: str):
    if name == "vcfast-cpu":
        if not vcfast._extension.has_op("log_mel_spectrogram"):
            pytest.skip("vcfast._C without the log_mel_spectrogram op")
        return lambda wave: vcfast.log_mel_spectrogram(wave, "esc50_mel", backend="cpu")
    if name == "vcfast-fast":
        return lambda wave: vcfast.log_mel_spectrogram(wave, "esc50_mel", backend="fast")
    if name == "vcfast-reference":
        return lambda wave: vcfast.log_mel_spectrogram(wave, "esc50_mel", backend="reference")
    if name == "torch.stft-chain":
        return _user_chain()
    if name == "nnAudio":
        return _nnaudio_chain()
    raise ValueError(name)


def _wave(requires_grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    wave = (torch.rand(BATCH, SAMPLES, generator=g, dtype=torch.float64) - 0.5).to(dtype)
    return wave.requires_grad_(requires_grad)


def _weight():
    g = torch.Generator().manual_seed(1)
    return torch.rand(BATCH, N_MELS, N_FRAMES, generator=g, dtype=torch.float64)


@functools.cache
def _reference64():
    """Values and gradient of the reference chain in float64: what every row is checked
    against."""
    wave = _wave(requires_grad=True, dtype=torch.float64)
    with torch.enable_grad():
        out = vcfast.log_mel_spectrogram(wave, "esc50_mel", backend="reference")
        (grad,) = torch.autograd.grad((out * _weight()).sum(), wave)
    return out.detach(), grad


def _check_forward(out):
    ref, _ = _reference64()
    assert out.shape == (BATCH, N_MELS, N_FRAMES)
    # float32 log of small mel values: absolute error up to ~1e-3 (nnAudio's conv DFT).
    torch.testing.assert_close(out.double(), ref, rtol=1e-3, atol=5e-3)
    assert (out.double() - ref).abs().mean() < 1e-5


def _check_gradient(grad):
    _, ref = _reference64()
    rel = (grad.double() - ref).norm() / ref.norm()
    assert rel < 1e-3, f"gradient relative error {rel:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_cpu(benchmark, impl):
    run, wave = _impl(impl), _wave()
    with torch.no_grad():
        _check_forward(run(wave))
    benchmark.group = (f"log-mel forward, {BATCH}x{SAMPLES} fp32 -> {BATCH}x{N_MELS}x{N_FRAMES}, "
                       f"CPU, {BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()
    print(f"\n{impl}: {conditions()}")
    benchmark(run, wave)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_backward_cpu(benchmark, impl):
    run, wave = _impl(impl), _wave(requires_grad=True)
    weight = _weight().float()

    def step():
        (grad,) = torch.autograd.grad((run(wave) * weight).sum(), wave)
        return grad

    _check_gradient(step())
    benchmark.group = (f"log-mel forward+backward, {BATCH}x{SAMPLES} fp32, CPU, "
                       f"{BENCH_THREADS} threads")
    benchmark.extra_info["conditions"] = conditions()
    print(f"\n{impl}: {conditions()}")
    grad = benchmark(step)
    assert grad.shape == wave.shape


_MEMORY_SETUP = {
    "vcfast-cpu": "import vcfast\n"
                  "fn = lambda w: vcfast.log_mel_spectrogram(w, 'esc50_mel', backend='cpu')",
    "vcfast-fast": "import vcfast\n"
                   "fn = lambda w: vcfast.log_mel_spectrogram(w, 'esc50_mel', backend='fast')",
    "torch.stft-chain": textwrap.dedent(f"""
        import torch, vcfast
        window = torch.hann_window({PRESET.n_fft})
        fb_t = vcfast.mel_filterbank({PRESET.n_freqs}, 0.0, 22050.0, {N_MELS}, 44100, 'slaney',
                                     'slaney').T.contiguous()
        def fn(w):
            spec = torch.stft(w, {PRESET.n_fft}, {PRESET.hop}, window=window, center=True,
                              pad_mode='reflect', return_complex=True)
            return torch.log(torch.clamp(fb_t @ spec.abs().pow(2), min=1e-10))
        """),
    "nnAudio": textwrap.dedent(f"""
        import torch
        from nnAudio.features import MelSpectrogram
        mel = MelSpectrogram(sr=44100, n_fft={PRESET.n_fft}, n_mels={N_MELS},
                             hop_length={PRESET.hop}, window='hann', center=True,
                             pad_mode='reflect', power=2.0, htk=False, fmin=0.0, fmax=None,
                             norm=1, trainable_mel=False, trainable_STFT=False, verbose=False)
        fn = lambda w: torch.log(torch.clamp(mel(w), min=1e-10))
        """),
}


def test_extra_memory_table(capsys):
    """Extra memory beyond the output (forward: the log-mel; forward+backward: the wave's
    gradient), each in a fresh process. Printed as a table; pytest -s shows it."""
    setups = dict(_MEMORY_SETUP)
    if not vcfast._extension.has_op("log_mel_spectrogram"):
        del setups["vcfast-cpu"]
    if importlib.util.find_spec("nnAudio") is None:
        pytest.skip("pip install nnAudio (the bench extra)")
    rows = waveform_memory_rows(setups, BATCH, SAMPLES)
    with capsys.disabled():
        print_memory_rows(f"log-mel {BATCH}x{SAMPLES} fp32 -> {BATCH}x{N_MELS}x{N_FRAMES}", rows)
    assert rows and all(r[2] > 0 and r[4] > 0 for r in rows)
