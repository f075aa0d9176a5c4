"""Voice conversion of whole utterances with a trained StarGAN generator
(docs/ops.md#log-spectrogram, docs/labels.md).

The generator sees fixed-size spectrogram images (256 bins x 256 frames when trained on
the crops of docs/ops.md#crops), but a recording has any length. :func:`convert_wave` therefore

1. peak-normalises the wave and pads both ends with 768 zeros (n_fft - hop; the end is
   rounded up to whole frames) so that every sample lies under a full set of overlapping
   frames, then takes the log-spectrogram of the whole utterance with the fused op
   (``vcfast.log_spectrogram``, preset ``stargan_vc``): ``[256, F]``;
2. cuts the frames into windows of ``window_frames`` that overlap by ``overlap_frames``
   (:func:`convert_spectrogram`); the last window, or a single window for an utterance
   shorter than one window, is padded with 0, the value the spectrogram gives silence;
3. runs the generator on batches of windows with the target label vector
   (``LabelSpace.generator_input``), then overlap-adds the converted windows back with
   linear crossfades over each overlap (weights normalised to sum to 1 at every frame),
   and trims to the utterance's ``F`` frames;
4. inverts with Fast Griffin-Lim (``vcfast.spectrogram_to_wave``), drops the padding and
   peak-normalises to 0.95.

With a generator that returns its input, step 2-3 reproduce the spectrogram exactly (up to
float rounding of the crossfade), which the tests check.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import nn

from vcfast.data.audio import SAMPLE_RATE, peak_normalize
from vcfast.labels import LabelSpace
from vcfast.models.generator import inference_mode, module_device
from vcfast.ops.inverse import spectrogram_to_wave
from vcfast.ops.spectrogram import PRESETS, log_spectrogram

__all__ = ["convert_wave", "convert_spectrogram", "target_indices", "utterance_spectrogram",
           "SILENCE_VALUE"]

_CONFIG = PRESETS["stargan_vc"]
#: Value of the stargan_vc spectrogram for silence (magnitudes at or below the log floor).
SILENCE_VALUE = 0.0
# Peak of the returned wave: Griffin-Lim output is not bounded by 1, and a little headroom
# keeps the 16-bit file from clipping.
_OUTPUT_PEAK = 0.95


def target_indices(label_space: LabelSpace, target: Mapping[str, str | int | None]) -> list[int]:
    """Target labels ``{group: class name | index | None}`` -> one index per group (-1 unknown).

    Groups missing from ``target`` are unknown. Raises ValueError for a group the label space
    does not have (listing its groups) or a class name it does not know (listing a few valid
    ones, with close matches), and TypeError when ``target`` is not a mapping.
    """
    if not isinstance(target, Mapping):
        raise TypeError(f"target must be a dict group -> class name (or None), "
                        f"got {type(target).__name__}")
    indices = [-1] * label_space.n_groups
    for group, name in target.items():
        # group_index raises "unknown label group ...; groups are [...]".
        k = label_space.group_index(group)
        indices[k] = -1 if name is None else label_space.index_of(k, name)
    return indices


def _window_starts(n_frames: int, window_frames: int, overlap_frames: int) -> list[int]:
    """Start frame of each window; the last may run past ``n_frames`` (padded)."""
    stride = window_frames - overlap_frames
    if n_frames <= window_frames:
        return [0]
    count = math.ceil((n_frames - window_frames) / stride) + 1
    return [i * stride for i in range(count)]


def _crossfade_weights(window_frames: int, overlap_frames: int, first: bool, last: bool,
                       dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-frame weight of one window: 1, with linear ramps over the overlaps it shares.

    The ramp-up of window k+1 and the ramp-down of window k cover the same frames and sum
    to exactly 1 there, so a constant spectrogram stays constant; the weights are still
    normalised by their sum after overlap-add (the first/last windows have no ramp outside).
    """
    weights = torch.ones(window_frames, dtype=dtype, device=device)
    if overlap_frames:
        # Half-sample offsets keep every weight strictly inside (0, 1): no frame gets weight 0.
        ramp = (torch.arange(overlap_frames, dtype=dtype, device=device) + 0.5) / overlap_frames
        if not first:
            weights[:overlap_frames] = ramp
        if not last:
            weights[window_frames - overlap_frames:] = ramp.flip(0)
    return weights


