"""`pixelwise.atomic`: a file is replaced whole or left as it was, with no temporary behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pixelwise.atomic import atomic_path, write_bytes, write_json, write_text


def test_replaces_whole_file_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.bin"  # the folder is created
    write_bytes(target, b"first")
    write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_error_keeps_the_previous_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_temporary_suffix_and_fsync(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    with atomic_path(target, suffix=".onnx", fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".onnx") and tmp != target
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_mode_follows_the_umask_not_mkstemps_private_mode(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        import importlib

        import pixelwise.atomic as atomic

        importlib.reload(atomic)  # reads the umask at import
        atomic.write_text(tmp_path / "a.txt", "a")
    finally:
        os.umask(mask)
        importlib.reload(atomic)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_json_indented_compact_and_strict(tmp_path: Path) -> None:
    obj = {"a": [1, 2], "b": 0.5}
    write_json(tmp_path / "i.json", obj)
    write_json(tmp_path / "c.json", obj, indent=None)
    assert json.loads((tmp_path / "i.json").read_text()) == obj
    assert (tmp_path / "i.json").read_text().startswith("{\n  ")
    assert (tmp_path / "c.json").read_text() == '{"a":[1,2],"b":0.5}\n'
    with pytest.raises(ValueError):
        write_json(tmp_path / "c.json", {"x": float("nan")}, allow_nan=False)
    assert json.loads((tmp_path / "c.json").read_text()) == obj  # untouched
