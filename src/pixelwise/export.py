"""Export a trained semantic model to ONNX (or a torch.export program), verified against eager.

`export_model(model, out, format="onnx", size=None, in_channels=3)` writes `out` atomically (a
temporary file in the same folder, then `os.replace`) only after the exported file ran and
matched the eager model: the largest absolute difference of the logits on random inputs must be
<= `tolerance`, else nothing is written and a `UserError` says by how much they differ.

* input `images` (N, C, H, W) float32 in [0, 1] (as `image_to_float` makes them), output
  `logits` (N, K, H, W);
* `size=None`: N, H and W are dynamic (checked on two inputs of different batch and size);
  `size=(H, W)`: a fixed H x W input (dynamic batch).

FORMATS: `onnx` (the torch.export-based exporter; checked with onnxruntime) and `pt2`
(`torch.export.save` of the ExportedProgram; `torch.export.load(f).module()` runs it). TorchScript
is not offered: tracing is deprecated in torch 2.x and fails on the upsamplers' size arguments.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pixelwise.atomic import atomic_path
from pixelwise.errors import UserError, unknown_name

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_OPSET = 18
DEFAULT_EXAMPLE_SIZE = (64, 64)
# the exporter's helpers log every optimisation pass at INFO; keep `pixelwise export` readable
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


@contextlib.contextmanager
def _quiet(names: Sequence[str] = _CHATTY_LOGGERS) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(logging.WARNING, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _dynamic_shapes(size: Sequence[int] | None) -> dict[str, dict[int, str]]:
    return {INPUT_NAME: {0: "batch"} if size is not None else
            {0: "batch", 2: "height", 3: "width"}}


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path,
                 size: Sequence[int] | None, opset: int | None) -> None:
    try:
        import onnxscript  # noqa: F401 - the exporter needs it
    except ImportError:
        raise UserError("ONNX export needs the onnx, onnxscript and onnxruntime packages: "
                        "pip install 'pixelwise[export]'") from None
    torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_shapes=_dynamic_shapes(size), opset_version=opset or DEFAULT_OPSET,
                      external_data=False)


def _run_onnx(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("checking an ONNX export needs onnxruntime: pip install "
                        "'pixelwise[export]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])


def _export_pt2(model: nn.Module, example: torch.Tensor, path: Path,
                size: Sequence[int] | None, opset: int | None) -> None:
    dims = {axis: torch.export.Dim.AUTO for axis in _dynamic_shapes(size)[INPUT_NAME]}
    program = torch.export.export(model, (example,), dynamic_shapes=(dims,))
    torch.export.save(program, str(path))


def _run_pt2(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    module = torch.export.load(str(path)).module()
    return lambda x: module(x)


# format name -> (write the file, load it back as a callable on CPU tensors)
FORMATS: dict[str, tuple[Callable[..., None], Callable[[Path], Callable]]] = {
    "onnx": (_export_onnx, _run_onnx),
    "pt2": (_export_pt2, _run_pt2),
}


class _Logits(nn.Module):
    """The model with its output reduced to the logits tensor (torchvision's {"out": ...})."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from pixelwise.tasks.semantic import logits_of

        return logits_of(self.model(images))


def check_sizes(size: Sequence[int] | None, stride: int) -> list[tuple[int, int, int]]:
    """(N, H, W) of the random inputs the export is checked on: the example first (batch 2:
    torch.export specialises a dimension it sees as 1), then batch 1 at another size."""
    if size is not None:
        h, w = size
        return [(2, h, w), (1, h, w)]
    h, w = DEFAULT_EXAMPLE_SIZE
    # a second, different size (a multiple of the stride, so that every model accepts it)
    step = max(stride, 8)
    return [(2, h, w), (1, h + step, w + 2 * step)]


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    format: str = "onnx",  # noqa: A002 - the CLI's --format
    size: Sequence[int] | None = None,
    in_channels: int = 3,
    opset: int | None = None,
    tolerance: float = 1e-3,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Export `model` (in eval mode, moved to the CPU) to `out` and check it (module docstring).

    Returns `{"out", "format", "input": [dims], "output": [dims], "checked": [[N, C, H, W]...],
    "max_abs_diff"}`, dims as ints or names ("batch", "height", "width").
    """
    if format not in FORMATS:
        raise unknown_name("export format", format, FORMATS)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out names the file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    if size is not None and min(size) < 1:
        raise UserError(f"size must be positive, got {size}")
    from pixelwise.predict.tiling import output_stride

    model = model.to("cpu").eval()
    wrapped = _Logits(model).eval()
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.rand(n, in_channels, h, w, generator=gen)
              for n, h, w in check_sizes(size, output_stride(model))]
    write, load = FORMATS[format]
    with atomic_path(out, suffix=out.suffix) as tmp:  # the exporters go by the suffix
        try:
            with _quiet():
                write(wrapped, inputs[0], tmp, size, opset)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - exporters raise many types for unsupported code
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "" if size is not None else "; try a fixed input size (--size HxW)"
            raise UserError(f"cannot export {type(model).__name__} to {format}: {first}{hint}"
                            ) from None
        run = load(tmp)
        diff = 0.0
        with torch.inference_mode():
            for x in inputs:
                expected = wrapped(x)
                try:
                    got = run(x)
                except Exception as exc:  # noqa: BLE001 - runtime errors of the exported file
                    first = str(exc).strip().splitlines()[0]
                    raise UserError(f"the exported {format} file fails on an input of shape "
                                    f"{list(x.shape)}: {first}") from None
                if tuple(got.shape) != tuple(expected.shape):
                    raise UserError(f"the exported {format} file returns {list(got.shape)} for "
                                    f"{list(x.shape)}, eager {list(expected.shape)}")
                diff = max(diff, float((got - expected).abs().max()))
        if not np.isfinite(diff) or diff > tolerance:
            raise UserError(f"the exported {format} model differs from eager by {diff:.3g} "
                            f"(> tolerance {tolerance:g}); nothing written")
    k = int(getattr(model, "num_classes", expected.shape[1]))
    dims: list[Any] = ["batch", in_channels, *(size if size is not None else ("height", "width"))]
    logger.info("exported %s to %s (%s); max abs diff vs eager %.3g", type(model).__name__, out,
                format, diff)
    return {"out": str(out), "format": format, "input": dims,
            "output": [dims[0], k, *dims[2:]], "checked": [list(x.shape) for x in inputs],
            "max_abs_diff": diff, "tolerance": tolerance}
