"""vcfast.log_mel_spectrogram, vcfast.mel_filterbank and vcfast.nn.LogMelSpectrogram
(docs/ops.md#log-mel-spectrogram): the filterbank against the published formulas written out
here independently (and against librosa / torchaudio where importable), the fast backend
against the reference chain (values and gradients), gradcheck, framing variants, shapes,
torch.compile, argument errors and the module."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import vcfast
from vcfast import _extension
from vcfast.ops.mel import (
    MEL_PRESETS,
    MelNormalization,
    hz_to_mel,
    log_mel_spectrogram_reference,
    mel_to_hz,
)

TINY = dict(sample_rate=16000, n_fft=256, hop=64, n_mels=24)


def _wave(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5).to(dtype)


# ---------------------------------------------------------------------------------------------
# Mel scales and the filterbank, from the formulas (numpy, element by element)


def _np_hz_to_mel(f, scale):
    f = np.asarray(f, dtype=np.float64)
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney: 3 mels per 200 Hz up to 1000 Hz (15 mels), then 27 mels per factor 6.4.
    return np.where(f < 1000.0, f * 3.0 / 200.0,
                    15.0 + np.log(np.maximum(f, 1e-300) / 1000.0) * 27.0 / np.log(6.4))


def _np_mel_to_hz(m, scale):
    m = np.asarray(m, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * 6.4 ** ((m - 15.0) / 27.0))


def _np_filterbank(n_freqs, f_min, f_max, n_mels, sample_rate, scale, norm):
    freqs = np.linspace(0.0, sample_rate / 2, n_freqs)
    edges = _np_mel_to_hz(np.linspace(_np_hz_to_mel(f_min, scale), _np_hz_to_mel(f_max, scale),
                                      n_mels + 2), scale)
    fb = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        lo, peak, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            if lo < f <= peak:
                fb[k, m] = (f - lo) / (peak - lo)
            elif peak < f < hi:
                fb[k, m] = (hi - f) / (hi - peak)
        if norm == "slaney":
            fb[:, m] *= 2.0 / (hi - lo)
    return fb


def test_mel_scale_known_values():
    f = torch.tensor([0.0, 200.0, 1000.0, 6400.0], dtype=torch.float64)
    htk = hz_to_mel(f, "htk")
    assert htk[0] == 0
    assert htk[2].item() == pytest.approx(999.98553, abs=1e-5)  # 2595 log10(1 + 10/7)
    slaney = hz_to_mel(f, "slaney")
    assert slaney.tolist() == pytest.approx([0.0, 3.0, 15.0, 42.0], abs=1e-12)
    for scale in ("htk", "slaney"):
        grid = torch.linspace(0, 22050, 301, dtype=torch.float64)
        torch.testing.assert_close(mel_to_hz(hz_to_mel(grid, scale), scale), grid,
                                   rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(hz_to_mel(grid, scale).numpy(),
                                   _np_hz_to_mel(grid.numpy(), scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", ["htk", "slaney"])
@pytest.mark.parametrize("norm", [None, "slaney"])
@pytest.mark.parametrize("n_freqs, f_min, f_max, n_mels, sample_rate", [
    (513, 0.0, 22050.0, 128, 44100),
    (201, 20.0, 8000.0, 40, 16000),
    (129, 300.0, 3000.0, 10, 8000),
    (257, 0.0, 4000.0, 64, 22050),
])
def test_filterbank_matches_formulas(scale, norm, n_freqs, f_min, f_max, n_mels, sample_rate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fb = vcfast.mel_filterbank(n_freqs, f_min, f_max, n_mels, sample_rate, mel_scale=scale,
                                   norm=norm, dtype=torch.float64)
    expected = _np_filterbank(n_freqs, f_min, f_max, n_mels, sample_rate, scale, norm)
    assert fb.shape == (n_freqs, n_mels) and fb.dtype == torch.float64
    np.testing.assert_allclose(fb.numpy(), expected, rtol=1e-10, atol=1e-13)
    assert (fb >= 0).all() and fb.max() <= (1.0 if norm is None else fb.max())


def test_filterbank_hand_values():
    # Three HTK filters with edges at 0, 1, 2, 3, 4 kHz... in mel: check peaks are 1 at the
    # centre frequencies and the slaney area norm makes each filter integrate to 1 (Hz units).
    fb = vcfast.mel_filterbank(4001, 0.0, 4000.0, 3, 8000, mel_scale="htk",
                               dtype=torch.float64)
    edges = _np_mel_to_hz(np.linspace(0, _np_hz_to_mel(4000.0, "htk"), 5), "htk")
    freqs = np.linspace(0, 4000, 4001)
    for m in range(3):
        k = int(np.argmin(np.abs(freqs - edges[m + 1])))
        assert fb[k, m].item() == pytest.approx(1.0, abs=2e-3)
    fb_n = vcfast.mel_filterbank(4001, 0.0, 4000.0, 3, 8000, mel_scale="htk", norm="slaney",
                                 dtype=torch.float64)
    # Bins are 1 Hz apart, so the sum approximates the integral: 1/2 * width * 2/width = 1.
    torch.testing.assert_close(fb_n.sum(0), torch.ones(3, dtype=torch.float64), atol=1e-3,
                               rtol=0)
    assert vcfast.mel_filterbank(513, 0, 22050, 128, 44100, "slaney").dtype == torch.float32


def test_filterbank_warns_on_empty_band():
    with pytest.warns(UserWarning, match=r"mel band\(s\) \[0\]"):
        vcfast.mel_filterbank(513, 0.0, 22050.0, 128, 44100, mel_scale="htk")


@pytest.mark.parametrize("scale, norm", [("htk", None), ("slaney", "slaney"), ("slaney", None)])
def test_filterbank_vs_librosa(scale, norm):
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=16000, n_fft=512, n_mels=40, fmin=30.0, fmax=7600.0,
                                   htk=scale == "htk", norm=norm, dtype=np.float64)
    fb = vcfast.mel_filterbank(257, 30.0, 7600.0, 40, 16000, mel_scale=scale, norm=norm,
                               dtype=torch.float64)
    np.testing.assert_allclose(fb.numpy(), expected.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale, norm", [("htk", None), ("slaney", "slaney"), ("htk", "slaney")])
def test_filterbank_vs_torchaudio(scale, norm):
    torchaudio = pytest.importorskip("torchaudio")
    expected = torchaudio.functional.melscale_fbanks(257, 30.0, 7600.0, 40, 16000, norm=norm,
                                                     mel_scale=scale)
    fb = vcfast.mel_filterbank(257, 30.0, 7600.0, 40, 16000, mel_scale=scale, norm=norm)
    torch.testing.assert_close(fb, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The op


def test_esc50_preset_shape():
    assert "esc50_mel" in MEL_PRESETS
    wave = _wave(2, 5 * 44100)
    out = vcfast.log_mel_spectrogram(wave, "esc50_mel")
    assert out.shape == (2, 128, 431) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert vcfast.log_mel_spectrogram(wave[0], "esc50_mel").shape == (128, 431)
    assert MEL_PRESETS["esc50_mel"].n_frames(5 * 44100) == 431
    ref = vcfast.log_mel_spectrogram(wave[:1], "esc50_mel", backend="reference")
    torch.testing.assert_close(out[:1], ref, rtol=1e-4, atol=1e-4)


def test_log_definitions():
    wave = _wave(2, 3000, dtype=torch.float64)
    cfg = vcfast.MelConfig(**TINY)
    win = cfg.make_window(torch.float64)
    fb = cfg.make_filterbank(torch.float64)
    spec = torch.stft(wave, 256, 64, window=win, center=True, return_complex=True)
    mel = torch.einsum("km,bkf->bmf", fb, spec.abs() ** 2)
    nat = vcfast.log_mel_spectrogram(wave, **TINY)
    torch.testing.assert_close(nat, torch.log(mel.clamp_min(1e-10)))
    db = vcfast.log_mel_spectrogram(wave, **TINY, log="db")
    torch.testing.assert_close(db, 10 * torch.log10(mel.clamp_min(1e-10)))
    db1 = vcfast.log_mel_spectrogram(wave, **TINY, log="db", power=1.0)
    mel1 = torch.einsum("km,bkf->bmf", fb, spec.abs())
    torch.testing.assert_close(db1, 20 * torch.log10(mel1.clamp_min(1e-10)))
    top = vcfast.log_mel_spectrogram(wave, **TINY, log="db", top_db=30.0)
    peak = db.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(top, torch.maximum(db, peak - 30.0))
    assert (top.amax(dim=(1, 2)) - top.amin(dim=(1, 2)) <= 30.0 + 1e-9).all()
    rng = vcfast.log_mel_spectrogram(wave, **TINY, normalization="range")
    torch.testing.assert_close(rng, (nat - math.log(1e-10)) / -math.log(1e-10))
    mean, std = torch.rand(24, dtype=torch.float64), torch.rand(24, dtype=torch.float64) + 0.5
    ms = vcfast.log_mel_spectrogram(wave, **TINY, normalization=("mean_std", mean, std))
    torch.testing.assert_close(ms, (nat - mean[:, None]) / std[:, None])
    ms2 = vcfast.log_mel_spectrogram(wave, **TINY, normalization=MelNormalization(
        "mean_std", mean=mean, std=std))
    ms3 = vcfast.log_mel_spectrogram(wave, **TINY, normalization="mean_std", mean=mean, std=std)
    assert torch.equal(ms, ms2) and torch.equal(ms, ms3)


VARIANTS = {
    "default": {},
    "constant-pad": dict(pad_mode="constant"),
    "no-center": dict(center=False),
    "slaney": dict(mel_scale="slaney", mel_norm="slaney", f_min=50.0, f_max=7000.0),
    "power1-db": dict(power=1.0, log="db"),
    "power1.5": dict(power=1.5),
    "db-top": dict(log="db", top_db=40.0),
    "range": dict(normalization="range", log_range=(-20.0, 5.0)),
    "mean-std": dict(normalization="mean_std"),
    "hamming": dict(window="hamming", periodic_window=False),
}


def _call(wave, backend, variant, **extra):
    settings = dict(TINY, **VARIANTS[variant], **extra)
    if settings.get("normalization") == "mean_std":
        settings["mean"] = torch.linspace(-12, -2, 24)
        settings["std"] = torch.linspace(1, 3, 24)
    return vcfast.log_mel_spectrogram(wave, backend=backend, **settings)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_matches_reference(variant, dtype):
    wave = _wave(3, 4000, dtype=dtype).requires_grad_(True)
    weight = _wave(3, 24, 4000 // 64 + 1, dtype=dtype, seed=1)
    if variant == "no-center":
        weight = weight[..., : (4000 - 256) // 64 + 1]
    outs, grads = [], []
    for backend in ("fast", "reference"):
        out = _call(wave, backend, variant)
        (grad,) = torch.autograd.grad((out * weight).sum(), wave)
        outs.append(out)
        grads.append(grad)
    assert outs[0].dtype == dtype and outs[0].shape == weight.shape
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    gtol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], **gtol)


@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("settings", [
    dict(),
    dict(center=False, log="db", normalization="range", mel_scale="slaney", mel_norm="slaney"),
    dict(pad_mode="constant", power=1.0, log="db", top_db=200.0),
], ids=["default", "slaney-db-range", "constant-power1"])
def test_gradcheck(backend, settings):
    wave = (_wave(2, 40, dtype=torch.float64) + 0.05).requires_grad_(True)
    tiny = dict(sample_rate=1000, n_fft=16, hop=4, n_mels=4, f_min=50.0)

    def fn(x):
        return vcfast.log_mel_spectrogram(x, backend=backend, **tiny, **settings)

    assert torch.autograd.gradcheck(fn, (wave,))
    if settings == {}:
        assert torch.autograd.gradgradcheck(fn, (wave,))


def test_batch_and_1d_input():
    wave = _wave(3, 4000)
    batched = vcfast.log_mel_spectrogram(wave, **TINY)
    for i in range(3):
        single = vcfast.log_mel_spectrogram(wave[i], **TINY)
        assert single.shape == batched.shape[1:]
        torch.testing.assert_close(single, batched[i], rtol=1e-5, atol=1e-5)
    half = vcfast.log_mel_spectrogram(wave.half(), **TINY)
    assert half.dtype == torch.float32


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_no_grad_and_inference_mode(backend):
    wave = _wave(2, 3000).requires_grad_(True)
    expected = vcfast.log_mel_spectrogram(wave, backend=backend, **TINY, log="db", top_db=50.0)
    assert expected.requires_grad
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = vcfast.log_mel_spectrogram(wave, backend=backend, **TINY, log="db",
                                             top_db=50.0)
        assert not out.requires_grad
        torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)


def test_chunked_no_grad_matches(monkeypatch):
    import vcfast.ops.mel as mel_module

    wave = _wave(5, 4000)
    whole = vcfast.log_mel_spectrogram(wave, **TINY, log="db", top_db=40.0)
    monkeypatch.setattr(mel_module, "_CHUNK_ELEMENTS", 2 * 63 * 129)  # two clips a chunk
    with torch.no_grad():
        chunked = vcfast.log_mel_spectrogram(wave, **TINY, log="db", top_db=40.0)
    torch.testing.assert_close(chunked, whole.detach(), rtol=1e-6, atol=1e-5)


def test_inference_mode_first_then_grad():
    # The functional caches its window and filterbank per configuration: one made under
    # inference_mode must still be usable by a later call that autograd records.
    settings = dict(TINY, n_mels=23, f_min=12.5)
    wave = _wave(2, 3000).requires_grad_(True)
    with torch.inference_mode():
        first = vcfast.log_mel_spectrogram(wave.detach(), **settings)
    out = vcfast.log_mel_spectrogram(wave, **settings)
    (grad,) = torch.autograd.grad(out.sum(), wave)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(out.detach(), first, rtol=0, atol=0)


def test_custom_window_tensor():
    wave = _wave(2, 3000)
    win = torch.hann_window(256)
    torch.testing.assert_close(vcfast.log_mel_spectrogram(wave, **TINY, window=win),
                               vcfast.log_mel_spectrogram(wave, **TINY))
    ones = vcfast.log_mel_spectrogram(wave, **TINY, window=torch.ones(256))
    torch.testing.assert_close(ones, vcfast.log_mel_spectrogram(wave, **TINY,
                                                                window="rectangular"))


def test_reference_is_exported_chain():
    wave = _wave(1, 3000, dtype=torch.float64)
    cfg = vcfast.MelConfig(**TINY)
    out = log_mel_spectrogram_reference(wave, cfg, cfg.make_window(torch.float64),
                                        cfg.make_filterbank(torch.float64))
    torch.testing.assert_close(out, vcfast.log_mel_spectrogram(wave, **TINY))


# ---------------------------------------------------------------------------------------------
# Argument errors


@pytest.mark.parametrize("settings, name", [
    (dict(f_max=9000.0), "f_max"),
    (dict(f_min=4000.0, f_max=3000.0), "f_min"),
    (dict(f_min=-1.0), "f_min"),
    (dict(n_mels=0), "n_mels"),
    (dict(mel_scale="bark"), "mel_scale"),
    (dict(mel_norm="l2"), "mel_norm"),
    (dict(n_fft=1), "n_fft"),
    (dict(hop=0), "hop"),
    (dict(power=0.0), "power"),
    (dict(pad_mode="circular"), "pad_mode"),
    (dict(window="kaiser"), "window"),
    (dict(log="log2"), "log"),
    (dict(log_floor=0.0), "log_floor"),
    (dict(top_db=80.0), "top_db"),
    (dict(log="db", top_db=-1.0), "top_db"),
    (dict(normalization="minmax"), "normalization"),
    (dict(normalization=("mean", 0, 1)), "normalization"),
    (dict(normalization="mean_std"), "mean"),
    (dict(normalization="range", log_range=(1.0, 0.0)), "log_range"),
    (dict(log_range=(0.0, 1.0)), "log_range"),
    (dict(backend="cuda"), "backend"),
    (dict(window=torch.ones(100)), "window"),
])
def test_bad_arguments_name_the_argument(settings, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        vcfast.log_mel_spectrogram(_wave(4000), **{**TINY, **settings})


def test_bad_arguments_misc():
    with pytest.raises(ValueError, match="`sample_rate`"):
        vcfast.log_mel_spectrogram(_wave(4000), n_fft=256, hop=64, n_mels=10)
    with pytest.raises(ValueError, match="`preset`"):
        vcfast.log_mel_spectrogram(_wave(4000), "esc51")
    with pytest.raises(TypeError, match="unknown setting"):
        vcfast.log_mel_spectrogram(_wave(4000), "esc50_mel", n_bins=3)
    with pytest.raises(ValueError, match="`wave`"):
        vcfast.log_mel_spectrogram(_wave(100), **TINY)  # reflect pad needs > n_fft // 2
    with pytest.raises(ValueError, match="`wave`"):
        vcfast.log_mel_spectrogram(_wave(200), **TINY, center=False)
    with pytest.raises(ValueError, match="`wave`"):
        vcfast.log_mel_spectrogram(_wave(2, 2, 4000), **TINY)
    with pytest.raises(ValueError, match="`std`"):
        vcfast.log_mel_spectrogram(_wave(4000), **TINY, normalization="mean_std",
                                   mean=torch.zeros(24), std=torch.zeros(24))
    with pytest.raises(ValueError, match="`mean`"):
        vcfast.log_mel_spectrogram(_wave(4000), **TINY, mean=torch.zeros(24),
                                   std=torch.ones(24))
    with pytest.raises(ValueError, match="`n_freqs`"):
        vcfast.mel_filterbank(1, 0.0, 100.0, 4, 1000)
    with pytest.raises(ValueError, match="`norm`"):
        vcfast.mel_filterbank(65, 0.0, 100.0, 4, 1000, norm="l1")
    with pytest.raises(ValueError, match="`f_max`"):
        vcfast.mel_filterbank(65, 0.0, 600.0, 4, 1000)
    # The preset with a keyword override.
    out = vcfast.log_mel_spectrogram(_wave(44100), "esc50_mel", n_mels=64, log="db")
    assert out.shape == (64, 87)


# ---------------------------------------------------------------------------------------------
# The module


def test_module_matches_functional_and_moves():
    module = vcfast.nn.LogMelSpectrogram(**TINY, log="db", top_db=60.0)
    assert isinstance(module, torch.nn.Module)
    assert "n_mels=24" in repr(module) and "top_db=60.0" in repr(module)
    assert set(dict(module.named_buffers())) == {"window", "filterbank"}
    assert module.state_dict() == {}
    wave = _wave(2, 3000)
    torch.testing.assert_close(module(wave),
                               vcfast.log_mel_spectrogram(wave, **TINY, log="db", top_db=60.0))
    module64 = module.to(torch.float64)
    assert module64.filterbank.dtype == module64.window.dtype == torch.float64
    out64 = module64(wave.double())
    assert out64.dtype == torch.float64
    # The buffers were made in float32, so they carry float32 rounding after .to(float64).
    torch.testing.assert_close(out64, vcfast.log_mel_spectrogram(
        wave.double(), **TINY, log="db", top_db=60.0), rtol=1e-5, atol=1e-5)
    assert vcfast.LogMelSpectrogram is vcfast.nn.LogMelSpectrogram


def test_module_mean_std_in_state_dict():
    mean, std = torch.linspace(-10, -1, 24), torch.linspace(1, 2, 24)
    module = vcfast.nn.LogMelSpectrogram(**TINY, normalization=("mean_std", mean, std))
    assert set(module.state_dict()) == {"mean", "std"}
    wave = _wave(3000)
    torch.testing.assert_close(module(wave), vcfast.log_mel_spectrogram(
        wave, **TINY, normalization="mean_std", mean=mean, std=std))
    esc = vcfast.nn.LogMelSpectrogram("esc50_mel")
    assert esc.n_frames(220500) == 431
    with pytest.raises(ValueError, match="`backend`"):
        vcfast.nn.LogMelSpectrogram("esc50_mel", backend="triton")


def _assert_module_compiles(module):
    """The module's output and the wave's gradient through torch.compile(fullgraph=True)
    equal eager's."""
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    wave = _wave(2, 3000).requires_grad_(True)
    out = compiled(wave)
    expected = module(wave)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), wave)
    (grad_eager,) = torch.autograd.grad(expected.sum(), wave)
    torch.testing.assert_close(grad, grad_eager)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_module_compiles_fullgraph(backend):
    torch._dynamo.reset()
    _assert_module_compiles(vcfast.nn.LogMelSpectrogram(**TINY, log="db", top_db=70.0,
                                                        normalization="range", backend=backend))


