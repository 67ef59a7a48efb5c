"""What isolhub shows while it works: progress bars, plain progress lines, and notices.

One rule everywhere: a tqdm bar only when the stream is a terminal, plain lines otherwise (a log
file, CI), nothing at all when quiet (`ISOLHUB_QUIET=1`, or `--quiet` on the command line, which
sets it for the workers too). Notices such as torch.hub's "Using cache found in ..." go through
the `isolhub` logger, so `logging.getLogger("isolhub").setLevel(logging.WARNING)` silences them.

`Hub.map` shows done, failed, starting, running and an ETA ("starting workers" until the first
call is in a worker); elsewhere a line as workers start, then one line per finished spec:

    isolhub: [ 0/10] starting 4 workers for 10 specs (fetching snapshots, importing hubconf)
    isolhub: [ 3/10] failed 1, starting 0, running 4, eta 12 s: FAILED git+file:///srv/x.git@v1: ...

Example:
    >>> import io
    >>> bar = bytes_bar(enabled=True, desc="w.pt", stream=io.StringIO())
    >>> bar.reset(total=2048); bar.update(2048); bar.close()
    >>> is_quiet()
    False
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Protocol, TextIO

__all__ = ["PoolProgress", "bytes_bar", "is_quiet", "log", "notice"]

log = logging.getLogger("isolhub")

# Plain progress lines at most this often (and once at the end), so a log stays readable.
_LINE_EVERY_S = 5.0


def is_quiet() -> bool:
    """True when progress and notices are off (`ISOLHUB_QUIET` set to anything but 0)."""
    return os.environ.get("ISOLHUB_QUIET", "") not in ("", "0")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest and users swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


if not log.handlers:
    # A library logger with its own handler (as huggingface_hub's): torch.hub prints these
    # notices by default, so they show without logging configured. Not propagated, so a
    # configured root logger does not print them twice; add handlers here to redirect them.
    log.addHandler(_StderrHandler())
    log.propagate = False
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def notice(message: str) -> None:
    """Tell the user something in passing (torch.hub's "Using cache found in ..."), unless quiet.

    Example:
        >>> handler = logging.StreamHandler(sys.stdout)     # where a CLI would show it
        >>> log.addHandler(handler); log.setLevel(logging.INFO)
        >>> notice("Using cache found in /cache/hub/owner_repo_main")
        Using cache found in /cache/hub/owner_repo_main
        >>> os.environ["ISOLHUB_QUIET"] = "1"; notice("not shown")
        >>> del os.environ["ISOLHUB_QUIET"]; log.removeHandler(handler); log.setLevel(logging.NOTSET)
    """
    if not is_quiet():
        log.info(message)


def bytes_bar(enabled: bool, desc: str, stream: TextIO | None = None) -> Any:
    """A byte counter for a download: tqdm on a terminal, plain lines elsewhere, or nothing.

    The result has tqdm's `reset(total=)`, `update(n)` and `close()` and is a context manager.
    """
    stream = stream or sys.stderr
    if enabled and not is_quiet() and _isatty(stream):
        from tqdm import tqdm

        return tqdm(
            total=None, unit="B", unit_scale=True, unit_divisor=1024, file=stream, desc=desc
        )
    return _ByteLines(stream, desc, enabled and not is_quiet())


class _ByteLines:
    """Download progress as a line every few seconds and one at the end; none before a byte."""

    def __init__(self, stream: TextIO, desc: str, enabled: bool) -> None:
        self.stream, self.desc, self.enabled = stream, desc, enabled
        self.total: int | None = None
        self.n = 0
        self.start = self.last = time.monotonic()
        self.printed = False

    def __enter__(self) -> _ByteLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self, total: int | None = None) -> None:
        self.total, self.n = total, 0

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and n and now - self.last >= _LINE_EVERY_S:
            self.last = now
            self._line("downloading")

    def close(self) -> None:
        if self.enabled and self.n:
            complete = self.total is None or self.n >= self.total
            if complete or self.printed:
                self._line("downloaded" if complete else "stopped after")
        self.enabled = False

    def _line(self, verb: str) -> None:
        of = f" of {_size(self.total)}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        spent = time.monotonic() - self.start
        print(
            f"isolhub: {verb} {self.desc}: {_size(self.n)}{of}{pct} in {spent:.1f} s",
            file=self.stream,
            flush=True,
        )
        self.printed = True


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class _Finished(Protocol):
    """What the display reads of a finished spec (a pool `Result`)."""

    @property
    def ok(self) -> bool: ...
    @property
    def index(self) -> int: ...
    def summary(self) -> str: ...


class PoolProgress:
    """done / failed / starting / running and an ETA on stderr: a tqdm bar on a terminal, lines
    elsewhere.

    A spec is *starting* from when a pool thread takes it (its snapshot fetched, its worker
    forked and importing) until its call is sent; then *running* until its result. Until the
    first spec runs, the bar says "starting workers" and a plain line says so once, so a pool
    that spends its first seconds starting workers does not look stuck at 0.
    """

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.done = self.failed = 0
        self._starting: set[int] = set()
        self._running: set[int] = set()
        self._said_starting = False
        self.start = time.monotonic()
        self.bar: Any = None
        if enabled and is_quiet():
            self.enabled = enabled = False
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, unit="repo", dynamic_ncols=True)
            self._postfix()

    @property
    def starting(self) -> int:
        """Specs taken whose call has not been sent yet (fetching, worker starting)."""
        return len(self._starting)

    @property
    def running(self) -> int:
        """Specs whose call is in a worker."""
        return len(self._running)

    def _postfix(self) -> None:
        if not self._running and not self.done:
            self.bar.set_description_str("starting workers" if self._starting else "", False)
        else:
            self.bar.set_description_str("", False)
        self.bar.set_postfix_str(
            f"ok={self.done - self.failed} failed={self.failed} starting={self.starting} "
            f"running={self.running}",
            refresh=True,
        )

    def started(self, index: int) -> None:
        """A pool thread took spec `index`: its snapshot and worker are being made ready."""
        self._starting.add(index)
        if self.bar is not None:
            self._postfix()

    def launched(self, workers: int) -> None:
        """`workers` pool threads were started; say so once, before any result."""
        if not self.enabled or self._said_starting or self.done:
            return
        self._said_starting = True
        if self.bar is not None:
            self._postfix()
            return
        width = len(str(self.total))
        noun = "worker" if workers == 1 else "workers"
        print(
            f"isolhub: [{0:>{width}}/{self.total}] starting {workers} {noun} for {self.total} "
            "specs (fetching snapshots, importing hubconf)",
            file=self.stream,
            flush=True,
        )

    def running_now(self, index: int) -> None:
        """Spec `index` has its worker and its call was sent."""
        self._starting.discard(index)
        self._running.add(index)
        if self.bar is not None:
            self._postfix()

    def finished(self, result: _Finished) -> None:
        self._starting.discard(result.index)
        self._running.discard(result.index)
        self.done += 1
        self.failed += not result.ok
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self._postfix()
            return
        spent = time.monotonic() - self.start
        eta = spent / self.done * (self.total - self.done)
        width = len(str(self.total))
        print(
            f"isolhub: [{self.done:>{width}}/{self.total}] failed {self.failed}, starting "
            f"{self.starting}, running {self.running}, eta {eta:.0f} s: {result.summary()}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
