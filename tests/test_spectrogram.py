"""The fused log-spectrogram: the docs/ops.md#the-recipe recipe, C++ kernel vs the torch.stft
reference, gradients, registration (opcheck, torch.compile, meta) and bad input."""

import math
import os

import numpy as np
import pytest
import torch

import vcfast
from vcfast import _extension
from vcfast.data.synth import synthetic_speech
from vcfast.ops.spectrogram import _pick_backend, resolve_config

needs_extension = pytest.mark.skipif(
    not _extension.EXTENSION_LOADED,
    reason="vcfast._C is not built (pip install --no-build-isolation -e .)",
)


def test_extension_is_built_when_required():
    # CI sets VCFAST_REQUIRE_EXTENSION=1 so a failed build cannot hide behind skipped tests.
    if os.environ.get("VCFAST_REQUIRE_EXTENSION") == "1":
        assert _extension.EXTENSION_LOADED, _extension.build_info()
        assert vcfast.backends()["cpu"]
    assert vcfast.backends()["reference"]
    assert set(vcfast.backends()) == {"reference", "cpu", "cuda", "triton"}


def speech_like(samples: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return synthetic_speech(samples, seed=seed, dtype=dtype)


def spec_by_numpy(x: np.ndarray) -> np.ndarray:
    """The stargan_vc recipe (docs/ops.md#presets) written out with numpy, independent of vcfast's
    code."""
    window = np.hamming(1024)
    n_frames = (len(x) - 1024) // 256 + 1
    frames = np.stack([x[f * 256 : f * 256 + 1024] * window for f in range(n_frames)])
    magnitude = np.abs(np.fft.rfft(frames, axis=1)) / 1024
    kept = magnitude[:, 1:257].T  # row 0 = bin 1
    return (np.log(np.maximum(kept, 1e-3)) - np.log(1e-3)) / -np.log(1e-3)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
def test_stargan_vc_preset_matches_spec(backend):
    x = speech_like(66304)
    y = vcfast.log_spectrogram(x, backend=backend)
    assert y.shape == (256, 256) and y.dtype == torch.float64
    np.testing.assert_allclose(y.numpy(), spec_by_numpy(x.numpy()), atol=1e-12)
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert y.max() > 0.5  # a real signal uses the range, not just the floor


def test_stargan_vc_band_and_sizes():
    config = resolve_config("stargan_vc")
    assert config.frequency_range_hz() == (15.625, 4000.0)
    assert config.n_frames(66304) == 256
    assert config.samples_for_frames(256) == 66304
    specgan = resolve_config("specgan")
    assert specgan.n_frames(16384) == 128 and specgan.n_bins == 128


def test_specgan_preset_shape_and_range():
    x = speech_like(16384, dtype=torch.float32)
    mean, std = vcfast.measure_bin_stats([x[None], x[None] * 0.5])
    y = vcfast.log_spectrogram(x, "specgan", mean=mean, std=std)
    assert y.shape == (128, 128)
    assert y.min() >= -1.0 and y.max() <= 1.0


def test_measure_bin_stats_matches_direct_computation():
    clips = [speech_like(16384, seed=s, dtype=torch.float64)[None] for s in range(3)]
    mean, std = vcfast.measure_bin_stats(clips, "specgan", backend="reference")
    raw = torch.cat([vcfast.log_spectrogram(c, "specgan", normalization="none", clip=None,
                                            backend="reference") for c in clips])
    per_bin = raw.permute(1, 0, 2).reshape(128, -1)
    torch.testing.assert_close(mean, per_bin.mean(1).float())
    torch.testing.assert_close(std, per_bin.std(1, unbiased=False).float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no audio"):
        vcfast.measure_bin_stats([])


# Configurations that exercise every branch of the per-bin math and of the framing.
CONFIGS = {
    "stargan_small": dict(n_fft=64, hop=16, magnitude_scale=64.0, bin_lo=1, bin_hi=17),
    "stargan": dict(),
    "dc_and_nyquist": dict(n_fft=32, hop=8, bin_lo=0, bin_hi=None, window="hann",
                           periodic_window=True),
    "odd_n_fft": dict(n_fft=15, hop=4, magnitude_scale=15.0, bin_lo=0, bin_hi=None),
    "power_2_clipped": dict(n_fft=32, hop=8, magnitude_scale=32.0, bin_lo=1, bin_hi=17, power=2.0,
                            log_floor=1e-4, clip=(0.2, 0.8)),
    "power_1_5_offset": dict(n_fft=32, hop=12, bin_lo=3, bin_hi=10, power=1.5, log_floor=0.0,
                             log_offset=1e-6, normalization="none", window="rectangular"),
    "specgan_like": dict(n_fft=32, hop=16, window="hann", periodic_window=True, magnitude_scale=1.0,
                         bin_lo=0, bin_hi=16, log_floor=0.0, log_offset=1e-6, normalization="range",
                         log_range=(-6.0, 2.0), clip=(-1.0, 1.0)),
}


def _lengths(config):
    n_fft, hop = config.n_fft, config.hop
    return [n_fft, n_fft + 1, n_fft + 3 * hop + hop // 2 + 1]


@needs_extension
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_matches_reference(name, dtype):
    config = resolve_config("stargan_vc", **CONFIGS[name])
    g = torch.Generator().manual_seed(1)
    for length in _lengths(config):
        x = (torch.rand(3, length, generator=g, dtype=dtype) - 0.5) * 0.6
        expected = vcfast.log_spectrogram(x, config, backend="reference")
        got = vcfast.log_spectrogram(x, config, backend="cpu")
        assert got.shape == expected.shape == (3, config.n_bins, config.n_frames(length))
        assert got.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@needs_extension
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cpu_gradient_matches_reference(name):
    config = resolve_config("stargan_vc", **CONFIGS[name])
    g = torch.Generator().manual_seed(2)
    length = _lengths(config)[-1]
    x = ((torch.rand(2, length, generator=g, dtype=torch.float64) - 0.5) * 0.6).requires_grad_()
    weight = torch.randn(2, config.n_bins, config.n_frames(length), generator=g,
                         dtype=torch.float64)
    (grad_ref,) = torch.autograd.grad(
        (vcfast.log_spectrogram(x, config, backend="reference") * weight).sum(), x)
    (grad_cpu,) = torch.autograd.grad(
        (vcfast.log_spectrogram(x, config, backend="cpu") * weight).sum(), x)
    torch.testing.assert_close(grad_cpu, grad_ref, atol=1e-10, rtol=1e-9)
    assert grad_ref.abs().max() > 0


@needs_extension
@pytest.mark.parametrize("name", ["stargan_small", "dc_and_nyquist", "odd_n_fft", "power_2_clipped",
                                  "power_1_5_offset"])
def test_cpu_gradcheck_float64(name):
    overrides = dict(CONFIGS[name])
    config = resolve_config("stargan_vc", **overrides)
    config = resolve_config(config, n_fft=min(config.n_fft, 16), hop=min(config.hop, 5),
                            bin_lo=0, bin_hi=None, magnitude_scale=float(min(config.n_fft, 16)))
    x = ((torch.rand(2, 31, dtype=torch.float64) - 0.5) * 0.6).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: vcfast.log_spectrogram(w, config, backend="cpu"),
                                    (x,))


def test_reference_gradcheck_float64():
    config = resolve_config("stargan_vc", n_fft=16, hop=5, bin_lo=1, bin_hi=9, magnitude_scale=16.0)
    x = ((torch.rand(2, 31, dtype=torch.float64) - 0.5) * 0.6).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: vcfast.log_spectrogram(w, config, backend="reference"), (x,))


@needs_extension
def test_batch_dims_and_non_contiguous_input():
    config = resolve_config("stargan_vc", **CONFIGS["stargan_small"])
    base = torch.rand(2, 3, 2 * 200, dtype=torch.float64) - 0.5
    x = base[..., ::2]  # non-contiguous, [2, 3, 200]
    assert not x.is_contiguous()
    y = vcfast.log_spectrogram(x, config, backend="cpu")
    assert y.shape == (2, 3, 16, config.n_frames(200))
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(y[i, j], vcfast.log_spectrogram(x[i, j].contiguous(), config,
                                                                       backend="reference"))
    # one sample, and an empty batch
    assert vcfast.log_spectrogram(x[0, 0], config).shape == (16, config.n_frames(200))
    assert vcfast.log_spectrogram(x[:0], config).shape == (0, 3, 16, config.n_frames(200))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(dtype):
    x = speech_like(4096, dtype=dtype)
    y = vcfast.log_spectrogram(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, vcfast.log_spectrogram(x.float(), backend="reference"),
                               atol=2e-5, rtol=0)


@needs_extension
def test_backward_keeps_only_the_waveform():
    x = speech_like(66304, dtype=torch.float32).requires_grad_()
    y = vcfast.log_spectrogram(x, backend="cpu")
    saved = [t for t in y.grad_fn.saved_tensors] if hasattr(y.grad_fn, "saved_tensors") else []
    # the spectrum is never saved: every saved tensor is the input or a per-bin/per-sample vector
    assert all(t.numel() <= x.numel() for t in saved)


@needs_extension
def test_opcheck():
    config = resolve_config("stargan_vc", **CONFIGS["power_2_clipped"])
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(2, 100, dtype=dtype) - 0.5
        window = config.make_window(dtype)
        shift, scale = config.make_affine(dtype)
        for requires_grad in (False, True):
            args = (x.clone().requires_grad_(requires_grad), window, shift, scale)
            kwargs = dict(config.kernel_scalars(), check_finite=True)
            torch.library.opcheck(torch.ops.vcfast.log_spectrogram.default, args, kwargs)


@needs_extension
def test_meta_device_gives_shapes_without_compute():
    x = torch.empty(4, 66304, device="meta")
    y = vcfast.log_spectrogram(x)
    assert y.device.type == "meta" and y.shape == (4, 256, 256)


@needs_extension
def test_torch_compile_has_no_graph_breaks():
    module = vcfast.nn.LogSpectrogram(n_fft=64, hop=16, magnitude_scale=64.0, bin_lo=1, bin_hi=17)
    # inductor; fullgraph=True turns a graph break into an error
    compiled = torch.compile(module, fullgraph=True)
    x = (torch.rand(2, 300) - 0.5).requires_grad_()
    y = compiled(x)
    torch.testing.assert_close(y, module(x))
    (gc,) = torch.autograd.grad(y.sum(), x)
    (ge,) = torch.autograd.grad(module(x).sum(), x)
    torch.testing.assert_close(gc, ge)


@needs_extension
def test_module_buffers_and_state_dict():
    mean, std = torch.zeros(128), torch.ones(128)
    module = vcfast.nn.LogSpectrogram("specgan", mean=mean, std=std)
    assert set(module.state_dict()) == {"window", "shift", "scale"}
    x = speech_like(16384, dtype=torch.float32)
    torch.testing.assert_close(module(x), vcfast.log_spectrogram(x, "specgan", mean=mean, std=std))
    assert "n_fft=256" in repr(module)


# --------------------------------------------------------------------------- bad input


def test_too_short_raises():
    with pytest.raises(ValueError, match=r"1000 samples, shorter than one frame of n_fft=1024"):
        vcfast.log_spectrogram(torch.zeros(1000))
    # specgan pads 128 zeros first: 100 samples + 128 is still shorter than 256
    with pytest.raises(ValueError, match=r"100 samples \(\+128 padding\)"):
        vcfast.log_spectrogram(torch.zeros(100), "specgan", mean=torch.zeros(128),
                               std=torch.ones(128))


@pytest.mark.parametrize("bad", [torch.zeros(2048, dtype=torch.int16),
                                 torch.zeros(2048, dtype=torch.complex64),
                                 torch.zeros(2048, dtype=torch.bool)])
def test_wrong_dtype_raises(bad):
    with pytest.raises(TypeError, match="real floating"):
        vcfast.log_spectrogram(bad)


def test_non_tensor_and_scalar_raise():
    with pytest.raises(TypeError, match="torch.Tensor"):
        vcfast.log_spectrogram(np.zeros(2048))
    with pytest.raises(ValueError, match="scalar"):
        vcfast.log_spectrogram(torch.tensor(1.0))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_extension)])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_nan_policy(backend, bad_value):
    x = speech_like(4096, dtype=torch.float32)
    x[2000] = bad_value
    with pytest.raises(ValueError, match="NaN or Inf"):
        vcfast.log_spectrogram(x, backend=backend)
    y = vcfast.log_spectrogram(x, backend=backend, nan_policy="propagate")
    # frames 4..7 contain sample 2000; every other frame is untouched
    bad_frames = torch.isnan(y).any(0).nonzero().flatten().tolist()
    assert bad_frames == [4, 5, 6, 7]
    clean = vcfast.log_spectrogram(speech_like(4096, dtype=torch.float32), backend=backend)
    torch.testing.assert_close(y[:, :4], clean[:, :4])
    # a NaN in the tail that no frame covers does not matter
    tail = speech_like(4096 + 100, dtype=torch.float32)
    tail[-1] = math.nan
    assert torch.isfinite(vcfast.log_spectrogram(tail, backend=backend)).all()
    with pytest.raises(ValueError, match="nan_policy"):
        vcfast.log_spectrogram(x, backend=backend, nan_policy="ignore")


