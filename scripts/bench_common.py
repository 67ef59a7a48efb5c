"""Shared pieces of the benchmarks: the row record, timing side by side, formatting.

Module-level imports are stdlib only (spawned children re-import the row modules).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every allocation over 128 KiB gets pages never touched before, as in the first load of a
# process. Left adaptive, glibc raises its mmap threshold after the first large free and then
# recycles warm memory: repeating one load eleven times in a process makes the in-process
# peers (torch.hub.load, cloudpickle) look 20-60% faster than any first load. Workers are
# new processes and get fresh pages either way. `--recycled-memory` measures the other view.
FRESH_MEMORY_ENV = "MALLOC_MMAP_THRESHOLD_"
FRESH_MEMORY_VALUE = "131072"

MiB = 1 << 20
GiB = 1 << 30


def write_repo(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def forget_modules(root: Path) -> None:
    """Drop every module loaded from `root` (torch.hub caches a repo's imports in-process).

    It runs inside the peer's clock, so it compares path prefixes only: a `realpath` of each of
    the ~1,100 loaded modules' files took 67-104 ms here, more than a torch.hub.load of a tiny
    model, and made every torch.hub side look that much slower (fixed 2026-12-07).
    """
    prefixes = tuple({str(root) + os.sep, str(root.resolve()) + os.sep})
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(prefixes):
            del sys.modules[name]


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    title: str
    figure: str = ""
    against: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None  # None: not applicable
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "MISS")


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def side_by_side(
    ours: Callable[[], Any], peer: Callable[[], Any], reps: int, warm: int = 1
) -> tuple[float, float, list[float], list[float]]:
    """Alternate `ours` and `peer` `reps` times (after `warm` untimed rounds of each): medians.

    What each returns is released as soon as its clock stops, so both sides start from the
    same free memory (freeing a GiB of pages takes a tenth of a second here and is no part of
    a hand-off; and on this virtual machine, pages not recycled at once can cost seconds to
    get back from the host).
    """
    for _ in range(warm):
        release(ours())
        release(peer())
    a: list[float] = []
    b: list[float] = []
    for i in range(reps):
        order = (ours, peer) if i % 2 == 0 else (peer, ours)
        for fn in order:
            gc.collect()
            dt, out = timed(fn)
            release(out)
            out = None  # noqa: F841 - drop it now, outside the clock
            (a if fn is ours else b).append(dt)
    RUNS.append({"ours_s": a, "against_s": b})
    return median(a), median(b), a, b


RUNS: list[dict[str, list[float]]] = []  # every repetition, for the JSON output


class Fd(int):
    """An fd that `release` closes."""


def release(out: Any) -> None:
    if isinstance(out, Fd):
        os.close(out)
    elif isinstance(out, (tuple, list)):
        for item in out:
            release(item)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# Output
# ---------------------------------------------------------------------------------------------


def print_row(row: Row) -> None:
    print(f"\n[{row.verdict}] {row.title}", flush=True)
    print(f"    isolhub  {row.figure}")
    print(f"    against  {row.against}")
    if row.ratio or row.target:
        print(f"    ratio    {row.ratio}   (target {row.target})")
    if row.note:
        print(f"    note     {row.note}")


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| row | isolhub | measured against (same run) | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.title} | {r.figure} | {r.against} | {r.ratio} | {r.target} | {r.verdict} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    model, virtual = "unknown", False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    virtual = "hypervisor" in line.split()
                    break
    except OSError:
        pass
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return {
        "cpu": model + (" (virtual machine)" if virtual else ""),
        "cores": os.cpu_count(),
        "memory": fmt_bytes(mem),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get(FRESH_MEMORY_ENV, "adaptive (glibc default)"),
        "load_average": os.getloadavg(),
    }
