"""`markerless weights list|path|fetch`: see, locate and download the pretrained files of the manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add this group's commands."""
    parser = subparsers.add_parser("weights", help="pretrained weight files (list, locate, download)")
    commands = parser.add_subparsers(dest="weights_command", required=True, metavar="SUBCOMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--weights-dir", type=Path, default=None,
                         help="weights directory (default: $MARKERLESS_WEIGHTS_DIR or ~/.cache/markerless/weights)")
        return sub

    add("list", "every file of the manifest, and whether it is present").set_defaults(func=cmd_list)
    path = add("path", "print where a file is, or why it cannot be found (exit 1)")
    path.add_argument("name", help="manifest name, e.g. netvlad-pitts30k")
    path.set_defaults(func=cmd_path)
    fetch = add("fetch", "download a file (resumable, checksum verified, safe to run concurrently)")
    fetch.add_argument("name", help="manifest name, e.g. netvlad-pitts30k")
    fetch.add_argument("--url", default=None, help="download from this mirror instead of the manifest URL")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")
    fetch.set_defaults(func=cmd_fetch)


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def cmd_list(args: argparse.Namespace) -> int:
    from markerless.errors import MissingWeightsError
    from markerless.models import weights

    rows = [("NAME", "FILE", "PRESENT", "SIZE", "SHA256")]
    for name, spec in weights.load_manifest().items():
        try:
            found: Path | None = weights.resolve(name, args.weights_dir)
        except MissingWeightsError:
            found = None
        size = _human(found.stat().st_size) if found else (f"({_human(spec.size)})" if spec.size else "-")
        sha = f"{spec.sha256[:12]}…" if spec.sha256 else "unpinned"
        rows.append((name, spec.file, str(found) if found else "no", size, sha))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"weights directory: {weights.resolve_weights_dir(args.weights_dir)}")
    return 0


def cmd_path(args: argparse.Namespace) -> int:
    from markerless.errors import MarkerlessError
    from markerless.models import weights

    try:
        print(weights.resolve(args.name, args.weights_dir))
    except MarkerlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from markerless.errors import MarkerlessError
    from markerless.models import weights

    try:
        print(weights.fetch(args.name, args.weights_dir, url=args.url, progress=not args.no_progress))
    except MarkerlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