def utterance_spectrogram(wave: torch.Tensor, silence: int = 0) -> torch.Tensor:
    """stargan_vc log-spectrogram ``[256, frames]`` of a whole 1-D utterance (``>= 1024``
    samples), peak-normalised, with ``silence`` zero samples before it and at least as many
    after it, the end padded up to a whole frame so that every sample is covered."""
    samples = wave.shape[-1]
    n_frames = math.ceil((samples + 2 * silence - _CONFIG.n_fft) / _CONFIG.hop) + 1
    tail = _CONFIG.samples_for_frames(n_frames) - samples - silence
    return log_spectrogram(torch.nn.functional.pad(peak_normalize(wave), (silence, tail)))


def _check_window_args(window_frames, overlap_frames, batch_size) -> None:
    """ValueError unless the windowing arguments are ints in range."""
    for name, value, lo in (("window_frames", window_frames, 1),
                            ("overlap_frames", overlap_frames, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"`{name}` must be an int >= {lo}, got {value!r}")
    if overlap_frames >= window_frames:
        raise ValueError(f"`overlap_frames` ({overlap_frames}) must be smaller than "
                         f"`window_frames` ({window_frames})")


@torch.no_grad()
def convert_spectrogram(generator: nn.Module, label_space: LabelSpace, spec: torch.Tensor,
                        target: Mapping[str, str | int | None], *, window_frames: int = 256,
                        overlap_frames: int = 64, batch_size: int = 8,
                        device: torch.device | str | None = None,
                        norm_statistics: str = "instance") -> tuple[torch.Tensor, int]:
    """Convert a spectrogram of any length window by window; returns ``(spec_out, windows)``.

    Args:
        generator: maps ``(x [N, 1, bins, window_frames], c [N, label_space.input_dim])`` to a
            tensor of the same shape as ``x`` (a StarGANGenerator). Run under
            ``torch.no_grad()`` in :func:`vcfast.models.inference_mode`; every module's
            train/eval mode is restored afterwards.
        label_space: the label space the generator was trained with.
        spec: ``[bins, F]`` spectrogram (stargan_vc: 256 bins, values in [0, 1]), F >= 1.
        target: ``{group: class name | index | None}``; missing groups are unknown.
        window_frames, overlap_frames: window length and overlap in frames.
        batch_size: windows per generator call.
        device: where the generator runs; default: the generator's device.
        norm_statistics: ``"instance"`` (default; InstanceNorm with each window's own
            statistics, as in training and in the official StarGAN test code) or
            ``"running"`` (eval mode); see :func:`vcfast.models.inference_mode`.

    Returns:
        ``spec_out`` ``[bins, F]`` float32 on ``spec``'s device, and the number of windows.
    """
    _check_window_args(window_frames, overlap_frames, batch_size)
    if not isinstance(spec, torch.Tensor) or spec.dim() != 2 or spec.shape[1] < 1:
        shape = tuple(spec.shape) if isinstance(spec, torch.Tensor) else type(spec).__name__
        raise ValueError(f"`spec` must be a [bins, frames] tensor with >= 1 frame, got {shape}")
    indices = target_indices(label_space, target)
    run_device = torch.device(device) if device is not None else module_device(generator)
    bins, n_frames = spec.shape
    starts = _window_starts(n_frames, window_frames, overlap_frames)
    padded_frames = starts[-1] + window_frames
    padded = torch.full((bins, padded_frames), SILENCE_VALUE, dtype=torch.float32,
                        device=run_device)
    padded[:, :n_frames] = spec.to(run_device, torch.float32)
    windows = torch.stack([padded[:, s:s + window_frames] for s in starts]).unsqueeze(1)
    labels = label_space.generator_input([indices], device=run_device)

    with inference_mode(generator, norm_statistics):
        outputs = []
        for i in range(0, len(starts), batch_size):
            chunk = windows[i:i + batch_size]
            out = generator(chunk, labels.expand(chunk.shape[0], -1))
            if not isinstance(out, torch.Tensor) or out.shape != chunk.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"`generator` must map {tuple(chunk.shape)} to the same shape, "
                                 f"got {got} (it expects {bins}-bin images; window_frames must "
                                 "suit its down-sampling, e.g. a multiple of 4)")
            outputs.append(out.float())
        converted = torch.cat(outputs)[:, 0]  # [n_windows, bins, window_frames]

    total = torch.zeros(bins, padded_frames, dtype=torch.float32, device=run_device)
    weight_sum = torch.zeros(padded_frames, dtype=torch.float32, device=run_device)
    for k, s in enumerate(starts):
        weights = _crossfade_weights(window_frames, overlap_frames, k == 0, k == len(starts) - 1,
                                     torch.float32, run_device)
        total[:, s:s + window_frames] += converted[k] * weights
        weight_sum[s:s + window_frames] += weights
    return (total / weight_sum)[:, :n_frames].to(spec.device), len(starts)


