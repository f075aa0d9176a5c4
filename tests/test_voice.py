"""vcfast.voice: whole-utterance conversion (windowing, overlap-add, Griffin-Lim, label checks)."""

import math

import pytest
import soundfile as sf
import torch

import vcfast
import vcfast.voice as voice
from vcfast.data import load_audio, synthetic_speech
from vcfast.models.generator import StarGANGenerator
from vcfast.voice import convert_spectrogram, convert_wave

SR = 16000
SPACE = vcfast.LabelSpace.from_names(
    {"speaker": ["alice", "bob", "carol"], "birthplace": ["leeds", "perth"], "sex": ["F", "M"]})


class Identity(torch.nn.Module):
    """A 'generator' that returns its input: conversion must then give the input back."""

    def forward(self, x, c):
        return x


class Recorder(torch.nn.Module):
    """Returns its input and records the shapes and label vectors it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, c):
        self.calls.append((tuple(x.shape), c.clone()))
        return x


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    return StarGANGenerator(conv_dim=4, c_dim=SPACE.input_dim, repeat_num=1).eval()


MARGIN = 1024 - 256  # silence convert_wave puts before and after the utterance


def frames_of(samples):
    return math.ceil((samples + 2 * MARGIN - 1024) / 256) + 1


@pytest.mark.parametrize("n_frames", [1, 37, 255, 256, 257, 448, 449, 641, 1000])
@pytest.mark.parametrize("window,overlap", [(256, 64), (256, 0), (64, 48), (128, 127)])
def test_identity_generator_reproduces_spectrogram(n_frames, window, overlap):
    spec = torch.rand(256, n_frames, generator=torch.Generator().manual_seed(n_frames))
    out, windows = convert_spectrogram(Identity(), SPACE, spec, {"speaker": "bob"},
                                       window_frames=window, overlap_frames=overlap, batch_size=3)
    assert out.shape == spec.shape
    # Exact up to float32 rounding of the crossfade sums (up to 128 windows overlap a frame).
    torch.testing.assert_close(out, spec, atol=4e-6, rtol=0)
    stride = window - overlap
    expected = 1 if n_frames <= window else math.ceil((n_frames - window) / stride) + 1
    assert windows == expected


def test_overlap_add_weights_are_normalised_crossfades():
    # Window k of the output is the constant k: inside an overlap the result must move
    # linearly (monotonically) from k to k+1, and be exactly k away from overlaps.
    class WindowIndex(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = 0

        def forward(self, x, c):
            index = torch.arange(self.seen, self.seen + x.shape[0], dtype=x.dtype)
            self.seen += x.shape[0]
            return index[:, None, None, None].expand_as(x).clone()

    out, windows = convert_spectrogram(WindowIndex(), SPACE, torch.zeros(256, 600), {},
                                       window_frames=256, overlap_frames=64, batch_size=2)
    assert windows == 3  # starts 0, 192, 384
    row = out[0]
    assert torch.all(out == row)  # every bin alike
    assert torch.all(row[:192] == 0) and torch.all(row[256:384] == 1) and torch.all(row[448:] == 2)
    for lo in (192, 384):
        ramp = row[lo:lo + 64] - row[lo - 1]  # from window k's value towards k + 1
        assert torch.all(ramp.diff() > 0) and 0 < ramp[0] < 0.05 and 0.95 < ramp[-1] < 1
        torch.testing.assert_close(ramp + ramp.flip(0), torch.ones(64))  # linear, symmetric


def test_convert_wave_identity_passes_the_exact_spectrogram_to_griffin_lim(monkeypatch):
    wave = synthetic_speech(int(9.7 * SR), seed=4) * 0.3
    seen = {}
    real = voice.spectrogram_to_wave

    def spy(spec, **kwargs):
        seen["spec"] = spec
        seen["kwargs"] = kwargs
        return real(spec, **kwargs)

    monkeypatch.setattr(voice, "spectrogram_to_wave", spy)
    out, info = convert_wave(Identity(), SPACE, wave, {"speaker": "alice"}, n_iter=4)
    n_frames = frames_of(wave.numel())
    tail = (n_frames - 1) * 256 + 1024 - wave.numel() - MARGIN
    padded = torch.nn.functional.pad(wave / wave.abs().max(), (MARGIN, tail))
    expected = vcfast.log_spectrogram(padded)
    assert seen["spec"].shape == (256, n_frames)
    torch.testing.assert_close(seen["spec"], expected, atol=1e-6, rtol=0)
    assert seen["kwargs"]["n_iter"] == 4
    assert out.shape == wave.shape and info["frames"] == n_frames and info["windows"] == 3
    assert 0 < info["spectral_convergence"] < 0.5
    assert info["seconds"] >= info["griffin_lim_seconds"] > 0


@pytest.mark.parametrize("seconds", [1.3, 9.7, 1024 / SR])
def test_tiny_generator_any_length(seconds):
    samples = int(round(seconds * SR))
    wave = synthetic_speech(max(samples, 2048), seed=7)[:samples]
    generator = tiny_generator().train()  # convert_wave must run it in eval mode, then restore
    out, info = convert_wave(generator, SPACE, wave, {"speaker": "carol", "sex": "F"}, n_iter=2)
    assert generator.training
    assert out.shape == (samples,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() == pytest.approx(0.95, abs=1e-5)
    assert info["frames"] == frames_of(samples)
    assert info["windows"] == max(1, math.ceil((info["frames"] - 256) / 192) + 1)
    assert set(info) >= {"spectral_convergence", "frames", "windows", "seconds"}


def test_no_clicks_at_the_ends_for_an_inconsistent_spectrogram():
    # A generator whose output is no STFT of any signal (here: noise). Griffin-Lim's inverse
    # divides by the tiny window envelope at a signal's ends; without the silent margins the
    # first/last samples came back as a click holding the whole peak.
    class Noise(torch.nn.Module):
        def forward(self, x, c):
            return torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 0.6

    out, _ = convert_wave(Noise(), SPACE, synthetic_speech(3 * SR, seed=3), {"speaker": "bob"},
                          n_iter=8)
    rms = out.square().mean().sqrt()
    edges = torch.cat([out[:256], out[-256:]]).abs().max()
    assert edges < 4 * rms < out.abs().max()


def test_target_labels_reach_the_generator():
    recorder = Recorder()
    convert_wave(recorder, SPACE, synthetic_speech(20000, seed=1),
                 {"speaker": "bob", "birthplace": None}, n_iter=1)
    ((shape, c),) = recorder.calls
    assert shape == (1, 1, 256, 256)
    expected = SPACE.generator_input([{"speaker": "bob"}])
    torch.testing.assert_close(c, expected)
    assert SPACE.decode_generator_input(c).tolist() == [[1, -1, -1]]  # birthplace, sex unknown


def test_long_input_is_batched():
    recorder = Recorder()
    convert_wave(recorder, SPACE, synthetic_speech(16 * SR, seed=2), {"speaker": "alice"},
                 n_iter=1, batch_size=2)
    # 16 s = 1003 frames with the margins -> 5 windows of 256 (stride 192) -> batches of 2, 2, 1
    assert [s[0] for s, _ in recorder.calls] == [2, 2, 1]


def test_file_at_22050_hz_stereo(tmp_path):
    left = synthetic_speech(int(2.3 * 22050), sr=22050, seed=5).numpy()
    sf.write(tmp_path / "in.wav", [[a, 0.5 * a] for a in left], 22050)
    wave = load_audio(tmp_path / "in.wav")
    out, info = convert_wave(tiny_generator(), SPACE, wave, {"speaker": "alice"}, n_iter=2)
    assert out.shape == wave.shape and abs(wave.numel() - 2.3 * SR) <= 2
    assert torch.isfinite(out).all()


def test_too_short_wave_is_refused():
    with pytest.raises(ValueError, match=r"`wave` has 1023 samples; need at least 1024"):
        convert_wave(Identity(), SPACE, torch.randn(1023), {"speaker": "alice"})
    with pytest.raises(ValueError, match="1-D"):
        convert_wave(Identity(), SPACE, torch.randn(2, 5000), {"speaker": "alice"})
    with pytest.raises(ValueError, match="all zeros"):
        convert_wave(Identity(), SPACE, torch.zeros(5000), {"speaker": "alice"})
    with pytest.raises(ValueError, match="NaN"):
        convert_wave(Identity(), SPACE, torch.full((5000,), float("nan")), {"speaker": "alice"})
    with pytest.raises(TypeError, match="torch.Tensor"):
        convert_wave(Identity(), SPACE, [0.1] * 5000, {"speaker": "alice"})


def test_unknown_labels_list_valid_choices():
    wave = synthetic_speech(5000, seed=1)
    with pytest.raises(ValueError,
                       match=r"unknown speaker 'bobb'.*did you mean 'bob'.*valid: 'alice'"):
        convert_wave(Identity(), SPACE, wave, {"speaker": "bobb"})
    with pytest.raises(ValueError, match=r"unknown label group 'accent'; "
                                         r"groups are \['speaker', 'birthplace', 'sex'\]"):
        convert_wave(Identity(), SPACE, wave, {"speaker": "bob", "accent": "x"})
    with pytest.raises(TypeError, match="dict"):
        convert_wave(Identity(), SPACE, wave, "bob")


def test_bad_window_arguments_and_shape_changing_generator():
    spec = torch.rand(256, 300)
    with pytest.raises(ValueError, match="`overlap_frames` .* smaller than `window_frames`"):
        convert_spectrogram(Identity(), SPACE, spec, {}, window_frames=64, overlap_frames=64)
    with pytest.raises(ValueError, match="`window_frames` must be an int >= 1"):
        convert_spectrogram(Identity(), SPACE, spec, {}, window_frames=0)

    class Shrinks(torch.nn.Module):
        def forward(self, x, c):
            return x[..., :-1]

    with pytest.raises(ValueError, match="same shape"):
        convert_spectrogram(Shrinks(), SPACE, spec, {})
