"""The task-agnostic training loop.

`train(cfg)` is the builder: it reads a `TrainConfig`, builds the task, datasets and model, and
runs a `Trainer`. The `Trainer` takes finished objects (a model, a task, datasets) and knows
nothing about segmentation: each step it asks the task for a dict of scalar loss terms, sums
them, steps the optimizer and schedule, and logs each term. Per epoch it evaluates (the task's
metrics, reduced over DDP ranks), appends a record to `RUN/metrics.jsonl`, redraws
`RUN/curves.png` and writes the `last` (and, when the task's `best_metric` improves, `best`)
checkpoints. See `pixelwise.engine.checkpoint` for the file format. With `cfg.ema` a moving
average of the weights (`pixelwise.engine.ema`) is updated after every step, and it is the
average that is validated and saved as the model.

Exact resume: the sample order is a function of (seed, epoch), augmentation of (seed, epoch,
index), and the model/optimizer/scheduler/scaler/RNG states are saved, so `N/2` steps, a resume
and `N/2` more give the same parameters, bit for bit, as `N` steps (deterministic mode, CPU).

Time budgets (`cfg.time_budget`, minutes): the schedule is a `TimedSchedule` over the fraction
of the budget used (training and validation; the mean over DDP ranks, so every rank sets the
same learning rate) and training stops when one more step plus a validation as long as the last
would not fit. The clock is saved with the run, so resume continues it; the step count then
depends on the machine's speed, so such runs are not bit-reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from pixelwise.atomic import write_json, write_text
from pixelwise.engine import distributed
from pixelwise.engine.checkpoint import load_checkpoint, save_checkpoint
from pixelwise.engine.config import JITTERED_TASKS, NO_SCALE, TrainConfig
from pixelwise.engine.curves import plot_curves, read_metrics
from pixelwise.engine.ema import WeightAverage
from pixelwise.engine.loader import (
    DropBadSamples,
    EpochSampler,
    ReplaceBadSamples,
    SeededDataset,
    ShardSampler,
    make_loader,
)
from pixelwise.engine.schedules import WarmupSchedule, make_scheduler, make_timed_scheduler
from pixelwise.engine.seed import deterministic_mode, get_rng_state, seed_everything, set_rng_state
from pixelwise.errors import UserError, unknown_name

logger = logging.getLogger(__name__)

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
# what a run directory holds; `--overwrite` removes exactly these
RUN_FILES = ("config.json", "metrics.jsonl", "curves.png", "last.safetensors", "best.safetensors")
# settings that may change on resume without changing the result
_RESUME_FREE = {"out", "data", "max_steps", "workers", "device", "progress", "epochs",
                "time_budget"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint."""


