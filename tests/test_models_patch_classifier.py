"""The sliding window and the dense (fully convolutional) patch classifier agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pixelwise.errors import UserError
from pixelwise.models import build_model
from pixelwise.models.patch_classifier import dilation_schedule


@pytest.mark.parametrize("patch_size", [3, 5, 9, 21, 33, 65])
def test_dilation_schedule_shrinks_a_patch_to_one_pixel(patch_size: int) -> None:
    schedule = dilation_schedule(patch_size)
    assert 1 + sum(2 * d for d in schedule) == patch_size
    model = build_model("patch_classifier", 2, patch_size=patch_size, width=2, hidden=2)
    assert model.features(torch.zeros(1, 3, patch_size, patch_size)).shape[-2:] == (1, 1)


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("patch_size", [9, 33])
def test_sliding_window_equals_dense(pad_mode: str, patch_size: int) -> None:
    model = build_model(
        "patch_classifier", 4, patch_size=patch_size, width=8, hidden=16, pad_mode=pad_mode
    ).eval()
    x = torch.rand(2, 3, 19, 23)
    with torch.no_grad():
        dense = model(x)
        slow = model.sliding_window(x, batch_size=97)  # batches that do not divide N*H*W
    assert dense.shape == slow.shape == (2, 4, 19, 23)
    assert (dense - slow).abs().max() <= 1e-4


def test_sliding_window_is_a_literal_patch_classifier() -> None:
    """Independent reference: cut one patch by hand and classify it."""
    model = build_model("patch_classifier", 3, patch_size=9, width=4, hidden=8).eval()
    x = torch.rand(1, 3, 12, 10)
    padded = F.pad(x, (4, 4, 4, 4))
    with torch.no_grad():
        out = model.sliding_window(x)
        for i, j in [(0, 0), (5, 7), (11, 9)]:
            patch = padded[:, :, i : i + 9, j : j + 9]  # centred on pixel (i, j)
            torch.testing.assert_close(out[0, :, i, j], model.classify_patches(patch)[0])


def test_bad_patch_size() -> None:
    with pytest.raises(UserError, match="odd"):
        build_model("patch_classifier", 2, patch_size=32)