def test_functional_compiles_fullgraph():
    torch._dynamo.reset()

    def fn(x):
        return vcfast.log_mel_spectrogram(x, "esc50_mel", log="db")

    wave = _wave(1, 20000)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(wave), fn(wave))


# ---------------------------------------------------------------------------------------------
# The fused C++ CPU backend (csrc/cpu/mel_cpu.cpp)

needs_cpu_op = pytest.mark.skipif(not _extension.has_op("log_mel_spectrogram"),
                                  reason="vcfast._C without the log_mel_spectrogram op")
CPU_VARIANTS = sorted(v for v in VARIANTS if v != "db-top")  # top_db: not covered by "cpu"


def _values_and_grad(wave, backend, variant, weight_seed=1, **extra):
    wave = wave.detach().requires_grad_(True)
    out = _call(wave, backend, variant, **extra)
    weight = _wave(*out.shape, dtype=out.dtype, seed=weight_seed)
    (grad,) = torch.autograd.grad((out * weight).sum(), wave)
    return out.detach(), grad


def _tols(dtype):
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4), dict(rtol=1e-3, atol=1e-3)
    return dict(rtol=1e-10, atol=1e-10), dict(rtol=1e-9, atol=1e-9)


@needs_cpu_op
@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matches_reference(variant, dtype):
    wave = _wave(3, 4001, dtype=dtype)
    out, grad = _values_and_grad(wave, "cpu", variant)
    ref, ref_grad = _values_and_grad(wave, "reference", variant)
    assert out.dtype == dtype and out.shape == ref.shape
    tol, gtol = _tols(dtype)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **gtol)


