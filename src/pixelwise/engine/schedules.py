"""Learning-rate schedules with linear warm-up, as `torch.optim.lr_scheduler.LambdaLR` factors.

Step `t` of `T` (after the warm-up's `W` steps, `s = (t - W) / (T - W)`):

* `cosine`: `0.5 (1 + cos(pi s))`            (Loshchilov & Hutter, SGDR, without restarts)
* `poly`:   `(1 - s) ** power`, power 0.9    (the DeepLab schedule)

During warm-up the factor rises linearly: `(t + 1) / (W + 1)`, reaching 1 at `t = W`.
`TimedSchedule` is the same curve over the fraction of a wall-clock budget used instead of the
step count (`pixelwise train --time MINUTES`): the warm-up spans the budget's first 5 %, and the
factor reaches 0 when the time is up, however many steps that turns out to be.

The factor is a small callable object (not a lambda) so that `LambdaLR.state_dict()` holds its
settings as plain numbers, which the checkpoint stores as JSON.
"""

from __future__ import annotations

import math

import torch

from pixelwise.errors import unknown_name


class WarmupSchedule:
    """Multiplicative learning-rate factor at step `t` (0-based)."""

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, power: float = 0.9):
        if kind not in SCHEDULES:
            raise unknown_name("schedule", kind, SCHEDULES)
        self.kind = kind
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))
        self.power = float(power)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return SCHEDULES[self.kind](min(1.0, progress), self.power)


class TimedSchedule:
    """Multiplicative learning-rate factor at the fraction `progress` (0..1) of a time budget,
    which the trainer sets before each `scheduler.step()` (`LambdaLR` passes the step count,
    which is ignored). `progress` is a plain attribute, so it is saved with the scheduler."""

    def __init__(self, kind: str, warmup: float = 0.05, power: float = 0.9) -> None:
        if kind not in SCHEDULES:
            raise unknown_name("schedule", kind, SCHEDULES)
        self.kind = kind
        self.warmup = min(max(float(warmup), 0.0), 0.5)
        self.power = float(power)
        self.progress = 0.0

    def __call__(self, step: int) -> float:
        progress = min(max(self.progress, 0.0), 1.0)
        if progress < self.warmup:
            return progress / self.warmup
        decay = (progress - self.warmup) / (1.0 - self.warmup)
        return SCHEDULES[self.kind](decay, self.power)


def _cosine(progress: float, power: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _poly(progress: float, power: float) -> float:
    return (1.0 - progress) ** power


# name -> factor(progress in [0, 1], power) after the warm-up
SCHEDULES = {"cosine": _cosine, "poly": _poly}


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` stepping once per optimizer step with `WarmupSchedule(kind, ...)`."""
    schedule = WarmupSchedule(kind, total_steps, warmup_steps, power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def make_timed_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, power: float = 0.9
                         ) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` with a `TimedSchedule(kind)`: set `.lr_lambdas[0].progress` before each
    `step()`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, TimedSchedule(kind, power=power))
