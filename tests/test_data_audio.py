"""Tests for vcfast.data.audio (docs/ops.md#crops: load, mono, resample, crop)."""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from vcfast.data.audio import (
    CROP_SAMPLES,
    MAX_CROP_RMS,
    AudioReadError,
    NoUsableCropError,
    load_audio,
    load_crop,
    peak_normalize,
    random_crop,
    save_audio,
)


def speech_like(n: int, sr: int, seed: int = 0) -> np.ndarray:
    """Harmonic tone with gliding f0 and 4 Hz syllable-rate envelope plus a little noise.

    Peak-normalised RMS is ~0.27: a high crest factor, like speech.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 11))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.3 * harmonics * envelope + 0.002 * rng.standard_normal(n)).astype(np.float32)


def square_wave(n: int, period: int = 40) -> np.ndarray:
    """±1 square wave: RMS 1 after peak normalisation, so always rejected."""
    return np.where((np.arange(n) // (period // 2)) % 2 == 0, 1.0, -1.0).astype(np.float32)


def rms(x: torch.Tensor) -> float:
    return float(x.double().square().mean().sqrt())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- load_audio


def test_load_stereo_44k_wav_to_mono_16k(tmp_path):
    sr, n = 44100, 44100 * 2 + 123
    left = speech_like(n, sr, seed=1)
    right = speech_like(n, sr, seed=2) * 0.5
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), sr)

    x = load_audio(path)
    assert x.dtype == torch.float32 and x.dim() == 1
    assert abs(x.shape[0] - round(n * 16000 / sr)) <= 1


def test_load_mono_22k_flac(tmp_path):
    sr, n = 22050, 22050 * 3 + 7
    path = tmp_path / "mono.flac"
    sf.write(path, speech_like(n, sr), sr)

    x = load_audio(str(path))
    assert x.dtype == torch.float32 and x.dim() == 1
    assert abs(x.shape[0] - round(n * 16000 / sr)) <= 1


def test_mono_mix_is_channel_mean_exactly(tmp_path):
    n = 16000
    data = np.stack([speech_like(n, 16000, 3), speech_like(n, 16000, 4) * 0.3], axis=1)
    path = tmp_path / "stereo16k.wav"
    sf.write(path, data, 16000, subtype="FLOAT")  # float storage: no quantisation

    x = load_audio(path)
    assert torch.equal(x, torch.from_numpy(data.mean(axis=1, dtype=np.float32)))


def test_no_resample_keeps_samples(tmp_path):
    data = speech_like(20000, 16000)
    path = tmp_path / "m.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    assert torch.equal(load_audio(path), torch.from_numpy(data))


def test_custom_sample_rate(tmp_path):
    path = tmp_path / "m.wav"
    sf.write(path, speech_like(16000, 16000), 16000)
    assert load_audio(path, sample_rate=8000).shape[0] == 8000


def test_resampling_keeps_440hz(tmp_path):
    sr = 44100
    t = np.arange(sr) / sr
    path = tmp_path / "sine.wav"
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)

    x = load_audio(path).numpy()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak_hz = np.argmax(spectrum) * 16000 / len(x)
    assert abs(peak_hz - 440) <= 1.0
    assert np.abs(x).max() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("bad", [0, -16000, 16000.0, True, "16000"])
def test_bad_sample_rate(tmp_path, bad):
    path = tmp_path / "m.wav"
    sf.write(path, speech_like(1000, 16000), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(path, sample_rate=bad)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.wav"
    path.write_bytes(b"this is not a riff header " * 50)
    with pytest.raises(AudioReadError, match="garbage.wav") as info:
        load_audio(path)
    assert isinstance(info.value, ValueError)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioReadError, match="no samples"):
        load_audio(path)


def test_nonfinite_file(tmp_path):
    data = speech_like(1000, 16000)
    data[10] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, data, 16000, subtype="FLOAT")
    with pytest.raises(AudioReadError, match="NaN"):
        load_audio(path)


# --------------------------------------------------------------------------- peak_normalize


def test_peak_normalize():
    x = torch.tensor([0.1, -0.4, 0.2])
    y = peak_normalize(x)
    assert torch.allclose(y, x / 0.4)
    assert y.abs().max().item() == 1.0


def test_peak_normalize_zeros_unchanged():
    x = torch.zeros(5)
    y = peak_normalize(x)
    assert torch.equal(y, x) and not torch.isnan(y).any()
    y[0] = 1.0
    assert x[0] == 0  # a new tensor, not a view


# --------------------------------------------------------------------------- random_crop


@pytest.fixture(scope="module")
def long_wave():
    return torch.from_numpy(speech_like(16000 * 20, 16000))


def test_crop_properties(long_wave):
    crop = random_crop(long_wave, generator=gen(0))
    assert crop.shape == (CROP_SAMPLES,) and crop.dtype == torch.float32
    assert crop.abs().max().item() == 1.0
    assert rms(crop) <= MAX_CROP_RMS


def test_crop_is_normalised_slice(long_wave):
    crop = random_crop(long_wave, generator=gen(5))
    start = int(torch.randint(0, len(long_wave) - CROP_SAMPLES + 1, (1,), generator=gen(5)))
    assert torch.equal(crop, peak_normalize(long_wave[start:start + CROP_SAMPLES]))


def test_crop_deterministic(long_wave):
    a = random_crop(long_wave, generator=gen(123))
    b = random_crop(long_wave, generator=gen(123))
    assert torch.equal(a, b)


def test_crop_differs_across_seeds(long_wave):
    crops = [random_crop(long_wave, generator=gen(s)) for s in range(4)]
    for i in range(len(crops)):
        for j in range(i + 1, len(crops)):
            assert not torch.equal(crops[i], crops[j])


def test_crop_exact_length_returns_whole_wave():
    wave = torch.from_numpy(speech_like(CROP_SAMPLES, 16000)) * 0.3
    crop = random_crop(wave, generator=gen(0))
    assert torch.equal(crop, peak_normalize(wave))


def test_crop_too_short():
    wave = torch.from_numpy(speech_like(CROP_SAMPLES - 1, 16000))
    with pytest.raises(ValueError, match=rf"{CROP_SAMPLES - 1} samples.*{CROP_SAMPLES}"):
        random_crop(wave)


def test_crop_all_zero():
    with pytest.raises(NoUsableCropError, match="silent"):
        random_crop(torch.zeros(CROP_SAMPLES * 2), generator=gen(0))


def test_crop_square_wave_rejected():
    wave = torch.from_numpy(square_wave(CROP_SAMPLES * 3))
    with pytest.raises(NoUsableCropError, match=r"after 7 tries.*noise-like") as info:
        random_crop(wave, generator=gen(0), max_tries=7)
    assert isinstance(info.value, ValueError)


def test_crop_uniform_noise_rejected():
    # Uniform white noise: RMS after peak normalisation ≈ 1/sqrt(3) ≈ 0.58 > 0.5.
    rng = np.random.default_rng(0)
    wave = torch.from_numpy(rng.uniform(-1, 1, CROP_SAMPLES * 2).astype(np.float32))
    with pytest.raises(NoUsableCropError):
        random_crop(wave, generator=gen(0))


def test_max_rms_none_disables_rule():
    wave = torch.from_numpy(square_wave(CROP_SAMPLES * 2))
    crop = random_crop(wave, generator=gen(0), max_rms=None)
    assert crop.shape == (CROP_SAMPLES,)
    with pytest.raises(NoUsableCropError, match="silent"):  # silence still rejected
        random_crop(torch.zeros(CROP_SAMPLES), max_rms=None)


def test_crop_comes_from_usable_region():
    # Square wave everywhere except a speech-like stretch in the middle. A crop
    # with a fraction f of square samples has normalised RMS^2 ≈ f + (1-f)*0.07,
    # so only crops lying >= ~80 % inside the speech region are accepted.
    L = CROP_SAMPLES
    n = 4 * L
    a, b = int(1.5 * L), int(3.0 * L)
    data = square_wave(n)
    data[a:b] = speech_like(b - a, 16000)
    data[a:b] /= np.abs(data[a:b]).max()
    wave = torch.from_numpy(data)

    retried = 0
    for seed in range(12):
        first_start = int(torch.randint(0, n - L + 1, (1,), generator=gen(seed)))
        crop = random_crop(wave, generator=gen(seed), max_tries=60)
        assert rms(crop) <= MAX_CROP_RMS
        # Square-wave samples stay exactly ±1 after normalisation; speech ones don't.
        assert (crop.abs() == 1).sum().item() <= 0.25 * L
        if first_start + L <= a:  # first draw was pure square wave: a retry happened
            retried += 1
    assert retried > 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(length=0), dict(max_tries=0), dict(max_rms=0.0), dict(max_rms=float("nan"))],
)
def test_crop_bad_args(kwargs, long_wave):
    with pytest.raises(ValueError):
        random_crop(long_wave, **kwargs)


def test_crop_rejects_2d():
    with pytest.raises(ValueError, match="1-D"):
        random_crop(torch.zeros(2, CROP_SAMPLES * 2))


# --------------------------------------------------------------------------- load_crop


def test_load_crop(tmp_path):
    path = tmp_path / "s.flac"
    sf.write(path, speech_like(22050 * 6, 22050), 22050)
    a = load_crop(path, generator=gen(1))
    b = load_crop(path, generator=gen(1))
    assert a.shape == (CROP_SAMPLES,) and torch.equal(a, b)
    assert a.abs().max().item() == 1.0 and rms(a) <= MAX_CROP_RMS


def test_load_crop_errors_mention_path(tmp_path):
    short = tmp_path / "short.wav"
    sf.write(short, speech_like(16000, 16000), 16000)
    with pytest.raises(NoUsableCropError, match=r"short\.wav.*16000 samples"):
        load_crop(short)

    noisy = tmp_path / "noisy.wav"
    sf.write(noisy, square_wave(CROP_SAMPLES * 2), 16000)
    with pytest.raises(NoUsableCropError, match=r"noisy\.wav.*noise-like"):
        load_crop(noisy, generator=gen(0), max_tries=3)


# --------------------------------------------------------------------------- save_audio


@pytest.mark.parametrize("ext", [".wav", ".flac"])
def test_save_round_trip(tmp_path, ext):
    wave = torch.from_numpy(speech_like(16000, 16000))
    wave = wave / wave.abs().max() * 0.9
    path = tmp_path / f"out{ext}"
    save_audio(path, wave)

    info = sf.info(path)
    assert info.subtype == "PCM_16" and info.samplerate == 16000 and info.channels == 1
    back = load_audio(path)
    assert back.shape == wave.shape
    assert torch.allclose(back, wave, atol=1e-4)
    assert os.listdir(tmp_path) == [f"out{ext}"]  # no temp files left


def test_save_clips_and_overwrites(tmp_path):
    path = tmp_path / "clip.wav"
    save_audio(path, torch.zeros(10))
    save_audio(path, torch.tensor([2.0, -3.0, 0.5]))
    back = load_audio(path)
    assert back.shape == (3,)
    assert torch.allclose(back, torch.tensor([1.0, -1.0, 0.5]), atol=1e-4)
    assert os.listdir(tmp_path) == ["clip.wav"]


def test_save_failure_leaves_nothing(tmp_path):
    path = tmp_path / "bad.wav"
    with pytest.raises(ValueError):
        save_audio(path, torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="extension"):
        save_audio(tmp_path / "x.mp3", torch.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        save_audio(path, torch.zeros(2, 4))
    assert os.listdir(tmp_path) == []
