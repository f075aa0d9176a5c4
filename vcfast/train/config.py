"""Training configuration (docs/training.md defaults) and the model sizes the trainer builds."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["OPTIMIZERS", "RESUME_CRITICAL_FIELDS", "SIZES", "TrainConfig"]

#: Model sizes (docs/models.md#reduced-sizes). "paper" is the paper size exactly; "small" is a CPU
#: demo size (a step takes a few seconds on 2 threads); "tiny" is for tests. The discriminator's
#: stride-2 convolutions always bring the input down to a 4x4 map. ``image_size`` is the
#: spectrogram the models see: 256 bins x 256 frames (docs/ops.md#presets), except "tiny", which
#: trains on the lowest 64 bins x first 64 frames of each crop so that tests run in seconds on a
#: CPU.
SIZES: dict[str, dict[str, int]] = {
    "paper": {"g_conv_dim": 64, "g_repeat": 6, "d_conv_dim": 64, "d_repeat": 6, "image_size": 256},
    "small": {"g_conv_dim": 16, "g_repeat": 3, "d_conv_dim": 16, "d_repeat": 6, "image_size": 256},
    "tiny": {"g_conv_dim": 4, "g_repeat": 1, "d_conv_dim": 4, "d_repeat": 4, "image_size": 64},
}

#: Optimiser name -> (default lr, extra keyword arguments). RMSprop 1e-5 is the default recipe
#: (docs/training.md); Adam 1e-4 with betas (0.5, 0.999) is the StarGAN paper's.
OPTIMIZERS: dict[str, tuple[float, dict[str, Any]]] = {
    "rmsprop": (1e-5, {}),
    "adam": (1e-4, {"betas": (0.5, 0.999)}),
}

#: Fields that must match the checkpoint to resume: they change the models' shapes or the
#: optimiser state's layout, so the saved tensors would not fit (or would mean something else).
RESUME_CRITICAL_FIELDS = ("size", "optimizer")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` in the run directory.

    Defaults are docs/training.md's (RMSprop 1e-5, 5 D steps per G step, lambda_gp 10 with the lean
    penalty, lambda_rec/id/fm 10, lambda_cls 1, batch 2) with paper-size models.
    ``lr=None`` means the optimiser's default (1e-5 RMSprop, 1e-4 Adam).
    ``held_out_per_speaker`` utterances per speaker are kept out of training for
    :func:`vcfast.train.evaluate` (0: no held-out set, no evaluation).
    """

    size: str = "paper"
    optimizer: str = "rmsprop"
    lr: float | None = None
    batch_size: int = 2
    n_critic: int = 5
    lambda_gp: float = 10.0
    lambda_rec: float = 10.0
    lambda_id: float = 10.0
    lambda_fm: float = 10.0
    lambda_cls: float = 1.0
    steps: int = 1000
    log_every: int = 10
    sample_every: int = 100
    checkpoint_every: int = 100
    eval_every: int = 100
    keep_checkpoints: int = 3
    held_out_per_speaker: int = 1
    bf16: bool = False
    checkpoint_blocks: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first field that is out of range."""
        if self.size not in SIZES:
            raise ValueError(f"TrainConfig.size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"TrainConfig.optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        positive_ints = (
            "batch_size",
            "n_critic",
            "steps",
            "log_every",
            "sample_every",
            "checkpoint_every",
            "eval_every",
            "keep_checkpoints",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("held_out_per_speaker", "workers", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("lambda_gp", "lambda_rec", "lambda_id", "lambda_fm", "lambda_cls"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.lr is not None:
            if (
                isinstance(self.lr, bool)
                or not isinstance(self.lr, (int, float))
                or not math.isfinite(self.lr)
                or self.lr <= 0
            ):
                raise ValueError(
                    f"TrainConfig.lr must be a positive number or None, got {self.lr!r}"
                )
            self.lr = float(self.lr)
        if self.max_minutes is not None:
            if (
                isinstance(self.max_minutes, bool)
                or not isinstance(self.max_minutes, (int, float))
                or not self.max_minutes > 0
            ):
                raise ValueError(
                    f"TrainConfig.max_minutes must be a positive number or None, "
                    f"got {self.max_minutes!r}"
                )
            self.max_minutes = float(self.max_minutes)
        for name in ("bf16", "checkpoint_blocks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"TrainConfig.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(
                f"TrainConfig.device must be 'auto' or a torch device string, got {self.device!r}"
            )

    # ------------------------------------------------------------------ derived values
    @property
    def learning_rate(self) -> float:
        """The learning rate in effect: ``lr`` or the optimiser's default."""
        return self.lr if self.lr is not None else OPTIMIZERS[self.optimizer][0]

    @property
    def model_sizes(self) -> dict[str, int]:
        """Channel widths and depths of the chosen size (see :data:`SIZES`)."""
        return dict(SIZES[self.size])

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the configuration fields, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], *, base: TrainConfig | None = None, source: str = "config"
    ) -> TrainConfig:
        """Build from a mapping of field values, on top of ``base`` (defaults when None).

        Unknown keys raise ValueError listing them and the valid field names.
        """
        if not isinstance(values, dict):
            raise TypeError(
                f"{source}: expected a JSON object of TrainConfig fields, got "
                f"{type(values).__name__}"
            )
        known = cls.field_names()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown TrainConfig key(s) {unknown}; valid keys: {known}")
        merged = (base or cls()).to_dict()
        merged.update(values)
        return cls(**merged)

    @classmethod
    def from_json_file(
        cls, path: str | os.PathLike, *, base: TrainConfig | None = None
    ) -> TrainConfig:
        """Load a JSON file of TrainConfig fields (missing fields keep ``base``'s values)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(values, base=base, source=f"config file {str(path)!r}")