@needs_cpu_op
@pytest.mark.parametrize("batch, samples", [(1, 257), (1, 3000), (2, 1111), (5, 64 * 33 + 7)])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("power", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_awkward_lengths(batch, samples, center, power, dtype):
    # Lengths that leave a partial block of frames, a last sample range with a tail after the
    # last hop, and (257 samples, centred) fewer frames than one block.
    wave = _wave(batch, samples, dtype=dtype, seed=samples)
    settings = dict(center=center, power=power)
    out, grad = _values_and_grad(wave, "cpu", "default", **settings)
    ref, ref_grad = _values_and_grad(wave, "reference", "default", **settings)
    tol, gtol = _tols(dtype)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **gtol)


@needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_esc50_preset(dtype):
    wave = _wave(2, 44100 + 123, dtype=dtype, seed=3)
    results = []
    for backend in ("cpu", "reference"):
        x = wave.clone().requires_grad_(True)
        out = vcfast.log_mel_spectrogram(x, "esc50_mel", backend=backend)
        weight = _wave(*out.shape, dtype=dtype, seed=4)
        (grad,) = torch.autograd.grad((out * weight).sum(), x)
        results.append((out.detach(), grad))
    assert results[0][0].shape == (2, 128, 87)
    tol, gtol = _tols(dtype)
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    torch.testing.assert_close(results[0][1], results[1][1], **gtol)