def test_unknown_preset_and_overrides():
    x = torch.zeros(4096)
    with pytest.raises(ValueError, match="unknown preset 'stargan'"):
        vcfast.log_spectrogram(x, "stargan")
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['nfft'\]"):
        vcfast.log_spectrogram(x, nfft=512)
    with pytest.raises(ValueError, match="bin_hi"):
        vcfast.log_spectrogram(x, bin_hi=600)
    with pytest.raises(ValueError, match="bin_lo"):
        vcfast.log_spectrogram(x, bin_lo=300, bin_hi=200)
    with pytest.raises(ValueError, match="hop"):
        vcfast.log_spectrogram(x, hop=0)
    with pytest.raises(ValueError, match="log_floor or log_offset"):
        vcfast.log_spectrogram(x, log_floor=0.0)
    with pytest.raises(ValueError, match="window"):
        vcfast.log_spectrogram(x, window="kaiser")
    with pytest.raises(ValueError, match="clip"):
        vcfast.log_spectrogram(x, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="normalization"):
        vcfast.log_spectrogram(x, normalization="minmax")


def test_standardize_statistics_are_checked():
    x = torch.zeros(16384)
    with pytest.raises(ValueError, match="needs per-bin `mean` and `std`"):
        vcfast.log_spectrogram(x, "specgan")
    with pytest.raises(ValueError, match="`mean` must have 128 values"):
        vcfast.log_spectrogram(x, "specgan", mean=torch.zeros(129), std=torch.ones(128))
    with pytest.raises(ValueError, match="`std` entry must be > 0"):
        vcfast.log_spectrogram(x, "specgan", mean=torch.zeros(128), std=torch.zeros(128))
    with pytest.raises(ValueError, match="only used with normalization='standardize'"):
        vcfast.log_spectrogram(x, mean=torch.zeros(256), std=torch.ones(256))


