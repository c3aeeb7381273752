"""`markerless serve`: run the MQTT daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("markerless.serve")


def register(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add this group's commands."""
    parser = subparsers.add_parser(
        "serve",
        help="run the MQTT calibration service",
        description="Serve SceneScape's auto-calibration MQTT topics. Settings come from --config and "
        "MARKERLESS__<SECTION>__<FIELD> environment variables (which win).",
    )
    parser.add_argument("--config", type=Path, default=None, help="settings YAML (e.g. configs/markerless.yaml)")
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    """Exit codes: 0 clean stop, 2 bad settings or unusable broker (TLS, credentials, refused)."""
    from pydantic import ValidationError

    from markerless.service.daemon import Daemon
    from markerless.service.settings import Settings
    from markerless.service.transport import TransportError

    try:
        settings = Settings.load(args.config)
    except (ValueError, ValidationError) as exc:
        print(f"markerless serve: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("markerless").setLevel(settings.log_level)
    daemon = Daemon(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        daemon.start()
    except TransportError as exc:
        print(f"markerless serve: {exc}", file=sys.stderr)
        return 2
    except (ValueError, ValidationError) as exc:  # scenes.yaml
        print(f"markerless serve: invalid scenes file: {exc}", file=sys.stderr)
        return 2
    log.info("serving on %s:%s (prefix %r)", settings.mqtt.host, settings.mqtt.port, settings.mqtt.topic_prefix)
    stop.wait()
    log.info("stopping")
    daemon.stop()
    return 0