@dataclass
class TrainState:
    """Where a run is; saved in `last` so that resume continues from the same place."""

    epoch: int = 0  # current epoch, 0-based
    step_in_epoch: int = 0  # batches already trained in the current epoch
    global_step: int = 0
    images: int = 0  # images trained on, over all ranks
    seconds: float = 0.0  # wall time spent training and validating
    val_seconds: float = 0.0  # how long the last validation took (time budgets plan with it)
    best: float | None = None  # best value of the task's best_metric
    best_step: int | None = None
    sums: dict[str, float] = field(default_factory=dict)  # loss-term sums in the current epoch


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum); biases and normalisation weights (1-D parameters) get no
    weight decay."""
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, OPTIMIZERS)
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in ((decay, weight_decay), (no_decay, 0.0)) if params]
    if not groups:
        raise UserError("the model has no trainable parameters")
    # torch's fused kernels (one pass over all tensors; an AdamW step of a ResNet-18 Mask R-CNN
    # on a CPU: 13 ms against 37 ms, benchmarks/train_step.py) where every parameter allows them
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for group in groups for p in group["params"])
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    return OPTIMIZERS[name](groups, lr=lr, fused=fused)


def check_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a non-empty `out` unless resuming or overwriting."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if resume:
        if not (out / "last.safetensors").is_file():
            raise UserError(f"{out}: nothing to resume (no last.safetensors)")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace its "
                        "run files or --resume to continue the run")


def _kept(out: Path) -> str:
    last = out / "last.safetensors"
    return f"last good checkpoint: {last}" if last.is_file() else "no checkpoint written yet"


def _format_terms(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in values.items())


class Trainer:
    """Train `model` on `task` with the settings of `cfg`.

    Args:
        cfg: the run's settings (optimizer, schedule, batch, epochs, out directory, ...).
        model: the model; its `config` attribute (`{name, num_classes, options}`) is stored in the
            checkpoints so the model can be rebuilt from them alone.
        task: a task object (see `pixelwise.tasks`).
        train_set / val_set: map-style datasets of samples the task's `collate` understands.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, task: Any, train_set: Dataset,
                 val_set: Dataset | None = None, *, model_config: dict | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.task = task
        self.train_set = train_set
        self.val_set = val_set
        self.model_config = (model_config if model_config is not None
                             else getattr(model, "config", None))
        self._last_plot = -math.inf

    # seconds between redraws of curves.png (drawing takes a fraction of a second); the first
    # record and the last are always drawn
    plot_interval = 30.0

    # ---- public -------------------------------------------------------------------------------

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train until `cfg.epochs` (or `cfg.max_steps`); returns a summary dict. The model stays
        on the training device (`cfg.device`; a GPU where `auto` finds one).

        Raises `NonFiniteLossError` if the loss becomes NaN/inf (the last checkpoint is kept).
        """
        own_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        info = distributed.setup(self.cfg.device)
        try:
            with deterministic_mode(self.cfg.deterministic):
                return self._fit(info, resume=resume, overwrite=overwrite)
        finally:
            if own_group:
                distributed.cleanup()

    # ---- the loop -----------------------------------------------------------------------------

    def _fit(self, info: distributed.DistInfo, *, resume: bool, overwrite: bool) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        out = Path(cfg.out)
        check_run_dir(out, resume=resume, overwrite=overwrite)
        world, device = info.world_size, info.device
        if cfg.batch_size % world:
            raise UserError(f"batch size {cfg.batch_size} is not divisible by the {world} "
                            "processes")
        per_rank = cfg.batch_size // world
        amp, self.amp_dtype = autocast_settings(cfg.amp, device)
        distributed.barrier()  # every rank has looked at `out` before rank 0 writes into it
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if overwrite and not resume:
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            write_json(out / "config.json", self._describe())
        distributed.barrier()

        if not resume:
            seed_everything(cfg.seed)  # the training stream (dropout); the model is built already
        model = self.model.to(device)
        if cfg.channels_last:  # 4-D weights only; inputs may stay NCHW (convs follow weights)
            model = model.to(memory_format=torch.channels_last)

        train_data = SeededDataset(self.train_set, cfg.seed)
        sampler = EpochSampler(train_data, num_replicas=world, rank=info.rank, seed=cfg.seed)
        drop_last = sampler.num_samples >= per_rank  # keep a lone partial batch of a tiny set
        steps_per_epoch = (sampler.num_samples // per_rank if drop_last
                           else math.ceil(sampler.num_samples / per_rank))
        if steps_per_epoch < 1:
            raise UserError("the training set is empty")
        pin = device.type == "cuda"
        train_loader = make_loader(train_data, sampler=sampler, batch_size=per_rank,
                                   collate_fn=task.collate, workers=cfg.workers, seed=cfg.seed,
                                   drop_last=drop_last, pin_memory=pin)
        val_loader = None
        if self.val_set is not None and len(self.val_set) > 0:
            # seeded too, so that a dataset with randomness never draws from the training stream
            val_data = SeededDataset(self.val_set, cfg.seed)
            val_collate = DropBadSamples(task.collate) if cfg.skip_bad else task.collate
            val_loader = make_loader(val_data, sampler=ShardSampler(len(self.val_set),
                                     num_replicas=world, rank=info.rank), batch_size=per_rank,
                                     collate_fn=val_collate, workers=cfg.workers, seed=cfg.seed,
                                     drop_last=False, pin_memory=pin)

        budget = None if cfg.time_budget is None else 60.0 * cfg.time_budget  # seconds
        optimizer = build_optimizer(model, cfg.optimizer, lr=cfg.lr,
                                    weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        if budget is None:
            total_steps = cfg.epochs * steps_per_epoch
            warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
                      else round(0.05 * total_steps))
            scheduler = make_scheduler(optimizer, cfg.schedule, total_steps=total_steps,
                                       warmup_steps=warmup, power=cfg.power)
        else:
            scheduler = make_timed_scheduler(optimizer, cfg.schedule, power=cfg.power)
        # float16 needs loss scaling, bfloat16 (CPU) has float32's range and does not
        scaler = torch.amp.GradScaler(device.type, enabled=amp and self.amp_dtype == torch.float16)
        ema = None if cfg.ema is None else WeightAverage(model, cfg.ema)
        state = TrainState()
        if resume:
            state = self._restore(out / "last.safetensors", model, optimizer, scheduler, scaler,
                                  ema)
            if budget is None:  # --epochs may change on resume
                scheduler.lr_lambdas[0] = WarmupSchedule(cfg.schedule, total_steps, warmup,
                                                         cfg.power)
            if info.is_main:
                self._truncate_metrics(out / "metrics.jsonl", state.global_step)
        train_model: nn.Module = model
        if world > 1:
            # a task whose model leaves some parameters unused in a step (e.g. R-CNN heads
            # without targets) sets `find_unused_parameters = True`
            train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=getattr(task, "find_unused_parameters", False))

        if budget is None:
            stop_at = min(total_steps, cfg.max_steps or total_steps)
            until = f"{cfg.epochs} epochs, stopping at step {stop_at}"
        else:
            stop_at = cfg.max_steps or math.inf
            until = (f"{cfg.time_budget:g} minutes" + (f" or step {stop_at}" if cfg.max_steps
                                                       else ""))
        logger.info(
            "training %s on %s: %d images, %d steps/epoch of %d images (%d process%s), %s",
            type(model).__name__, device, len(self.train_set), steps_per_epoch, cfg.batch_size,
            world, "" if world == 1 else "es", until)
        if state.global_step >= stop_at or (budget is not None and state.seconds >= budget):
            logger.info("nothing to do: the run is at step %d (%.0f s) already",
                        state.global_step, state.seconds)
            return self._summary(state, None, out)

        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=stop_at if budget is None else None, initial=state.global_step,
                   unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=not (cfg.progress and info.is_main), mininterval=0.5)
        last_val: dict[str, Any] | None = None
        finished = False
        with bar, logging_redirect_tqdm():
            while not finished:
                sampler.set_epoch(state.epoch, skip=state.step_in_epoch * per_rank)
                train_model.train()
                bar.set_description(f"epoch {state.epoch + 1}"
                                    + (f"/{cfg.epochs}" if budget is None else ""))
                t0 = time.perf_counter()
                seg_images = seg_steps = 0
                for batch in train_loader:
                    values = self._step(train_model, model, batch, optimizer, scaler, device,
                                        amp, state, out)
                    if ema is not None:
                        ema.update(model)
                    n = task.num_images(batch) * world
                    seg_images += n
                    seg_steps += 1
                    state.images += n
                    state.global_step += 1
                    state.step_in_epoch += 1
                    for name, value in values.items():
                        state.sums[name] = state.sums.get(name, 0.0) + value
                    finished = state.global_step >= stop_at
                    if budget is not None:
                        finished |= self._time_step(scheduler, bar, state, budget,
                                                    time.perf_counter() - t0, seg_steps)
                    scheduler.step()
                    speed = seg_images / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{speed:.1f}",
                                    refresh=False)
                    bar.update(1)
                    if finished:
                        break
                train_seconds = time.perf_counter() - t0
                val = self._end_of_segment(model, ema, optimizer, scheduler, scaler, val_loader,
                                           state, steps_per_epoch, finished, train_seconds,
                                           seg_images, device, amp, info, out)
                last_val = val or last_val
                # a validation longer than foreseen (the first one) may use up the budget
                finished |= budget is not None and _mean_over_ranks(state.seconds)[0] >= budget
        return self._summary(state, last_val, out)

    def _time_step(self, scheduler: Any, bar: Any, state: TrainState, budget: float,
                   segment_seconds: float, segment_steps: int) -> bool:
        """Time-budget bookkeeping after a step: the schedule's progress becomes the fraction of
        the budget used, the bar's total the steps it should fit; True when one more step and a
        validation as long as the last one would not fit. Every figure is the mean over the
        ranks, so that every rank sets the same learning rate and stops at the same step."""
        # finished segments (training + validation) and this one; the mean step; the last
        # validation's time
        spent, step_seconds, val_seconds = _mean_over_ranks(
            state.seconds + segment_seconds, segment_seconds / max(segment_steps, 1),
            state.val_seconds)
        scheduler.lr_lambdas[0].progress = spent / budget
        if segment_steps >= 3:  # the first steps of a segment are slow (allocation, loading)
            bar.total = state.global_step + max(0, int((budget - spent) / step_seconds))
        return spent + step_seconds + val_seconds >= budget

    def _step(self, train_model: nn.Module, model: nn.Module, batch: Any,
              optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              device: torch.device, amp: bool, state: TrainState, out: Path) -> dict[str, float]:
        """One optimisation step (the schedule is stepped by the caller); returns the loss
        terms averaged over ranks (`loss` = sum)."""
        batch = self.task.to_device(batch, device)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=amp):
            terms = self.task.loss(train_model, batch)
        if not terms:
            raise UserError(f"task {self.task.name!r} returned no loss terms")
        total = torch.stack([term.float() for term in terms.values()]).sum()
        reported = torch.stack([total.detach(), *[t.detach().float() for t in terms.values()]])
        numbers = distributed.all_reduce_mean(reported).tolist()
        values = dict(zip(["loss", *terms], numbers))
        if not all(math.isfinite(v) for v in numbers):
            raise NonFiniteLossError(
                f"loss became {values['loss']} at step {state.global_step + 1} "
                f"(epoch {state.epoch + 1}; {_format_terms(values)}); training stopped, "
                f"{_kept(out)}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if self.cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return values

    def _end_of_segment(self, model: nn.Module, ema: WeightAverage | None,
                        optimizer: torch.optim.Optimizer, scheduler: Any,
                        scaler: torch.amp.GradScaler, val_loader: Any, state: TrainState,
                        steps_per_epoch: int, finished: bool, train_seconds: float,
                        seg_images: int,
                        device: torch.device, amp: bool, info: distributed.DistInfo,
                        out: Path) -> dict[str, Any] | None:
        """After an epoch (or the last step): validate, record, checkpoint. With an `ema`, the
        average is what is validated and saved as `model` (the trained weights are kept in
        `last` as `trained_model`, for resume)."""
        cfg, task = self.cfg, self.task
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()),
                   None)
        if bad is not None:  # a finite loss with non-finite gradients: never checkpoint that
            raise NonFiniteLossError(f"parameter {bad} became non-finite by step "
                                     f"{state.global_step}; training stopped, {_kept(out)}")
        epoch_done = state.step_in_epoch >= steps_per_epoch
        steps = max(state.step_in_epoch, 1)
        train_means = {name: total / steps for name, total in state.sums.items()}
        epoch_position = state.epoch + state.step_in_epoch / steps_per_epoch
        if epoch_done:
            state.epoch += 1
            state.step_in_epoch = 0
            state.sums = {}
        validate = val_loader is not None and (finished or state.epoch % cfg.val_every == 0)
        t0 = time.perf_counter()
        shipped = model if ema is None else ema.module  # the weights validated and saved
        val = task.evaluate(shipped, val_loader, device=device, amp=amp) if validate else None
        val_seconds = time.perf_counter() - t0
        if validate:
            state.val_seconds = val_seconds
        state.seconds += train_seconds + val_seconds
        improved = False
        score = None if val is None or task.best_metric is None else val.get(task.best_metric)
        if score is not None and (state.best is None or score > state.best):
            state.best, state.best_step, improved = float(score), state.global_step, True
        record = {
            "epoch": round(epoch_position, 6),
            "step": state.global_step,
            "lr": optimizer.param_groups[0]["lr"],
            "time": round(state.seconds, 3),
            "train_seconds": round(train_seconds, 3),
            "val_seconds": round(val_seconds, 3),
            "images_per_second": round(seg_images / max(train_seconds, 1e-9), 2),
            "train": train_means,
            "val": val,
        }
        of_epochs = f"/{cfg.epochs}" if cfg.time_budget is None else ""
        message = (f"epoch {epoch_position:g}{of_epochs} step {state.global_step}: "
                   f"train {_format_terms(train_means)}")
        if val is not None and task.best_metric in val and val[task.best_metric] is not None:
            message += f"; val {task.best_metric} {val[task.best_metric]:.4f}"
        message += f"; lr {record['lr']:.3g}; {record['images_per_second']:.1f} img/s"
        logger.info(message + ("  (best)" if improved else ""))
        if info.is_main:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if finished or time.monotonic() - self._last_plot >= self.plot_interval:
                self._last_plot = time.monotonic()
                try:
                    plot_curves(read_metrics(out / "metrics.jsonl"), out / "curves.png",
                                title=self._title())
                except Exception as exc:  # a figure must never stop training
                    logger.warning("could not draw %s: %s", out / "curves.png", exc)
            meta = self._describe()
            meta["progress"] = {"epoch": epoch_position, "step": state.global_step}
            meta["metrics"] = val
            if improved:
                save_checkpoint(out / "best.safetensors", {"model": shipped.state_dict()},
                                {**meta, "kind": "best"})
            averaging = {} if ema is None else {"trained_model": model.state_dict(),
                                                "ema": {"updates": ema.updates}}
            save_checkpoint(out / "last.safetensors", {
                "model": shipped.state_dict(),
                **averaging,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": get_rng_state(),
                "trainer": dataclasses.asdict(state),
            }, {**meta, "kind": "last"})
        distributed.barrier()
        return val

    # ---- helpers ------------------------------------------------------------------------------

    def _describe(self) -> dict[str, Any]:
        return {"train": self.cfg.to_dict(), "model": self.model_config,
                "task": self.task.config()}

    def _title(self) -> str:
        name = (self.model_config or {}).get("name", type(self.model).__name__)
        return f"{self.task.name}: {name} ({Path(self.cfg.out).name})"

    def _restore(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: torch.amp.GradScaler,
                 ema: WeightAverage | None) -> TrainState:
        tree, meta = load_checkpoint(path)
        if meta.get("kind") != "last" or "trainer" not in tree:
            raise UserError(f"{path}: not a resumable checkpoint (kind {meta.get('kind')!r})")
        saved = meta.get("train", {})
        changed = sorted(k for k, v in self.cfg.to_dict().items()
                         if k not in _RESUME_FREE and k in saved and saved[k] != v)
        if changed:
            logger.warning("resuming %s with changed settings (%s): the result will differ from "
                           "an uninterrupted run", path, ", ".join(changed))
        # a run with an average saved it as `model` and the trained weights apart
        model.load_state_dict(tree.get("trained_model", tree["model"]))
        if ema is not None and "ema" in tree:  # else an average switched on now starts afresh
            ema.load(tree["model"], tree["ema"]["updates"])
        optimizer.load_state_dict(tree["optimizer"])
        _match_state_layout(optimizer)
        scheduler.load_state_dict(tree["scheduler"])
        if tree.get("scaler"):
            scaler.load_state_dict(tree["scaler"])
        set_rng_state(tree["rng"])
        state = TrainState(**tree["trainer"])
        logger.info("resuming %s at epoch %d, step %d", path, state.epoch + 1, state.global_step)
        return state

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        # records written after the checkpoint (a run that died later) would be repeated
        if not path.is_file():
            return
        records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in records))

    def _summary(self, state: TrainState, val: dict[str, Any] | None, out: Path) -> dict[str, Any]:
        return {
            "out": str(out),
            "steps": state.global_step,
            "epochs": state.epoch,
            "images": state.images,
            "seconds": round(state.seconds, 3),
            "images_per_second": round(state.images / state.seconds, 2) if state.seconds else None,
            "best_metric": self.task.best_metric,
            "best": state.best,
            "best_step": state.best_step,
            "val": val,
        }


def _mean_over_ranks(*seconds: float) -> list[float]:
    """The means of a rank's clock readings over the DDP ranks (themselves without DDP): values
    that every rank bases the same decision on (one all-reduce)."""
    return distributed.all_reduce_mean(torch.tensor(seconds, dtype=torch.float64)).tolist()


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it and bf16 autocast is slower than float32."""
    try:  # private helpers of torch.cpu (no public API answers this)
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def _match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded optimizer state tensor its parameter's memory layout (checkpoints store
    them contiguous). Needed for channels_last weights: torch's fused CPU AdamW pairs state and
    parameter elements by memory offset, so NCHW moments would update channels_last weights
    wrongly (off by up to 0.16 after one step in a check; the unfused loop follows strides)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == param.shape
                    and value.stride() != param.stride()):
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def autocast_settings(amp: bool | None, device: torch.device) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) of training autocast for `TrainConfig.amp` on `device`: float16 on CUDA
    (on by default), bfloat16 on a CPU (only when asked for; a warning where it is emulated)."""
    if device.type == "cuda":
        return (True if amp is None else bool(amp)), torch.float16
    enabled = bool(amp) and device.type == "cpu"
    if enabled and not native_bf16():
        logger.warning("--amp on a CPU without native bfloat16 (AVX512-BF16/AMX): expect it to "
                       "be slower than float32")
    return enabled, torch.bfloat16


def _has_split(root: str | os.PathLike, split: str) -> bool:
    from pixelwise.data.layout import detect_layout

    return split in detect_layout(root).splits


def _task_jitter(cfg: TrainConfig) -> dict[str, Any]:
    """The instance / keypoint task's `scale` and `jitter` settings that `cfg` gives (scale
    (1, 1): none); empty where it keeps the task's defaults."""
    options: dict[str, Any] = {}
    if cfg.scale_jitter is not None:
        options["scale"] = None if cfg.scale_jitter == NO_SCALE else cfg.scale_jitter
    if cfg.color_jitter is not None:
        options["jitter"] = cfg.color_jitter
    return options


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Build the task, datasets and model that `cfg` names and train them (see `Trainer.fit`).

    With `resume`, `cfg.out/last.safetensors` is continued (its model, optimizer and progress);
    `cfg` should be the run's saved config (`RUN/config.json`), with only `epochs`, `max_steps`,
    `workers` or `device` changed.
    """
    from pixelwise.models import build_model
    from pixelwise.models import model_options as model_options_of
    from pixelwise.tasks import TASKS

    check_run_dir(Path(cfg.out), resume=resume, overwrite=overwrite)
    if cfg.data is None:
        raise UserError("no training data given (--data DIR)")
    if cfg.task not in TASKS:
        raise unknown_name("task", cfg.task, TASKS)
    valid_options = model_options_of(cfg.model)  # an unknown model name fails here, before data
    options = {k: v for k, v in (("loss", cfg.loss), ("class_weights", cfg.class_weights),
                                 ("loss_at", cfg.loss_at)) if v is not None}
    if cfg.task in JITTERED_TASKS:
        options.update(_task_jitter(cfg))
    task = TASKS[cfg.task].from_data(cfg.data, **options)
    # semantic only (the config checks)
    semantic = cfg.task == "semantic"
    augment = {"crop": cfg.crop, "crop_balance": cfg.crop_balance, "scale": cfg.scale_jitter,
               "rotate": cfg.rotate, "jitter": cfg.color_jitter or 0.0,
               "class_mix": cfg.class_mix,
               "mix_classes": cfg.mix_classes, "mix_turn": cfg.mix_turn} if semantic else {}
    cache = {"cache": cfg.cache} if semantic else {}
    train_set = task.dataset(cfg.data, "train", size=cfg.size, train=True, skip_bad=cfg.skip_bad,
                             **augment, **cache)
    if cfg.copy_paste:
        from pixelwise.data.copy_paste import CopyPaste

        train_set = CopyPaste(train_set, cfg.copy_paste)
    if cfg.skip_bad:
        train_set = ReplaceBadSamples(train_set)
    val_set = None
    if _has_split(cfg.data, "val"):
        val_set = task.dataset(cfg.data, "val", size=cfg.size, train=False,
                               skip_bad=cfg.skip_bad, **cache)
    else:
        logger.warning("%s has no val split: no validation, no best checkpoint", cfg.data)
    model_options = dict(cfg.model_options)
    if "in_channels" not in model_options and "in_channels" in valid_options:
        model_options["in_channels"] = int(train_set[0][0].shape[0])  # 1 for grayscale data
    seed_everything(cfg.seed)  # model initialisation
    model = build_model(cfg.model, num_classes=task.num_classes, **model_options)
    if cfg.loss_at == "net" and getattr(model, "input_factor", 1) == 1:
        raise UserError(f"loss_at 'net' is for a model run on a smaller map of the image (unet "
                        f"with --input-scale 1/k, k > 1); this {cfg.model} outputs at the "
                        "image's resolution already")
    return Trainer(cfg, model, task, train_set, val_set).fit(resume=resume, overwrite=overwrite)
