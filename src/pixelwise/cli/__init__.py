"""The `pixelwise` command.

Each subcommand lives in its own module of this package and exposes `register(subparsers)`,
which adds its parser and sets `func` to a runner taking the parsed `argparse.Namespace` and
returning an exit code. Command modules import torch only inside their runners, so that
`pixelwise --help` answers fast.

User mistakes (`ValueError`, which `pixelwise.errors.UserError` subclasses, and `OSError`) are
shown as one line on stderr with exit code 2; set `PIXELWISE_DEBUG=1` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pixelwise import __version__

# subcommand modules, in the order `--help` lists them
COMMAND_MODULES = ("data", "metrics", "models", "train", "eval", "predict", "export", "upsamplers",
                   "explain", "demo", "experiment")

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelwise",
        description="Image segmentation, from the sliding window to U-Net and beyond.",
    )
    parser.add_argument("--version", action="version", version=f"pixelwise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"pixelwise.cli.{name}").register(subparsers)
    return parser


def _configure_logging(verbose: bool) -> None:
    # Logs always go to stderr, so that `--json` output on stdout stays pure JSON.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # stdout closed early (e.g. `pixelwise ... --json | head`): not an error worth a message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as exc:
        if os.environ.get("PIXELWISE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pixelwise: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("pixelwise: interrupted", file=sys.stderr)
        return 130