def convert_wave(generator: nn.Module, label_space: LabelSpace, wave: torch.Tensor,
                 target: Mapping[str, str | int | None], *, window_frames: int = 256,
                 overlap_frames: int = 64, n_iter: int = 32, batch_size: int = 8,
                 device: torch.device | str | None = None,
                 norm_statistics: str = "instance") -> tuple[torch.Tensor, dict]:
    """Convert a 16 kHz utterance of any length to the ``target`` labels.

    Args:
        generator: a trained generator (see :func:`convert_spectrogram`), e.g. from
            ``vcfast.train.load_generator``; it must map ``[N, 1, 256, window_frames]`` to the
            same shape.
        label_space: the generator's label space.
        wave: ``[T]`` float waveform at 16 kHz, ``T >= 1024`` (one frame).
        target: ``{group: class name | index | None}``, e.g. ``{"speaker": "p225"}``;
            missing groups and ``None`` are unknown.
        window_frames, overlap_frames: generator window and overlap, in frames (16 ms each).
        n_iter: Griffin-Lim iterations.
        batch_size: windows per generator call.
        device: where the spectrogram, generator and Griffin-Lim run; default: the
            generator's device.
        norm_statistics: see :func:`convert_spectrogram`.

    Returns:
        ``(wave_out, info)``: ``wave_out`` ``[T]`` float32 on CPU at 16 kHz, peak 0.95;
        ``info`` = ``{"spectral_convergence", "frames", "windows", "seconds",
        "generator_seconds", "griffin_lim_seconds", "input_samples"}``.

    Raises:
        ValueError: ``wave`` not 1-D, shorter than one frame, not finite or silent; a target
            group or class name the label space does not have (the message lists valid ones);
            a generator that changes the shape.
        TypeError: ``wave`` not a tensor, ``target`` not a mapping.
    """
    start_time = time.perf_counter()
    if not isinstance(wave, torch.Tensor):
        raise TypeError(f"`wave` must be a torch.Tensor [samples], got {type(wave).__name__}")
    if wave.dim() != 1:
        raise ValueError(f"`wave` must be 1-D [samples] at 16 kHz, got shape {tuple(wave.shape)}")
    n_fft, hop = _CONFIG.n_fft, _CONFIG.hop
    samples = wave.shape[0]
    if samples < n_fft:
        raise ValueError(f"`wave` has {samples} samples; need at least {n_fft} (one "
                         f"{n_fft}-sample frame, {1000 * n_fft / SAMPLE_RATE:.0f} ms at "
                         f"{SAMPLE_RATE} Hz)")
    if not torch.isfinite(wave).all():
        raise ValueError("`wave` contains NaN or infinite samples")
    if not bool((wave != 0).any()):
        raise ValueError("`wave` is all zeros (silence): there is no voice to convert")
    target_indices(label_space, target)  # fail on bad labels before any expensive work
    run_device = torch.device(device) if device is not None else module_device(generator)

    # Silence on both sides, so that every real sample lies under a full set of overlapping
    # frames: Griffin-Lim divides by the overlap-added squared window, which is tiny near the
    # ends of the signal (Hamming edge 0.08: a 1/0.08**2 = 156x gain on the first samples),
    # and a generated spectrogram is never exactly consistent, so the ends would otherwise
    # come back as loud clicks. The lead-in is dropped again after Griffin-Lim.
    margin = n_fft - hop
    spec = utterance_spectrogram(wave.detach().to(run_device, torch.float32), silence=margin)
    n_frames = spec.shape[1]

    gen_start = time.perf_counter()
    converted, n_windows = convert_spectrogram(
        generator, label_space, spec, target, window_frames=window_frames,
        overlap_frames=overlap_frames, batch_size=batch_size, device=run_device,
        norm_statistics=norm_statistics)
    gl_start = time.perf_counter()
    out, convergence = spectrogram_to_wave(converted, n_iter=n_iter, return_convergence=True)
    out = peak_normalize(out[margin:margin + samples]) * _OUTPUT_PEAK
    end = time.perf_counter()
    info = {
        "spectral_convergence": float(convergence),
        "frames": n_frames,
        "windows": n_windows,
        "seconds": end - start_time,
        "generator_seconds": gl_start - gen_start,
        "griffin_lim_seconds": end - gl_start,
        "input_samples": samples,
    }
    return out.cpu(), info
