"""Placeholder command group; filled in by its owner."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add this group's commands."""
