"""`pixelwise explain TOPIC ...`: an idea of the lecture, computed and shown.

Topics live in the plain dict `TOPICS` (name -> help, argument builder, runner); a new topic is a
new entry. Today:

- `conv-matrix`: convolution and transposed convolution as the matrices X and X^T
  (`pixelwise.matrix`), symbolically with letters or numerically with numbers.

torch and sympy are imported inside the runners, so that `pixelwise --help` stays fast.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from pixelwise.cli._common import add_json_flag, emit_json
from pixelwise.errors import UserError


class Topic(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------
# conv-matrix


def _add_conv_matrix_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        default="x,y,z",
        help="comma-separated kernel entries, numbers or names (default: the lecture's x,y,z); "
        "write --kernel=-1,2,1 when the first entry is negative",
    )
    parser.add_argument(
        "--input",
        default="a,b,c,d",
        help="comma-separated input entries, numbers or names (default: the lecture's a,b,c,d); "
        "its first o entries are reused as the transposed convolution's input, as the lecture does",
    )
    parser.add_argument("--stride", type=int, default=1, help="stride s (default 1)")
    parser.add_argument(
        "--padding",
        type=int,
        default=1,
        help="zero padding p on each side, smaller than the kernel (default: the lecture's 1)",
    )
    add_json_flag(parser)


def _tokens(text: str, flag: str) -> list[str]:
    if not text.strip():
        raise UserError(
            f"{flag} is empty; give comma-separated numbers or names, e.g. {flag} x,y,z"
        )
    tokens = [token.strip() for token in text.split(",")]
    if not all(tokens):
        raise UserError(f"{flag} {text!r} has an empty entry")
    return tokens


def _number(token: str, flag: str) -> int | float | None:
    """The number `token` spells, or None when it is not a number."""
    try:
        return int(token)
    except ValueError:
        pass
    try:
        value = float(token)
    except ValueError:
        return None
    if not math.isfinite(value):
        raise UserError(f"{flag} entry {token!r} is not a finite number")
    return value


def _symbol(token: str, flag: str) -> Any:
    """A sympy number or symbol for `token` (sympy imported by the caller)."""
    import sympy

    number = _number(token, flag)
    if number is not None:
        return sympy.Rational(token) if isinstance(number, float) else sympy.Integer(number)
    if not token.isidentifier():
        raise UserError(f"{flag} entry {token!r} is neither a number nor a name")
    return sympy.Symbol(token)


def _json_value(value: Any) -> int | float | str:
    """A number for a number (int when integral), the sympy expression's str otherwise."""
    import sympy

    if isinstance(value, sympy.Basic):
        if not value.is_Number:
            return str(value)
        value = float(value)
    number = float(value)
    return int(number) if number.is_integer() else number


def _rows(matrix: Any) -> list[list[int | float | str]]:
    return [
        [_json_value(matrix[r, c]) for c in range(matrix.shape[1])] for r in range(matrix.shape[0])
    ]


def _vector(vector: Any) -> list[int | float | str]:
    return [_json_value(v) for v in list(vector)]  # a tensor, a sympy column or a list


