"""Training for a wall-clock budget (`--time MINUTES`): on a fake clock where a training step
takes 1 s and a validation batch 0.5 s, the steps, the stop and the learning rates are
hand-computed; the CLI flag, resume and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pixelwise.engine.config import TrainConfig
from pixelwise.engine.schedules import TimedSchedule
from pixelwise.engine.trainer import Trainer
from pixelwise.errors import UserError
from pixelwise.tasks.semantic import SemanticTask
from tests.test_engine_trainer import CLASSES, ToyDataset, records, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
LR = 0.02


class FakeClock:
    """`time.perf_counter` / `time.monotonic` for the trainer: moves only when a model runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    monotonic = perf_counter


class Timed(nn.Module):
    """A model whose training forward takes 1 s and eval forward 0.5 s on `clock`."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.inner, self.clock = tiny_model(), clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += 1.0 if self.training else 0.5
        return self.inner(x)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("pixelwise.engine.trainer.time", fake)
    monkeypatch.setattr("pixelwise.engine.trainer.plot_curves", lambda *a, **k: None)
    return fake


def fit(out: Path, clock: FakeClock, *, resume: bool = False, **changes) -> dict:
    cfg = TrainConfig(out=str(out), epochs=1, batch_size=4, lr=LR, progress=False, seed=7,
                      **{"time_budget": 0.5, **changes})
    return Trainer(cfg, Timed(clock), SemanticTask(CLASSES), ToyDataset(),
                   ToyDataset(12, augment=False)).fit(resume=resume)


def factor(progress: float) -> float:
    """Cosine after a warm-up over the first 5 % of the budget."""
    if progress < 0.05:
        return progress / 0.05
    return 0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95))


def test_the_budget_holds_steps_and_validations_and_the_lr_follows_the_time(
        tmp_path: Path, clock: FakeClock) -> None:
    """30 s; 6 steps of 1 s per epoch, then a 1.5 s validation (3 batches). Steps stop when one
    more step and a validation as long as the last would pass 30 s: after epochs ending at 7.5,
    15 and 22.5 s, step 23 ends at 27.5 s (27.5 + 1 + 1.5 = 30), the final validation at 29 s.
    `epochs` (1) does not end the run."""
    out = tmp_path / "run"
    summary = fit(out, clock)
    assert summary["steps"] == 23 and summary["seconds"] == 29.0
    recs = records(out)
    assert [r["step"] for r in recs] == [6, 12, 18, 23]
    # the lr of each record is set after its last step, at the time used so far
    for rec, spent in zip(recs, [6.0, 13.5, 21.0, 27.5]):
        assert rec["lr"] == pytest.approx(LR * factor(spent / 30), rel=1e-12)
    assert recs[-1]["time"] == 29.0
    assert json.loads((out / "config.json").read_text())["train"]["time_budget"] == 0.5


def test_max_steps_still_stops_first(tmp_path: Path, clock: FakeClock) -> None:
    summary = fit(tmp_path / "run", clock, max_steps=4)
    assert summary["steps"] == 4 and summary["seconds"] == 5.5  # 4 steps + one validation


def test_resume_continues_the_clock_and_may_extend_the_budget(
        tmp_path: Path, clock: FakeClock) -> None:
    """15 s: epoch 1 to 7.5 s, step 11 ends at 12.5 s (12.5 + 1 + 1.5 = 15), validation to 14 s.
    Resumed with 30 s: the saved 14 s count; step 12 (the epoch's last) ends at 15 s, its
    validation at 16.5, epoch 3 at 24; step 22 ends at 28 (28 + 1 + 1.5 > 30), the final
    validation at 29.5 s."""
    out = tmp_path / "run"
    first = fit(out, clock, time_budget=0.25)
    assert first["steps"] == 11 and first["seconds"] == 14.0
    resumed = fit(out, clock, resume=True, time_budget=0.5)
    assert resumed["steps"] == 22 and resumed["seconds"] == 29.5
    assert [r["step"] for r in records(out)] == [6, 11, 12, 18, 22]
    nothing = fit(out, clock, resume=True, time_budget=0.4)  # 24 s: used up already
    assert nothing["steps"] == 22


def test_timed_schedule_values_and_state() -> None:
    schedule = TimedSchedule("cosine")
    for progress, expected in [(0.0, 0.0), (0.025, 0.5), (0.05, 1.0), (0.525, 0.5), (1.0, 0.0),
                               (1.5, 0.0)]:
        schedule.progress = progress
        assert schedule(123) == pytest.approx(expected, abs=1e-12)  # the step is ignored
    poly = TimedSchedule("poly", warmup=0.0, power=2.0)
    poly.progress = 0.5
    assert poly(0) == pytest.approx(0.25)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, TimedSchedule("cosine"))
    scheduler.lr_lambdas[0].progress = 0.3
    optimizer.step()
    scheduler.step()
    state = json.loads(json.dumps(scheduler.state_dict()))  # plain numbers
    other = torch.optim.lr_scheduler.LambdaLR(optimizer, TimedSchedule("cosine"))
    other.load_state_dict(state)
    assert other.lr_lambdas[0].progress == 0.3


def test_refusals() -> None:
    with pytest.raises(UserError, match="time_budget must be > 0 minutes"):
        TrainConfig(time_budget=0)
    with pytest.raises(UserError, match="warmup_steps cannot be combined with a time budget"):
        TrainConfig(time_budget=1, warmup_steps=5)


def test_cli_time_flag_and_resume_refusal(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.cli import EXIT_USER_ERROR, main
    from pixelwise.data.synthetic import synthesize

    data = synthesize("semantic", tmp_path / "set", num=4, size=(32, 32), seed=0)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--model", "unet", "--width",
                 "4", "--depth", "2", "--batch-size", "2", "--time", "0.02",
                 "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["time_budget"] == 0.02
    assert records(out)[-1]["time"] < 0.02 * 60 + 5  # one step or validation over at most
    steps = out / "steps"
    assert main(["train", "--data", str(data), "--out", str(steps), "--model", "unet", "--width",
                 "4", "--depth", "2", "--batch-size", "2", "--max-steps", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(steps), "--resume", "--time", "1"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot change time_budget" in err[0]


def test_a_first_validation_that_uses_up_the_budget_ends_the_run(
        tmp_path: Path, clock: FakeClock) -> None:
    """7.2 s: the first validation's length is unknown, so the epoch's 6 steps run (6 + 1 + 0 <
    7.2); its validation ends at 7.5 s, past the budget: no further step, no second validation."""
    summary = fit(tmp_path / "run", clock, time_budget=0.12)
    assert summary["steps"] == 6 and summary["seconds"] == 7.5
    assert summary["val"] is not None and [r["step"] for r in records(tmp_path / "run")] == [6]
