"""Checkpoints: one safetensors file per checkpoint, never pickle.

A checkpoint file (`RUN/last.safetensors`, `RUN/best.safetensors`) holds

* tensors (safetensors body): the model's state dict under `model.<name>`, and for `last` also the
  optimizer, scheduler, gradient scaler and RNG states under `optimizer.`, `scheduler.`, `scaler.`,
  `rng.` (flattened paths); a run with a moving average of its weights (`--ema`) stores the
  average as `model` and, in `last`, the trained weights as `trained_model` (for resume);
* two JSON strings in the safetensors header metadata:
  `pixelwise` — `{"format": 1, "kind", "model": {"name", "num_classes", <options>}, "task": {...},
  "train": TrainConfig, "progress": {...}, "metrics": {...}}`, enough to rebuild the model with
  `pixelwise.models.build_model(**model)`;
  `state` — the non-tensor part of the state tree, each tensor replaced by `{"__tensor__": key}`
  (dicts with integer keys and tuples are tagged so they come back exactly).

Files are written to a temporary name in the same directory, flushed to disk, then renamed with
`os.replace`, so a crash leaves the previous checkpoint intact. Any tool reading safetensors can
open the weights (`safetensors.torch.load_file`); `load_checkpoint` restores the full tree.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pixelwise.atomic import atomic_path
from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_NAMES = ("best", "last")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def encode_state(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings) into a JSON-ready
    tree and a flat `{path: tensor}` dict; `decode_state` is the exact inverse."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            if path in tensors:
                raise ValueError(f"two tensors map to the same checkpoint key {path!r}")
            tensors[path] = obj.detach()
            return {_TENSOR: path}
        if isinstance(obj, dict):
            if all(isinstance(key, str) for key in obj):
                return {key: walk(value, f"{path}.{key}" if path else key)
                        for key, value in obj.items()}
            # e.g. the optimizer's per-parameter state, keyed by int
            return {_ITEMS: [[key, walk(value, f"{path}.{key}" if path else str(key))]
                             for key, value in obj.items()]}
        if isinstance(obj, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
            return obj.item()
        raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint")

    return walk(tree, prefix), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_state`."""
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        if set(tree) == {_TUPLE}:
            return tuple(decode_state(v, tensors) for v in tree[_TUPLE])
        if set(tree) == {_ITEMS}:
            return {key: decode_state(value, tensors) for key, value in tree[_ITEMS]}
        return {key: decode_state(value, tensors) for key, value in tree.items()}
    if isinstance(tree, list):
        return [decode_state(v, tensors) for v in tree]
    return tree


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory or are not contiguous: copy those.
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        ptr = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or (tensor.numel() > 0 and ptr in seen):
            tensor = tensor.contiguous().clone()
        if tensor.numel() > 0:
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write `state` (a tree with tensors) and `meta` (JSON) to `path` atomically.

    Args:
        path: the `.safetensors` file to (re)place.
        state: e.g. `{"model": model.state_dict(), "optimizer": optimizer.state_dict(), ...}`.
        meta: JSON-ready description (model config, task, training config, progress, metrics).
    """
    path = Path(path)
    tree, tensors = encode_state(state)
    metadata = {
        "pixelwise": json.dumps({"format": FORMAT_VERSION, **meta}),
        "state": json.dumps(tree),
    }
    with atomic_path(path, fsync=True) as tmp:
        save_file(_storable(tensors), str(tmp), metadata=metadata)
    return path


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata = handle.metadata() or {}
    if "pixelwise" not in metadata:
        raise UserError(f"{path}: not a pixelwise checkpoint (no 'pixelwise' metadata)")
    return handle, metadata


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON description (no tensors are read)."""
    _, metadata = _open(Path(path))
    return json.loads(metadata["pixelwise"])


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`: returns `(state, meta)` with CPU tensors."""
    path = Path(path)
    handle, metadata = _open(path)
    tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    meta = json.loads(metadata["pixelwise"])
    state = decode_state(json.loads(metadata.get("state", "{}")), tensors)
    return state, meta


def find_checkpoint(run: str | os.PathLike, which: str = "best") -> Path:
    """`RUN/<which>.safetensors`, or the file itself; `best` falls back to `last` when a run has
    no validation (hence no best)."""
    run = Path(run)
    if run.is_file():
        return run
    if which not in CHECKPOINT_NAMES:
        from pixelwise.errors import unknown_name

        raise unknown_name("checkpoint", which, CHECKPOINT_NAMES)
    for name in (which, "last") if which == "best" else (which,):
        candidate = run / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    raise UserError(f"{run}: no {which}.safetensors checkpoint found (is it a training run?)")


def load_model(
    run: str | os.PathLike, which: str = "best", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a trained model from a run directory or checkpoint file, in eval mode.

    Returns `(model, meta)`; `meta["model"]` is the model's `config` (`build_model(**config)`
    rebuilds it) and `meta["task"]` the task's settings (e.g. class names and ignore index).
    """
    from pixelwise.models import build_model

    path = find_checkpoint(run, which)
    handle, metadata = _open(path)
    meta = json.loads(metadata["pixelwise"])
    config = meta.get("model")
    if not config:
        raise UserError(f"{path}: the checkpoint does not say how to build its model")
    model = build_model(**config)
    prefix = "model."
    weights = {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys()
               if key.startswith(prefix)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit model {config['name']!r}: {first}") from None
    return model.to(device).eval(), meta