def _block(rows: Sequence[Sequence[Any]]) -> list[str]:
    """A bracketed, column-aligned text block, one line per row."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    return [
        "[ " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " ]"
        for row in cells
    ]


def _side_by_side(blocks: Sequence[list[str]], operators: Sequence[str]) -> str:
    """Blocks vertically centred next to each other, operators on the middle line."""
    height = max(len(block) for block in blocks)
    middle = (height - 1) // 2
    columns: list[list[str]] = []
    for index, block in enumerate(blocks):
        width = max(len(line) for line in block)
        top = (height - len(block)) // 2
        columns.append(
            [
                (block[r - top] if 0 <= r - top < len(block) else "").ljust(width)
                for r in range(height)
            ]
        )
        if index < len(operators):
            op = f" {operators[index]} "
            columns.append([op if r == middle else " " * len(op) for r in range(height)])
    return "\n".join("".join(column[r] for column in columns).rstrip() for r in range(height))


def _run_conv_matrix(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from pixelwise import matrix as mx

    kernel_tokens = _tokens(args.kernel, "--kernel")
    input_tokens = _tokens(args.input, "--input")
    k, i, s, p = len(kernel_tokens), len(input_tokens), args.stride, args.padding
    o = mx.output_length(i, k, s, p)  # validates stride, padding and sizes (UserError)
    a_pad = mx.transposed_output_padding(i, k, s, p)
    numeric = all(_number(t, "--kernel") is not None for t in kernel_tokens) and all(
        _number(t, "--input") is not None for t in input_tokens
    )

    if numeric:
        kernel = torch.tensor([_number(t, "--kernel") for t in kernel_tokens], dtype=torch.float64)
        values = torch.tensor([_number(t, "--input") for t in input_tokens], dtype=torch.float64)
    else:
        kernel = [_symbol(t, "--kernel") for t in kernel_tokens]
        values = [_symbol(t, "--input") for t in input_tokens]
    X = mx.conv_matrix(kernel, i, stride=s, padding=p)
    padded = mx.pad_input(values, p)
    conv_output = mx.conv_product(X, padded)
    transposed_input = values[:o] if o <= i else None  # the lecture reuses the letters
    transposed_output = torch_output = cropped = None
    if transposed_input is not None:
        transposed_output = mx.transposed_product(X, transposed_input)
        cropped = mx.crop_to_torch(transposed_output, p)
        if numeric:
            torch_output = F.conv_transpose1d(
                transposed_input.view(1, 1, o),  # (o,) -> (N=1, C_in=1, o)
                kernel.view(1, 1, k),  # (k,) -> (C_in=1, C_out=1, k)
                stride=s,
                padding=p,
                output_padding=a_pad,
            ).view(-1)  # (1, 1, i) -> (i,)

    result = {
        "matrix": _rows(X),
        "transposed": _rows(X.T),
        "conv_output": _vector(conv_output),
        "transposed_output": None if transposed_output is None else _vector(transposed_output),
        "torch_transposed_output": None if torch_output is None else _vector(torch_output),
    }
    if args.json:
        emit_json(result)
        return 0

    def column(entries: list[Any]) -> list[str]:
        return _block([[entry] for entry in entries])

    kernel_text, input_text = ", ".join(kernel_tokens), ", ".join(input_tokens)
    lines = [
        f"conv-matrix: kernel [{kernel_text}] (k = {k}), input [{input_text}] (i = {i}), "
        f"stride s = {s}, padding p = {p}",
        f"output length o = floor((i + 2p - k) / s) + 1 "
        f"= floor(({i} + {2 * p} - {k}) / {s}) + 1 = {o}",
        "",
        f"convolution: X @ pad(input), X is {o} x {i + 2 * p} and acts on the input zero-padded "
        f"by {p} on each side",
        "",
        _side_by_side(
            [_block(result["matrix"]), column(_vector(padded)), column(result["conv_output"])],
            ["@", "="],
        ),
        "",
    ]
    if transposed_output is None:
        lines.append(
            f"transposed convolution: skipped, X^T needs o = {o} input entries and --input has {i}"
        )
    else:
        lines += [
            f"transposed convolution: X^T @ (the first o = {o} entries of the input), "
            f"on the padded grid of length {i + 2 * p}",
            "",
            _side_by_side(
                [
                    _block(result["transposed"]),
                    column(_vector(transposed_input)),
                    column(result["transposed_output"]),
                ],
                ["@", "="],
            ),
            "",
            f"torch: conv_transpose1d(stride={s}, padding={p}, output_padding={a_pad}) returns "
            f"this without {p} entr{'y' if p == 1 else 'ies'} at each end",
            f"(output_padding = (i + 2p - k) mod s, Dumoulin & Visin's a, "
            f"gives back length i = {i}):",
            "[ " + ", ".join(str(v) for v in _vector(torch_output if numeric else cropped)) + " ]",
        ]
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------------------------

TOPICS: dict[str, Topic] = {
    "conv-matrix": Topic(
        help="convolution and transposed convolution as the matrices X and X^T "
        "(letters or numbers)",
        add_arguments=_add_conv_matrix_arguments,
        run=_run_conv_matrix,
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show an idea of the lecture, computed: " + ", ".join(TOPICS),
        description="Show an idea of the lecture, computed and printed.",
    )
    topics = parser.add_subparsers(dest="topic", metavar="TOPIC", required=True)
    for name, topic in TOPICS.items():
        topic.add_arguments(topics.add_parser(name, help=topic.help, description=topic.help))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return TOPICS[args.topic].run(args)
