"""Checkpoints: exact round trip of model/optimizer/scheduler/RNG state through safetensors +
JSON (no pickle), atomic writes, rebuilding a model from the checkpoint alone, clear errors."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pixelwise.engine import checkpoint as ckpt
from pixelwise.engine.checkpoint import (
    decode_state,
    encode_state,
    find_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from pixelwise.engine.schedules import make_scheduler
from pixelwise.engine.seed import get_rng_state, set_rng_state
from pixelwise.errors import UserError


def trained_state() -> tuple[torch.nn.Module, dict]:
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95))
    sched = make_scheduler(opt, "cosine", total_steps=10, warmup_steps=2)
    for _ in range(3):
        model(torch.randn(2, 2, 5, 5)).square().mean().backward()
        opt.step()
        sched.step()
    return model, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "rng": get_rng_state(),
                   "misc": {"tuple": (1, 2.5, None, True), 3: "int key", "nested": [[1], {"a": 2}]}}


def assert_same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_state_round_trips_exactly_through_a_file(tmp_path: Path) -> None:
    _, state = trained_state()
    path = save_checkpoint(tmp_path / "last.safetensors", state, {"kind": "last", "x": [1, 2]})
    loaded, meta = load_checkpoint(path)
    state["model"] = dict(state["model"])  # OrderedDict comes back as a plain dict
    assert_same(state, loaded)
    assert meta == {"format": 1, "kind": "last", "x": [1, 2]}
    # the optimizer loads into a fresh one (int parameter keys, tuple betas survive)
    model, _ = trained_state()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)


def test_the_file_is_plain_safetensors_with_a_json_header(tmp_path: Path) -> None:
    model, state = trained_state()
    path = save_checkpoint(tmp_path / "c.safetensors", state, {"kind": "last"})
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])  # no pickle anywhere: a JSON header, then raw tensors
    assert json.loads(header["__metadata__"]["pixelwise"])["kind"] == "last"
    tensors = load_file(path)  # any safetensors reader gets the weights
    for name, value in model.state_dict().items():
        assert torch.equal(tensors[f"model.{name}"], value)


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)}, {"kind": "last"})
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)}, {"kind": "last"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_shared_and_strided_tensors_are_stored(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"a": base, "b": base, "t": base.t(), "row": base[1]}
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "s.safetensors", state, {}))
    for key in state:
        assert torch.equal(loaded[key], state[key])
    with pytest.raises(TypeError, match="'bad.x'"):
        encode_state({"bad": {"x": object()}})
    tree, tensors = encode_state({"t": torch.ones(1)})
    assert decode_state(json.loads(json.dumps(tree)), tensors)["t"].item() == 1.0


def test_rng_states_restore_every_generator() -> None:
    state = get_rng_state()
    tree, tensors = encode_state(state)
    first = (torch.rand(3), random.random(), np.random.rand(2))
    set_rng_state(decode_state(json.loads(json.dumps(tree)), tensors))
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert np.array_equal(first[2], again[2])


def test_load_model_rebuilds_from_the_checkpoint_alone(tmp_path: Path) -> None:
    from pixelwise.models import build_model

    model = build_model("unet", 4, width=8, depth=2, upsample="transposed").eval()
    save_checkpoint(tmp_path / "best.safetensors", {"model": model.state_dict()},
                    {"kind": "best", "model": model.config, "task": {"name": "semantic"}})
    rebuilt, meta = load_model(tmp_path)
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert meta["model"]["upsample"] == "transposed" and not rebuilt.training
    # a checkpoint whose weights do not fit the recorded architecture
    other = build_model("unet", 4, width=8, depth=3)
    save_checkpoint(tmp_path / "bad.safetensors", {"model": other.state_dict()},
                    {"kind": "best", "model": model.config})
    with pytest.raises(UserError, match="do not fit model 'unet'"):
        load_model(tmp_path / "bad.safetensors")


def test_checkpoint_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no best.safetensors"):
        find_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "last.safetensors", {}, {"kind": "last"})
    assert find_checkpoint(tmp_path) == tmp_path / "last.safetensors"  # best falls back to last
    save_file({"x": torch.ones(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError, match="not a pixelwise checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
