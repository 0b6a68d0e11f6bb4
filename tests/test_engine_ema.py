"""The moving average of the weights (`--ema DECAY`): the trainer's average equals the warmed-up
formula applied by hand to the weights after every step (batch-norm buffers included), it is
what is validated and saved as the model, and a resumed run averages bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixelwise.engine.checkpoint import load_checkpoint
from pixelwise.engine.config import TrainConfig
from pixelwise.engine.ema import WeightAverage, ema_decay
from pixelwise.errors import UserError
from pixelwise.tasks.semantic import SemanticTask
from tests.test_engine_trainer import (  # noqa: F401 (_fast: the fixture, autouse here too)
    CLASSES,
    ToyDataset,
    _fast,
    records,
    run,
    tiny_model,
)

DECAY = 0.8


def test_decay_warms_up_to_its_ceiling() -> None:
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay(0.999, 10**6) == 0.999
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        WeightAverage(tiny_model(), 1.0)


def test_the_saved_model_is_the_average_of_the_weights_after_every_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    after_steps: list[dict[str, torch.Tensor]] = []
    update = WeightAverage.update

    def spy(self: WeightAverage, model: torch.nn.Module) -> None:
        after_steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        update(self, model)

    monkeypatch.setattr(WeightAverage, "update", spy)
    model, summary = run(tmp_path / "run", ema=DECAY, epochs=2)
    assert len(after_steps) == summary["steps"] == 12

    # the formula by hand: copy at the first step, then w <- d_n w + (1 - d_n) w_step
    expected = {k: v.double() for k, v in after_steps[0].items()}
    for n, weights in enumerate(after_steps[1:], start=1):
        d = min(DECAY, (1 + n) / (10 + n))
        for k, v in weights.items():
            expected[k] = v.double() if not v.is_floating_point() else d * expected[k] + (1 - d) * v
    tree, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["train"]["ema"] == DECAY and tree["ema"] == {"updates": 12}
    for k, v in expected.items():
        assert torch.allclose(tree["model"][k].double(), v, rtol=0, atol=1e-6), k
    assert "running_var" in " ".join(expected) and tree["model"]["1.num_batches_tracked"] == 12
    # the trained weights are kept apart, for resume; they differ from the average
    for k, v in model.state_dict().items():
        assert torch.equal(tree["trained_model"][k], v), k
    assert not torch.allclose(tree["model"]["0.weight"], model.state_dict()["0.weight"])

    # what is validated is the average: its saved copy evaluates to the recorded metric
    (last,) = [r for r in records(tmp_path / "run") if r["step"] == 12]
    shipped = tiny_model(seed=3)
    shipped.load_state_dict(tree["model"])
    task = SemanticTask(CLASSES)
    val = ToyDataset(12, augment=False)
    batches = [task.collate([val[i] for i in range(j, min(j + 4, 12))]) for j in (0, 4, 8)]
    again = task.evaluate(shipped, batches, device=torch.device("cpu"))
    assert again["miou"] == pytest.approx(last["val"]["miou"], abs=1e-12)


def test_resume_with_an_average_is_bit_identical(tmp_path: Path) -> None:
    straight, _ = run(tmp_path / "straight", ema=DECAY)
    run(tmp_path / "split", ema=DECAY, max_steps=5)
    resumed, _ = run(tmp_path / "split", model=tiny_model(seed=99), resume=True, ema=DECAY)
    a, _ = load_checkpoint(tmp_path / "straight" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "split" / "last.safetensors")
    for part in ("model", "trained_model"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert a["ema"] == b["ema"] == {"updates": 12}


def test_an_average_switched_on_or_off_at_resume(tmp_path: Path) -> None:
    """Resuming a plain run with an average starts the average there; resuming an averaged run
    without one continues the trained weights (not the average)."""
    run(tmp_path / "on", max_steps=5)
    plain, _ = load_checkpoint(tmp_path / "on" / "last.safetensors")
    model, _ = run(tmp_path / "on", model=tiny_model(seed=99), resume=True, ema=DECAY)
    tree, _ = load_checkpoint(tmp_path / "on" / "last.safetensors")
    assert tree["ema"] == {"updates": 7}  # the 7 steps after the resume
    run(tmp_path / "off", max_steps=5, ema=DECAY)
    averaged, _ = load_checkpoint(tmp_path / "off" / "last.safetensors")
    resumed, _ = run(tmp_path / "off", model=tiny_model(seed=99), resume=True, max_steps=5)
    # nothing to train (already at step 5): the model is the trained weights, not the average
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, averaged["trained_model"][k]), k
    assert "trained_model" not in plain


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 2.0])
def test_a_decay_outside_the_open_unit_interval_is_refused(
        decay: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pixelwise.cli import main

    with pytest.raises(UserError, match=r"ema must be a decay in \(0, 1\)"):
        TrainConfig(ema=decay)
    capsys.readouterr()
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--ema",
                 str(decay)])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert f"ema must be a decay in (0, 1), e.g. 0.999, got {decay}" in err
    assert not (tmp_path / "run").exists()


def test_the_config_round_trips_the_decay() -> None:
    cfg = TrainConfig(ema=0.999)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).ema == 0.999
