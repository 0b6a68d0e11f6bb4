"""What the experiments (and the semantic demo) share: data, budgeted training, evaluation, timing.

* `SMALL_SCENE`: the scene options for small (64-128 px) teaching images;
* `make_data(root, ...)`: a seeded synthetic semantic dataset;
* `Budget` and `train_variant(...)`: train one model with the trainer on a budget of steps or of
  seconds (turned into steps from a measured step time, so the cosine schedule still ends at 0);
* `evaluate(model, data)`: `SemanticMetrics` + `BoundaryFScore` + the output checkerboard energy
  on a split, keeping a few predictions for figures;
* `inference_ms(...)`: best-of timing of one forward pass on one thread.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pixelwise.data.synthetic import SceneConfig, run_synthesis
from pixelwise.errors import UserError
from pixelwise.ops.labels import argmax_labels
from pixelwise.tasks.semantic import SemanticTask, logits_of

logger = logging.getLogger(__name__)

# Scenes for small images. The default `SceneConfig` is made for 256 px: its things are 5-20 % of
# the side, i.e. 3-13 px at 64 px, too small to tell an ellipse from a triangle. Here things are
# 12-35 % of the side; the tiny-ellipse crowd groups (sub-pixel at 64 px) are left out. Every
# class of the default scenes stays (sky, ground, water, person, ellipse, rectangle, triangle).
SMALL_SCENE = SceneConfig(thing_size=(0.12, 0.35), crowd_fraction=0.0)


def make_data(root: Path, *, size: int, num: int, seed: int,
              scene: SceneConfig = SMALL_SCENE, val_fraction: float = 0.2) -> Path:
    """Write `num` seeded synthetic semantic images of size x size under `root` (replacing the
    layout there; `val_fraction` of them in val); returns `root`."""
    summary = run_synthesis("semantic", root, num=num, size=(size, size), seed=seed,
                            val_fraction=val_fraction, overwrite=True, config=scene)
    logger.info("synthesised %d semantic images of %dx%d in %s (%s)", num, size, size, root,
                ", ".join(f"{s} {c['images']}" for s, c in summary.splits.items()))
    return root


def dataset_classes(root: Path) -> tuple[list[str], list[list[int]] | None]:
    """Class names and display colours (None: the default palette) of the semantic set at
    `root`, from its classes.json."""
    task = SemanticTask.from_data(root)
    return list(task.class_names), task.class_colors


@dataclass(frozen=True)
class Budget:
    """A training budget per model: `steps`, or `seconds` of training (turned into steps from a
    step time measured on this machine, just before training)."""

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.seconds is None):
            raise UserError("a budget is a number of steps or of seconds (exactly one)")

    def describe(self) -> str:
        return f"{self.steps} steps" if self.steps is not None else f"{self.seconds:g} s"


@dataclass(frozen=True)
class Variant:
    """One model of an experiment: a `pixelwise.models` name and its options."""

    name: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trained:
    """A trained model (on the CPU, in eval mode) and what its training cost."""

    model: nn.Module
    steps: int
    seconds: float  # training wall time (validation excluded when there was none)
    step_seconds: float | None  # measured before training (seconds budgets only)
    run: Path
    summary: dict[str, Any]


def median_frequency_weights(data: Path, split: str = "train", *, power: float = 1.0
                             ) -> list[float]:
    """Class weights by median frequency balancing (Eigen & Fergus 2015, used by SegNet):
    w_c = (median_k f_k / f_c) ** power, f_c = pixels of class c / pixels of the images where c
    appears (ignore excluded). Classes never seen get the largest weight of the others."""
    from pixelwise.data.images import read_label_png

    task = SemanticTask.from_data(data)
    k = task.num_classes
    pixels = torch.zeros(k, dtype=torch.float64)  # pixels of class c
    totals = torch.zeros(k, dtype=torch.float64)  # pixels of the images holding class c
    for _, mask_path in task.dataset(data, split).samples:
        labels = read_label_png(mask_path)
        valid = labels[labels != task.ignore_index] if task.ignore_index is not None else labels
        counts = torch.bincount(valid.flatten(), minlength=k)[:k].double()
        pixels += counts
        totals += (counts > 0).double() * valid.numel()
    seen = pixels > 0
    if not bool(seen.any()):
        raise UserError(f"{data}: no labelled pixels in split {split!r}")
    freq = torch.where(seen, pixels / totals.clamp(min=1), torch.zeros_like(pixels))
    weights = torch.where(seen, (freq[seen].median() / freq.clamp(min=1e-12)) ** power,
                          torch.zeros_like(freq))
    weights[~seen] = weights[seen].max()
    return [round(float(w), 4) for w in weights]


def first_batch(task: SemanticTask, dataset: Any, batch_size: int) -> Any:
    """The first `batch_size` samples of `dataset`, collated."""
    n = min(batch_size, len(dataset))
    return task.collate([dataset[i] for i in range(n)])


def measure_step_seconds(model: nn.Module, task: SemanticTask, batch: Any, *, lr: float,
                         repeats: int = 3, amp: bool = False) -> float:
    """Seconds per training step (forward, loss, backward, AdamW step) of a copy of `model` on
    `batch` (under CPU bfloat16 autocast with `amp`): the median of `repeats` steps after one
    warm-up step. `model` is not changed."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            total = sum(task.loss(probe, batch).values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_variant(
    variant: Variant,
    data: Path,
    run: Path,
    *,
    budget: Budget,
    batch_size: int,
    lr: float,
    loss: str = "ce+dice",
    class_weights: Sequence[float] | None = None,
    seed: int = 0,
    validate: bool = False,
    validations: int = 1,
    min_steps: int = 1,
    max_steps: int | None = None,
    progress: bool = False,
    overwrite: bool = True,
    amp: bool = False,
) -> Trained:
    """Train `variant` on `data` (its train split; val too when `validate`) into `run`.

    The cosine schedule spans ceil(steps / steps per epoch) epochs and training stops at `steps`,
    so the learning rate has (nearly) reached 0 when the budget ends. A seconds budget becomes
    `seconds / step time` steps, clamped to [min_steps, max_steps]. With `validate`, the val split
    is evaluated about `validations` times (every epochs / validations epochs, and at the end).
    amp: bfloat16 autocast on the CPU (`TrainConfig.amp`).
    """
    from pixelwise.engine.config import TrainConfig
    from pixelwise.engine.seed import seed_everything
    from pixelwise.engine.trainer import Trainer
    from pixelwise.models import build_model

    task = SemanticTask.from_data(data, loss=loss, class_weights=class_weights)
    train_set = task.dataset(data, "train", train=True)
    val_set = task.dataset(data, "val") if validate else None
    options = dict(variant.options)
    options.setdefault("in_channels", int(train_set[0][0].shape[0]))
    seed_everything(seed)
    model = build_model(variant.model, num_classes=task.num_classes, **options)
    step_seconds = None
    if budget.steps is not None:
        steps = budget.steps
    else:
        step_seconds = measure_step_seconds(model, task, first_batch(task, train_set, batch_size),
                                            lr=lr, amp=amp)
        steps = max(min_steps, int(budget.seconds / step_seconds))
        if max_steps is not None:
            steps = min(steps, max_steps)
        logger.info("%s: %.3f s per step of %d images -> %d steps in %g s", variant.name,
                    step_seconds, batch_size, steps, budget.seconds)
    steps_per_epoch = max(1, len(train_set) // batch_size)
    epochs = math.ceil(steps / steps_per_epoch)
    cfg = TrainConfig(
        data=str(data), out=str(run), task="semantic", model=variant.model,
        model_options=options, loss=loss,
        class_weights=list(class_weights) if class_weights is not None else None,
        epochs=epochs, batch_size=batch_size, lr=lr, max_steps=steps, seed=seed,
        progress=progress, amp=amp,
        val_every=max(1, epochs // max(1, validations)),
    )  # fmt: skip
    summary = Trainer(cfg, model, task, train_set, val_set).fit(overwrite=overwrite)
    logger.info("%s: %d steps in %.1f s", variant.name, summary["steps"], summary["seconds"])
    # the trainer leaves the model on its device (a GPU where present); the experiments evaluate
    # and time it on the CPU
    return Trained(model=model.cpu().eval(), steps=int(summary["steps"]),
                   seconds=float(summary["seconds"]), step_seconds=step_seconds, run=run,
                   summary=summary)


def output_checkerboard(logits: torch.Tensor) -> float:
    """Share of the energy of the logits (N, K, H, W) (each map's mean removed) at the period-2
    frequencies (the Nyquist row and column of the 2-D spectrum): where the checkerboard of an
    uneven upsampler lives. A smooth map scores near 0, a pure checkerboard 1."""
    h, w = logits.shape[-2:]
    x = logits.double() - logits.double().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2  # (N, K, H, W)
    total = float(power.sum())
    if total == 0.0:
        return 0.0
    nyquist = torch.zeros(h, w, dtype=torch.bool)
    if h % 2 == 0:
        nyquist[h // 2, :] = True
    if w % 2 == 0:
        nyquist[:, w // 2] = True
    return float(power[..., nyquist].sum()) / total


@dataclass
class Evaluation:
    """Metrics of one model on one split, and its predictions of the `keep` images."""

    metrics: dict[str, Any]
    examples: list[dict[str, np.ndarray]]  # {"image" (H, W, 3) uint8, "target", "pred" (H, W)}


def _display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    rgb = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]  # gray -> 3 channels
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)


@torch.inference_mode()
def evaluate(model: nn.Module, data: Path, *, split: str = "val", batch_size: int = 8,
             keep: Sequence[int] = (), tolerance: int = 2) -> Evaluation:
    """SemanticMetrics (miou, pixel_accuracy, mean_accuracy, fw_iou, dice, per_class), the
    boundary F-score (`boundary_f`, `tolerance` px) and `output_checkerboard` of `model` on
    `split` of `data`; the images, targets and predictions of the indices in `keep`."""
    from pixelwise.metrics.boundary import BoundaryFScore
    from pixelwise.metrics.semantic import SemanticMetrics

    task = SemanticTask.from_data(data)
    dataset = task.dataset(data, split)
    metrics = SemanticMetrics(task.num_classes, ignore_index=task.ignore_index,
                              class_names=task.class_names)
    boundary = BoundaryFScore(task.num_classes, tolerance=tolerance,
                              ignore_index=task.ignore_index, class_names=task.class_names)
    was_training = model.training
    model.eval()
    energy, count = 0.0, 0
    examples: list[dict[str, np.ndarray]] = []
    wanted = set(keep)
    try:
        for first in range(0, len(dataset), batch_size):
            indices = range(first, min(first + batch_size, len(dataset)))
            images, targets = task.collate([dataset[i] for i in indices])
            logits = logits_of(model(images)).float()  # (N, K, H, W)
            pred = argmax_labels(logits, 1)  # (N, H, W)
            metrics.update(pred, targets)
            boundary.update(pred, targets)
            energy += output_checkerboard(logits) * len(indices)
            count += len(indices)
            for row, i in enumerate(indices):
                if i in wanted:
                    examples.append({"image": _display(images[row]),
                                     "target": targets[row].numpy().astype(np.uint8),
                                     "pred": pred[row].numpy().astype(np.uint8)})
    finally:
        model.train(was_training)
    scores = metrics.compute()
    scores["boundary_f"] = boundary.compute()["boundary_f"]
    scores["output_checkerboard"] = energy / count if count else None
    return Evaluation(metrics=scores, examples=examples)


@torch.inference_mode()
def inference_ms(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, *,
                 budget_s: float = 0.3, repeats: int = 3, max_calls: int = 200) -> float:
    """Milliseconds of `forward(x)` on one CPU thread: the best of at least `repeats` calls and
    `budget_s` seconds, after one warm-up call. One thread and the best time, because on a shared
    machine other processes only ever add time (and two threads preempted at random stop rows
    from comparing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forward(x)
        times: list[float] = []
        while len(times) < max_calls and (len(times) < repeats or sum(times) < budget_s):
            start = time.perf_counter()
            forward(x)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return min(times) * 1e3


def model_cost(model: nn.Module, size: int) -> dict[str, Any]:
    """Parameters, FLOPs per image at size x size, receptive field and output stride."""
    from pixelwise.models.info import model_info

    info = model_info(model, (size, size))
    return {"params": info["parameters"], "flops": info["flops"],
            "receptive_field": info["receptive_field"], "output_stride": info["output_stride"]}


def score_variant(variant: Variant, data: Path, work: Path, *, size: int, budget: Budget,
                  batch_size: int, lr: float, loss: str, seed: int,
                  keep: Sequence[int] = (), timing_s: float = 0.3
                  ) -> tuple[dict[str, Any], list[dict[str, np.ndarray]], Trained]:
    """Train `variant` on `data` (run folder `work / variant.name`), evaluate it on val and
    measure its cost. Returns (row, examples, trained): the row holds name, model, options,
    the semantic metrics (miou, pixel_accuracy, mean_accuracy, fw_iou, dice, boundary_f,
    output_checkerboard, per_class_iou), params, flops, receptive_field, output_stride,
    ms_per_image (size x size, one thread, float32, best of calls over `timing_s` seconds),
    train_seconds and steps. Training uses bfloat16 autocast where the CPU has native bf16."""
    from pixelwise.engine.trainer import native_bf16

    trained = train_variant(variant, data, work / variant.name, budget=budget,
                            batch_size=batch_size, lr=lr, loss=loss, seed=seed,
                            amp=native_bf16())
    result = evaluate(trained.model, data, keep=keep)
    m = result.metrics
    x = torch.rand(1, int(getattr(trained.model, "in_channels", 3)), size, size)
    row = {
        "name": variant.name,
        "model": variant.model,
        "options": dict(variant.options),
        **{k: m[k] for k in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "dice",
                             "boundary_f", "output_checkerboard")},
        **model_cost(trained.model, size),
        "ms_per_image": inference_ms(trained.model, x, budget_s=timing_s),
        "train_seconds": trained.seconds,
        "steps": trained.steps,
        "per_class_iou": {k: v["iou"] for k, v in m["per_class"].items()},
    }
    logger.info("%s: mIoU %.3f, boundary F %s, %.2f ms/image", variant.name, m["miou"],
                "-" if m["boundary_f"] is None else f"{m['boundary_f']:.3f}", row["ms_per_image"])
    return row, result.examples, trained


def resolve_budget(steps: int | None, seconds: float | None, default_steps: int) -> Budget:
    """The budget the options ask for (seconds, else steps, else the experiment's default)."""
    if seconds is not None:
        return Budget(seconds=seconds)
    return Budget(steps=steps if steps is not None else default_steps)


def setting_dict(*, size: int, num: int, seed: int, budget: Budget, batch_size: int, lr: float,
                 loss: str, scene: SceneConfig = SMALL_SCENE, **extra: Any) -> dict[str, Any]:
    """The shared settings of an experiment, JSON-ready (for the report)."""
    from dataclasses import asdict

    return {"size": size, "num": num, "seed": seed, "budget": budget.describe(),
            "budget_steps": budget.steps, "budget_seconds": budget.seconds,
            "batch_size": batch_size, "lr": lr, "loss": loss, "optimizer": "adamw",
            "schedule": "cosine", "scene": asdict(scene), "threads": torch.get_num_threads(),
            **extra}
