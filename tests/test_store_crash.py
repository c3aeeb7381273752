"""A registration killed mid-way (SIGKILL, no cleanup code runs) leaves the previous version serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polycam_factory import subset_zip

from markerless.scene.store import SceneStore


def test_killed_registration_keeps_previous_version(kitchen_dir: Path, tmp_path: Path) -> None:
    scan = subset_zip(kitchen_dir / "kitchen-poly.zip", tmp_path / "small.zip", keep=12)
    store_root = tmp_path / "store"
    cmd = [sys.executable, "-m", "markerless.cli", "register", str(scan), "--scene", "s", "--store", str(store_root)]
    subprocess.run(cmd, check=True, capture_output=True)
    before = SceneStore(store_root).info("s")
    assert before is not None

    # --no-depth changes the scene's identity: everything is computed again (new gates alone would reuse the files)
    proc = subprocess.Popen(cmd + ["--no-depth"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((store_root / "s").glob(".staging-*/rgb/*.jpg")):  # killed while it writes the new version
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("registration finished or stalled before it could be killed")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert list((store_root / "s").glob(".staging-*"))  # the half-written version is there...
    store = SceneStore(store_root)  # ...until the store opens again
    assert not list((store_root / "s").glob(".staging-*"))
    assert store.info("s") == before
    scene = store.load("s")
    assert scene.num_keyframes == 12 and scene.version == before.version
