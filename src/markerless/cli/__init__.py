"""The `markerless` command line: one module per command group, each exposing `register(subparsers)`.

Command groups are imported only when the process starts, and heavy libraries (torch, pycolmap) only inside the
commands that need them, so `markerless --help` is instant.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from markerless import __version__
from markerless.cli import cameras, demo, scene, service, weights

GROUPS = (scene, cameras, weights, service, demo)

EXIT_STATUS = """exit status (every command):
  0  success
  1  the request failed, with a reason (on stderr; with --json in the JSON's "reason")
  2  usage: unknown or missing options, option values that cannot be parsed, options that need another
     (with --json, also printed as JSON)"""

# Options whose value is a list of numbers: one starting with a minus sign (a barrel lens's k1 of -0.28) is still
# their value, not an option, so `--distortion -0.28,0.09,0,0` works as `--distortion=-0.28,0.09,0,0` does.
NUMBER_LISTS = frozenset({"--intrinsics", "--distortion"})
_NUMBER_LIST = re.compile(r"^-[\d.][\d.eE+\-,\s]*$")


class Parser(argparse.ArgumentParser):
    """argparse's parser; when the command line asks for --json, a usage error is also JSON on stdout (exit 2)."""

    def __init__(self, *args: object, json_errors: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            print(json.dumps({"success": False, "reason": "bad_request", "message": f"{self.prog}: {message}"},
                             indent=1))
        super().error(message)


def build_parser(json_errors: bool = False) -> argparse.ArgumentParser:
    parser = Parser(
        prog="markerless", description="Markerless camera calibration against a scanned 3D scene.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter, json_errors=json_errors,
    )
    parser.add_argument("--version", action="version", version=f"markerless {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=functools.partial(Parser, json_errors=json_errors))
    for group in GROUPS:
        group.register(subparsers)
    return parser


def join_number_lists(argv: Sequence[str]) -> list[str]:
    """`--distortion -0.28,0.09` as `--distortion=-0.28,0.09` (see NUMBER_LISTS)."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in NUMBER_LISTS and _NUMBER_LIST.match(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = join_number_lists(sys.argv[1:] if argv is None else argv)
    json_errors = "localize" in argv and "--json" in argv  # the one command whose --json prints to stdout
    args = build_parser(json_errors).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
