"""Audio loading, cropping and saving for the StarGAN-VC data pipeline.

Implements the crops of docs/ops.md#crops:

1. load audio, mix to mono, resample to 16 000 Hz (:func:`load_audio`);
2. take a random crop of :data:`CROP_SAMPLES` samples, peak-normalise it to
   [-1, 1] and reject it if its RMS after normalisation exceeds
   :data:`MAX_CROP_RMS` (noise-like or silent), drawing another crop
   (:func:`random_crop`, :func:`load_crop`).

Waveforms are 1-D ``torch.float32`` tensors of samples in [-1, 1] (full
scale), shape ``(T,)``; sample rates are in Hz.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Optional, Union

import numpy as np
import soundfile as sf
import soxr
import torch

__all__ = [
    "SAMPLE_RATE",
    "CROP_SAMPLES",
    "MAX_CROP_RMS",
    "AudioReadError",
    "NoUsableCropError",
    "load_audio",
    "peak_normalize",
    "random_crop",
    "load_crop",
    "save_audio",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Sample rate (Hz) every waveform is resampled to.
SAMPLE_RATE = 16000
#: Crop length in samples (~4.14 s at 16 kHz): 256 frames of the stargan_vc preset.
CROP_SAMPLES = 66304
#: A crop whose RMS after peak normalisation exceeds this is noise-like or
#: silence-plus-clicks and is discarded (docs/ops.md#crops).
MAX_CROP_RMS = 0.5

# Formats save_audio writes, keyed by lower-case extension.
_SAVE_FORMATS = {".wav": "WAV", ".flac": "FLAC"}

# Read once at import (single-threaded) because os.umask can only be queried
# by setting it, which would race with other threads at call time.
_UMASK = os.umask(0)
os.umask(_UMASK)


class AudioReadError(ValueError):
    """The file exists but cannot be decoded as audio, or holds no usable samples."""


class NoUsableCropError(ValueError):
    """No crop satisfying the rules of docs/ops.md#crops could be drawn from a waveform."""


def _check_positive_int(name: str, value) -> int:
    # bool is an int subclass, but sample_rate=True is always a bug.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Load an audio file as mono float32 at ``sample_rate``.

    Any format libsndfile reads (wav, flac, ogg, ...) is accepted.
    Multi-channel audio is mixed to mono by averaging the channels; the result
    is resampled with soxr (``quality="HQ"``) when the file's rate differs.

    Args:
        path: audio file path.
        sample_rate: target rate in Hz (positive int).

    Returns:
        Tensor of shape ``(T,)``, dtype float32, at ``sample_rate`` Hz, where
        ``T ≈ round(frames * sample_rate / file_rate)``. Amplitudes are kept
        as stored (not normalised).

    Raises:
        ValueError: ``sample_rate`` is not a positive int.
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        AudioReadError: the file cannot be decoded, has 0 samples, or
            contains NaN/inf samples.
    """
    sample_rate = _check_positive_int("sample_rate", sample_rate)
    path_str = os.fspath(path)
    if not os.path.exists(path_str):
        raise FileNotFoundError(2, "audio file not found", path_str)
    if os.path.isdir(path_str):
        raise IsADirectoryError(21, "expected an audio file, got a directory", path_str)

    try:
        data, file_rate = sf.read(path_str, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioReadError(f"cannot read audio file {path_str!r}: {e}") from e

    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioReadError(f"audio file {path_str!r} contains no samples")
    # Float wav/flac can store NaN/inf; they would poison peak normalisation
    # and every feature downstream, so fail here where the file is known.
    if not np.isfinite(data).all():
        raise AudioReadError(f"audio file {path_str!r} contains NaN or infinite samples")

    # Mix before resampling: both are linear, and resampling one channel is cheaper.
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate:
        mono = soxr.resample(mono, file_rate, sample_rate, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


def peak_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale ``x`` so that ``max|x| == 1`` (divide by its absolute peak).

    Works on any shape (one global peak). The sample(s) at the peak become
    exactly ±1. An all-zero (or empty) input has no peak to scale by and is
    returned unchanged, as zeros (a new tensor, never a view of ``x``).
    Integer input is converted to float32 first.

    Args:
        x: tensor of any shape.

    Returns:
        Tensor of the same shape, floating dtype, values in [-1, 1].
    """
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.numel() == 0:
        return x.clone()
    peak = x.abs().amax()
    # torch.where instead of a Python branch avoids a device sync on GPU;
    # the 0/0 NaNs of the silent case are discarded by the select.
    return torch.where(peak > 0, x / peak, x)


