"""SIGTERM/SIGINT turned into a `threading.Event`, safely.

A Python signal handler runs in the main thread between two of its instructions, possibly while that thread is
inside `Event.wait()` holding the event's (non-reentrant) lock. A handler that calls `Event.set()` then waits on a
lock its own thread holds: the process hangs for good and ignores every later SIGTERM. The handler here only
writes a byte to a pipe; a relay thread reads it and sets the event.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Sets `event` on SIGTERM/SIGINT. Construct it in the main thread; `install()` again after a library has
    taken the signals over (glog's failure handler, installed by importing pycolmap)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        # The relay thread starts with the stop signals blocked, so the kernel never runs a foreign handler (glog's,
        # while it is installed) on it; the main thread's mask is restored at once.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            threading.Thread(target=self._relay, name="markerless-stop-signals", daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.install()

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        try:
            os.write(self._write, b"s")
        except BlockingIOError:  # the pipe is full of stops not yet relayed: one more adds nothing
            pass

    def _relay(self) -> None:
        while os.read(self._read, 1):
            self.event.set()
