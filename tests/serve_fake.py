"""`markerless serve` with the FakeCore vision core, as a process tests can kill with real signals.

Usage: python tests/serve_fake.py SPEC.json. The spec holds `settings` (Settings fields), `scenes` (scenes.yaml
content; every scene is registered in the fake store as version v1), `marker` (a file written when a
localization begins, so a test knows the worker is mid-calibration) and `mode`:
- "serve": answer normally;
- "hold": hold every localization and registration (the process is meant to be killed);
- "die_after_answer": SIGKILL itself right after a reply is delivered and remembered, before the request is
  acknowledged to the broker (the narrowest crash window of manual acknowledgement).
SIGTERM/SIGINT stop the daemon cleanly (exit 0).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
from mqtt_fixtures import FakeCore

from markerless.service.daemon import CalibrationRequest, Daemon
from markerless.service.settings import ScenesFile, Settings


class _DiesAfterAnswer(Daemon):
    def _delivered(self, request: CalibrationRequest) -> None:
        if request.key is not None and self._answered is not None:
            self._answered.add(request.key)
        os.kill(os.getpid(), signal.SIGKILL)


class _Marking:
    """The FakeCore localizer, writing `marker` when a localization begins."""

    def __init__(self, core: FakeCore, marker: Path) -> None:
        self._core = core
        self._marker = marker

    def localize(self, *args: Any) -> Any:
        self._marker.write_text("started")
        return self._core.localize(*args)


def main(spec_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = orjson.loads(Path(spec_path).read_bytes())
    settings = Settings(**spec["settings"])
    scenes = ScenesFile.model_validate(spec["scenes"])
    core = FakeCore()
    for scene_id, entry in scenes.scenes.items():
        core.registrations.append(scene_id)
        core.commit(scene_id, entry.dataset, entry.config)
    if spec["mode"] == "hold":
        core.gate.clear()
        core.register_gate.clear()
    marker = Path(spec["marker"])
    backend = dataclasses.replace(core.backend(), new_localizer=lambda models: _Marking(core, marker))
    daemon_cls = _DiesAfterAnswer if spec["mode"] == "die_after_answer" else Daemon
    daemon = daemon_cls(settings, backend=backend, scenes=scenes)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon.start()
    stop.wait()
    core.gate.set()
    core.register_gate.set()
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
