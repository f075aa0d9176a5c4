"""Training logs: CSV files that survive resumes, TensorBoard scalars, spectrogram PNGs, and
the progress report on stderr (a bar on a terminal, plain lines in pipes and files)."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from vcfast.train.checkpoint import write_atomically

__all__ = ["DEFAULT_PROGRESS_INTERVAL_S", "CsvLog", "ProgressReporter", "ScalarWriter",
           "progress_interval", "save_spectrogram_png"]


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        # repr keeps every bit of a float, so resumed and uninterrupted logs compare exactly.
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class CsvLog:
    """An append-only CSV with a fixed header and a ``step`` first column.

    Each row is flushed and fsynced as it is written. Opening with ``resume_step`` drops the
    rows logged after that step (they belong to a run that went on past its last checkpoint),
    rewriting the file atomically, so a resumed run's log reads as one uninterrupted run.
    Opening without it starts a new file.
    """

    def __init__(
        self, path: str | os.PathLike, columns: list[str], *, resume_step: int | None = None
    ) -> None:
        self.path = Path(path)
        self.columns = ["step", *[c for c in columns if c != "step"]]
        kept: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        if int(row.get("step") or -1) <= resume_step:
                            kept.append(row)
                    except ValueError:
                        continue
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(kept)
        write_atomically(self.path, buffer.getvalue())
        # Kept open for the run (closed by close()): one row is appended per log step.
        self._file = open(self.path, "a", newline="")  # noqa: SIM115
        self._writer = csv.DictWriter(
            self._file, fieldnames=self.columns, extrasaction="ignore", restval=""
        )

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (missing columns empty, extra keys ignored), flushed to disk."""
        self._writer.writerow({k: _format(v) for k, v in row.items()})
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, str]]:
        """All rows of a log file as dicts of strings."""
        with open(path, newline="") as f:
            return list(csv.DictReader(f))


_warned_tensorboard = False


class ScalarWriter:
    """TensorBoard scalars under ``RUN/tb``; a no-op (with one warning) without tensorboard.

    On resume, ``purge_step`` makes TensorBoard hide the events logged after the checkpoint.
    """

    def __init__(self, log_dir: str | os.PathLike, *, purge_step: int | None = None) -> None:
        global _warned_tensorboard
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        except Exception as exc:  # noqa: BLE001 - ImportError, or any broken tensorboard install
            if not _warned_tensorboard:
                warnings.warn(
                    f"TensorBoard logging disabled ({exc}); log.csv is still written", stacklevel=2
                )
                _warned_tensorboard = True

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        """Write each finite number in ``values`` as a scalar ``prefix + name``."""
        if self._writer is None:
            return
        for name, value in values.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self._writer.add_scalar(prefix + name, value, step)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


#: Seconds between plain progress lines when stderr is not a terminal; the environment
#: variable VCFAST_PROGRESS_INTERVAL_S overrides it (e.g. for a CI job), an explicit
#: ``interval_s`` overrides both.
DEFAULT_PROGRESS_INTERVAL_S = 30.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _notebook_widget() -> bool:
    """True inside a Jupyter kernel, where tqdm draws a widget (no carriage returns)."""
    from tqdm import autonotebook

    return autonotebook.tqdm.__module__ == "tqdm.notebook"