def test_backend_device_mismatch_raises(monkeypatch):
    x = torch.zeros(4096)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on a CPU tensor"):
        vcfast.log_spectrogram(x, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        vcfast.log_spectrogram(x, backend="gpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        vcfast.log_spectrogram(x, backend="triton")
    # CUDA tensors cannot be made here; the dispatch decision is checked directly.
    with pytest.raises(ValueError, match="backend 'cpu' cannot run on a CUDA tensor"):
        _pick_backend("cpu", torch.device("cuda"))
    # CUDA tensors default to the cuFFT backend when the extension has it, else to Triton.
    monkeypatch.setattr(_extension, "extension_has_cuda", lambda: True)
    assert _pick_backend(None, torch.device("cuda")) == "cuda"
    monkeypatch.setattr(_extension, "extension_has_cuda", lambda: False)
    if _extension.triton_available():
        assert _pick_backend(None, torch.device("cuda")) == "triton"
    monkeypatch.setattr(_extension, "triton_available", lambda: False)
    assert _pick_backend(None, torch.device("cuda")) == "reference"
    # CPU defaults are unchanged.
    assert _pick_backend(None, torch.device("cpu")) == (
        "cpu" if _extension.EXTENSION_LOADED else "reference")


@needs_extension
def test_registered_op_rejects_bad_arguments_without_crashing():
    op = torch.ops.vcfast.log_spectrogram
    config = resolve_config("stargan_vc", n_fft=64, hop=16, bin_lo=1, bin_hi=17)
    window, (shift, scale) = config.make_window(torch.float32), config.make_affine(torch.float32)
    kwargs = dict(config.kernel_scalars(), check_finite=True)
    x = torch.rand(2, 200)
    with pytest.raises(ValueError, match="2-D"):
        op(x[0], window, shift, scale, **kwargs)
    with pytest.raises(ValueError, match="bin_hi"):
        op(x, window, shift, scale, **dict(kwargs, bin_hi=40))
    with pytest.raises(ValueError, match="window must have shape"):
        op(x, window[:10], shift, scale, **kwargs)
    with pytest.raises(ValueError, match="fewer than one frame"):
        op(x[:, :10], window, shift, scale, **kwargs)
    with pytest.raises(TypeError, match="match wave's dtype"):
        op(x, window.double(), shift, scale, **kwargs)
    with pytest.raises(TypeError, match="float32 or float64"):
        op(x.half(), window, shift, scale, **kwargs)
    with pytest.raises(ValueError, match="grad must have shape"):
        torch.ops.vcfast.log_spectrogram_backward(torch.zeros(3, 3, 3), x, window, shift, scale,
                                                  **config.kernel_scalars())


@needs_extension
def test_backward_accepts_any_gradient_layout():
    # .sum() hands the backward an expanded scalar; a transpose hands it a permuted tensor.
    config = resolve_config("stargan_vc", **CONFIGS["stargan_small"])
    x = ((torch.rand(2, 300, dtype=torch.float64) - 0.5) * 0.6).requires_grad_()
    weight_t = torch.rand(2, config.n_frames(300), 16, dtype=torch.float64)
    for reduce in (lambda y: y.sum(), lambda y: (y.transpose(1, 2) * weight_t).sum(),
                   lambda y: y[:, ::2].sum()):
        (g_cpu,) = torch.autograd.grad(reduce(vcfast.log_spectrogram(x, config, backend="cpu")), x)
        (g_ref,) = torch.autograd.grad(
            reduce(vcfast.log_spectrogram(x, config, backend="reference")), x)
        torch.testing.assert_close(g_cpu, g_ref, atol=1e-10, rtol=1e-9)


def test_nan_policy_auto_checks_only_off_cuda():
    """The NaN check reads its verdict on the host: on CUDA that is a per-call device-to-host
    sync, so "auto" (the default) checks CPU tensors only and CUDA needs an explicit opt-in."""
    from vcfast.ops.spectrogram import _resolve_nan_policy

    assert _resolve_nan_policy("auto", torch.device("cpu")) == "raise"
    assert _resolve_nan_policy("auto", torch.device("cuda", 1)) == "propagate"
    for device in ("cpu", "cuda"):
        for policy in ("raise", "propagate"):
            assert _resolve_nan_policy(policy, torch.device(device)) == policy
    with pytest.raises(ValueError, match="'auto', 'raise' or 'propagate'"):
        _resolve_nan_policy("ignore", torch.device("cpu"))
    x = speech_like(4096, dtype=torch.float32)
    x[2000] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):  # the CPU default still raises
        vcfast.log_spectrogram(x, backend="reference")
    with pytest.raises(ValueError, match="NaN or Inf"):
        vcfast.nn.LogSpectrogram(backend="reference")(x)
