"""Tests for vcfast.ops.inverse (spectrogram -> waveform by Fast Griffin-Lim)."""

import math

import pytest
import torch

import vcfast
from vcfast.data.synth import synthetic_speech as speech_like
from vcfast.ops.inverse import framed_istft, framed_stft, spectrogram_to_wave

# Small configuration for the batch tests: 128 bins (1..128 of 129), 64-sample hop.
SMALL = dict(n_fft=256, hop=64, bin_hi=129)


@pytest.fixture(scope="module")
def speech():
    wave = speech_like()
    return wave, vcfast.log_spectrogram(wave)


def round_trip(spec, **kwargs):
    wave, sc = spectrogram_to_wave(spec, return_convergence=True, **kwargs)
    mae = (vcfast.log_spectrogram(wave) - spec).abs().mean().item()
    return wave, mae, sc.item()


# --------------------------------------------------------------------------- round trips


def test_stargan_round_trip(speech):
    wave, spec = speech
    assert spec.shape == (256, 256)
    out, mae, sc = round_trip(spec, n_iter=32)
    assert out.shape == wave.shape and out.dtype == torch.float32
    # Measured (torch 2.14 CPU): mean abs err 0.0075 in normalised units (0.0103 for plain
    # GLA), spectral convergence 0.040. 75 % of this spectrogram sits at the floor (y = 0).
    assert mae < 0.011
    assert sc < 0.06
    # The level survives (RMS measured 0.197 vs 0.193); the peak does not (1.87: the phase,
    # and with it the crest factor, is lost).
    rms = lambda x: x.square().mean().sqrt().item()  # noqa: E731
    assert rms(out) == pytest.approx(rms(wave), rel=0.1)


def test_fgla_beats_gla_and_iterations_help(speech):
    _, spec = speech
    # Measured: GLA sc 0.219 (8 it) / 0.097 (32 it); FGLA 0.138 (8 it) / 0.040 (32 it);
    # mean abs err GLA 0.0164 / 0.0103, FGLA 0.0128 / 0.0075.
    _, mae_gla, sc_gla = round_trip(spec, n_iter=32, momentum=0.0)
    _, mae8, sc8 = round_trip(spec, n_iter=8)
    _, mae32, sc32 = round_trip(spec, n_iter=32)
    assert sc32 < 0.6 * sc_gla
    assert mae32 < mae_gla
    assert sc32 < 0.5 * sc8
    assert mae32 < mae8


def test_random_init_converges_and_is_reproducible(speech):
    _, spec = speech
    def gen():
        return torch.Generator().manual_seed(1)

    a, _, sc = round_trip(spec, n_iter=32, init="random", generator=gen())
    b = spectrogram_to_wave(spec, n_iter=32, init="random", generator=gen())
    assert torch.equal(a, b)
    assert sc < 0.06  # measured 0.040


def test_specgan_round_trip():
    clips = [speech_like(16384, seed=s) for s in range(4)]
    mean, std = vcfast.measure_bin_stats(clips, "specgan")
    x = speech_like(16384, seed=7)
    spec = vcfast.log_spectrogram(x, "specgan", mean=mean, std=std)
    assert spec.shape == (128, 128)
    results = {}
    for n_iter in (8, 32):
        wave, sc = spectrogram_to_wave(spec, "specgan", mean=mean, std=std, n_iter=n_iter,
                                       return_convergence=True)
        assert wave.shape == (16384,)
        again = vcfast.log_spectrogram(wave, "specgan", mean=mean, std=std)
        results[n_iter] = (sc.item(), (again - spec).abs().mean().item())
    # Measured: sc 0.160 / 0.055, mean abs err 0.054 / 0.025 (y in [-1, 1]) for 8 / 32 it.
    assert results[32][0] < 0.08 and results[32][1] < 0.035
    assert results[32][0] < results[8][0]
    with pytest.raises(ValueError, match="mean"):
        spectrogram_to_wave(spec, "specgan")


# --------------------------------------------------------------------------- shapes, dtypes