def random_crop(
    wave: torch.Tensor,
    length: int = CROP_SAMPLES,
    *,
    generator: Optional[torch.Generator] = None,
    max_rms: Optional[float] = MAX_CROP_RMS,
    max_tries: int = 20,
) -> torch.Tensor:
    """Draw a random peak-normalised crop, rejecting noise-like or silent ones.

    The crop start is drawn uniformly from ``[0, len(wave) - length]`` with
    ``torch.randint(..., generator=generator)``, so the result is
    deterministic for a seeded (CPU) generator. The crop is peak-normalised
    (:func:`peak_normalize`) and rejected when

    * its RMS after normalisation exceeds ``max_rms`` (noise-like: speech
      has a high crest factor, so its normalised RMS is well below 0.5), or
    * its peak is 0 (all-zero silence: normalisation cannot scale it and it
      carries nothing to learn from), regardless of ``max_rms``.

    A rejected crop is replaced by a fresh draw, up to ``max_tries`` draws in
    total. When ``len(wave) == length`` there is only one possible crop, so it
    is tried once.

    Short input is *not* padded: training uses real 66 304-sample crops,
    and padding would feed silence the model never sees at inference.

    Args:
        wave: 1-D waveform, shape ``(T,)`` with ``T >= length``.
        length: crop length in samples (positive int).
        generator: optional CPU ``torch.Generator`` for the start draws.
        max_rms: RMS threshold after normalisation; ``None`` disables the
            RMS rule (all-zero crops are still rejected).
        max_tries: maximum number of draws (positive int).

    Returns:
        Tensor of shape ``(length,)``, same floating dtype/device as ``wave``
        (float32 for integer input), with ``max|crop| == 1``.

    Raises:
        ValueError: ``wave`` is not 1-D or an argument is invalid.
        NoUsableCropError: ``wave`` is shorter than ``length``, or every
            draw was rejected.
    """
    if wave.dim() != 1:
        raise ValueError(f"wave must be 1-D (T,), got shape {tuple(wave.shape)}")
    length = _check_positive_int("length", length)
    max_tries = _check_positive_int("max_tries", max_tries)
    if max_rms is not None and not (isinstance(max_rms, (int, float)) and max_rms > 0
                                    and math.isfinite(max_rms)):
        raise ValueError(f"max_rms must be a positive finite number or None, got {max_rms!r}")

    n = wave.shape[0]
    if n < length:
        raise NoUsableCropError(
            f"audio has {n} samples, fewer than one crop of {length} samples "
            f"({length / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz); crops are not padded, "
            f"use a longer recording or drop this one"
        )

    tries = 1 if n == length else max_tries
    n_silent = 0
    n_noisy = 0
    worst_rms = 0.0
    for _ in range(tries):
        start = int(torch.randint(0, n - length + 1, (1,), generator=generator).item())
        crop = wave[start:start + length]
        peak = float(crop.abs().amax())
        if peak == 0.0:
            n_silent += 1
            continue
        crop = peak_normalize(crop)
        if max_rms is not None:
            # float64 accumulation so the threshold comparison is not at the
            # mercy of float32 rounding over 66k squares.
            rms = float(crop.double().square().mean().sqrt())
            if rms > max_rms:
                n_noisy += 1
                worst_rms = max(worst_rms, rms)
                continue
        return crop

    reasons = []
    if n_silent:
        reasons.append(f"{n_silent} silent (all-zero)")
    if n_noisy:
        reasons.append(
            f"{n_noisy} noise-like (RMS after peak normalisation > {max_rms}, "
            f"up to {worst_rms:.3f})"
        )
    raise NoUsableCropError(
        f"no usable crop of {length} samples from audio of {n} samples after "
        f"{tries} tr{'y' if tries == 1 else 'ies'}: rejected {', '.join(reasons)}"
    )


def load_crop(
    path: PathLike,
    *,
    sample_rate: int = SAMPLE_RATE,
    length: int = CROP_SAMPLES,
    generator: Optional[torch.Generator] = None,
    max_tries: int = 20,
) -> torch.Tensor:
    """Load a file and draw one usable crop: :func:`load_audio` + :func:`random_crop`.

    Uses the default RMS threshold :data:`MAX_CROP_RMS`.

    Args:
        path: audio file path.
        sample_rate: rate in Hz the audio is resampled to before cropping.
        length: crop length in samples.
        generator: optional CPU ``torch.Generator`` for the start draws.
        max_tries: maximum number of crop draws.

    Returns:
        Float32 tensor of shape ``(length,)`` with ``max|crop| == 1``.

    Raises:
        Everything :func:`load_audio` raises; :class:`NoUsableCropError`
        (message prefixed with the path) when no crop is usable.
    """
    wave = load_audio(path, sample_rate)
    try:
        return random_crop(wave, length, generator=generator, max_tries=max_tries)
    except NoUsableCropError as e:
        raise NoUsableCropError(f"{os.fspath(path)!r}: {e}") from e


def save_audio(path: PathLike, wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write a 1-D waveform as 16-bit PCM, atomically.

    The container follows the extension: ``.wav`` (WAV) or ``.flac`` (FLAC).
    Samples are clipped to [-1, 1] before quantisation. The data is written to
    a temporary file in the same directory, flushed to disk, then moved over
    ``path`` with :func:`os.replace`, so a crash never leaves a half-written
    file at ``path``; on error the temporary file is removed.

    Args:
        path: destination file; its directory must exist.
        wave: float tensor (or array) of shape ``(T,)``, full scale [-1, 1].
        sample_rate: sample rate in Hz stored in the header.

    Raises:
        ValueError: bad shape, non-finite samples, bad sample rate or an
            unsupported extension.
    """
    sample_rate = _check_positive_int("sample_rate", sample_rate)
    path_str = os.fspath(path)
    ext = os.path.splitext(path_str)[1].lower()
    if ext not in _SAVE_FORMATS:
        raise ValueError(
            f"cannot save {path_str!r}: unsupported extension {ext!r} "
            f"(supported: {', '.join(sorted(_SAVE_FORMATS))})"
        )
    if isinstance(wave, torch.Tensor):
        data = wave.detach().to("cpu", torch.float32).numpy()
    else:
        data = np.asarray(wave, dtype=np.float32)
    if data.ndim != 1:
        raise ValueError(f"wave must be 1-D (T,), got shape {tuple(data.shape)}")
    # Clipping cannot fix NaN, and libsndfile's conversion of NaN to PCM is undefined.
    if not np.isfinite(data).all():
        raise ValueError(f"cannot save {path_str!r}: wave contains NaN or infinite samples")
    data = np.clip(data, -1.0, 1.0)

    directory = os.path.dirname(os.path.abspath(path_str))
    # Same directory as the target so os.replace is a rename within one filesystem.
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path_str) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, data, sample_rate, format=_SAVE_FORMATS[ext], subtype="PCM_16")
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions open() would have.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path_str)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
