"""Benchmark rows on repos shaped like real ones (see `bench.py` for the method).

Real hub repos import heavy installed packages (here: numpy, sympy, networkx, jinja2, yaml;
torchvision does not load beside the CPU torch build on the benchmark machine), have many
modules, or ship their own copy of an installed package. Each row is measured side by side
with torch.hub in one run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HEAVY_IMPORTS = "import numpy, sympy, networkx, jinja2, yaml  # heavy installed packages\n"

HEAVY_HUBCONF = """
dependencies = ["torch", "numpy"]

{imports}
from heavynet.resnet import resnet18

TAG = {tag}


def net():
    return resnet18()
"""

TINY_HUBCONF = """
import torch.nn as nn


def net():
    return nn.Linear(4, 4)
"""

OWN_YAML = '"""This repo\'s own yaml (shadows the installed one)."""\nOWN = True\n'


def _heavy(bench: Any, name: str, tag: int, extra: dict[str, str] | None = None) -> Path:
    from bench_common import write_repo
    from bench_repos import RESNET

    return write_repo(
        bench.tmp / "real" / name,
        {
            "hubconf.py": HEAVY_HUBCONF.format(imports=HEAVY_IMPORTS, tag=tag),
            "heavynet/__init__.py": "",
            "heavynet/resnet.py": RESNET,
            **(extra or {}),
        },
    )


def _many_modules(bench: Any, count: int = 200) -> Path:
    from bench_common import write_repo

    files = {f"parts/m{i:03d}.py": f"import torch\nK{i} = {i}\n" for i in range(count)}
    files["parts/__init__.py"] = "".join(f"from .m{i:03d} import *\n" for i in range(count))
    files["hubconf.py"] = (
        "from parts import *\nimport torch.nn as nn\n\ndef net():\n    return nn.Linear(8, 8)\n"
    )
    return write_repo(bench.tmp / "real" / "many", files)


def _fresh_process(code: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - t0


def row_heavy_first(bench: Any) -> Any:
    from bench_common import Row, fmt_time, median

    repo = str(_heavy(bench, "heavy_first", 0))
    env = dict(os.environ)
    ours_code = f"import isolhub; isolhub.load({repo!r}, 'net', source='local', verbose=False)"
    peer_code = f"import torch; torch.hub.load({repo!r}, 'net', source='local', verbose=False)"
    _fresh_process(ours_code, env)  # learns what the repo imports (what a user's first run does)
    cold_env = dict(env, ISOLHUB_PRELOAD="0")
    a, b, c = [], [], []
    for i in range(bench.reps(3, 5)):
        order = [(a, ours_code, env), (b, peer_code, env), (c, ours_code, cold_env)]
        for out, code, e in order if i % 2 == 0 else order[::-1]:
            out.append(_fresh_process(code, e))
    a_s, b_s, c_s = median(a), median(b), median(c)
    ratio = a_s / b_s
    return Row(
        "heavy_first",
        "first load in a fresh process, repo importing heavy installed packages (ResNet-18)",
        fmt_time(a_s),
        f"python -c 'import torch; torch.hub.load(...)': {fmt_time(b_s)}",
        f"{ratio:.2f}×",
        "≤ 1.2×",
        ratio <= 1.2,
        "whole process, interpreter start to exit; the packages were learned by one earlier run "
        f"(a user's first); with nothing learned (ISOLHUB_PRELOAD=0) it took {fmt_time(c_s)} "
        f"({c_s / b_s:.2f}×)",
        {"ours_s": a, "peer_s": b, "unlearned_s": c, "ratio": ratio},
    )


def _repeat_row(bench: Any, key: str, title: str, repos: list[Path], note: str) -> Any:
    import torch.hub
    from bench_common import Row, fmt_time, forget_modules, side_by_side

    import isolhub

    def ours() -> Any:
        return [isolhub.load(str(r), "net", source="local", verbose=False) for r in repos]

    def peer() -> Any:
        out = []
        for r in repos:
            forget_modules(r)
            out.append(torch.hub.load(str(r), "net", source="local", verbose=False))
        return out

    # One warm-up load each: torch.hub then has the packages imported; isolhub's zygote too.
    ours()
    time.sleep(1.0)  # the zygote imports what it learned off the load's path
    a, b, _, _ = side_by_side(ours, peer, bench.reps(3, 7))
    for r in repos:
        forget_modules(r)
    ratio = a / b
    n = len(repos)
    return Row(
        key,
        title,
        f"{fmt_time(a / n)} a load",
        f"torch.hub.load in the same process: {fmt_time(b / n)} a load",
        f"{ratio:.2f}×",
        "≤ 1.5×",
        ratio <= 1.5,
        note,
        {"ours_s": a, "peer_s": b, "loads": n, "ratio": ratio},
    )


def row_heavy_repeat(bench: Any) -> Any:
    repos = [_heavy(bench, f"heavy{i}", i) for i in range(6)]
    return _repeat_row(
        bench,
        "heavy_repeat",
        "repeated loads of 6 different refs in one process, heavy imports (ResNet-18)",
        repos,
        "torch.hub side: each repo's own modules are dropped before its load; the installed "
        "packages stay imported, as they do for a torch.hub user",
    )


def row_shadowed(bench: Any) -> Any:
    repos = [_heavy(bench, f"shadow{i}", i, {"yaml/__init__.py": OWN_YAML}) for i in range(4)]
    return _repeat_row(
        bench,
        "shadowed",
        "repeated loads, repos shipping their own `yaml` beside heavy imports (ResNet-18)",
        repos,
        "each isolhub worker drops the preloaded yaml and imports the repo's; torch.hub keeps "
        "whichever yaml was imported first (the installed one here)",
    )


def row_many_modules(bench: Any) -> Any:
    return _repeat_row(
        bench,
        "many_modules",
        "repeated loads of a repo of 200 modules (a Linear(8, 8))",
        [_many_modules(bench)],
        "each load imports the repo's 200 modules on both sides",
    )


def row_tiny(bench: Any) -> Any:
    import torch.hub
    from bench_common import Row, fmt_time, forget_modules, side_by_side, write_repo

    import isolhub

    repo = write_repo(bench.tmp / "real" / "tiny", {"hubconf.py": TINY_HUBCONF})

    def ours() -> Any:
        return isolhub.load(str(repo), "net", source="local", verbose=False)

    def peer() -> Any:
        forget_modules(repo)
        return torch.hub.load(str(repo), "net", source="local", verbose=False)

    a, b, _, _ = side_by_side(ours, peer, bench.reps(11, 31))
    forget_modules(repo)
    tax = a - b
    return Row(
        "tiny",
        "fixed cost of one load of a tiny model (Linear(4, 4)): the isolation tax",
        fmt_time(a),
        f"torch.hub.load: {fmt_time(b)}",
        f"{tax * 1e3:+.1f} ms",
        "≤ +10 ms",
        tax <= 0.010,
        "",
        {"ours_s": a, "peer_s": b, "tax_s": tax},
    )


def row_call_busy(bench: Any) -> Any:
    """The small remote call with every core but one busy (a spinning process per core)."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(max(1, (os.cpu_count() or 2) - 1))
    ]
    try:
        time.sleep(0.5)
        row = bench.row_call_small()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    row.key = "call_busy"
    row.title = "remote call round trip, 12 KiB in, 4 floats out, the other core busy"
    return row