def progress_interval(interval_s: float | None = None) -> float:
    """Seconds between plain progress lines: ``interval_s`` if given, else the environment
    variable VCFAST_PROGRESS_INTERVAL_S, else :data:`DEFAULT_PROGRESS_INTERVAL_S`. Raises
    ValueError for a negative or non-numeric value."""
    if interval_s is not None:
        seconds, source = interval_s, "interval_s"
    else:
        value = os.environ.get("VCFAST_PROGRESS_INTERVAL_S")
        if not value:
            return DEFAULT_PROGRESS_INTERVAL_S
        try:
            seconds, source = float(value), "VCFAST_PROGRESS_INTERVAL_S"
        except ValueError:
            raise ValueError("VCFAST_PROGRESS_INTERVAL_S must be a number of seconds, "
                             f"got {value!r}") from None
    # (not seconds >= 0 also refuses NaN)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ValueError(f"{source} must be a number of seconds >= 0, got {seconds!r}")
    return float(seconds)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressReporter:
    """Progress of a training run: a tqdm bar on a terminal, plain lines anywhere else.

    A progress bar redraws itself with carriage returns; in a CI log or a file (stderr not a
    terminal) every redraw stays, hundreds of them run together into one unreadable line.
    There the reporter prints one plain line (step, losses, throughput, elapsed time) for the
    first step, then for the first step at least ``interval_s`` seconds after the last
    printed line, and for the last step: at ``total`` right away, else (a run stopped early)
    when closed. On a terminal (or in a Jupyter notebook, where tqdm draws a widget) it is the
    usual bar.

    ``stream``: where to write (default ``sys.stderr`` as it is when the reporter is made).
    ``interval_s``: see :func:`progress_interval`. ``bar``: force (True) or refuse (False) the
    bar; default: a bar on a terminal only. ``clock``: seconds, monotonic (injectable for
    tests). ``enabled=False`` reports nothing.
    """

    def __init__(self, *, total: int | None, initial: int = 0, desc: str = "train",
                 stream: TextIO | None = None, interval_s: float | None = None,
                 bar: bool | None = None, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.interval_s = progress_interval(interval_s) if enabled else math.inf
        self.clock = clock
        if bar is None:
            bar = _is_terminal(self.stream) or (self.stream is sys.stderr and _notebook_widget())
        self._bar = None
        if enabled and bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             desc=desc, file=self.stream)
        self._start = clock()
        self._last_line_at: float | None = None
        self._pending: str | None = None  # the last step's line, if it was not printed
        self._window_seconds = 0.0  # step time and samples since the last printed line
        self._window_steps = 0
        self._window_samples = 0

    @property
    def uses_bar(self) -> bool:
        """True when progress shows as a tqdm bar, False for plain lines (or nothing)."""
        return self._bar is not None

    def update(self, step: int, losses: dict[str, float], seconds: float, samples: int) -> None:
        """One training step done: ``step`` (its number), its ``losses`` (``d_loss`` and
        ``g_loss`` are shown), ``seconds`` it took and ``samples`` it used."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                d=f"{losses['d_loss']:.3f}",
                g=f"{losses['g_loss']:.3f}",
                s_per_step=f"{seconds:.2f}",
                samples_per_s=f"{samples / seconds:.1f}" if seconds > 0 else "-",
            )
            return
        self._window_seconds += seconds
        self._window_steps += 1
        self._window_samples += samples
        now = self.clock()
        steps = f"step {step}/{self.total}" if self.total is not None else f"step {step}"
        rate = (f"{self._window_seconds / self._window_steps:.2f} s/step, "
                f"{self._window_samples / self._window_seconds:.1f} samples/s"
                if self._window_seconds > 0 else "- s/step")
        self._pending = (f"{self.desc}: {steps}, d_loss {losses['d_loss']:.4f}, "
                         f"g_loss {losses['g_loss']:.4f}, {rate}, "
                         f"elapsed {_duration(now - self._start)}")
        first = self._last_line_at is None
        last = self.total is not None and step >= self.total
        if first or last or now - self._last_line_at >= self.interval_s:
            self._print_pending(now)

    def write(self, message: str) -> None:
        """A message line (evaluation results, interruption) that does not break the bar. In
        plain lines the step it is about comes first: an unprinted step line is printed."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
            return
        if self._pending is not None:
            self._print_pending(self.clock())
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Ends the bar, or prints the last step's line if it was not printed (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._pending is not None:
            self._print_pending(self.clock())

    def _print_pending(self, now: float) -> None:
        print(self._pending, file=self.stream, flush=True)
        self._pending = None
        self._last_line_at = now
        self._window_seconds, self._window_steps, self._window_samples = 0.0, 0, 0


def save_spectrogram_png(path: str | os.PathLike, panels: list[tuple[str, torch.Tensor]]) -> bool:
    """Side-by-side spectrogram images (values in [0, 1]) written atomically as a PNG.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (title, spec) in zip(axes[0], panels):
        ax.imshow(
            spec.detach().float().cpu().numpy(),
            origin="lower",
            aspect="auto",
            vmin=0,
            vmax=1,
            cmap="magma",
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("frame (16 ms hop)")
        ax.set_ylabel("bin (15.6 Hz .. 4 kHz)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())
    return True
