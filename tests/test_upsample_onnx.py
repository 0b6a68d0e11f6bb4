"""Every upsampler exports to ONNX (torch's default dynamo exporter) and runs in onnxruntime
with the same result as eager PyTorch -- max_unpool included, its indices an input of the graph."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pixelwise.upsample import UPSAMPLERS, MaxPoolWithIndices, make_upsampler

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class _Call(nn.Module):
    """Wraps an upsampler so the exported graph takes (x[, indices]) and a fixed `size`."""

    def __init__(self, up: nn.Module, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.up, self.size = up, size

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return self.up(x, size=self.size, indices=indices)


def _onnx_run(
    model: nn.Module, args: tuple[torch.Tensor, ...], *, dynamo: bool = True
) -> list[np.ndarray]:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # the exporter logs its progress at INFO/WARNING
        try:
            if dynamo:
                program = torch.onnx.export(model, args, dynamo=True, verbose=False)
                data = program.model_proto.SerializeToString()
            else:
                buf = io.BytesIO()
                torch.onnx.export(model, args, buf, dynamo=False)
                data = buf.getvalue()
        finally:
            logging.disable(logging.NOTSET)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {inp.name: a.numpy() for inp, a in zip(session.get_inputs(), args, strict=True)}
    return session.run(None, feeds)


def _args(name: str, pre: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    if UPSAMPLERS[name].needs_indices:
        pooled, idx = MaxPoolWithIndices(2)(torch.randn(1, 3, *pre))
        return pooled, idx
    return (torch.randn(1, 3, pre[0] // 2, pre[1] // 2),)


@pytest.mark.parametrize("name", UPSAMPLERS)
@pytest.mark.parametrize("size", [None, (13, 15)])
def test_onnx_matches_eager(name: str, size: tuple[int, int] | None) -> None:
    up = make_upsampler(name, 3)
    model = _Call(up, size)
    args = _args(name, (13, 15) if size else (12, 14))
    with torch.no_grad():
        expected = model(*args).numpy()
    (got,) = _onnx_run(model, args)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_max_unpool_exports_with_the_torchscript_exporter_too() -> None:
    """torch's own MaxUnpool2d fails there (pytorch#25088); the scatter formulation does not."""
    args = _args("max_unpool", (12, 14))
    model = _Call(make_upsampler("max_unpool", 3), None)
    (got,) = _onnx_run(model, args, dynamo=False)
    np.testing.assert_array_equal(got, model(*args).numpy())


class _PoolUnpool(nn.Module):
    """The SegNet pairing: pool with indices, then unpool to the pre-pool size."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = MaxPoolWithIndices(2)
        self.unpool = make_upsampler("max_unpool", 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, idx = self.pool(x)
        return self.unpool(pooled * 2, size=x.shape[-2:], indices=idx)


def test_pool_unpool_pair_exports() -> None:
    x = torch.randn(2, 3, 11, 14)
    model = _PoolUnpool()
    (got,) = _onnx_run(model, (x,))
    np.testing.assert_array_equal(got, model(x).numpy())
