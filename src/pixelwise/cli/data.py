"""`pixelwise data ...`: synthesise and check datasets."""

from __future__ import annotations

import argparse

from pixelwise.cli import data_check, data_synth


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="synthesise and check datasets")
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    data_synth.register(sub)
    data_check.register(sub)
