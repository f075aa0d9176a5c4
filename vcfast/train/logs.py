"""Training logs: CSV files that survive resumes, TensorBoard scalars, spectrogram PNGs."""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from vcfast.train.checkpoint import write_atomically

__all__ = ["CsvLog", "ScalarWriter", "save_spectrogram_png"]


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
