"""Longest silence between two progress reports while registering the kitchen scan, per stage.

The daemon forwards progress as MQTT status messages (at most one per `registration.progress_interval_s`); a
stage that reports nothing for seconds looks like a hung service. A gap is attributed to the stage reported at
its start (the one running); "start" is the time before the first report.

    python bench/bench_registration_progress.py [--kitchen DIR] [--no-depth] [--out REPORT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from markerless.pipeline.features import FeatureModels
from markerless.pipeline.registration import RegistrationOptions, register_scene
from markerless.scene.config import SceneConfig
from markerless.scene.store import SceneStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kitchen", type=Path, default=Path(os.environ.get("MARKERLESS_KITCHEN_DIR",
                                                                           "../shared/data/kitchen")))
    parser.add_argument("--no-depth", action="store_true", help="3D points by mesh ray casting only")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    args = parser.parse_args()
    models = FeatureModels()
    gaps: dict[str, float] = {}
    reports = 0
    last, running = time.perf_counter(), "start"

    def progress(stage: str, fraction: float) -> None:
        nonlocal last, reports, running
        now = time.perf_counter()
        gaps[running] = max(gaps.get(running, 0.0), now - last)
        last, reports, running = now, reports + 1, stage

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as store:
        register_scene(SceneStore(Path(store)), "kitchen", args.kitchen / "kitchen-poly.zip", SceneConfig(), models,
                       progress=progress, options=RegistrationOptions(use_depth=not args.no_depth))
    report = {"total_s": round(time.perf_counter() - start, 1), "reports": reports,
              "longest_gap_s_by_stage": {k: round(v, 2) for k, v in gaps.items()},
              "longest_gap_s": round(max(gaps.values()), 2)}
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
