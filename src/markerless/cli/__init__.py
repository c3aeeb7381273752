"""The `markerless` command line: one module per command group, each exposing `register(subparsers)`.

Command groups are imported only when the process starts, and heavy libraries (torch, pycolmap) only inside the
commands that need them, so `markerless --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from markerless import __version__
from markerless.cli import cameras, demo, scene, service, weights

GROUPS = (scene, cameras, weights, service, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="markerless", description="Markerless camera calibration against a scanned 3D scene."
    )
    parser.add_argument("--version", action="version", version=f"markerless {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130

