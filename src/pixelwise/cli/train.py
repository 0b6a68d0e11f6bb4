"""`pixelwise train`: train a model on a dataset folder, writing a run directory.

    pixelwise train --task semantic --model unet --upsample bilinear --data DIR --out RUN
    pixelwise train --out RUN --resume [--epochs N] [--max-steps N] [--time MINUTES]
    torchrun --nproc_per_node=2 -m pixelwise train ...          (DDP; --batch-size is global)

Model options keep their builder's names (`--upsample` -> `upsample`, `--encoder`, `--depth`,
...; see `pixelwise models`). No torch import at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pixelwise.cli._common import add_json_flag, emit_json, parse_floats
from pixelwise.cli.models import add_model_options, model_options_from_args
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

# settings a resumed run may change (the others would make it a different run)
RESUME_OVERRIDES = ("epochs", "max_steps", "time_budget", "workers", "device", "progress", "data",
                    "skip_bad", "cache")


def parse_size(text: str) -> tuple[int, int]:
    """'256x192' -> (256, 192); '256' -> (256, 256)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 256x256) or one size, got {text!r}")
    return parts[0], parts[1]


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# (flag, TrainConfig field, type, help); every default is the TrainConfig's (None = not given)
TRAIN_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--task", "task", str, "semantic (default), instance, keypoints, panoptic"),
    ("--model", "model", str, "model name (see `pixelwise models`; default unet)"),
    ("--data", "data", str, "dataset folder (pixelwise layout; see `pixelwise data`)"),
    ("--epochs", "epochs", int, "epochs (default 20)"),
    ("--batch-size", "batch_size", int, "global batch size, split over DDP processes (default 8)"),
    ("--lr", "lr", float, "peak learning rate (default 1e-3)"),
    ("--optimizer", "optimizer", str, "adamw (default) or sgd"),
    ("--momentum", "momentum", float, "sgd momentum (default 0.9)"),
    ("--weight-decay", "weight_decay", float, "weight decay, not on biases/norms (default 1e-4)"),
    ("--schedule", "schedule", str, "cosine (default) or poly, after a linear warm-up"),
    ("--warmup-steps", "warmup_steps", int, "warm-up steps (default 5%% of all steps)"),
    ("--power", "power", float, "poly schedule power (default 0.9)"),
    ("--loss", "loss", str, "loss terms joined by +: ce, dice, focal (e.g. ce+dice; default ce)"),
    ("--class-weights", "class_weights", parse_floats, "comma-separated weight per class"),
    ("--loss-at", "loss_at", str, "image (default): the loss at the labels' resolution; net: a "
                                  "model run at --input-scale 1/k (unet) trained on its own "
                                  "logits against each k x k block's label counts "
                                  "(semantic)"),
    ("--size", "size", parse_size, "resize every image to HxW (default: as stored)"),
    ("--crop", "crop", parse_size, "train on random HxW crops, after --size (semantic; smaller "
                                   "images padded with ignore; validation on whole images)"),
    ("--crop-balance", "crop_balance", float, "probability that a crop is centred on a pixel of "
                                              "a class drawn uniformly among the image's classes "
                                              "(oversamples rare classes; default 0)"),
    ("--scale-jitter", "scale_jitter", parse_floats, "LOW,HIGH: rescale training images by a "
                                                     "random factor (semantic: cut back to "
                                                     "--crop or --size; instance, keypoints: "
                                                     "default 0.75,1.25, 1,1 for none)"),
    ("--rotate", "rotate", float, "rotate training images by a random angle within +-DEG "
                                  "(semantic; corners ignored)"),
    ("--color-jitter", "color_jitter", float, "brightness/contrast/saturation jitter strength, "
                                              "hue a quarter of it (semantic: default 0; "
                                              "instance, keypoints: default 0.2)"),
    ("--class-mix", "class_mix", float, "probability that a training image gets the pixels of a "
                                        "random half of another one's classes pasted on "
                                        "(ClassMix; semantic; e.g. 0.5)"),
    ("--mix-classes", "mix_classes", _names, "comma-separated class names: --class-mix pastes "
                                             "all of these instead (copy-paste of things)"),
    ("--copy-paste", "copy_paste", float, "probability that a training image gets some objects "
                                          "of another one pasted on (Simple Copy-Paste; "
                                          "instance task; e.g. 0.5)"),
    ("--clip-grad", "clip_grad", float, "clip the gradient norm to this value"),
    ("--ema", "ema", float, "validate and save an exponential moving average of the weights "
                            "with this decay (e.g. 0.999; warmed up over the first steps)"),
    ("--seed", "seed", int, "random seed (default 0)"),
    ("--max-steps", "max_steps", int, "stop after this many steps (the schedule still spans "
                                      "--epochs)"),
    ("--time", "time_budget", float, "train for this many minutes of wall time, validation "
                                     "included, instead of --epochs (the schedule follows the "
                                     "time used)"),
    ("--workers", "workers", int, "DataLoader worker processes (default 0)"),
    ("--device", "device", str, "auto (default), cpu, cuda, cuda:N"),
    ("--val-every", "val_every", int, "validate every N epochs (default 1)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model (checkpoints, metrics.jsonl and curves.png in --out)",
        description="Train a model on a dataset folder. RUN gets config.json, metrics.jsonl "
        "(one record per epoch), curves.png and the checkpoints last.safetensors and "
        "best.safetensors. Under `torchrun --nproc_per_node=N -m pixelwise train ...` it trains "
        "with DDP (NCCL on GPUs, gloo on CPU).",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run directory")
    for flag, dest, typ, help_text in TRAIN_FLAGS:
        parser.add_argument(flag, dest=dest, type=typ, default=None, help=help_text)
    parser.add_argument("--amp", dest="amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision: float16 on CUDA (on by default), bfloat16 on a "
                        "CPU (off by default; 1.5-1.8x faster steps on CPUs with AVX512-BF16 "
                        "or AMX)")
    parser.add_argument("--channels-last", dest="channels_last",
                        action=argparse.BooleanOptionalAction, default=None,
                        help="convolution weights in channels_last memory format (1.2x faster "
                        "U-Net steps on a CPU with oneDNN)")
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="deterministic algorithms (exact resume; slower on GPU)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bar")
    parser.add_argument("--skip-bad", dest="skip_bad", action="store_true", default=None,
                        help="log and skip bad samples (those `pixelwise data check` reports) "
                        "instead of stopping at the first")
    parser.add_argument("--mix-turn", dest="mix_turn", action="store_true", default=None,
                        help="--class-mix turns the pasted image by a random multiple of 90 "
                        "degrees, mirrored or not (for classes without a direction)")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the decoded images and masks in memory after their first read "
                        "(semantic; uint8 images: H x W x (C + 1) bytes each, per worker)")
    parser.add_argument("--resume", action="store_true",
                        help="continue RUN from its last checkpoint with its saved settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run files of an existing RUN")
    add_model_options(parser)
    add_json_flag(parser)
    parser.set_defaults(func=run)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    names = [dest for _, dest, _, _ in TRAIN_FLAGS] + ["amp", "deterministic", "progress",
                                                      "skip_bad", "cache", "mix_turn",
                                                      "channels_last"]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def build_config(args: argparse.Namespace) -> Any:
    """The `TrainConfig` of the command line (with `--resume`: the run's saved one, with only
    the settings of RESUME_OVERRIDES changed)."""
    from pixelwise.engine.config import TrainConfig

    given = _given(args)
    options = model_options_from_args(args)
    if not args.resume:
        return with_task_model_options(
            TrainConfig(out=str(args.out), model_options=options, **given))
    saved_path = args.out / "config.json"
    try:
        run_config = json.loads(saved_path.read_text())
        saved = _with_task_augmentation(run_config["train"], run_config.get("task"))
    except FileNotFoundError:
        raise UserError(f"{args.out}: nothing to resume (no config.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{saved_path}: not a run configuration ({exc})") from None
    cfg = TrainConfig.from_dict(saved)
    refused = sorted(k for k, v in given.items()
                     if k not in RESUME_OVERRIDES and v != getattr(cfg, k))
    if options and options != {k: cfg.model_options.get(k) for k in options}:
        refused.append("model options")
    if "time_budget" in given and cfg.time_budget is None:
        refused.append("time_budget (the run counts epochs, not time)")
    if refused:
        raise UserError(f"--resume continues the saved run; it cannot change {', '.join(refused)} "
                        f"(only {', '.join(RESUME_OVERRIDES)})")
    changes = {k: v for k, v in given.items() if k in RESUME_OVERRIDES}
    return dataclasses.replace(cfg, out=str(args.out), **changes)


