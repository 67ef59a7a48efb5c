"""The one cross-process file lock (the `filelock` library), with one failure policy.

Every lock isolhub takes (`<hub>/.locks/*.lock`: a snapshot install, a download) only avoids
duplicate work; correctness never depends on it (files are written beside their target and
renamed in, and `flock` succeeds for everyone on some network filesystems). So a lock that
cannot be had never stops the work:

* the lock file cannot be made (a read-only cache, no locking on this filesystem): the body
  runs unlocked, logged at debug level;
* another process holds it past `timeout` seconds: the body runs unlocked, with a warning that
  names the lock file and how to remove it if it is stale;
* releasing it fails: ignored (the kernel drops the lock with the fd).

Example:
    >>> from pathlib import Path
    >>> with held(Path("locks") / "x.lock", timeout=600):   # its folder is made if missing
    ...     Path("locks/x.lock").exists()
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import filelock

__all__ = ["held"]

_log = logging.getLogger("isolhub.lock")


@contextlib.contextmanager
def held(
    path: str | os.PathLike[str], timeout: float, *, log: logging.Logger | None = None
) -> Iterator[None]:
    """Hold the lock file `path` (its folder made if missing) for the body, if it can be had.

    `log` is where a timeout is reported (default `isolhub.lock`).
    """
    path = os.fspath(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fl = filelock.FileLock(path, timeout=timeout)
        fl.acquire()
    except filelock.Timeout:
        (log or _log).warning(
            "waited %g s for the lock %s, held by another process; going on without it. "
            "If no other isolhub process is running, the lock is stale and can be deleted: rm %s",
            timeout,
            path,
            path,
        )
        yield
        return
    except (OSError, NotImplementedError) as e:
        _log.debug("going on without the lock %s (%s)", path, e)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fl.release()