def test_batch_matches_unbatched():
    waves = torch.stack([torch.stack([speech_like(4096, seed=3 * i + j) for j in range(3)])
                         for i in range(2)])
    spec = vcfast.log_spectrogram(waves, **SMALL)
    assert spec.shape == (2, 3, 128, 61)
    out, sc = spectrogram_to_wave(spec, n_iter=8, return_convergence=True, **SMALL)
    assert out.shape == (2, 3, 4096) and sc.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            single, sc1 = spectrogram_to_wave(spec[i, j], n_iter=8, return_convergence=True,
                                              **SMALL)
            torch.testing.assert_close(out[i, j], single, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(sc[i, j], sc1, rtol=1e-4, atol=1e-6)


def test_length_crops_and_pads():
    spec = vcfast.log_spectrogram(speech_like(4096), **SMALL)
    full = spectrogram_to_wave(spec, n_iter=2, **SMALL)
    short = spectrogram_to_wave(spec, n_iter=2, length=1000, **SMALL)
    long = spectrogram_to_wave(spec, n_iter=2, length=5000, **SMALL)
    assert full.shape == (4096,)
    torch.testing.assert_close(short, full[:1000])
    torch.testing.assert_close(long[:4096], full)
    assert (long[4096:] == 0).all()


def test_float64_stays_float64():
    spec = vcfast.log_spectrogram(speech_like(4096).double(), **SMALL)
    assert spec.dtype == torch.float64
    wave, sc = spectrogram_to_wave(spec, n_iter=4, return_convergence=True, **SMALL)
    assert wave.dtype == torch.float64 and sc.dtype == torch.float64
    half = spectrogram_to_wave(spec.to(torch.bfloat16), n_iter=2, **SMALL)
    assert half.dtype == torch.float32


# --------------------------------------------------------------------------- STFT helpers


@pytest.mark.parametrize("preset,overrides", [("stargan_vc", {}), ("specgan", {}),
                                              ("stargan_vc", dict(n_fft=256, hop=100, bin_hi=129))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_istft_inverts_stft(preset, overrides, dtype):
    config = vcfast.resolve_config(preset, **overrides)
    window = config.make_window(dtype)
    n_frames = 20
    x = torch.randn(2, config.n_fft + (n_frames - 1) * config.hop, dtype=dtype,
                    generator=torch.Generator().manual_seed(0))
    spectrum = framed_stft(x, window, config.hop)
    assert spectrum.shape == (2, config.n_rfft, n_frames)
    # Same spectrum as the forward op's torch.stft(center=False).
    ref = torch.stft(x, config.n_fft, config.hop, window=window, center=False, return_complex=True)
    atol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(spectrum, ref, rtol=1e-5, atol=atol)
    y = framed_istft(spectrum, window, config.hop)
    assert y.shape == x.shape
    # Compare where the overlap-added window-square envelope is usefully nonzero (periodic
    # Hann weights sample 0 by exactly 0 and the last sample by ~2e-8).
    square_sum = torch.zeros(x.shape[-1], dtype=dtype)
    for f in range(n_frames):
        square_sum[f * config.hop: f * config.hop + config.n_fft] += window.square()
    good = square_sum > 1e-3
    assert good.float().mean() > 0.95
    torch.testing.assert_close(y[:, good], x[:, good], rtol=0, atol=1e-5)
    assert (y[:, square_sum <= 1e-11] == 0).all()


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs():
    spec = torch.rand(256, 16)
    with pytest.raises(TypeError, match="`spec` must be a torch.Tensor"):
        spectrogram_to_wave(spec.numpy())
    with pytest.raises(TypeError, match="`spec` must be a real floating"):
        spectrogram_to_wave(torch.zeros(256, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="`spec` must be a real floating"):
        spectrogram_to_wave(spec.to(torch.complex64))
    with pytest.raises(ValueError, match="`spec` must have shape"):
        spectrogram_to_wave(torch.rand(256))
    msg = "`spec` has 128 rows but preset stargan_vc keeps 256 bins"
    with pytest.raises(ValueError, match=msg):
        spectrogram_to_wave(torch.rand(128, 16))
    with pytest.raises(ValueError, match="`spec` has 256 rows but preset specgan keeps 128 bins"):
        spectrogram_to_wave(spec, "specgan")
    with pytest.raises(ValueError, match="NaN"):
        spectrogram_to_wave(torch.where(torch.arange(16) == 3, math.nan, spec))
    with pytest.raises(ValueError, match="`n_iter` must be >= 1"):
        spectrogram_to_wave(spec, n_iter=0)
    with pytest.raises(TypeError, match="`n_iter`"):
        spectrogram_to_wave(spec, n_iter=2.5)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="`momentum` must be in \\[0, 1\\)"):
            spectrogram_to_wave(spec, momentum=bad)
    with pytest.raises(TypeError, match="`momentum`"):
        spectrogram_to_wave(spec, momentum="0.9")
    with pytest.raises(ValueError, match="`init`"):
        spectrogram_to_wave(spec, init="ones")
    with pytest.raises(ValueError, match="`length`"):
        spectrogram_to_wave(spec, length=0)
    with pytest.raises(ValueError, match="only used with normalization='standardize'"):
        spectrogram_to_wave(spec, mean=torch.zeros(256), std=torch.ones(256))
    with pytest.raises(ValueError, match="unknown preset"):
        spectrogram_to_wave(spec, "nope")
    with pytest.raises(TypeError, match="unknown parameter"):
        spectrogram_to_wave(spec, nfft=512)
