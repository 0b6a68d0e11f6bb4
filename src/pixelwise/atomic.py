"""Files written whole or not at all.

pixelwise's outputs (checkpoints, JSON, PNGs, exported models, datasets' index files; not the
images of a synthetic dataset, whose index is written last) go through `atomic_path`: a temporary
file in the target's folder, moved onto the target with `os.replace` (atomic within one file
system) only when writing succeeded. An error or a crash leaves the previous file, or none, and no
temporary behind. Written by hand: the standard library has the pieces (`tempfile`,
`os.replace`) but no helper that joins them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp",
                fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path` (created empty, name ending in `suffix`); when the
    block ends without an exception it replaces `path`, else it is removed. `fsync`: flush the
    file to disk before the rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
               allow_nan: bool = True) -> None:
    """Write `obj` as JSON to `path` atomically: indented, or compact with `indent=None`;
    `allow_nan=False` refuses NaN/inf (strict JSON) instead of writing them."""
    separators = (",", ":") if indent is None else None
    write_text(path, json.dumps(obj, indent=indent, separators=separators,
                                allow_nan=allow_nan) + "\n")
