"""Installed packages that workers import, learned per environment and preloaded by the zygote.

A worker is a fork of the zygote, so whatever the zygote has imported costs a worker nothing.
torch is always there; the installed packages repos import (numpy, yaml, timm, …) are learned:
after a call, an unconfined worker reports the top-level installed modules it imported
(`reported`), the parent records them in the hub dir, one file per Python environment
(`learn`), and asks its zygote to import them now (`_process.worker`); the next zygote imports them as
it starts (`preload`). A confined worker's report is never taken: what the zygote imports is
decided by trusted code only.

A snapshot (or another private path entry) that ships a module of the same name as a preloaded
one gets its own, as in a fresh interpreter: before the repo runs, `evict_shadowed` removes
that module and every preloaded group that imported it from the worker's `sys.modules`.

`ISOLHUB_PRELOAD=0` turns learning and preloading off.

Example:
    >>> import sys
    >>> import tqdm                              # loaded, whatever ran before this example
    >>> from isolhub import get_dir
    >>> before = set(sys.modules) - {"tqdm"}     # as if tqdm was imported since `before`
    >>> "tqdm" in reported(before, private=[]) # in a worker, after a call
    True
    >>> learn(get_dir(), ["tqdm"])               # in the parent: recorded, may be preloaded
    ['tqdm']
    >>> learned(get_dir())
    ['tqdm']
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_MODULES",
    "TEMP_PREFIX",
    "enabled",
    "evict_shadowed",
    "forbid",
    "learn",
    "learned",
    "preload",
    "preloaded_modules",
    "prime",
    "reported",
    "valid_names",
]

TEMP_PREFIX = (
    ".preload-"  # a record being written; `isolhub cache verify --fix` sweeps abandoned ones
)
MAX_MODULES = 64  # top-level names a zygote preloads; the most recently used are kept
_MAX_NAME = 100

# In the zygote (and so in every worker): top-level name -> the top-level names its import added.
_GROUPS: dict[str, set[str]] = {}


def enabled() -> bool:
    return os.environ.get("ISOLHUB_PRELOAD", "1").strip().lower() not in ("0", "no", "off", "false")


def valid_names(names: Any) -> bool:
    """Whether `names` (from a worker: hostile) is a short list of plain top-level module names."""
    return (
        isinstance(names, list)
        and len(names) <= MAX_MODULES * 4
        and all(
            type(n) is str and 0 < len(n) <= _MAX_NAME and n.isidentifier() and n.isascii()
            for n in names
        )
    )


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    # Cached, and primed in the zygote (`prime`): in a fresh fork the first `get_paths()` took
    # 2.3 ms of a tiny load, and every worker asks the same question.
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("purelib", "platlib") if k in paths}
    return tuple(os.path.realpath(r) + os.sep for r in roots)


def prime() -> None:
    """Compute, before forking, what every worker's `reported` needs (it is inherited)."""
    _installed_roots()


def reported(before: Iterable[str], private: Iterable[str]) -> list[str]:
    """Top-level packages imported since `before` from site-packages, not from `private` dirs."""
    known = set(before)
    # By name first: reading a module object writes its reference count, and in a fresh fork
    # each such write copies a page (1.2 ms for the ~1,100 modules torch leaves behind).
    names = [
        n
        for n in list(sys.modules)
        if "." not in n
        and n not in known
        and not n.startswith("_")
        and n not in _GROUPS
        and n not in sys.stdlib_module_names  # cheap to import, and always there
    ]
    if not names:
        return []
    roots = _installed_roots()
    mine = tuple(os.path.realpath(p) + os.sep for p in private)
    out = []
    for name in names:
        path = getattr(sys.modules.get(name), "__file__", None)
        if not isinstance(path, str):
            continue
        real = os.path.realpath(path)
        if real.startswith(roots) and not real.startswith(mine) and valid_names([name]):
            out.append(name)
    return sorted(out)[:MAX_MODULES]


def _file(hub_dir: str | os.PathLike[str]) -> Path:
    env = "\0".join((sys.executable, sys.prefix, sys.version, os.environ.get("PYTHONPATH", "")))
    key = hashlib.sha256(env.encode()).hexdigest()[:16]
    return Path(hub_dir) / "preload" / f"{key}.json"


def _read(path: Path) -> tuple[dict[str, float], set[str]]:
    try:
        data = json.loads(path.read_text())
        used = {str(k): float(v) for k, v in data["used"].items()}
        never = {str(n) for n in data.get("never", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}, set()
    if not valid_names(list(used)) or not valid_names(sorted(never)):
        return {}, set()
    return used, never


def _write(path: Path, used: dict[str, float], never: set[str]) -> None:
    keep = sorted(used, key=lambda n: -used[n])[:MAX_MODULES]
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"used": {n: used[n] for n in keep}, "never": sorted(never)}, f)
            os.replace(tmp, path)  # a concurrent writer's names may be lost: they are relearned
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def learned(hub_dir: str | os.PathLike[str]) -> list[str]:
    """The names recorded for this environment, most recently used first (empty if unreadable)."""
    used, never = _read(_file(hub_dir))
    return [n for n in sorted(used, key=lambda n: -used[n]) if n not in never][:MAX_MODULES]


def learn(hub_dir: str | os.PathLike[str], names: list[str]) -> list[str]:
    """Record `names` for this environment; returns those that may be preloaded."""
    path = _file(hub_dir)
    used, never = _read(path)
    allowed = [n for n in names if n not in never]
    if any(n not in used for n in allowed):  # one write per new package, not one per load
        used.update(dict.fromkeys(allowed, time.time()))
        _write(path, used, never)
    return allowed


def forbid(hub_dir: str | os.PathLike[str], name: str) -> None:
    """Never preload `name` in this environment (importing it started a thread)."""
    path = _file(hub_dir)
    used, never = _read(path)
    used.pop(name, None)
    _write(path, used, never | {name})


def preload(names: Iterable[str], threads: Any) -> tuple[list[str], str | None]:
    """In the zygote: import `names`; (imported, the first one that started a thread, if any).

    A process with threads must not fork, so an import that starts one is reported and the
    zygote is replaced by one that does not import it.
    """
    done: list[str] = []
    for name in names:
        if name in _GROUPS or name in sys.modules:
            continue
        before = {n.partition(".")[0] for n in sys.modules}
        try:
            __import__(name)
        except BaseException:  # noqa: BLE001 - a package that fails to import is just not preloaded
            continue
        _GROUPS[name] = {n.partition(".")[0] for n in sys.modules} - before | {name}
        if threads() != 1:
            return done, name
        done.append(name)
    return done, None


def preloaded_modules() -> set[str]:
    """In the zygote: the top-level names that `preload` added (what workers may evict)."""
    return set().union(*_GROUPS.values())


def evict_shadowed(private: Iterable[str]) -> list[str]:
    """In a worker, before the repo runs: drop preloaded groups that a `private` dir shadows."""
    shadowed = set()
    for d in private:
        with contextlib.suppress(OSError):
            for entry in os.scandir(d):
                name = entry.name.removesuffix(".py") if entry.is_file() else entry.name
                if name.isidentifier():
                    shadowed.add(name)
    doomed: set[str] = set()
    for group in _GROUPS.values():
        if group & shadowed:
            doomed |= group
    if doomed:
        for name in [n for n in sys.modules if n.partition(".")[0] in doomed]:
            del sys.modules[name]
    return sorted(doomed)