@needs_cpu_op
def test_cpu_is_the_default_on_cpu_tensors(monkeypatch):
    from vcfast.ops import mel as mel_module

    calls = []
    original = mel_module._log_mel_cpu
    monkeypatch.setattr(mel_module, "_log_mel_cpu",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    wave = _wave(2, 3000)
    out = vcfast.log_mel_spectrogram(wave, **TINY)
    assert calls == [1]
    torch.testing.assert_close(out, vcfast.log_mel_spectrogram(wave, **TINY, backend="fast"),
                               rtol=1e-4, atol=1e-4)
    vcfast.log_mel_spectrogram(wave, **TINY, log="db", top_db=50.0)  # not covered: "fast"
    assert calls == [1]
    # A custom window that asks for its gradient goes to "fast", which gives one.
    win = torch.hann_window(256).requires_grad_(True)
    out = vcfast.log_mel_spectrogram(wave, **TINY, window=win)
    assert calls == [1]
    (gw,) = torch.autograd.grad(out.sum(), win)
    assert torch.isfinite(gw).all()


@needs_cpu_op
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_cpu_no_grad_and_inference_mode(ctx):
    wave = _wave(2, 3000).requires_grad_(True)
    expected = vcfast.log_mel_spectrogram(wave, **TINY, backend="cpu")
    assert expected.requires_grad
    with ctx():
        out = vcfast.log_mel_spectrogram(wave, **TINY, backend="cpu")
    assert not out.requires_grad
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)


