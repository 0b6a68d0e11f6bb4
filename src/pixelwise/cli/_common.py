"""Helpers shared by the command modules (no torch imports here)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON on stdout (logs go to stderr)"
    )


def emit_json(obj: Any) -> None:
    """Write `obj` as the only thing on stdout."""
    json.dump(obj, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
