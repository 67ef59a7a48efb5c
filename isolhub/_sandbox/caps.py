"""Memory and task caps that hold for a root worker too: one cgroup per sandboxed worker.

RLIMIT_AS does not count memfds or tmpfs pages, and RLIMIT_NPROC is not enforced for uid 0. A
memory cgroup charges every page the worker causes (anonymous memory, memfds, tmpfs, page
cache) and its OOM killer stops the worker at the cap; a pids cgroup counts its threads and
processes. Per controller the worker uses, in this order:

* cgroup v2 (`memory.max` with `memory.swap.max` 0, `pids.max`) when the controller is enabled
  for children of this process's cgroup (or can be: only where that cgroup has no processes,
  e.g. the root cgroup, because of v2's "no internal processes" rule);
* cgroup v1 (`memory.limit_in_bytes` and, where swap accounting exists,
  `memory.memsw.limit_in_bytes`; `pids.max`).

The worker joins `isolhub-<pid namespace>-<its pid>` below its own cgroup before it drops its
capabilities (`join`); the parent removes that cgroup once it has reaped the worker (`release`),
reading first whether the OOM killer struck. A cgroup left behind by a parent that was killed
is removed by the next worker that starts beside it, once its pid is gone.

A worker calls `join("memory", 256 * 1024**2)` before it confines itself (it moves the calling
process, so it is not shown here); the parent calls `release(pid)` once it has reaped it.

Example:
    >>> name_for(812)                   # the cgroup of worker 812, in this pid namespace
    'isolhub-...-812'
    >>> release(812)                    # no such worker cgroup: nothing to say
    ''
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

__all__ = [
    "CONTROLLERS",
    "Place",
    "join",
    "locate",
    "name_for",
    "oom_note",
    "prepare",
    "probe",
    "release",
    "remove",
]

CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class Place:
    """Where one controller's worker cgroups go: this process's cgroup dir in its hierarchy."""

    controller: str
    version: int
    own: str


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def name_for(pid: int) -> str:
    """The cgroup name of the worker `pid` (unique per pid namespace)."""
    return f"isolhub-{_pid_namespace()}-{pid}"


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
                out.append((fields[3], fields[4], rest[0], set(rest[2].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """{controller or "" for v2: this process's cgroup path} from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def _join_path(mount_root: str, mount_point: str, path: str) -> str | None:
    if mount_root != "/" and not (path == mount_root or path.startswith(mount_root + "/")):
        return None  # this process's cgroup is outside what is mounted here
    rel = path[len(mount_root) :] if mount_root != "/" else path
    if os.path.basename(rel) == name_for(os.getpid()):  # entered ahead (`prepare`): its parent
        rel = os.path.dirname(rel)
    return os.path.join(mount_point, rel.lstrip("/")).rstrip("/") or "/"


def _member(place: Place) -> bool:
    """Whether this process is in its worker cgroup of `place` already."""
    key = "" if place.version == 2 else place.controller
    return _own_paths().get(key, "").endswith("/" + name_for(os.getpid()))


def locate(controller: str, *, enable: bool = False) -> Place | str:
    """Where `controller`'s worker cgroups go, or why they cannot go anywhere.

    With `enable`, a v2 controller that is available but not enabled for children is enabled
    in this cgroup's `cgroup.subtree_control` (which the kernel refuses while it has processes).
    """
    try:
        mounts, paths = _mounts(), _own_paths()
    except (OSError, ValueError) as e:
        return f"cannot read /proc/self/mountinfo or /proc/self/cgroup: {e}"
    reasons = []
    for root, point, fstype, _ in mounts:
        if fstype != "cgroup2" or "" not in paths:
            continue
        own = _join_path(root, point, paths[""])
        if own is None:
            continue
        try:
            available = _read(f"{own}/cgroup.controllers").split()
            enabled = _read(f"{own}/cgroup.subtree_control").split()
        except OSError as e:
            reasons.append(f"cgroup v2 at {own}: {e.strerror}")
            continue
        if controller not in available:
            reasons.append(f"cgroup v2 at {point} has no {controller} controller")
            continue
        if controller not in enabled:
            if not enable:
                reasons.append(f"cgroup v2 {own}: {controller} not enabled for children")
                continue
            try:
                _write(f"{own}/cgroup.subtree_control", f"+{controller}")
            except OSError as e:
                reasons.append(
                    f"cgroup v2 {own}: cannot enable {controller} for children ({e.strerror}; "
                    "a cgroup with processes cannot: start isolhub in a delegated leaf cgroup)"
                )
                continue
        return Place(controller, 2, own)
    for root, point, fstype, options in mounts:
        if fstype == "cgroup" and controller in options and controller in paths:
            own = _join_path(root, point, paths[controller])
            if own is not None:
                return Place(controller, 1, own)
    if not reasons:
        reasons.append(f"no cgroup hierarchy with the {controller} controller is mounted")
    return "; ".join(reasons)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _limits(place: Place, value: int) -> list[tuple[str, str, bool]]:
    """(file, value, required) to write, in order, for a cap of `value`."""
    if place.controller == "pids":
        return [("pids.max", str(value), True)]
    if place.version == 2:
        return [
            ("memory.max", str(value), True),
            ("memory.swap.max", "0", False),
            ("memory.oom.group", "1", False),
        ]
    # v1: memsw (memory + swap) must be >= the memory limit, so the memory limit goes first.
    return [
        ("memory.limit_in_bytes", str(value), True),
        ("memory.memsw.limit_in_bytes", str(value), False),
    ]


def _human(controller: str, value: int) -> str:
    return f"{value / 1024**2:g} MiB" if controller == "memory" else str(value)


def _sweep(own: str) -> None:
    """Remove worker cgroups beside us whose worker is gone (their parent was killed)."""
    prefix = f"isolhub-{_pid_namespace()}-"
    with contextlib.suppress(OSError):
        for entry in os.listdir(own):
            if entry.startswith(prefix) and entry[len(prefix) :].isdigit():
                try:
                    os.kill(int(entry[len(prefix) :]), 0)
                except ProcessLookupError:
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(own, entry))
                except OSError:
                    pass


