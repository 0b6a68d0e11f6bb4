"""The matrix view of (transposed) convolution: against torch's ops and the lecture's equations."""

from __future__ import annotations

import itertools

import pytest
import sympy
import torch
import torch.nn.functional as F

from pixelwise.errors import UserError
from pixelwise.matrix import (
    conv_matrix,
    conv_matrix_2d,
    conv_product,
    crop_to_torch,
    crop_to_torch_2d,
    output_length,
    pad_input,
    pad_input_2d,
    stretch,
    transposed_conv_via_stretch,
    transposed_length,
    transposed_output_padding,
    transposed_product,
)

a, b, c, d, x, y, z = sympy.symbols("a b c d x y z")

# The lecture's two worked examples (kernel [x, y, z], input [a, b, c, d], padding 1), copied
# from its equations: X, X @ [0, a, b, c, d, 0], and X^T @ (the letters again, first o of them).
LECTURE = {
    "stride1": dict(
        stride=1,
        X=[[x, y, z, 0, 0, 0], [0, x, y, z, 0, 0], [0, 0, x, y, z, 0], [0, 0, 0, x, y, z]],
        conv=[a * y + b * z, a * x + b * y + c * z, b * x + c * y + d * z, c * x + d * y],
        XT=[[x, 0, 0, 0], [y, x, 0, 0], [z, y, x, 0], [0, z, y, x], [0, 0, z, y], [0, 0, 0, z]],
        transposed=[
            a * x,
            a * y + b * x,
            a * z + b * y + c * x,
            b * z + c * y + d * x,
            c * z + d * y,
            d * z,
        ],
    ),
    "stride2": dict(
        stride=2,
        X=[[x, y, z, 0, 0, 0], [0, 0, x, y, z, 0]],
        conv=[a * y + b * z, b * x + c * y + d * z],
        XT=[[x, 0], [y, 0], [z, x], [0, y], [0, z], [0, 0]],
        transposed=[a * x, a * y, a * z + b * x, b * y, b * z, 0],
    ),
}


