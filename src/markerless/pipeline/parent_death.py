"""Processes that end with their parent (Linux): multiprocessing's forkserver and the SIFT workers it forks.

A `markerless register` or `serve` killed with SIGKILL runs no clean-up, and its forkserver, resource tracker and
SIFT workers (150 MB each) went on running for minutes. The kernel's parent-death signal (prctl
PR_SET_PDEATHSIG) ends each when its parent ends, with nothing to run in the dead parent: the forkserver when the
markerless process dies (`forkserver_dies_with_parent` is preloaded into it), each worker when the forkserver
dies (`die_with_parent` in the pool's initializer); the resource tracker exits by itself once they are all gone
(its pipe is closed).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent ended before the signal was armed: the kernel will not send it
        os._exit(1)