def _enter(place: Place) -> str:
    """Make this process's worker cgroup in `place` and move into it: its path."""
    _sweep(place.own)
    pid = os.getpid()
    path = os.path.join(place.own, name_for(pid))
    try:
        try:
            os.mkdir(path)
        except FileExistsError:  # a dead worker's, with our (reused) pid, and its old limits
            os.rmdir(path)
            os.mkdir(path)
    except OSError as e:
        raise OSError(e.errno, f"mkdir {path}: {e.strerror}") from e
    try:
        _write(os.path.join(path, "cgroup.procs"), str(pid))
    except OSError as e:
        raise OSError(e.errno, f"joining {path}: {e.strerror}") from e
    return path


def prepare() -> None:
    """Enter this process's worker cgroups ahead of time, where that needs no new permission.

    Moving a process between cgroups waits for an RCU grace period (5-30 ms measured); the
    zygote's spare does it while it waits for work, so `join` then only writes the limits. A
    worker that ends up unconfined just sits in a cgroup without limits until it is reaped.
    """
    for controller in CONTROLLERS:
        place = locate(controller)
        if isinstance(place, Place) and not _member(place):
            with contextlib.suppress(OSError):
                _enter(place)


def join(controller: str, value: int) -> str:
    """Move this process into a new cgroup capping `controller` at `value`; say what was done.

    Raises:
        OSError: the cgroup could not be made, limited or joined (the message says which step).
    """
    place = locate(controller, enable=True)
    if isinstance(place, str):
        raise OSError(0, place)
    pid = os.getpid()
    path = os.path.join(place.own, name_for(pid))
    if not _member(place):  # not entered ahead by `prepare`
        _enter(place)
    written = []
    for file, text, required in _limits(place, value):
        try:
            _write(os.path.join(path, file), text)
            written.append(file)
        except OSError as e:
            if required:
                raise OSError(e.errno, f"writing {path}/{file}: {e.strerror}") from e
    if not _member(place):
        raise OSError(0, f"joined {path}, but /proc/self/cgroup does not show it")
    return f"cgroup v{place.version} {path}: {', '.join(written)} {_human(controller, value)}"


def _oom_kills(path: str) -> int:
    for file in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(OSError, ValueError):
            for line in _read(os.path.join(path, file)).splitlines():
                key, _, count = line.partition(" ")
                if key == "oom_kill":
                    return int(count)
    return 0


def _worker_dirs(pid: int) -> list[tuple[Place, str]]:
    """(place, path) of each cgroup the worker `pid` has here."""
    found = []
    for controller in CONTROLLERS:
        place = locate(controller)
        if isinstance(place, str):
            continue
        path = os.path.join(place.own, name_for(pid))
        if os.path.isdir(path):
            found.append((place, path))
    return found


def oom_note(pid: int) -> str:
    """A note if the reaped worker `pid`'s memory cap killed it, else '' (its cgroups stay)."""
    for place, path in _worker_dirs(pid):
        if place.controller == "memory" and _oom_kills(path):
            try:
                limit = int(_read(os.path.join(path, _limits(place, 0)[0][0])).strip())
                return f"it reached its memory cap ({_human('memory', limit)}) and was OOM-killed"
            except (OSError, ValueError):
                return "it reached its memory cap and was OOM-killed"
    return ""


def remove(pid: int) -> None:
    """Remove the cgroups of the reaped worker `pid` (none: nothing to do).

    The kernel may take 10-30 ms to let go of a cgroup whose last process just exited, so
    callers on a load's path leave this to a thread (`_process.worker`).
    """
    for _, path in _worker_dirs(pid):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def release(pid: int) -> str:
    """Remove the cgroups of the reaped worker `pid`: a note if its memory cap killed it, else ''.

    Safe to call for a worker that never joined one (nothing to remove).
    """
    note = oom_note(pid)
    remove(pid)
    return note


def probe(controller: str) -> tuple[bool, str]:
    """Whether a worker cgroup for `controller` can be made here: made, limited, removed again."""
    place = locate(controller, enable=True)
    if isinstance(place, str):
        return False, place
    path = os.path.join(place.own, f"isolhub-probe-{_pid_namespace()}-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        try:
            file, text, _ = _limits(place, 1 << 30 if controller == "memory" else 1024)[0]
            _write(os.path.join(path, file), text)
        finally:
            os.rmdir(path)
    except OSError as e:
        return False, f"cgroup v{place.version} {place.own}: {e.strerror or e}"
    first = _limits(place, 0)[0][0]
    return True, f"cgroup v{place.version} {first} under {place.own}"
