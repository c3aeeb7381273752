"""`markerless serve` with the FakeCore vision core, as a process tests can kill with real signals.

Usage: python tests/serve_fake.py SPEC.json. The spec holds `settings` (Settings fields), `scenes` (scenes.yaml
content; every scene not yet in the store is registered as version v1), `marker` (a file written when a
localization begins, so a test knows the worker is mid-calibration), optionally `release` (a file whose
appearance lets registrations finish; they wait for it) and `localize_s` (seconds a localization takes), and
`mode`:
- "serve": answer normally;
- "hold": hold every localization and registration (the process is meant to be killed);
- "die_after_answer": SIGKILL itself right after a reply is delivered and remembered, before the request is
  acknowledged to the broker (the narrowest crash window of manual acknowledgement).
SIGTERM/SIGINT stop the daemon cleanly (exit 0). Scene versions are kept as JSON files in the settings' store
root, so replicas of this process share them as real replicas share the scene store.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from mqtt_fixtures import FakeCore, FakeInfo, _sha

from markerless.service.daemon import Daemon
from markerless.service.requests import CalibrationRequest
from markerless.service.scenes_file import ScenesFile
from markerless.service.settings import Settings
from markerless.service.stop_signals import StopSignals


def _die_instead_of_acknowledging(request: CalibrationRequest) -> None:
    """`CalibrationRequest.delivered` in mode die_after_answer: `Replies.delivered` calls it once the reply is
    delivered and remembered as answered, to acknowledge the request; this process dies instead."""
    os.kill(os.getpid(), signal.SIGKILL)


class _DiskCore(FakeCore):
    """FakeCore whose scene versions live in `<root>/<scene>.json`, shared by processes."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def scene_ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.json"))

    def info(self, scene_id: str) -> FakeInfo | None:
        from markerless.scene.config import SceneConfig

        try:
            data = orjson.loads((self.root / f"{scene_id}.json").read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return FakeInfo(scene_id, data["version"], data["sha"], SceneConfig.model_validate(data["config"]))

    def commit(self, scene_id: str, dataset: Path, config: Any) -> FakeInfo:
        old = self.info(scene_id)
        version = f"v{int(old.version[1:]) + 1 if old else 1}"
        tmp = self.root / f".{scene_id}.tmp"
        tmp.write_bytes(orjson.dumps({"version": version, "sha": _sha(dataset), "config": config.model_dump()}))
        os.replace(tmp, self.root / f"{scene_id}.json")
        info = self.info(scene_id)
        assert info is not None
        return info


class _Marking:
    """The FakeCore localizer, writing `marker` when a localization begins and taking `seconds`."""

    def __init__(self, core: FakeCore, marker: Path, seconds: float) -> None:
        self._core = core
        self._marker = marker
        self._seconds = seconds

    def localize(self, *args: Any) -> Any:
        self._marker.write_text("started")
        time.sleep(self._seconds)  # stands for the compute time of a real localization
        return self._core.localize(*args)


def _release_when(path: Path, gate: threading.Event) -> None:
    while not path.exists():
        time.sleep(0.05)
    gate.set()


def main(spec_path: str) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that waits in vain asks for the stacks
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = orjson.loads(Path(spec_path).read_bytes())
    settings = Settings(**spec["settings"])
    scenes = ScenesFile.model_validate(spec["scenes"])
    core = _DiskCore(settings.store.root / "fake")
    for scene_id, entry in scenes.scenes.items():
        if core.info(scene_id) is None:
            core.commit(scene_id, entry.dataset, entry.config)
    if spec["mode"] == "hold":
        core.gate.clear()
        core.register_gate.clear()
    if spec.get("release"):
        core.register_gate.clear()
        threading.Thread(target=_release_when, args=(Path(spec["release"]), core.register_gate), daemon=True).start()
    marker = Path(spec["marker"])
    localizer = _Marking(core, marker, float(spec.get("localize_s", 0.0)))
    backend = dataclasses.replace(core.backend(), new_localizer=lambda models: localizer)
    if spec["mode"] == "die_after_answer":
        CalibrationRequest.delivered = _die_instead_of_acknowledging
    daemon = Daemon(settings, backend=backend, scenes=scenes)
    stop = threading.Event()
    StopSignals(stop)
    daemon.start()
    stop.wait()
    core.gate.set()
    core.register_gate.set()
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
