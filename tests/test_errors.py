"""The shared input checks of `pixelwise.errors`, and one model option checked through them."""

from __future__ import annotations

import numpy as np
import pytest

from pixelwise.errors import UserError, check_positive_int, unknown_name
from pixelwise.models import build_model


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(2)])
def test_positive_integers_pass_as_int(value: object) -> None:
    if isinstance(value, np.integer):  # by default Python ints only (configs are JSON)
        with pytest.raises(UserError, match="width must be a positive integer"):
            check_positive_int("width", value)
    checked = check_positive_int("width", value, numpy_ok=True)
    assert checked == int(value) and type(checked) is int


@pytest.mark.parametrize("value", [0, -2, True, False, 1.0, 2.5, "3", None, np.float32(2.0)])
def test_other_values_are_one_line_user_errors(value: object) -> None:
    with pytest.raises(UserError) as info:
        check_positive_int("flat_fcn: width", value, numpy_ok=True)
    assert str(info.value) == f"flat_fcn: width must be a positive integer, got {value!r}"


def test_model_options_go_through_the_check() -> None:
    with pytest.raises(UserError, match=r"^num_classes must be a positive integer, got True$"):
        build_model("flat_fcn", num_classes=True)
    with pytest.raises(UserError, match=r"^flat_fcn: depth must be a positive integer, got 0$"):
        build_model("flat_fcn", num_classes=2, depth=0)
    with pytest.raises(UserError, match=r"^num_classes must be a positive integer"):
        build_model("flat_fcn", num_classes=np.int64(3))


def test_unknown_name_lists_the_valid_names() -> None:
    error = unknown_name("model", "unet3", {"unet": 1, "fcn8s": 2})
    assert str(error) == "unknown model 'unet3'; valid names: fcn8s, unet"
