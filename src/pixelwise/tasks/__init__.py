"""Tasks: what a model is trained to do, in the terms the task-agnostic trainer needs.

A task object provides (see `SemanticTask` for the reference implementation):

* `name`, `num_classes` (what the model is built with), `best_metric` (a key of `evaluate`'s
  result, higher is better, or None: then the `best` checkpoint is not kept);
* `config() -> dict`: JSON settings; `build_task(config)` rebuilds the task;
* `from_data(root, **options)` (classmethod): the task for a dataset folder;
  `check_data(root)`: a one-line `UserError` when a dataset does not fit the task (e.g. another
  number of classes than the checkpoint's);
* `dataset(root, split, *, size, train) -> Dataset` and `collate(samples) -> batch`;
* `to_device(batch, device) -> batch` and `num_images(batch) -> int`;
* `loss(model, batch) -> dict[str, Tensor]`: the scalar loss terms (summed by the trainer,
  logged one by one) — R-CNN models compute this dict themselves in training mode;
* `evaluate(model, batches, *, device, amp) -> dict`: metrics over this rank's batches, reduced
  over all DDP ranks (`pixelwise.engine.distributed.all_reduce_sum` / `all_gather_objects`);
* optionally `find_unused_parameters = True` for models that skip parameters in some steps (DDP).
"""

from __future__ import annotations

from typing import Any

from pixelwise.errors import UserError, unknown_name
from pixelwise.tasks.instance import InstanceTask, KeypointTask
from pixelwise.tasks.panoptic import PanopticTask
from pixelwise.tasks.semantic import SemanticTask

TASKS: dict[str, type] = {"semantic": SemanticTask, "panoptic": PanopticTask,
                          "instance": InstanceTask, "keypoints": KeypointTask}


def build_task(config: dict[str, Any]) -> Any:
    """Rebuild a task from its `config()` (as stored in checkpoints)."""
    settings = dict(config)
    name = settings.pop("name", None)
    if name not in TASKS:
        raise unknown_name("task", name, TASKS)
    try:
        return TASKS[name](**settings)
    except TypeError as exc:
        raise UserError(f"task {name!r}: bad settings ({exc})") from None
