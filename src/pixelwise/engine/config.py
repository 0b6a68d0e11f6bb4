"""`TrainConfig`: every choice of a training run, in one plain dataclass (no torch here).

The config stops at the builder (`pixelwise.engine.trainer.train`): the model, task, optimizer,
schedule and loaders below it receive explicit keyword arguments. It is stored as JSON in
`RUN/config.json` and in every checkpoint, so a run can be resumed, evaluated and used for
prediction without the command that started it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pixelwise.errors import UserError

OPTIMIZER_NAMES = ("adamw", "sgd")  # built in pixelwise.engine.trainer.OPTIMIZERS
SCHEDULE_NAMES = ("cosine", "poly")  # built in pixelwise.engine.schedules.SCHEDULES
# tasks whose random scale and photometric jitter `scale_jitter` / `color_jitter` set
# (`pixelwise.tasks.instance.InstanceTask`'s scale and jitter)
JITTERED_TASKS = ("instance", "keypoints")
NO_SCALE = (1.0, 1.0)  # their `scale_jitter` for no random scale (the task's scale None)


@dataclass
class TrainConfig:
    """One training run.

    `batch_size` is the global batch: under DDP each of the N processes loads `batch_size / N`
    images per step, so a run gives the same schedule whatever the number of processes.
    `max_steps` only stops early: the learning-rate schedule still spans `epochs`, so a run cut
    short and resumed follows the same curve as one that never stopped.
    """

    data: str | None = None  # dataset root (layout of pixelwise.data)
    out: str = "runs/train"  # the RUN directory
    task: str = "semantic"
    model: str = "unet"
    model_options: dict[str, Any] = field(default_factory=dict)  # passed to build_model as kwargs
    loss: str | None = None  # task's default when None (semantic: "ce")
    class_weights: list[float] | None = None
    # semantic: "image" (the task's default when None): the loss on logits at the labels'
    # resolution; "net": a coarse model (`unet` input_scale 1/k) on its own logits against each
    # k x k block's label counts (pixelwise.tasks.semantic)
    loss_at: str | None = None
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4  # not applied to biases and normalisation weights
    schedule: str = "cosine"
    warmup_steps: int | None = None  # None: 5% of the total steps
    power: float = 0.9  # poly only
    size: tuple[int, int] | None = None  # (H, W) every image is resized to; None: as stored
    # (H, W) random crop of every training image, after `size` (semantic task; a smaller image is
    # padded with the ignore label); validation sees whole images. None: no crop
    crop: tuple[int, int] | None = None
    # probability that a crop is centred on a pixel of a class drawn uniformly among the image's
    # classes (oversamples rare classes; needs crop). 0: plain random crops
    crop_balance: float = 0.0
    # augmentation beyond the horizontal flip: a random rescale by a factor in (low, high)
    # (semantic: cut back to `crop` or `size`); a random rotation within +-`rotate` degrees
    # (semantic); photometric jitter of this strength. None: the task's default (semantic:
    # none; instance and keypoints: scale (0.75, 1.25), jitter 0.2; scale (1, 1) turns it off)
    scale_jitter: tuple[float, float] | None = None
    rotate: float = 0.0
    color_jitter: float | None = None
    # probability that a training image gets the pixels of some classes of another one pasted
    # on (ClassMix: a random half of that image's classes, or every class in `mix_classes`)
    class_mix: float = 0.0
    mix_classes: tuple[str, ...] | None = None
    mix_turn: bool = False  # the pasted image turned by a random symmetry of the square
    cache: bool = False  # keep the decoded training / validation files in memory (semantic)
    # probability that a training image gets some objects of another one pasted on (Simple
    # Copy-Paste; instance task; pixelwise.data.copy_paste)
    copy_paste: float = 0.0
    # mixed precision: None = on for CUDA (float16 + GradScaler), off on CPU; True = on, on a CPU
    # with bfloat16 (steps 1.5-1.8x faster where the CPU has native bf16: AVX512-BF16, AMX);
    # False = off
    amp: bool | None = None
    clip_grad: float | None = None  # max global gradient norm
    # convolution weights (and so activations) in channels_last memory format: 1.2x faster
    # U-Net steps on a CPU with oneDNN (benchmarks/train_step.py)
    channels_last: bool = False
    # decay of an exponential moving average of the weights (e.g. 0.999; pixelwise.engine.ema),
    # which is then what is validated and saved as the model. None: no average
    ema: float | None = None
    seed: int = 0
    deterministic: bool = False
    max_steps: int | None = None
    # minutes of wall time (training + validation) instead of a number of epochs: the schedule
    # runs over the fraction of this budget used and training stops when it is used up
    time_budget: float | None = None
    workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    val_every: int = 1  # epochs between validations
    progress: bool = True  # tqdm bar on stderr (rank 0)
    skip_bad: bool = False  # log and skip bad samples (pixelwise.data.check) instead of stopping

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
        if self.crop is not None:
            self.crop = (int(self.crop[0]), int(self.crop[1]))
        if self.scale_jitter is not None:
            if len(self.scale_jitter) != 2:
                raise UserError(f"scale_jitter takes two factors LOW,HIGH, got "
                                f"{list(self.scale_jitter)}")
            self.scale_jitter = (float(self.scale_jitter[0]), float(self.scale_jitter[1]))
        if self.class_weights is not None:
            self.class_weights = [float(w) for w in self.class_weights]
        if self.mix_classes is not None:
            self.mix_classes = tuple(str(name) for name in self.mix_classes)
        self.model_options = dict(self.model_options)
        self.validate()

    def validate(self) -> None:
        """Raise `UserError` naming the first impossible value."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size,
                    "val_every": self.val_every}
        for name, value in positive.items():
            if int(value) < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise UserError(f"time_budget must be > 0 minutes, got {self.time_budget}")
        if self.time_budget is not None and self.warmup_steps is not None:
            raise UserError("warmup_steps cannot be combined with a time budget (the warm-up is "
                            "then the budget's first 5 %)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.workers < 0:
            raise UserError(f"workers must be >= 0, got {self.workers}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise UserError(f"clip_grad must be > 0, got {self.clip_grad}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise UserError(f"ema must be a decay in (0, 1), e.g. 0.999, got {self.ema}")
        if self.size is not None and min(self.size) < 1:
            raise UserError(f"size must be positive, got {self.size[0]}x{self.size[1]}")
        if self.crop is not None and min(self.crop) < 1:
            raise UserError(f"crop must be positive, got {self.crop[0]}x{self.crop[1]}")
        if self.crop is not None and self.task != "semantic":
            raise UserError(f"crop is for the semantic task, not {self.task!r}")
        if self.loss_at is not None and self.task != "semantic":
            raise UserError(f"loss_at is for the semantic task, not {self.task!r}")
        if not 0.0 <= self.crop_balance <= 1.0:
            raise UserError(f"crop_balance must be in [0, 1], got {self.crop_balance}")
        if self.crop_balance > 0 and self.crop is None:
            raise UserError("crop_balance needs a crop (--crop HxW)")
        # the instance and keypoint tasks take the random scale and the photometric jitter
        jitters = self.task in JITTERED_TASKS
        augment = {"scale_jitter": self.scale_jitter is not None and not jitters,
                   "rotate": self.rotate != 0,
                   "color_jitter": bool(self.color_jitter) and not jitters,
                   "class_mix": self.class_mix != 0, "cache": self.cache}
        used = [name for name, on in augment.items() if on]
        if used and self.task != "semantic":
            raise UserError(f"{', '.join(used)} is for the semantic task, not {self.task!r} (the "
                            "other tasks read and augment their data by their own settings)")
        if self.scale_jitter is not None and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise UserError(f"scale_jitter must satisfy 0 < low <= high, got {self.scale_jitter}")
        if (self.scale_jitter is not None and self.task == "semantic" and self.crop is None
                and self.size is None):
            raise UserError("scale_jitter needs --crop or --size to cut the rescaled images back "
                            "to (one size per batch)")
        if not 0 <= self.rotate <= 180:
            raise UserError(f"rotate must be in [0, 180] degrees, got {self.rotate}")
        if self.color_jitter is not None and not 0 <= self.color_jitter <= 1:
            raise UserError(f"color_jitter must be in [0, 1], got {self.color_jitter}")
        if not 0 <= self.copy_paste <= 1:
            raise UserError(f"copy_paste must be in [0, 1], got {self.copy_paste}")
        if self.copy_paste and self.task != "instance":
            raise UserError(f"copy_paste is for the instance task (objects with masks), not "
                            f"{self.task!r}")
        if not 0 <= self.class_mix <= 1:
            raise UserError(f"class_mix must be in [0, 1], got {self.class_mix}")
        if self.mix_classes is not None and self.class_mix == 0:
            raise UserError("mix_classes needs class_mix > 0 (--class-mix P)")
        if self.mix_turn and self.class_mix == 0:
            raise UserError("mix_turn needs class_mix > 0 (--class-mix P)")
        if self.optimizer not in OPTIMIZER_NAMES:
            from pixelwise.errors import unknown_name

            raise unknown_name("optimizer", self.optimizer, OPTIMIZER_NAMES)
        if self.schedule not in SCHEDULE_NAMES:
            from pixelwise.errors import unknown_name

            raise unknown_name("schedule", self.schedule, SCHEDULE_NAMES)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for name in ("size", "crop", "scale_jitter", "mix_classes"):
            if out[name] is not None:
                out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
