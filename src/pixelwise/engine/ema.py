"""An exponential moving average of a model's weights (``--ema DECAY``).

After every optimizer step each floating-point parameter and buffer (batch-norm statistics
included) of the average moves towards the model's: ``w_ema <- d w_ema + (1 - d) w``. The decay
warms up as in TensorFlow's `ExponentialMovingAverage(num_updates=...)` and timm's `ModelEma`,
``d_n = min(decay, (1 + n) / (10 + n))`` after `n` updates, so that a short run's average is not
dominated by its random initialisation. Integer buffers (batch-norm's `num_batches_tracked`) are
copied. The trainer validates and checkpoints the average: the weights of the last steps of a
noisy run, averaged, usually generalise better than the last step's (Polyak averaging).

`torch.optim.swa_utils.AveragedModel` keeps the copy and walks parameters and buffers; only the
update rule with the warm-up is ours (its `get_ema_multi_avg_fn` has a fixed decay).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the update that follows `updates` earlier ones (the first, a copy, counts):
    the warm-up ``min(decay, (1 + updates) / (10 + updates))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """The exponential moving average of `model`'s weights (a copy on the model's device).

    Args:
        model: the model being trained (not a DDP wrapper: its parameters are the same on
            every rank, so every rank keeps the same average).
        decay: the decay after the warm-up, in (0, 1); e.g. 0.999 averages over about the last
            1000 steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._averaged = AveragedModel(model, multi_avg_fn=self._blend, use_buffers=True)
        self._averaged.eval().requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model (eval mode; the same class as the trained one)."""
        return self._averaged.module

    @property
    def updates(self) -> int:
        """How many steps have been averaged in (the first one copies the weights)."""
        return int(self._averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in `model`'s current weights (call after each optimizer step)."""
        self._averaged.update_parameters(model)

    @torch.no_grad()
    def _blend(self, averaged: list[torch.Tensor], current: list[torch.Tensor],
               updates: torch.Tensor) -> None:
        # AveragedModel calls this per (device, dtype) group with the count of earlier updates
        # (>= 1: the first update copies the weights, and counts)
        if not (averaged[0].is_floating_point() or averaged[0].is_complex()):
            torch._foreach_copy_(averaged, current)  # counters: the model's value
            return
        weight = 1.0 - ema_decay(self.decay, int(updates))
        torch._foreach_lerp_(averaged, current, weight)

    def load(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Restore an average (`module.state_dict()`) saved after `updates` updates (resume)."""
        self.module.load_state_dict(weights)
        self._averaged.n_averaged.fill_(int(updates))
