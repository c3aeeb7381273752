"""A stop signal that lands while the main thread holds the stop event's lock (inside `Event.wait()`): the
service's handler must not take that lock again, or the process hangs and ignores every later SIGTERM (seen in CI:
a daemon signalled right after it started, under load, never exited)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PROGRAM = textwrap.dedent("""
    import os, signal, sys, threading
    {setup}
    stop = threading.Event()
    {install}
    with stop._cond:  # what Event.wait() holds between its check and its sleep
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # instructions: the Python handler runs between two of them, lock held
            pass
    sys.exit(0 if stop.wait(10) else 3)
""")
SAFE = ("from markerless.service.stop_signals import StopSignals", "StopSignals(stop)")
NAIVE = ("", "signal.signal(signal.SIGTERM, lambda *_: stop.set())")


def _run(setup: str, install: str, timeout: float) -> int:
    program = PROGRAM.format(setup=setup, install=install)
    proc = subprocess.Popen([sys.executable, "-c", program])
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -1


def test_a_stop_signal_while_the_event_lock_is_held_stops_the_process() -> None:
    assert _run(*SAFE, timeout=20) == 0


def test_the_naive_handler_hangs_there() -> None:
    """The test above exercises the real hazard: on this Python a handler calling `Event.set()` deadlocks there."""
    assert _run(*NAIVE, timeout=5) == -1
