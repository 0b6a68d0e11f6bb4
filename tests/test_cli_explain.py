"""`pixelwise explain conv-matrix`: the lecture's worked equations, and numbers against torch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pixelwise.cli import EXIT_USER_ERROR, main

# The lecture's two worked examples, entry by entry (kernel [x, y, z], input [a, b, c, d], p = 1).
LECTURE_JSON = {
    "1": {
        "matrix": [
            ["x", "y", "z", 0, 0, 0],
            [0, "x", "y", "z", 0, 0],
            [0, 0, "x", "y", "z", 0],
            [0, 0, 0, "x", "y", "z"],
        ],
        "transposed": [
            ["x", 0, 0, 0],
            ["y", "x", 0, 0],
            ["z", "y", "x", 0],
            [0, "z", "y", "x"],
            [0, 0, "z", "y"],
            [0, 0, 0, "z"],
        ],
        "conv_output": ["a*y + b*z", "a*x + b*y + c*z", "b*x + c*y + d*z", "c*x + d*y"],
        "transposed_output": [
            "a*x",
            "a*y + b*x",
            "a*z + b*y + c*x",
            "b*z + c*y + d*x",
            "c*z + d*y",
            "d*z",
        ],
        "torch_transposed_output": None,
    },
    "2": {
        "matrix": [["x", "y", "z", 0, 0, 0], [0, 0, "x", "y", "z", 0]],
        "transposed": [["x", 0], ["y", 0], ["z", "x"], [0, "y"], [0, "z"], [0, 0]],
        "conv_output": ["a*y + b*z", "b*x + c*y + d*z"],
        "transposed_output": ["a*x", "a*y", "a*z + b*x", "b*y", "b*z", 0],
        "torch_transposed_output": None,
    },
}


def _run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["explain", "conv-matrix", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # stdout carries the JSON alone


@pytest.mark.parametrize("stride", LECTURE_JSON)
def test_lecture_json_exact(capsys: pytest.CaptureFixture[str], stride: str) -> None:
    got = _run_json(
        capsys, "--kernel", "x,y,z", "--input", "a,b,c,d", "--stride", stride, "--padding", "1"
    )
    assert got == LECTURE_JSON[stride]


def test_defaults_are_the_lecture_first_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_json(capsys) == LECTURE_JSON["1"]


def test_lecture_text_stride2(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "explain",
                "conv-matrix",
                "--kernel",
                "x,y,z",
                "--input",
                "a,b,c,d",
                "--stride",
                "2",
                "--padding",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    conv = (
        "                       [ 0 ]\n"
        "                       [ a ]\n"
        "[ x  y  z  0  0  0 ] @ [ b ] = [ a*y + b*z       ]\n"
        "[ 0  0  x  y  z  0 ]   [ c ]   [ b*x + c*y + d*z ]\n"
        "                       [ d ]\n"
        "                       [ 0 ]\n"
    )
    transposed = (
        "[ x  0 ]           [ a*x       ]\n"
        "[ y  0 ]           [ a*y       ]\n"
        "[ z  x ] @ [ a ] = [ a*z + b*x ]\n"
        "[ 0  y ]   [ b ]   [ b*y       ]\n"
        "[ 0  z ]           [ b*z       ]\n"
        "[ 0  0 ]           [ 0         ]\n"
    )
    assert conv in out and transposed in out
    assert "output_padding=1" in out and "[ a*y, a*z + b*x, b*y, b*z ]" in out


NUMERIC = {
    "lecture_s2": dict(kernel=[1, 2, 3], values=[1, 0.5, 2, -1], stride=2, padding=1),
    "s1_p0": dict(kernel=[2, -1], values=[3, 1, 4, 1, 5], stride=1, padding=0),
    "s3_p2": dict(kernel=[0.25, 1, -2, 0.5], values=[1, 2, 3, 4, 5, 6, 7, 8], stride=3, padding=2),
    "s2_p1_k4_odd": dict(kernel=[1, 1, 1, 1], values=[1, -2, 3, -4, 5, 6, 7], stride=2, padding=1),
}


@pytest.mark.parametrize("name", NUMERIC)
def test_numeric_against_torch(capsys: pytest.CaptureFixture[str], name: str) -> None:
    case = NUMERIC[name]
    kernel, values, s, p = case["kernel"], case["values"], case["stride"], case["padding"]
    got = _run_json(
        capsys,
        "--kernel",
        ",".join(map(str, kernel)),
        "--input",
        ",".join(map(str, values)),
        "--stride",
        str(s),
        "--padding",
        str(p),
    )
    w = torch.tensor(kernel, dtype=torch.float64).view(1, 1, -1)
    u = torch.tensor(values, dtype=torch.float64).view(1, 1, -1)
    conv = F.conv1d(u, w, stride=s, padding=p).view(-1)
    o, i, k = conv.numel(), len(values), len(kernel)
    assert got["conv_output"] == pytest.approx(conv.tolist(), rel=1e-12, abs=1e-12)
    assert len(got["matrix"]) == o and len(got["matrix"][0]) == i + 2 * p
    assert got["transposed"] == [list(col) for col in zip(*got["matrix"], strict=True)]
    a_pad = (i + 2 * p - k) % s
    ct = F.conv_transpose1d(u[..., :o], w, stride=s, padding=p, output_padding=a_pad).view(-1)
    assert ct.numel() == i
    assert got["torch_transposed_output"] == pytest.approx(ct.tolist(), rel=1e-12, abs=1e-12)
    # the lecture's padded result, without p entries at each end, is torch's
    grid = got["transposed_output"]
    assert len(grid) == i + 2 * p
    assert grid[p : p + i] == pytest.approx(got["torch_transposed_output"], rel=1e-12, abs=1e-12)
    # integral numbers are JSON integers, others floats
    for entry in [*grid, *got["conv_output"], *got["torch_transposed_output"]]:
        assert isinstance(entry, int) or (isinstance(entry, float) and not entry.is_integer())


def test_numeric_lecture_values_exact(capsys: pytest.CaptureFixture[str]) -> None:
    """x, y, z = 1, 2, 3 and a, b, c, d = 1, 0.5, 2, -1 in the lecture's stride-2 equations."""
    got = _run_json(
        capsys, "--kernel", "1,2,3", "--input", "1,0.5,2,-1", "--stride", "2", "--padding", "1"
    )
    assert got == {
        "matrix": [[1, 2, 3, 0, 0, 0], [0, 0, 1, 2, 3, 0]],
        "transposed": [[1, 0], [2, 0], [3, 1], [0, 2], [0, 3], [0, 0]],
        "conv_output": [3.5, 1.5],  # a*y + b*z = 2 + 1.5; b*x + c*y + d*z = 0.5 + 4 - 3
        "transposed_output": [1, 2, 3.5, 1, 1.5, 0],  # a*x, a*y, a*z + b*x, b*y, b*z, 0
        "torch_transposed_output": [2, 3.5, 1, 1.5],
    }


