"""Convolution and transposed convolution as matrices: the lecture's X and X^T.

A stride-`s` convolution (cross-correlation, as in `torch.nn.functional.conv1d`) of a 1-D input
`a` of length `i`, zero-padded by `p` on each side, with a kernel `w` of size `k` is a matrix
product `y = X @ pad(a)`: X has shape `(o, i + 2p)` with `o = floor((i + 2p - k) / s) + 1`
(Dumoulin & Visin, relation 6) and row `r` holds the kernel at columns `r*s ... r*s + k - 1`.

The transposed convolution is `X^T @ b`, a vector on the same padded grid (length `i + 2p`).
torch's `conv_transpose1d(b, w, stride=s, padding=p, output_padding=a)` returns exactly that
vector without `p` entries at each end, when `a = (i + 2p - k) mod s` (Dumoulin & Visin,
relation 14): `crop_to_torch` does this mapping. Equivalently (relation 14 again) a transposed
convolution is "insert s - 1 zeros between the units" (bed of nails without its trailing zeros,
`stretch`) followed by a stride-1 convolution with the flipped kernel and padding `k - 1 - p`
(plus `a` zeros on the far side): `transposed_conv_via_stretch`.

Every matrix function works for numbers (a torch tensor, a numpy array or a list of numbers:
returns a `torch.Tensor`) and for symbols (a `sympy.Matrix` or a sequence holding sympy
expressions: returns a `sympy.Matrix`); both share the index logic in `_band_1d`.
The 2-D matrix acts on the row-major flattened padded image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import sympy
import torch
import torch.nn.functional as F

from pixelwise.errors import UserError

logger = logging.getLogger(__name__)

Kernel = torch.Tensor | np.ndarray | sympy.MatrixBase | Sequence[Any]
Vector = torch.Tensor | np.ndarray | sympy.MatrixBase | Sequence[Any]
IntPair = int | tuple[int, int]


# ---------------------------------------------------------------------------------------------
# sizes (Dumoulin & Visin)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def output_length(input_length: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Length of a convolution's output: `o = floor((i + 2p - k) / s) + 1` (D&V relation 6).

    Raises `UserError` for sizes the lecture's picture cannot draw: an empty kernel or input, a
    stride < 1, a negative padding, a padding >= the kernel size (the transposed convolution's
    padding `k - 1 - p` would be negative) or a kernel longer than the padded input.
    """
    k = _check_int("kernel size", kernel_size, 1)
    i = _check_int("input length", input_length, 1)
    s = _check_int("stride", stride, 1)
    p = _check_int("padding", padding, 0)
    if p >= k:
        raise UserError(f"padding {p} must be smaller than the kernel size {k}")
    if k > i + 2 * p:
        raise UserError(
            f"kernel size {k} is longer than the padded input ({i} + 2*{p} = {i + 2 * p})"
        )
    return (i + 2 * p - k) // s + 1


def transposed_output_padding(
    input_length: int, kernel_size: int, stride: int = 1, padding: int = 0
) -> int:
    """Dumoulin & Visin's `a = (i + 2p - k) mod s`: torch's `output_padding` that makes the
    transposed convolution give back the original input length `i` (D&V relation 14)."""
    output_length(input_length, kernel_size, stride, padding)  # validates
    return (input_length + 2 * padding - kernel_size) % stride


def transposed_length(
    input_length: int, kernel_size: int, stride: int = 1, padding: int = 0, output_padding: int = 0
) -> int:
    """Length of `conv_transpose1d`'s output for an input of length `i'` (D&V relation 14):
    `o' = s (i' - 1) + a + k - 2p` with `a = output_padding`."""
    i = _check_int("input length", input_length, 1)
    k = _check_int("kernel size", kernel_size, 1)
    s = _check_int("stride", stride, 1)
    p = _check_int("padding", padding, 0)
    a = _check_int("output_padding", output_padding, 0)
    return s * (i - 1) + a + k - 2 * p


def _band_1d(
    kernel_size: int, input_length: int, stride: int, padding: int
) -> tuple[int, int, list[tuple[int, int, int]]]:
    """The index logic shared by every matrix: `(o, i + 2p, [(row, column, tap), ...])`.

    Row `r` of X holds kernel tap `j` at column `r*s + j` of the padded input.
    """
    o = output_length(input_length, kernel_size, stride, padding)
    entries = [(r, r * stride + j, j) for r in range(o) for j in range(kernel_size)]
    return o, input_length + 2 * padding, entries


