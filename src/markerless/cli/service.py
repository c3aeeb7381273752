"""`markerless serve`: run the MQTT daemon until SIGTERM/SIGINT; `markerless health`: is it alive."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from markerless.service.stop_signals import STOP_SIGNALS, StopSignals

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
    health = subparsers.add_parser(
        "health",
        help="exit 0 when a running `markerless serve` reports a live worker (for container health checks)",
        description="Reads the service's metrics endpoint (metrics.port must be set) and exits 0 when "
        "markerless_worker_alive is 1, 1 when the worker is stalled or the service does not answer.",
    )
    health.add_argument("--config", type=Path, default=None, help="settings YAML of the service")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the endpoint")
    health.set_defaults(func=check_health)


def _import_native_libraries(signals: StopSignals) -> None:
    """Import pycolmap and torch with the stop signals held back, then take the signals back.

    Importing pycolmap installs glog's failure-signal handler, which turns SIGTERM into a native abort (exit 143,
    nothing answered). The signals are blocked (held pending by the kernel) while the libraries load, the Python
    handler is installed again over glog's, and a stop that arrived meanwhile is delivered to it on unblocking.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        import pycolmap  # noqa: F401
        import torch  # noqa: F401
    finally:
        signals.install()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _load_settings(command: str, path: Any) -> Any:
    """Settings from `path`, or None after a one-line error naming the command."""
    from pydantic import ValidationError

    from markerless.service.settings import Settings

    try:
        return Settings.load(path)
    except (ValueError, ValidationError) as exc:
        print(f"markerless {command}: invalid settings: {exc}", file=sys.stderr)
        return None


def serve(args: argparse.Namespace) -> int:
    """Exit codes: 0 clean stop (also a stop during start-up), 2 bad settings or unusable broker (TLS,
    credentials, refused).

    SIGTERM/SIGINT are handled from the first instruction, before anything slow (native imports, scene store,
    broker): a stop during start-up ends the start where it is, publishes `stopped` if `online` was published
    and nothing if the broker was never reached; registrations are staged, so none is left half-written."""
    stop = threading.Event()
    signals = StopSignals(stop)
    log.info("starting: a stop signal from now on ends the start cleanly")
    _import_native_libraries(signals)
    if stop.is_set():
        log.info("stopped during start-up")
        return 0
    from pydantic import ValidationError

    from markerless.service.daemon import Daemon
    from markerless.service.transport import TransportError

    settings = _load_settings("serve", args.config)
    if settings is None:
        return 2
    logging.getLogger("markerless").setLevel(settings.log_level)
    daemon = Daemon(settings)
    try:
        started = daemon.start(cancel=stop)
    except TransportError as exc:
        print(f"markerless serve: {exc}", file=sys.stderr)
        daemon.stop()
        return 2
    except (ValueError, ValidationError) as exc:  # scenes.yaml, or an unreadable http.token_file
        print(f"markerless serve: invalid scenes file or http settings: {exc}", file=sys.stderr)
        daemon.stop()
        return 2
    except OSError as exc:  # the metrics or http port is taken, a certificate or the state directory unreadable
        print(f"markerless serve: {exc}", file=sys.stderr)
        daemon.stop()
        return 2
    if started:
        log.info("serving on %s:%s (prefix %r)", settings.mqtt.host, settings.mqtt.port,
                 settings.mqtt.topic_prefix)
        while not stop.is_set() and not daemon.wait_ready(0.5):
            pass
        # The worker has now imported and built everything it uses; re-install in case a library took SIGTERM over.
        signals.install()
        stop.wait()
    log.info("stopping" if started else "stopped during start-up: stopping what was begun")
    daemon.stop()
    return 0


def check_health(args: argparse.Namespace) -> int:
    """0: the worker is alive; 1: stalled or no answer; 2: metrics are not enabled in the settings."""

    import urllib.error
    import urllib.request

    from markerless.service.metrics import WORKER_ALIVE

    settings = _load_settings("health", args.config)
    if settings is None:
        return 2
    if settings.metrics.port is None:
        print("markerless health: metrics.port is not set (MARKERLESS__METRICS__PORT): nothing to ask",
              file=sys.stderr)
        return 2
    url = f"http://127.0.0.1:{settings.metrics.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310 - fixed local URL
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        print(f"markerless health: {url}: {exc}", file=sys.stderr)
        return 1
    for line in text.splitlines():
        if line.startswith(WORKER_ALIVE + " "):
            alive = float(line.split()[1]) == 1.0
            print("alive" if alive else "stalled: the worker stopped taking requests")
            return 0 if alive else 1
    print(f"markerless health: {url} has no {WORKER_ALIVE}", file=sys.stderr)
    return 1