def test_negative_first_entry_with_equals(capsys: pytest.CaptureFixture[str]) -> None:
    got = _run_json(capsys, "--kernel=-1,2,3", "--input=-1,2,3", "--padding", "0")
    assert got["conv_output"] == [1 + 4 + 9]
    assert got["torch_transposed_output"] == [1, -2, -3]  # -1 * [-1, 2, 3]


def test_mixed_numbers_and_letters_is_symbolic(capsys: pytest.CaptureFixture[str]) -> None:
    got = _run_json(
        capsys, "--kernel", "1,2,1", "--input", "a,b,c", "--stride", "1", "--padding", "1"
    )
    assert got["matrix"][0] == [1, 2, 1, 0, 0]
    assert got["conv_output"] == ["2*a + b", "a + 2*b + c", "b + 2*c"]
    assert got["torch_transposed_output"] is None


def test_fractional_number_in_symbolic_mode(capsys: pytest.CaptureFixture[str]) -> None:
    got = _run_json(
        capsys, "--kernel", "0.5,w", "--input", "a,b", "--stride", "1", "--padding", "0"
    )
    assert got["matrix"] == [[0.5, "w"]]
    assert got["conv_output"] == ["a/2 + b*w"]
    assert got["transposed_output"] == ["a/2", "a*w"]


def test_transposed_skipped_when_output_longer_than_input(
    capsys: pytest.CaptureFixture[str],
) -> None:
    got = _run_json(
        capsys, "--kernel", "1,2,3", "--input", "1,2", "--stride", "1", "--padding", "2"
    )
    assert got["conv_output"] == [3, 8, 5, 2]  # conv1d([1, 2], [1, 2, 3], padding=2), by hand
    assert got["transposed_output"] is None and got["torch_transposed_output"] is None


BAD = {
    "empty_kernel": ["--kernel", ""],
    "empty_entry": ["--kernel", "x,,z"],
    "zero_stride": ["--stride", "0"],
    "negative_stride": ["--stride", "-2"],
    "negative_padding": ["--padding", "-1"],
    "padding_equals_kernel": ["--padding", "3"],
    "kernel_longer_than_padded_input": ["--kernel", "1,2,3,4,5,6,7", "--padding", "1"],
    "not_a_name": ["--input", "a,2b,c"],
    "not_finite": ["--input", "1,inf"],
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_one_line_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delenv("PIXELWISE_DEBUG", raising=False)
    assert main(["explain", "conv-matrix", *BAD[name], "--json"]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pixelwise: error: ")


def test_topic_required() -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["explain"])
    assert excinfo.value.code == 2
