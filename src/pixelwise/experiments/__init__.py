"""Experiments that answer the lecture's questions: `pixelwise experiment NAME`.

Each experiment trains a few models on the same synthetic data with the same budget, evaluates
them, and writes `NAME.md` (a table and how it was made), `NAME.png` (a figure) and `NAME.json`
(every number) into its output folder:

| name | question |
|---|---|
| `upsamplers` | which upsampler for a U-Net decoder? (mIoU, boundary F, cost, checkerboard) |
| `fcn-skips` | what do FCN's skips buy? FCN-32s / 16s / 8s (the FCN paper's Table 2) |
| `receptive-field` | patch classifier vs flat FCN vs U-Net: mIoU vs receptive field vs cost |

One module per experiment, each with `run(out: Path, options: ExperimentOptions) -> dict`.
This package imports no torch (the CLI lists the names cheaply); the modules do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixelwise.errors import UserError, unknown_name

# experiment name -> module implementing it
EXPERIMENTS: dict[str, str] = {
    "upsamplers": "pixelwise.experiments.upsamplers",
    "fcn-skips": "pixelwise.experiments.fcn_skips",
    "receptive-field": "pixelwise.experiments.receptive_field",
}


@dataclass(frozen=True)
class ExperimentOptions:
    """What a user may change; None means the experiment's default.

    budget_steps / budget_seconds: training budget per model (at most one; seconds are turned
    into steps from a measured step time, so every model gets the same wall time). size: image
    side in pixels; num: images synthesised (train + val); quick: a tiny run for tests.
    """

    size: int | None = None
    num: int | None = None
    seed: int = 0
    budget_steps: int | None = None
    budget_seconds: float | None = None
    quick: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.budget_steps is not None and self.budget_seconds is not None:
            raise UserError("give --budget-steps or --budget-seconds, not both")
        if self.budget_steps is not None and self.budget_steps < 1:
            raise UserError(f"--budget-steps must be >= 1, got {self.budget_steps}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise UserError(f"--budget-seconds must be > 0, got {self.budget_seconds}")
        if self.size is not None and self.size < 16:
            raise UserError(f"--size must be >= 16 pixels, got {self.size}")
        if self.num is not None and self.num < 5:
            raise UserError(f"--num must be >= 5 images (some go to val), got {self.num}")


def default_out(name: str) -> Path:
    """Where `pixelwise experiment NAME` writes by default: runs/experiments/NAME."""
    return Path("runs") / "experiments" / name


def run_experiment(name: str, out: str | Path | None = None,
                   options: ExperimentOptions | None = None) -> dict[str, Any]:
    """Run experiment `name`, write its report into `out`; return the report's JSON content."""
    if name not in EXPERIMENTS:
        raise unknown_name("experiment", name, EXPERIMENTS)
    module = importlib.import_module(EXPERIMENTS[name])
    return module.run(Path(out) if out is not None else default_out(name),
                      options or ExperimentOptions())


__all__ = ["EXPERIMENTS", "ExperimentOptions", "default_out", "run_experiment"]
