"""Child processes that die with their parent, so Ctrl-C or a kill leaves nothing behind."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def child_preexec() -> None:
    """Run in a child before exec.

    A session of its own keeps the terminal's Ctrl-C away from it, so the parent alone
    decides the order of shutdown (workers before the Redis they write to); and Linux
    SIGTERMs it if the parent dies without that chance.
    """
    os.setsid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
