"""What workers may leave behind in the test process: child processes, zombies, scratch dirs.

Tests take a snapshot before and compare after, so a leaked worker, an unreaped one or a scratch
dir left in the temp dir fails the test that caused it. Each first waits for the reaper thread
(`settle`): a closed `load`'s worker is reaped and cleaned up just after `load` returns.

Example:
    >>> before = child_pids(), scratch_dirs()
    >>> ...  # load, crash, time out
    >>> assert (child_pids(), scratch_dirs()) == before and zombie_pids() == []
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from isolhub._process.worker import settle


def child_pids() -> set[int]:
    """The pids whose parent is this process (read from /proc)."""
    settle()
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.add(int(pid))
    return out


def zombie_pids() -> list[int]:
    """Zombie grandchildren: workers the zygote has not reaped."""
    settle()
    out = []
    for child in child_pids():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == child and fields[0] == "Z":
                out.append(int(pid))
    return out


def scratch_dirs() -> set[str]:
    """Worker scratch dirs (`isolhub-worker-*`) in the current temp dir."""
    settle()
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("isolhub-worker-")}


def open_fds() -> set[str]:
    """This process's open file descriptors (numbers, from /proc/self/fd)."""
    settle()
    return set(os.listdir("/proc/self/fd"))
