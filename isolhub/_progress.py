"""The progress display of `Hub.map`: done, failed, running and an ETA, on stderr.

On a terminal it is a tqdm bar with `ok=… failed=… running=…` after it; elsewhere (a log file,
CI) it is one line per finished spec:

    isolhub: [ 3/10] failed 1, running 4, eta 12 s: FAILED git+file:///srv/x.git@v1: ...

Example:
    >>> progress = _Progress(total=len(specs), enabled=True)
    >>> progress.started()
    >>> progress.finished(result)  # a pool `Result`
    >>> progress.close()
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO


class _Finished(Protocol):
    """What the display reads of a finished spec (a pool `Result`)."""

    @property
    def ok(self) -> bool: ...
    def summary(self) -> str: ...


class _Progress:
    """done / failed / running and an ETA on stderr: a tqdm bar on a terminal, lines elsewhere."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.done = self.failed = self.running = 0
        self.start = time.monotonic()
        self.bar: Any = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, unit="repo", dynamic_ncols=True)
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(
            f"ok={self.done - self.failed} failed={self.failed} running={self.running}",
            refresh=True,
        )

    def started(self) -> None:
        self.running += 1
        if self.bar is not None:
            self._postfix()

    def finished(self, result: _Finished) -> None:
        self.running = max(0, self.running - 1)
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
            f"isolhub: [{self.done:>{width}}/{self.total}] failed {self.failed}, running "
            f"{self.running}, eta {eta:.0f} s: {result.summary()}",
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
