"""isolhub benchmarks: each figure next to its peer or floor, measured side by side in one run.

Usage:
    .venv/bin/python scripts/bench.py [--quick] [--json out.json] [--only ROW[,ROW...]]
        [--recycled-memory]

Every row prints the figure, what it is measured against in the same run, the ratio, the target
and PASS/MISS. The machines this runs on are noisy, so the ratios matter, not the absolute
times; each side is timed in interleaved repetitions and summarised by its median. Models are
generated (no download); memory comes from /proc (VmHWM) or getrusage, fds from /proc/self/fd.
Nothing here is a test: a MISS is reported, never raised.

Module-level imports are stdlib only: the `multiprocessing` peers start their children with
"spawn", which re-imports this file in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)  # the row modules beside it
# Workers import them too (a `then=` function travels by reference from bench_children).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (_HERE, os.environ.get("PYTHONPATH"))))

from bench_children import rss_child  # noqa: E402
from bench_common import (  # noqa: E402
    FRESH_MEMORY_ENV,
    FRESH_MEMORY_VALUE,
    RUNS,
    Row,
    fmt_time,
    machine,
    markdown_table,
    print_row,
    timed,
)
from bench_repos import make_repos  # noqa: E402


class Bench:
    """What every row reads: the generated repos, the repetition counts, the rows so far."""

    def __init__(self, quick: bool, tmp: Path) -> None:
        self.quick = quick
        self.tmp = tmp
        self.repo, self.small_repos = make_repos(tmp / "repos")
        self.rows: list[Row] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("row_") and name[4:] in ROWS:
            module = importlib.import_module(_FAMILY[name[4:]])
            return lambda: getattr(module, name)(self)
        raise AttributeError(name)

    def reps(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print_row(row)


ROWS = (
    "load",
    "worker_ready",
    "state_dict_big",
    "state_dict_small",
    "module",
    "call_small",
    "call_large",
    "rss",
    "sandbox",
    "pool",
    # repos shaped like real ones (bench_real.py)
    "heavy_first",
    "heavy_repeat",
    "shadowed",
    "many_modules",
    "tiny",
    "call_busy",
)
REAL_ROWS = ROWS[ROWS.index("heavy_first") :]
# The module each row's function (`row_NAME(bench)`) lives in.
_FAMILY = {
    **dict.fromkeys(("load", "worker_ready", "sandbox", "pool"), "bench_load"),
    **dict.fromkeys(("state_dict_big", "state_dict_small", "module", "rss"), "bench_transfer"),
    **dict.fromkeys(("call_small", "call_large"), "bench_call"),
    **dict.fromkeys(REAL_ROWS, "bench_real"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--only", metavar="ROWS", help=f"comma-separated subset of: {','.join(ROWS)}")
    p.add_argument(
        "--recycled-memory",
        action="store_true",
        help="leave glibc's adaptive mmap threshold on (see FRESH_MEMORY_ENV)",
    )
    p.add_argument("--_rss", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._rss:
        rss_child(args._rss[0], int(args._rss[1]))
        return 0
    only = set(args.only.split(",")) if args.only else set(ROWS)
    unknown = only - set(ROWS)
    if unknown:
        p.error(f"unknown rows: {', '.join(sorted(unknown))}")
    if not args.recycled_memory and FRESH_MEMORY_ENV not in os.environ:
        # glibc reads it at start-up only: run again with it set.
        env = dict(os.environ, **{FRESH_MEMORY_ENV: FRESH_MEMORY_VALUE})
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)

    # As most users run Python: bytecode cached (torch.hub's side and isolhub's workers alike).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    tmp = Path(tempfile.mkdtemp(prefix="isolhub-bench-"))
    os.environ["ISOLHUB_HOME"] = str(tmp / "home")
    started = time.perf_counter()
    try:
        import isolhub

        info = machine()
        print(
            f"isolhub benchmarks ({'quick' if args.quick else 'full'}): {info['cpu']}, "
            f"{info['cores']} cores, {info['memory']}, Linux {info['kernel']}, "
            f"Python {info['python']}, torch {info['torch']}, load {info['load_average'][0]:.2f}; "
            f"{FRESH_MEMORY_ENV}={info['malloc_mmap_threshold']}"
        )
        bench = Bench(args.quick, tmp)
        t, _ = timed(lambda: isolhub.load(str(bench.repo), "echo", source="local"))
        print(f"zygote start and first load: {fmt_time(t)} (not counted)")
        for name in ROWS:
            if name not in only:
                continue
            try:
                out = getattr(bench, f"row_{name}")()
            except Exception as e:  # noqa: BLE001 - a broken row is reported, the rest still run
                import traceback

                traceback.print_exc()
                out = Row(name, name, "error", "", "", "", False, f"{type(e).__name__}: {e}")
            for row in out if isinstance(out, list) else [out]:
                if RUNS:
                    row.data["repetitions"] = list(RUNS)
                bench.add(row)
            RUNS.clear()
        elapsed = time.perf_counter() - started
        print(f"\n{markdown_table(bench.rows)}\n")
        misses = [r.key for r in bench.rows if r.ok is False]
        print(
            f"{len(bench.rows)} rows, {len(misses)} miss{'es' if len(misses) != 1 else ''}"
            f"{': ' + ', '.join(misses) if misses else ''}; {elapsed:.0f} s"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "mode": "quick" if args.quick else "full",
                        "machine": info,
                        "seconds": elapsed,
                        "rows": [dict(asdict(r), verdict=r.verdict) for r in bench.rows],
                    },
                    f,
                    indent=2,
                )
            print(f"wrote {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