@needs_cpu_op
@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_cpu_every_isa_level(level):
    levels = ["baseline", "avx2", "avx512"]
    best = _extension.cpu_isa_supported()
    if levels.index(level) > levels.index(best):
        pytest.skip(f"this CPU does not execute {level} code (best: {best})")
    wave = _wave(2, 3001, dtype=torch.float64)
    previous = vcfast.set_cpu_isa(level)
    try:
        for variant in ("default", "power1-db", "power1.5", "mean-std"):
            out, grad = _values_and_grad(wave, "cpu", variant)
            ref, ref_grad = _values_and_grad(wave, "reference", variant)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)
    finally:
        vcfast.set_cpu_isa(previous)


def _op_args(batch=2, samples=300, n_fft=32, hop=8, n_mels=6, dtype=torch.float64):
    cfg = vcfast.MelConfig(sample_rate=1000, n_fft=n_fft, hop=hop, n_mels=n_mels, f_min=50.0)
    wave = _wave(batch, samples, dtype=dtype) + 0.05
    shift = torch.linspace(-1, 1, n_mels, dtype=dtype)
    scale = torch.linspace(0.5, 2, n_mels, dtype=dtype)
    return (wave, cfg.make_window(dtype), cfg.make_filterbank(dtype), shift, scale, n_fft, hop,
            2.0, 1e-10, 1.0)


