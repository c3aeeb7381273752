"""`markerless cameras`: the calibrations kept in a store (state, age, sigma), read from the files the service
writes, with no broker."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from markerless.cli.scene import DEFAULT_STORE


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001
    p = subparsers.add_parser("cameras", help="list the cameras' kept calibrations (state, age, sigma)")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE,
                   help="scene store (default $MARKERLESS_STORE or ./store)")
    p.add_argument("--json", action="store_true", help="print the calibration records as JSON")
    p.set_defaults(func=cameras)


def _age(at: str, now: datetime) -> str:
    try:
        seconds = (now - datetime.fromisoformat(at)).total_seconds()
    except (TypeError, ValueError):
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def cameras(args: argparse.Namespace) -> int:
    from markerless.pipeline.calibration_watch import Calibration
    from markerless.scene.calibrations import CalibrationStore

    store = CalibrationStore(args.store)
    calibrations = []
    for record in store.records():
        try:
            calibrations.append(Calibration.from_dict(record))
        except (KeyError, TypeError, ValueError) as exc:
            print(f"markerless: unreadable calibration of {record.get('camera_id')!r}: {exc}")
    if args.json:
        print(json.dumps([{k: v for k, v in c.to_dict().items() if k not in ("evidence", "pending")}
                          for c in calibrations], indent=1))
        return 0
    if not calibrations:
        print(f"no calibrations in {store.folder}")
        return 0
    now = datetime.now(UTC)
    print(f"{'camera':20s} {'scene@version':28s} {'state':10s} {'frames':>6s} {'age':>9s} {'sigma':>16s}  "
          "last failure")
    for c in sorted(calibrations, key=lambda c: c.camera_id):
        sigma = f"{100 * c.position_sigma_m:.2f} cm/{c.rotation_sigma_deg:.2f} deg"
        failure = (c.last_failure or "") if c.state == "lost" else ""
        print(f"{c.camera_id:20s} {c.scene_id + '@' + c.scene_version:28s} {c.state:10s} {c.frames:6d} "
              f"{_age(c.updated_at, now):>9s} {sigma:>16s}  {failure}")
    return 0
