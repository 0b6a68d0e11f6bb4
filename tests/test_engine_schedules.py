"""Learning-rate schedules: warm-up and decay against the closed forms, stored as plain JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pixelwise.engine.schedules import SCHEDULES, WarmupSchedule, make_scheduler
from pixelwise.errors import UserError

CLOSED_FORM = {
    "cosine": lambda s, power: 0.5 * (1 + math.cos(math.pi * s)),
    "poly": lambda s, power: (1 - s) ** power,
}


def lrs(kind: str, total: int, warmup: int, base: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_scheduler(opt, kind, total_steps=total, warmup_steps=warmup)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])  # the lr used by this step
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_warmup_then_closed_form_decay(kind: str) -> None:
    total, warmup, base = 20, 4, 0.1
    got = lrs(kind, total, warmup, base)
    for t in range(warmup):
        assert got[t] == pytest.approx(base * (t + 1) / (warmup + 1), rel=1e-12)
    for t in range(warmup, total):
        s = (t - warmup) / (total - warmup)
        assert got[t] == pytest.approx(base * CLOSED_FORM[kind](s, 0.9), rel=1e-12)
    assert got[warmup] == pytest.approx(base)  # the peak right after warm-up
    assert all(a >= b for a, b in zip(got[warmup:], got[warmup + 1:]))


def test_known_values() -> None:
    assert WarmupSchedule("cosine", 10)(5) == pytest.approx(0.5)
    assert WarmupSchedule("poly", 10, power=1.0)(5) == pytest.approx(0.5)
    assert WarmupSchedule("poly", 10, power=2.0)(5) == pytest.approx(0.25)
    assert WarmupSchedule("cosine", 10, warmup_steps=0)(0) == 1.0
    with pytest.raises(UserError, match="valid names: cosine, poly"):
        WarmupSchedule("step", 10)


def test_scheduler_state_is_json_and_resumes_the_same_curve() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "poly", total_steps=10, warmup_steps=2)
    for _ in range(4):
        opt.step()
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))  # plain numbers only
    assert state["lr_lambdas"][0] == {"kind": "poly", "total_steps": 10, "warmup_steps": 2,
                                      "power": 0.9}
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = make_scheduler(opt2, "poly", total_steps=10, warmup_steps=2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