def _pair(name: str, value: IntPair) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise UserError(f"{name} must be an integer or a pair of integers, got {value!r}")
        return value[0], value[1]
    return value, value


# ---------------------------------------------------------------------------------------------
# numbers or symbols


def _flat(values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        return [item for value in values for item in _flat(value)]
    return [values]


def is_symbolic(values: Any) -> bool:
    """True for a `sympy.Matrix` or a (nested) sequence holding at least one sympy expression."""
    if isinstance(values, sympy.MatrixBase):
        return True
    if isinstance(values, torch.Tensor):
        return False
    if isinstance(values, np.ndarray):
        return values.dtype == object and any(isinstance(v, sympy.Basic) for v in values.flat)
    return any(isinstance(v, sympy.Basic) for v in _flat(values))


def _sympy_entries(values: Any) -> sympy.Matrix:
    """A sympy Matrix of the values (a 1-D sequence becomes a column)."""
    if isinstance(values, sympy.MatrixBase):
        return sympy.Matrix(values)
    if isinstance(values, np.ndarray):
        values = values.tolist()
    values = list(values)
    if values and isinstance(values[0], (list, tuple)):  # nested: a 2-D matrix
        return sympy.Matrix([[sympy.sympify(v, strict=True) for v in row] for row in values])
    return sympy.Matrix([sympy.sympify(v, strict=True) for v in values])


def _symbolic_kernel_1d(kernel: Kernel) -> list[sympy.Expr]:
    w = _sympy_entries(kernel)
    if w.rows != 1 and w.cols != 1:
        raise UserError(f"a 1-D kernel must be a vector, got a {w.rows}x{w.cols} matrix")
    if len(w) == 0:
        raise UserError("kernel is empty")
    return list(w)


def _tensor_kernel(kernel: Kernel, ndim: int) -> torch.Tensor:
    w = torch.as_tensor(kernel)
    if w.ndim != ndim:
        raise UserError(f"kernel must have {ndim} dimension(s), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise UserError("kernel is empty")
    return w


# ---------------------------------------------------------------------------------------------
# the matrices


def conv_matrix(
    kernel: Kernel, input_length: int, stride: int = 1, padding: int = 0
) -> torch.Tensor | sympy.Matrix:
    """The lecture's X: `conv1d(a, kernel, stride, padding) == X @ pad(a, padding)`.

    kernel: (k,) numbers (tensor, array, list) or symbols (sympy Matrix / sequence of sympy
    expressions). Returns X of shape `(o, input_length + 2*padding)` with
    `o = output_length(input_length, k, stride, padding)`: a `torch.Tensor` of the kernel's dtype
    for numbers (differentiable in the kernel), a `sympy.Matrix` for symbols.
    For [x, y, z], length 4, padding 1: 4x6 at stride 1 and 2x6 at stride 2.
    """
    if is_symbolic(kernel):
        w = _symbolic_kernel_1d(kernel)
        o, n, entries = _band_1d(len(w), input_length, stride, padding)
        X = sympy.zeros(o, n)
        for row, col, tap in entries:
            X[row, col] = w[tap]
        return X
    w = _tensor_kernel(kernel, 1)
    o, n, entries = _band_1d(w.shape[0], input_length, stride, padding)
    rows, cols, taps = torch.tensor(entries, dtype=torch.long).unbind(1)
    X = w.new_zeros(o, n)
    X[rows, cols] = w[taps]  # index_put keeps the kernel's autograd graph
    return X


def conv_matrix_2d(
    kernel2d: Kernel, input_shape: tuple[int, int], stride: IntPair = 1, padding: IntPair = 0
) -> torch.Tensor | sympy.Matrix:
    """X for a 2-D convolution, acting on the row-major flattened zero-padded image.

    kernel2d: (kh, kw) numbers or symbols; input_shape (H, W); stride and padding an int or a
    pair (rows, columns). Returns X of shape `(oh * ow, (H + 2ph) * (W + 2pw))` with
    `conv2d(img, kernel2d, stride, padding).flatten() == X @ F.pad(img, ...).flatten()`.
    Its index logic is the product of the 1-D bands of the rows and of the columns.
    """
    sh, sw = _pair("stride", stride)
    ph, pw = _pair("padding", padding)
    height, width = _pair("input_shape", input_shape)
    symbolic = is_symbolic(kernel2d)
    if symbolic:
        w = _sympy_entries(kernel2d)
        kh, kw = w.shape
    else:
        w = _tensor_kernel(kernel2d, 2)
        kh, kw = w.shape
    if kh * kw == 0:
        raise UserError("kernel is empty")
    oh, _, row_band = _band_1d(kh, height, sh, ph)
    ow, wp, col_band = _band_1d(kw, width, sw, pw)
    # output (r1, r2) -> flat r1 * ow + r2; padded input (c1, c2) -> flat c1 * wp + c2
    entries = [
        (r1 * ow + r2, c1 * wp + c2, u, v) for r1, c1, u in row_band for r2, c2, v in col_band
    ]
    n = (height + 2 * ph) * wp
    if symbolic:
        X = sympy.zeros(oh * ow, n)
        for row, col, u, v in entries:
            X[row, col] = w[u, v]
        return X
    rows, cols, us, vs = torch.tensor(entries, dtype=torch.long).unbind(1)
    X = w.new_zeros(oh * ow, n)
    X[rows, cols] = w[us, vs]
    return X


# ---------------------------------------------------------------------------------------------
# padding, products, and the mapping to torch's transposed convolution


def pad_input(a: Vector, padding: int) -> torch.Tensor | sympy.Matrix:
    """`a` (..., i) zero-padded by `padding` on each side of its last dimension: (..., i + 2p).

    Symbols give a sympy column vector; numbers a tensor.
    """
    p = _check_int("padding", padding, 0)
    if is_symbolic(a):
        column = list(_sympy_entries(a))
        return sympy.Matrix([0] * p + column + [0] * p)
    return F.pad(torch.as_tensor(a), (p, p))


def pad_input_2d(image: Vector, padding: IntPair) -> torch.Tensor | sympy.Matrix:
    """A (H, W) image zero-padded and flattened row-major: ((H + 2ph) * (W + 2pw),),
    the vector `conv_matrix_2d` acts on."""
    ph, pw = _pair("padding", padding)
    ph, pw = _check_int("padding", ph, 0), _check_int("padding", pw, 0)
    if is_symbolic(image):
        img = _sympy_entries(image)
        padded = sympy.zeros(img.rows + 2 * ph, img.cols + 2 * pw)
        padded[ph : ph + img.rows, pw : pw + img.cols] = img
        return padded.reshape(len(padded), 1)  # (Hp * Wp, 1) row-major
    img = torch.as_tensor(image)
    return F.pad(img, (pw, pw, ph, ph)).reshape(-1)  # (Hp, Wp) -> (Hp * Wp,) row-major


def conv_product(X: torch.Tensor | sympy.Matrix, padded: Vector) -> torch.Tensor | sympy.Matrix:
    """`X @ padded`: the convolution of the padded input (sympy entries expanded)."""
    if isinstance(X, sympy.MatrixBase):
        return (X * _sympy_entries(padded)).applyfunc(sympy.expand)
    return X @ torch.as_tensor(padded, dtype=X.dtype)


def transposed_product(X: torch.Tensor | sympy.Matrix, b: Vector) -> torch.Tensor | sympy.Matrix:
    """`X^T @ b`: the transposed convolution of `b` (o,), on the padded grid (i + 2p,).

    Sympy entries are expanded. Map the result to torch's `conv_transpose1d` with
    `crop_to_torch`.
    """
    if isinstance(X, sympy.MatrixBase):
        return (X.T * _sympy_entries(b)).applyfunc(sympy.expand)
    return X.T @ torch.as_tensor(b, dtype=X.dtype)


def crop_to_torch(
    y: torch.Tensor | sympy.Matrix, padding: int, length: int | None = None
) -> torch.Tensor | sympy.Matrix:
    """Map `X^T @ b` on the padded grid (..., i + 2p) to `conv_transpose1d(b, padding=p, ...)`.

    torch's output entry `j` is entry `j + p` of the padded grid. By default keeps `i` entries
    (drops `p` at each end), which is what torch returns with
    `output_padding = transposed_output_padding(i, k, s, p)`; pass `length =
    transposed_length(o, k, s, p, output_padding)` for another output_padding (entries past the
    grid are zeros: no kernel tap reaches them).
    """
    p = _check_int("padding", padding, 0)
    n = y.shape[0] if isinstance(y, sympy.MatrixBase) else y.shape[-1]
    length = n - 2 * p if length is None else _check_int("length", length, 0)
    extra = max(0, p + length - n)
    if isinstance(y, sympy.MatrixBase):
        return sympy.Matrix(list(y[p : p + length, 0]) + [0] * extra)
    return F.pad(y[..., p : p + length], (0, extra))


def crop_to_torch_2d(
    y: torch.Tensor | sympy.Matrix,
    input_shape: tuple[int, int],
    padding: IntPair,
    size: tuple[int, int] | None = None,
) -> torch.Tensor | sympy.Matrix:
    """Map `X^T @ b` for `conv_matrix_2d` ((H + 2ph) * (W + 2pw),) to `conv_transpose2d`'s (h, w).

    `size` defaults to `input_shape` (torch with output_padding = D&V's `a` per dimension).
    """
    height, width = _pair("input_shape", input_shape)
    ph, pw = _pair("padding", padding)
    hp, wp = height + 2 * ph, width + 2 * pw
    h, w = (height, width) if size is None else _pair("size", size)
    extra_h, extra_w = max(0, ph + h - hp), max(0, pw + w - wp)
    if isinstance(y, sympy.MatrixBase):
        grid = y.reshape(hp, wp)  # (Hp * Wp, 1) -> (Hp, Wp) row-major
        grid = grid.col_join(sympy.zeros(extra_h, wp)).row_join(sympy.zeros(hp + extra_h, extra_w))
        return grid[ph : ph + h, pw : pw + w]
    grid = y.reshape(*y.shape[:-1], hp, wp)  # (..., Hp * Wp) -> (..., Hp, Wp) row-major
    grid = F.pad(grid, (0, extra_w, 0, extra_h))
    return grid[..., ph : ph + h, pw : pw + w]


# ---------------------------------------------------------------------------------------------
# transposed convolution = zeros inserted + stride-1 convolution with the flipped kernel


def stretch(x: torch.Tensor, stride: IntPair, dims: int = 1) -> torch.Tensor:
    """Insert `stride - 1` zeros between neighbouring units of the last `dims` dimensions.

    (..., n) -> (..., s(n - 1) + 1) for dims=1; (..., h, w) -> (..., sh(h-1)+1, sw(w-1)+1) for
    dims=2 (stride an int or a pair). This is bed of nails (each value at the top-left of its
    s x s block) without its trailing `s - 1` zeros. Written by hand because torch has no
    zero-insertion op; one strided slice assignment is a single copy.
    """
    if dims not in (1, 2):
        raise UserError(f"dims must be 1 or 2, got {dims}")
    strides = _pair("stride", stride) if dims == 2 else (stride,)
    strides = tuple(_check_int("stride", s, 1) for s in strides)
    size = [s * (n - 1) + 1 for s, n in zip(strides, x.shape[-dims:], strict=True)]
    out = x.new_zeros(*x.shape[:-dims], *size)
    if dims == 1:
        out[..., :: strides[0]] = x
    else:
        out[..., :: strides[0], :: strides[1]] = x
    return out


def transposed_conv_via_stretch(
    b: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
) -> torch.Tensor:
    """`conv_transpose1d/2d(b, weight, stride, padding, output_padding)` computed as the lecture's
    alternative (D&V relation 14): zeros inserted (`stretch`), then a stride-1 convolution with
    the flipped kernel, padding `k - 1 - p` on each side plus `output_padding` on the far side.

    b: (N, C_in, L) or (N, C_in, H, W); weight: (C_in, C_out, k) or (C_in, C_out, kh, kw), the
    layout of `conv_transpose`. Needs padding < kernel size.
    """
    dims = weight.ndim - 2
    if dims not in (1, 2) or b.ndim != dims + 2:
        raise UserError(
            f"expected (N, C, L) or (N, C, H, W) input with a matching weight, "
            f"got {tuple(b.shape)} and {tuple(weight.shape)}"
        )
    pads = _pair("padding", padding) if dims == 2 else (padding,)
    extras = _pair("output_padding", output_padding) if dims == 2 else (output_padding,)
    x = stretch(b, stride, dims=dims)
    flipped = weight.transpose(0, 1).flip(list(range(2, weight.ndim)))  # (C_out, C_in, k...)
    pad_spec: list[int] = []
    for k, p, a in reversed(
        list(zip(weight.shape[2:], pads, extras, strict=True))
    ):  # F.pad: last dim first
        if p >= k:
            raise UserError(f"padding {p} must be smaller than the kernel size {k}")
        pad_spec += [k - 1 - p, k - 1 - p + a]
    x = F.pad(x, pad_spec)
    return F.conv1d(x, flipped) if dims == 1 else F.conv2d(x, flipped)