def _with_task_augmentation(train: dict[str, Any], task: dict[str, Any] | None
                            ) -> dict[str, Any]:
    """A saved instance / keypoint run's training settings with the random scale and colour
    jitter its task used (`config.json`'s task section), so that a resumed run augments as it
    did, also when it was saved before `scale_jitter` / `color_jitter` reached these tasks."""
    from pixelwise.engine.config import JITTERED_TASKS, NO_SCALE

    if train.get("task") not in JITTERED_TASKS or not isinstance(task, dict):
        return train
    if "scale" not in task or "jitter" not in task:
        return train
    return {**train, "scale_jitter": task["scale"] or list(NO_SCALE),
            "color_jitter": task["jitter"]}


def with_task_model_options(cfg: Any) -> Any:
    """`cfg` plus the model options its data decides (a task's `model_options(model)`, e.g.
    keypoint_rcnn's keypoint schema), where the command line did not give them."""
    from pixelwise.tasks import TASKS

    task_cls = TASKS.get(cfg.task)
    if cfg.data is None or task_cls is None or not hasattr(task_cls, "model_options"):
        return cfg
    decided = task_cls.from_data(cfg.data).model_options(cfg.model)
    extra = {k: v for k, v in decided.items() if k not in cfg.model_options}
    return cfg.replace(model_options={**cfg.model_options, **extra}) if extra else cfg


def run(args: argparse.Namespace) -> int:
    from pixelwise.engine.trainer import NonFiniteLossError, train

    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if int(os.environ.get("RANK", "0")) > 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports for all processes
    cfg = build_config(args)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except NonFiniteLossError as exc:
        print(f"pixelwise: error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) > 0:
        return 0
    if args.json:
        emit_json(summary)
        return 0
    out = Path(summary["out"])
    speed = summary["images_per_second"]
    print(f"trained {summary['steps']} steps ({summary['images']} images) in "
          f"{summary['seconds']:.1f} s" + (f", {speed:.1f} img/s" if speed else ""))
    if summary["best"] is not None:
        print(f"best val {summary['best_metric']} {summary['best']:.4f} at step "
              f"{summary['best_step']}")
    for name in ("best.safetensors", "last.safetensors", "metrics.jsonl", "curves.png"):
        if (out / name).exists():
            print(f"  {out / name}")
    return 0
