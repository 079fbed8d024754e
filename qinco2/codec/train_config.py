"""Training settings: :class:`TrainConfig`, the training fields of each preset and their ranges."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

PRESET_TRAINING: dict[str, dict] = {
    "qinco1": dict(optimizer="adam", lr=1e-4, weight_decay=0.0, grad_clip=None, scheduler="plateau", patience=20,
                   init_noise=0.0, codeword_reset=False, normalization="max_abs", full_epochs=True),
    "qinco2-S": {}, "qinco2-M": {}, "qinco2-L": {},
}


@dataclass
class TrainConfig:
    """Optimisation settings; defaults are those of the QINCo2 presets."""

    lr: float = 8e-4
    optimizer: str = "adamw"            # "adamw" | "adam"
    weight_decay: float = 0.1
    grad_clip: float | None = 0.1       # element-wise value clipping
    batch: int = 1024
    grad_accumulate: int = 1
    epochs: int = 60                    # length of the cosine schedule
    ramp_epochs: int = 3
    lr_min_factor: float = 1e-3
    scheduler: str = "cosine"           # "cosine" | "plateau"
    patience: int = 10
    loop: int = 10_000_000              # samples per epoch (window over the training set)
    full_epochs: bool = False           # epoch = one pass over the whole training set
    init_noise: float = 0.1
    init_samples: int = 1_000_000
    init_refine: int = 0                # joint least-squares refinements of the RQ codebooks (rq_init)
    train_noise: float = 0.0            # Gaussian noise on training rows, std relative to their spread
    neighbour_mix: float = 0.0          # move training rows up to this share of the way to a near training row
    neighbour_k: int = 10               # near rows to draw from (.augment.training_neighbours)
    codeword_reset: bool = True
    reset_every: int = 20               # batches between codeword resets (see .resets); <= 0: per epoch
    normalization: str = "mean_std"     # "mean_std" (QINCo2) | "max_abs" (QINCo1)
    amp: bool = True                    # fp16 autocast, CUDA only
    cpu_bf16: bool = False              # bfloat16 training steps on the CPU: autocast and the beam search
    seed: int = 0
    max_time_s: float | None = None     # wall-clock budget, initialisation included; stops after the current batch
    time_schedule: bool = False         # spread warm-up + cosine over max_time_s, not over epochs
    max_epochs: int | None = None
    tensorboard: str | None = None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """The training settings of preset ``name`` with ``overrides``, validated."""
        if name not in PRESET_TRAINING:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESET_TRAINING)}")
        return cls(**{**PRESET_TRAINING[name], **overrides}).validated()

    def validated(self) -> "TrainConfig":
        """``self``, or :class:`ConfigError` naming the first setting out of its range."""
        for name, rule in _RANGES.items():
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL) and not _in_range(value, rule):
                kind = "whole number" if rule.startswith("int") else "number"
                raise ConfigError(f"training setting {name}={value!r} is invalid; {name} must be a {kind} "
                                  f"{rule.removeprefix('int ')}{' (or None)' * (name in _OPTIONAL)}")
        if self.optimizer not in ("adamw", "adam"):
            raise ConfigError(f"optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "plateau"):
            raise ConfigError(f"scheduler must be 'cosine' or 'plateau', got {self.scheduler!r}")
        if self.normalization not in ("mean_std", "max_abs"):
            raise ConfigError(f"normalization must be 'mean_std' or 'max_abs', got {self.normalization!r}")
        if self.time_schedule and not self.max_time_s:
            raise ConfigError("time_schedule=true needs a time budget: set max_time_s")
        return self


# the range of each numeric setting ("int": a whole number); those of _OPTIONAL may be None
_RANGES = {"lr": "> 0", "weight_decay": ">= 0", "grad_clip": ">= 0", "batch": "int >= 1",
           "grad_accumulate": "int >= 1", "epochs": "int >= 1", "ramp_epochs": "int >= 0",
           "lr_min_factor": ">= 0", "patience": "int >= 1", "loop": "int >= 1", "init_noise": ">= 0",
           "init_samples": "int >= 1", "init_refine": "int >= 0", "train_noise": ">= 0", "seed": "int >= 0",
           "neighbour_mix": ">= 0", "neighbour_k": "int >= 1",
           "max_time_s": "> 0", "max_epochs": "int >= 1"}
_OPTIONAL = {"grad_clip", "max_time_s", "max_epochs"}


def _in_range(value, rule: str) -> bool:
    *whole, op, bound = rule.split()
    types = (int, np.integer) if whole else (int, float, np.integer, np.floating)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, types) or not math.isfinite(value):
        return False
    return value > float(bound) if op == ">" else value >= float(bound)
