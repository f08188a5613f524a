"""Child processes, and the trees they grow, that never outlive `gql-service dev`."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterable

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LINUX = sys.platform.startswith("linux")


def _prctl(option: int, value: int) -> None:
    if _LINUX:
        ctypes.CDLL(None, use_errno=True).prctl(option, value)


def child_preexec() -> None:
    """Run in a child before exec.

    A session of its own keeps the terminal's Ctrl-C away from it, so the parent alone
    decides the order of shutdown (workers before the Redis they write to); and Linux
    SIGTERMs it if the parent dies without that chance.
    """
    os.setsid()
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def become_subreaper() -> None:
    """Adopt our descendants' orphans instead of letting PID 1 take them.

    RQ's pool forks its workers, and each worker forks a scheduler and work horses; none of
    them inherits the death signal. When their parent dies first they would be reparented
    out of our tree and run on, retrying a Redis that is gone. As a subreaper we keep them
    in our tree, where `descendants` finds them and `kill_tree` ends them.
    """
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _table() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, state letter), for every process /proc shows."""
    table: dict[int, tuple[int, bytes]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name is in parentheses and may hold spaces and parentheses itself.
        fields = stat[stat.rindex(b")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, zombies aside (empty where there is no /proc)."""
    if not os.path.isdir("/proc/self"):
        return set()
    table = _table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {p for p in found if table[p][1] != b"Z"}


def reap_adopted(*, besides: set[int]) -> None:
    """Wait for the orphans we adopted that have exited (not `besides`: Popen waits for those)."""
    if not os.path.isdir("/proc/self"):
        return
    me = os.getpid()
    for pid, (parent, state) in _table().items():
        if parent == me and state == b"Z" and pid not in besides:
            _reap(pid)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return not _exists(pid)
    return stat[stat.rindex(b")") + 2 :].startswith(b"Z")  # a zombie has nothing left to run


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    # Orphans we adopted are ours to wait for; others' children are not (ECHILD).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def kill_tree(pids: Iterable[int], *, groups: Iterable[int] = (), timeout_s: float = 5.0) -> None:
    """SIGKILL these processes and process groups, and wait until they are gone."""
    pids = set(pids)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        for pid in list(pids):
            _reap(pid)
            if _gone(pid):
                pids.discard(pid)
        if pids:
            time.sleep(0.01)