def _same(got: sympy.Matrix, expected: list) -> bool:
    want = sympy.Matrix(expected)
    return got.shape == want.shape and all(
        sympy.expand(g - w) == 0 for g, w in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("name", LECTURE)
def test_lecture_worked_examples_letter_for_letter(name: str) -> None:
    case = LECTURE[name]
    X = conv_matrix([x, y, z], 4, stride=case["stride"], padding=1)
    assert isinstance(X, sympy.MatrixBase)
    assert X == sympy.Matrix(case["X"])  # exact structural equality, not only up to expansion
    assert X.T == sympy.Matrix(case["XT"])
    padded = pad_input([a, b, c, d], 1)
    assert padded == sympy.Matrix([0, a, b, c, d, 0])
    assert _same(conv_product(X, padded), case["conv"])
    # the lecture reuses the letters a, b, ... for the transposed convolution's input
    assert _same(transposed_product(X, [a, b, c, d][: X.rows]), case["transposed"])


@pytest.mark.parametrize("name", LECTURE)
def test_lecture_transposed_cropped_is_torch(name: str) -> None:
    """The lecture's X^T [a, b, ...] without one entry at each end (padding 1) is what
    conv_transpose1d returns with output_padding a: symbolically, then after substitution."""
    s = LECTURE[name]["stride"]
    X = conv_matrix([x, y, z], 4, stride=s, padding=1)
    letters = [a, b, c, d][: X.rows]
    cropped = crop_to_torch(transposed_product(X, letters), 1)
    assert _same(cropped, LECTURE[name]["transposed"][1:-1])
    values = {x: 2.0, y: -1.0, z: 0.5, a: 3.0, b: -4.0, c: 1.5, d: 7.0}
    ct = F.conv_transpose1d(
        torch.tensor([[[values[e] for e in letters]]], dtype=torch.float64),
        torch.tensor([[[2.0, -1.0, 0.5]]], dtype=torch.float64),
        stride=s,
        padding=1,
        output_padding=transposed_output_padding(4, 3, s, 1),
    ).view(-1)
    assert [float(e.subs(values)) for e in cropped] == ct.tolist()


def test_lecture_shapes() -> None:
    assert conv_matrix(torch.ones(3), 4, stride=1, padding=1).shape == (4, 6)
    assert conv_matrix(torch.ones(3), 4, stride=2, padding=1).shape == (2, 6)


def _cases_1d() -> list[tuple[int, int, int, int]]:
    """(kernel size, input length, stride, padding) with padding < kernel size."""
    cases = []
    for k, i, s in itertools.product((1, 2, 3, 4, 5), (1, 4, 5, 7), (1, 2, 3)):
        for p in range(k):
            if k <= i + 2 * p:
                cases.append((k, i, s, p))
    return cases


CASES_1D = _cases_1d()


@pytest.mark.parametrize("k,i,s,p", CASES_1D)
def test_conv_matrix_is_conv1d(k: int, i: int, s: int, p: int) -> None:
    w, u = torch.randn(k, dtype=torch.float64), torch.randn(i, dtype=torch.float64)
    X = conv_matrix(w, i, stride=s, padding=p)
    expected = F.conv1d(u.view(1, 1, i), w.view(1, 1, k), stride=s, padding=p).view(-1)
    assert X.shape == (output_length(i, k, s, p), i + 2 * p) == (expected.numel(), i + 2 * p)
    torch.testing.assert_close(X @ pad_input(u, p), expected)


@pytest.mark.parametrize("k,i,s,p", CASES_1D)
def test_transposed_matrix_is_conv_transpose1d(k: int, i: int, s: int, p: int) -> None:
    """X^T b on the padded grid, without p entries at each end, is conv_transpose1d with
    output_padding = D&V's a = (i + 2p - k) mod s: the original length i comes back."""
    w = torch.randn(k, dtype=torch.float64)
    X = conv_matrix(w, i, stride=s, padding=p)
    o = X.shape[0]
    v = torch.randn(o, dtype=torch.float64)
    grid = transposed_product(X, v)
    assert grid.shape == (i + 2 * p,)
    a_pad = transposed_output_padding(i, k, s, p)
    assert a_pad == (i + 2 * p - k) % s and 0 <= a_pad < s
    assert transposed_length(o, k, s, p, a_pad) == i
    expected = F.conv_transpose1d(
        v.view(1, 1, o), w.view(1, 1, k), stride=s, padding=p, output_padding=a_pad
    ).view(-1)
    assert expected.numel() == i
    torch.testing.assert_close(crop_to_torch(grid, p), expected)
    # every other legal output_padding is the same grid, kept to another length
    for extra in range(s):
        length = transposed_length(o, k, s, p, extra)
        if length < 1:  # torch refuses an empty output
            continue
        torch_out = F.conv_transpose1d(
            v.view(1, 1, o), w.view(1, 1, k), stride=s, padding=p, output_padding=extra
        ).view(-1)
        torch.testing.assert_close(crop_to_torch(grid, p, length), torch_out)


@pytest.mark.parametrize("k,i,s,p", CASES_1D)
def test_adjoint_identity_1d(k: int, i: int, s: int, p: int) -> None:
    """<X pad(u), v> = <u, crop(X^T v)> = <u, conv_transpose1d(v)>: the transposed convolution is
    the adjoint of the convolution on the unpadded input."""
    w, u = torch.randn(k, dtype=torch.float64), torch.randn(i, dtype=torch.float64)
    X = conv_matrix(w, i, stride=s, padding=p)
    v = torch.randn(X.shape[0], dtype=torch.float64)
    lhs = torch.dot(F.conv1d(u.view(1, 1, -1), w.view(1, 1, -1), stride=s, padding=p).view(-1), v)
    torch.testing.assert_close(torch.dot(X @ pad_input(u, p), v), lhs)
    torch.testing.assert_close(torch.dot(u, crop_to_torch(X.T @ v, p)), lhs)
    a_pad = transposed_output_padding(i, k, s, p)
    ct = F.conv_transpose1d(
        v.view(1, 1, -1), w.view(1, 1, -1), stride=s, padding=p, output_padding=a_pad
    )
    torch.testing.assert_close(torch.dot(u, ct.view(-1)), lhs)


@pytest.mark.parametrize("k,i,s,p", CASES_1D)
def test_transposed_is_bed_of_nails_then_flipped_conv_1d(k: int, i: int, s: int, p: int) -> None:
    """conv_transpose1d(stride s, padding p) == insert s-1 zeros between units, then a stride-1
    conv1d with the flipped kernel and padding k-1-p (+ output_padding on the right)."""
    o = output_length(i, k, s, p)
    v = torch.randn(2, 3, o, dtype=torch.float64)  # (N, C_in, L)
    weight = torch.randn(3, 2, k, dtype=torch.float64)  # (C_in, C_out, k), conv_transpose layout
    for extra in range(s):
        if transposed_length(o, k, s, p, extra) < 1:  # torch refuses an empty output
            continue
        expected = F.conv_transpose1d(v, weight, stride=s, padding=p, output_padding=extra)
        torch.testing.assert_close(transposed_conv_via_stretch(v, weight, s, p, extra), expected)


def _naive_stretch(values: list[float], s: int) -> list[float]:
    out: list[float] = []
    for index, value in enumerate(values):
        out.append(value)
        if index < len(values) - 1:
            out.extend([0.0] * (s - 1))
    return out


@pytest.mark.parametrize("s", [1, 2, 3])
def test_stretch_against_loop(s: int) -> None:
    v = torch.randn(5, dtype=torch.float64)
    assert stretch(v, s).tolist() == _naive_stretch(v.tolist(), s)
    img = torch.randn(2, 3, 4, dtype=torch.float64)
    out = stretch(img, s, dims=2)
    assert out.shape == (2, s * 2 + 1, s * 3 + 1)
    for ch in range(2):
        for r in range(out.shape[1]):
            for col in range(out.shape[2]):
                want = img[ch, r // s, col // s] if r % s == 0 and col % s == 0 else 0.0
                assert out[ch, r, col] == want


@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("i", [4, 5, 6, 7])
def test_symbolic_transposed_matrix_is_flipped_full_conv_of_stretched(
    s: int, p: int, i: int
) -> None:
    """X^T = (stride-1, full-padding conv matrix of the flipped kernel) @ zero-pad @ stretch,
    followed by a = (i + 2p - k) mod s zero rows: letter for letter."""
    kernel, k = [x, y, z], 3
    X = conv_matrix(kernel, i, stride=s, padding=p)
    o = X.rows
    L = s * (o - 1) + 1  # stretched length
    S = sympy.zeros(L, o)  # stretch: column j -> row s*j
    for j in range(o):
        S[s * j, j] = 1
    Z = sympy.zeros(L + 2 * (k - 1), L)  # zero padding by k-1 on each side
    for j in range(L):
        Z[k - 1 + j, j] = 1
    full = conv_matrix(kernel[::-1], L, stride=1, padding=k - 1)
    product = full * Z * S
    a_pad = transposed_output_padding(i, k, s, p)
    assert X.T.rows == product.rows + a_pad
    assert X.T[: product.rows, :] == product
    assert X.T[product.rows :, :] == sympy.zeros(a_pad, o)


def test_symbolic_and_numeric_matrices_agree() -> None:
    values = {x: 0.5, y: -2.0, z: 3.25}
    for s, p, i in itertools.product((1, 2, 3), (0, 1, 2), (3, 6)):
        sym = conv_matrix([x, y, z], i, stride=s, padding=p).subs(values)
        num = conv_matrix(
            torch.tensor([0.5, -2.0, 3.25], dtype=torch.float64), i, stride=s, padding=p
        )
        assert torch.equal(torch.tensor(sympy.matrix2numpy(sym, dtype=float)), num)


def test_conv_matrix_accepts_numpy_and_keeps_kernel_gradient() -> None:
    import numpy as np

    X = conv_matrix(np.array([1.0, 2.0, 3.0]), 4, stride=2, padding=1)
    assert X.tolist() == [[1, 2, 3, 0, 0, 0], [0, 0, 1, 2, 3, 0]]
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    conv_matrix(w, 5, stride=2, padding=1).sum().backward()
    # each tap appears once per output row
    torch.testing.assert_close(w.grad, torch.full((3,), 3.0, dtype=torch.float64))


CASES_2D = {
    "k3_s1_p1": dict(kernel=(3, 3), shape=(5, 6), stride=1, padding=1),
    "k3_s2_p1_odd": dict(kernel=(3, 3), shape=(7, 5), stride=2, padding=1),
    "k4_s2_p1": dict(kernel=(4, 4), shape=(6, 6), stride=2, padding=1),
    "k3_s3_p0": dict(kernel=(3, 3), shape=(8, 7), stride=3, padding=0),
    "k5_s3_p2": dict(kernel=(5, 5), shape=(7, 9), stride=3, padding=2),
    "rect_k2x3_s12_p01": dict(kernel=(2, 3), shape=(5, 6), stride=(1, 2), padding=(0, 1)),
    "rect_k3x1_s31_p20": dict(kernel=(3, 1), shape=(6, 4), stride=(3, 1), padding=(2, 0)),
}


def _pairs(value: int | tuple[int, int]) -> tuple[int, int]:
    return value if isinstance(value, tuple) else (value, value)


@pytest.mark.parametrize("name", CASES_2D)
def test_conv_matrix_2d_against_torch(name: str) -> None:
    case = CASES_2D[name]
    (kh, kw), (H, W) = case["kernel"], case["shape"]
    (sh, sw), (ph, pw) = _pairs(case["stride"]), _pairs(case["padding"])
    w, img = torch.randn(kh, kw, dtype=torch.float64), torch.randn(H, W, dtype=torch.float64)
    X = conv_matrix_2d(w, (H, W), stride=case["stride"], padding=case["padding"])
    expected = F.conv2d(
        img.view(1, 1, H, W), w.view(1, 1, kh, kw), stride=(sh, sw), padding=(ph, pw)
    )
    oh, ow = expected.shape[-2:]
    assert X.shape == (oh * ow, (H + 2 * ph) * (W + 2 * pw))
    torch.testing.assert_close(X @ pad_input_2d(img, case["padding"]), expected.reshape(-1))

    # transposed: X^T v on the padded grid, cropped, is conv_transpose2d with output_padding a
    v = torch.randn(oh, ow, dtype=torch.float64)
    a_h, a_w = transposed_output_padding(H, kh, sh, ph), transposed_output_padding(W, kw, sw, pw)
    ct = F.conv_transpose2d(
        v.view(1, 1, oh, ow),
        w.view(1, 1, kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        output_padding=(a_h, a_w),
    )[0, 0]
    assert ct.shape == (H, W)
    grid = transposed_product(X, v.reshape(-1))  # (Hp * Wp,)
    torch.testing.assert_close(crop_to_torch_2d(grid, (H, W), case["padding"]), ct)
    for e_h, e_w in itertools.product(range(sh), range(sw)):
        torch_out = F.conv_transpose2d(
            v.view(1, 1, oh, ow),
            w.view(1, 1, kh, kw),
            stride=(sh, sw),
            padding=(ph, pw),
            output_padding=(e_h, e_w),
        )[0, 0]
        size = (transposed_length(oh, kh, sh, ph, e_h), transposed_length(ow, kw, sw, pw, e_w))
        torch.testing.assert_close(crop_to_torch_2d(grid, (H, W), case["padding"], size), torch_out)

    # adjoint identity on the unpadded image
    lhs = torch.dot(expected.reshape(-1), v.reshape(-1))
    torch.testing.assert_close(torch.sum(img * ct), lhs)
    torch.testing.assert_close(
        torch.dot(X @ pad_input_2d(img, case["padding"]), v.reshape(-1)), lhs
    )

    # bed of nails then a stride-1 conv with the flipped kernel
    b = torch.randn(2, 3, oh, ow, dtype=torch.float64)
    weight = torch.randn(3, 2, kh, kw, dtype=torch.float64)
    ref = F.conv_transpose2d(
        b, weight, stride=(sh, sw), padding=(ph, pw), output_padding=(a_h, a_w)
    )
    got = transposed_conv_via_stretch(b, weight, (sh, sw), (ph, pw), (a_h, a_w))
    torch.testing.assert_close(got, ref)


def test_conv_matrix_2d_symbolic() -> None:
    """A symbolic 2x2 kernel on a 3x3 image, stride 2, padding 1: conv2d after substitution."""
    w = sympy.Matrix(2, 2, sympy.symbols("w0:4"))
    img = sympy.Matrix(3, 3, sympy.symbols("u0:9"))
    X = conv_matrix_2d(w, (3, 3), stride=2, padding=1)
    assert isinstance(X, sympy.MatrixBase) and X.shape == (4, 25)
    out = conv_product(X, pad_input_2d(img, 1))
    # the first output sees only the bottom-right tap on u0 (the rest is padding)
    assert out[0] == w[1, 1] * img[0, 0]
    values = {s: float(n + 1) for n, s in enumerate(list(w) + list(img))}
    expected = F.conv2d(
        torch.tensor(sympy.matrix2numpy(img.subs(values), dtype=float)).view(1, 1, 3, 3),
        torch.tensor(sympy.matrix2numpy(w.subs(values), dtype=float)).view(1, 1, 2, 2),
        stride=2,
        padding=1,
    ).reshape(-1)
    torch.testing.assert_close(
        torch.tensor([float(e.subs(values)) for e in out], dtype=torch.float64), expected
    )
    grid = transposed_product(X, sympy.Matrix(sympy.symbols("v0:4")))
    cropped = crop_to_torch_2d(grid, (3, 3), 1)
    assert cropped.shape == (3, 3)
    assert cropped[0, 0] == sympy.Symbol("v0") * w[1, 1]


def test_bed_of_nails_upsampler_is_stretch_plus_trailing_zeros() -> None:
    """Cross-check with pixelwise.upsample's bed of nails: stretch is it without trailing zeros."""
    from pixelwise import upsample

    xin = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    for s in (2, 3):
        out = upsample.make_upsampler("bed_of_nails", 2, scale=s).to(torch.float64)(xin)
        assert out.shape == (1, 2, 3 * s, 4 * s)
        # bed of nails = stretch followed by s - 1 trailing zeros in each dimension
        assert torch.equal(out, F.pad(stretch(xin, s, dims=2), (0, s - 1, 0, s - 1)))


BAD = {
    "empty_kernel": lambda: conv_matrix([], 4),
    "empty_symbolic_kernel": lambda: conv_matrix(sympy.Matrix([]), 4),
    "zero_stride": lambda: conv_matrix([1.0, 2.0, 3.0], 4, stride=0),
    "float_stride": lambda: conv_matrix([1.0, 2.0, 3.0], 4, stride=1.5),
    "negative_padding": lambda: conv_matrix([1.0, 2.0, 3.0], 4, padding=-1),
    "padding_not_below_kernel": lambda: conv_matrix([x, y, z], 4, padding=3),
    "kernel_longer_than_input": lambda: conv_matrix([1.0] * 5, 2, padding=1),
    "zero_length_input": lambda: conv_matrix([1.0], 0),
    "2d_kernel_to_1d": lambda: conv_matrix(torch.ones(2, 2), 4),
    "1d_kernel_to_2d": lambda: conv_matrix_2d(torch.ones(3), (4, 4)),
    "bad_pair": lambda: conv_matrix_2d(torch.ones(3, 3), (4, 4), stride=(1, 2, 3)),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_user_error(name: str) -> None:
    with pytest.raises(UserError):
        BAD[name]()