@needs_cpu_op
@pytest.mark.parametrize("power", [1.0, 2.0, 1.5])
def test_cpu_opcheck(power):
    args = list(_op_args())
    args[7] = power
    args[0].requires_grad_(True)
    torch.library.opcheck(torch.ops.vcfast.log_mel_spectrogram.default, tuple(args))
    grad = _wave(2, 6, (300 - 32) // 8 + 1, dtype=torch.float64, seed=5)
    torch.library.opcheck(torch.ops.vcfast.log_mel_spectrogram_backward.default,
                          (grad, args[0].detach(), *args[1:]),
                          test_utils=("test_schema", "test_faketensor"))


def _op_chain(wave, window, fb, shift, scale, n_fft, hop, power, floor, multiplier):
    """The op's formula in plain PyTorch (csrc/cpu/mel_cpu.h)."""
    frames = wave.unfold(-1, n_fft, hop) * window
    mel = (torch.fft.rfft(frames).abs() ** power @ fb).transpose(-2, -1)
    return (multiplier * torch.log(mel.clamp_min(floor)) - shift[:, None]) * scale[:, None]


@needs_cpu_op
@pytest.mark.parametrize("dense", [False, True], ids=["mel-bands", "dense-filterbank"])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_cpu_op_matches_its_formula(dense, power):
    # The kernel sums over each filter's band of nonzero bins when the bands are narrow (mel
    # triangles) and uses a dense matmul otherwise: both against the formula.
    args = list(_op_args(n_fft=64, hop=16, samples=500))
    if dense:
        args[2] = torch.rand(args[2].shape, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(7))
    args[7], args[9] = power, 0.7
    wave = args[0].requires_grad_(True)
    out = torch.ops.vcfast.log_mel_spectrogram(*args)
    ref = _op_chain(*args)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    weight = _wave(*out.shape, dtype=torch.float64, seed=8)
    (grad,) = torch.autograd.grad((out * weight).sum(), wave)
    (ref_grad,) = torch.autograd.grad((ref * weight).sum(), wave)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)
    small = list(_op_args(samples=60, n_fft=16, hop=4, n_mels=3))
    if dense:
        small[2] = torch.rand(small[2].shape, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(9))
    small[7] = power
    assert torch.autograd.gradcheck(
        lambda x: torch.ops.vcfast.log_mel_spectrogram(x, *small[1:]),
        (small[0].requires_grad_(True),))


