"""Staging dirs are locked by the process writing them: a CLI opening the same store leaves a live one alone and
removes an abandoned one; registration reports progress through every stage, keyframe by keyframe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from polycam_factory import subset_zip

from markerless.pipeline.registration import register_scene
from markerless.scene.config import SceneConfig
from markerless.scene.store import SceneStore

HOLDER = """
import sys
from markerless.scene.store import SceneStore
with SceneStore(sys.argv[1]).staging("k", "v1") as staging:
    (staging / "part.h5").write_bytes(b"half written")
    print("ready", flush=True)
    sys.stdin.readline()
"""


def localize_in(store: Path, image: Path) -> subprocess.CompletedProcess[str]:
    """`markerless localize` opens the store (and cleans abandoned staging dirs) before finding no scene."""
    return subprocess.run([sys.executable, "-m", "markerless.cli", "localize", str(image), "--scene", "k", "--store",
                           str(store), "--intrinsics", "50,50,32,24"], capture_output=True, text=True, timeout=600)


def test_cli_leaves_a_live_staging_dir_alone_and_removes_an_abandoned_one(tmp_path: Path) -> None:
    store = tmp_path / "store"
    image = tmp_path / "frame.png"
    image.write_bytes(cv2.imencode(".png", np.zeros((48, 64, 3), np.uint8))[1].tobytes())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        staging = store / "k" / ".staging-v1"
        result = localize_in(store, image)
        assert result.returncode == 1 and "scene_not_found" in result.stderr, result.stderr
        assert (staging / "part.h5").read_bytes() == b"half written"  # the live registration's files survive

        os.kill(holder.pid, signal.SIGKILL)  # the writer dies: the kernel releases its lock
        holder.wait()
        assert staging.exists()
        result = localize_in(store, image)
        assert result.returncode == 1 and "scene_not_found" in result.stderr, result.stderr
        assert not (store / "k").exists()  # abandoned staging, its lock file and the empty scene dir are gone
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_finished_staging_block_removes_what_it_did_not_commit(tmp_path: Path) -> None:
    (tmp_path / "store" / ".locks").mkdir(parents=True)  # the daemon's scene locks: not a scene folder
    store = SceneStore(tmp_path / "store")
    with store.staging("k", "v1") as staging:
        (staging / "x").write_text("x")
        assert SceneStore(tmp_path / "store") and staging.exists()  # a second store in this process: still locked
    assert list((tmp_path / "store").iterdir()) == [tmp_path / "store" / ".locks"]


def test_registration_reports_every_keyframe_in_every_stage(kitchen_dir: Path, tmp_path: Path, feature_models) -> None:
    scan = subset_zip(kitchen_dir / "kitchen-poly.zip", tmp_path / "small.zip", keep=8)
    reports: list[tuple[str, float]] = []
    register_scene(SceneStore(tmp_path / "store"), "k", scan, SceneConfig(), feature_models,
                   progress=lambda stage, fraction: reports.append((stage, fraction)))
    stages = [s for s, _ in reports]
    assert (stages.index("ingest") < stages.index("features") < stages.index("points3d") < stages.index("global")
            < stages.index("commit"))
    for stage in ("ingest", "features", "points3d", "global"):
        fractions = [f for s, f in reports if s == stage]
        assert len(fractions) >= 8 and fractions == sorted(fractions) and fractions[-1] == 1.0, (stage, fractions)
    # the VLAD vocabulary (seconds of k-means) is announced before it starts, right after the 3D points
    assert reports[stages.index("global")] == ("global", 0.0)
