"""Training machinery shared by every task: the trainer, checkpoints, schedules, DDP, seeds.

* `TrainConfig` (config.py), `train(cfg)` and `Trainer` (trainer.py);
* `save_checkpoint` / `load_checkpoint` / `load_model` (checkpoint.py; safetensors + JSON);
* `SCHEDULES`, `make_scheduler` (schedules.py); `plot_curves` (curves.py);
* `distributed.setup` / `all_reduce_sum` (distributed.py); `seed_everything` (seed.py).

Names are imported lazily, so that `from pixelwise.engine.config import TrainConfig` does not load
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "pixelwise.engine.config",
    "Trainer": "pixelwise.engine.trainer",
    "train": "pixelwise.engine.trainer",
    "NonFiniteLossError": "pixelwise.engine.trainer",
    "OPTIMIZERS": "pixelwise.engine.trainer",
    "save_checkpoint": "pixelwise.engine.checkpoint",
    "load_checkpoint": "pixelwise.engine.checkpoint",
    "load_model": "pixelwise.engine.checkpoint",
    "find_checkpoint": "pixelwise.engine.checkpoint",
    "read_meta": "pixelwise.engine.checkpoint",
    "SCHEDULES": "pixelwise.engine.schedules",
    "make_scheduler": "pixelwise.engine.schedules",
    "plot_curves": "pixelwise.engine.curves",
    "seed_everything": "pixelwise.engine.seed",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pixelwise.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