@needs_cpu_op
@pytest.mark.parametrize("settings", [
    dict(),
    dict(center=False, log="db", normalization="range", mel_scale="slaney", mel_norm="slaney"),
    dict(pad_mode="constant", power=1.0, log="db"),
], ids=["default", "slaney-db-range", "constant-power1"])
def test_cpu_gradcheck(settings):
    wave = (_wave(2, 40, dtype=torch.float64) + 0.05).requires_grad_(True)
    tiny = dict(sample_rate=1000, n_fft=16, hop=4, n_mels=4, f_min=50.0)

    def fn(x):
        return vcfast.log_mel_spectrogram(x, backend="cpu", **tiny, **settings)

    assert torch.autograd.gradcheck(fn, (wave,))


@needs_cpu_op
def test_cpu_no_double_backward():
    wave = _wave(2, 3000, dtype=torch.float64).requires_grad_(True)
    out = vcfast.log_mel_spectrogram(wave, **TINY, backend="cpu")
    (grad,) = torch.autograd.grad(out.sum(), wave, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(grad.sum(), wave)


@needs_cpu_op
def test_cpu_compiles_fullgraph():
    torch._dynamo.reset()
    _assert_module_compiles(vcfast.nn.LogMelSpectrogram(**TINY, log="db", normalization="range",
                                                        backend="cpu"))
    torch._dynamo.reset()
    fn = torch.compile(lambda x: vcfast.log_mel_spectrogram(x, "esc50_mel"),
                       backend="aot_eager", fullgraph=True)
    wave = _wave(1, 20000)
    torch.testing.assert_close(fn(wave), vcfast.log_mel_spectrogram(wave, "esc50_mel"))


@needs_cpu_op
def test_cpu_backend_errors():
    wave = _wave(2, 3000)
    with pytest.raises(ValueError, match="`top_db`"):
        vcfast.log_mel_spectrogram(wave, **TINY, log="db", top_db=40.0, backend="cpu")
    with pytest.raises(ValueError, match="`backend`"):
        vcfast.log_mel_spectrogram(wave.to("meta"), **TINY, backend="cpu")
    op = torch.ops.vcfast.log_mel_spectrogram
    args = _op_args()

    def call(index, value):
        changed = list(args)
        changed[index] = value
        return op(*changed)

    for index, value, error, name in [
        (0, args[0][0], ValueError, "wave"),  # 1-D
        (0, args[0][:, :20], ValueError, "wave"),  # shorter than n_fft
        (0, args[0].int(), TypeError, "wave"),
        (1, args[1][:-1], ValueError, "window"),
        (1, args[1].float(), TypeError, "window"),
        (2, args[2][1:], ValueError, "filterbank"),
        (3, args[3][1:], ValueError, "shift"),
        (4, args[4][:, None], ValueError, "scale"),
        (5, 1, ValueError, "n_fft"),
        (6, 0, ValueError, "hop"),
        (7, 0.0, ValueError, "power"),
        (8, 0.0, ValueError, "log_floor"),
    ]:
        with pytest.raises(error, match=f"`{name}`"):
            call(index, value)
    out = op(*args)
    with pytest.raises(ValueError, match="`grad`"):
        torch.ops.vcfast.log_mel_spectrogram_backward(out[:, 1:], *args)

