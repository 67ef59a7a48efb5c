"""Measure env="auto" (docs/environments.md): create, reuse, offline reuse, disk; uv against pip.

Run from the repository root with the index your installers are configured for (PyPI by
default; it downloads the wheels of REQUIREMENTS once per installer, into a throw-away cache):

    PYTHONPATH=$PWD .venv/bin/python scripts/env_figures.py [REQUIREMENT ...]

Everything it writes (hub dir, installer caches, the two example repos) is in a temporary folder
removed at the end. Each figure is the median of --runs runs (default 3) where it is cheap to
repeat; a cold install is measured once per installer (a second one would not be cold).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REQUIREMENTS = ["scipy>=1.16", "einops>=0.8"]
HUBCONF = "import einops\nimport scipy\n\n\ndef versions():\n    return scipy.__version__\n"


def _size(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file())


def _timed(fn, runs: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requirements", nargs="*", default=REQUIREMENTS)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="isolhub-env-figures-") as tmp:
        root = Path(tmp)
        repos = []
        for name in ("a", "b"):  # two repos, the same requirement set
            repo = root / name
            repo.mkdir()
            (repo / "hubconf.py").write_text(HUBCONF)
            (repo / "requirements.txt").write_text("\n".join(opts.requirements) + "\n")
            repos.append(str(repo))
        plain = root / "plain"
        plain.mkdir()
        (plain / "hubconf.py").write_text("def versions():\n    return None\n")
        os.environ["ISOLHUB_QUIET"] = "1"
        import isolhub as hub
        from isolhub._env import environment as _env

        rows = []
        for installer in ("uv", "pip"):
            os.environ["ISOLHUB_INSTALLER"] = installer
            os.environ["ISOLHUB_HOME"] = str(root / f"hub-{installer}")
            os.environ["UV_CACHE_DIR"] = str(root / f"cache-{installer}" / "uv")
            os.environ["PIP_CACHE_DIR"] = str(root / f"cache-{installer}" / "pip")

            def prepare(spec: str = repos[0]) -> object:
                return hub.prepare_env(spec, source="local", verbose=False)

            cold, env = _timed(prepare)
            warm_runs = []
            for _ in range(opts.runs):  # the environment removed, the installer's cache kept
                _env.remove_env(env.key)
                warm_runs.append(_timed(prepare)[0])
            warm = statistics.median(warm_runs)
            reuse, _ = _timed(prepare, opts.runs)
            os.environ["ISOLHUB_OFFLINE"] = "1"
            offline, _ = _timed(prepare, opts.runs)
            del os.environ["ISOLHUB_OFFLINE"]
            other, env_b = _timed(lambda: prepare(repos[1]))
            envs = Path(os.environ["ISOLHUB_HOME"]) / "envs"
            folders = [p for p in envs.iterdir() if (p / "env.json").is_file()]
            load_env, _ = _timed(
                lambda: hub.load(repos[0], "versions", source="local", env="auto", verbose=False),
                opts.runs,
            )
            load_plain, _ = _timed(
                lambda: hub.load(str(plain), "versions", source="local", verbose=False), opts.runs
            )
            rows.append(
                (
                    installer,
                    cold,
                    warm,
                    reuse,
                    offline,
                    other,
                    env_b.key == env.key,
                    len(folders),
                    _size(folders[0]),
                    ", ".join(env.packages),
                    load_env,
                    load_plain,
                )
            )
        print(f"requirements: {' '.join(opts.requirements)}; Python {sys.version.split()[0]}")
        print(
            "| installer | create, cold cache | create, warm cache | reuse | reuse offline "
            "| second repo, same set | envs on disk | size | installed |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r[0]} | {r[1]:.2f} s | {r[2]:.2f} s | {r[3] * 1e3:.1f} ms "
                f"| {r[4] * 1e3:.1f} ms | {r[5] * 1e3:.1f} ms (same folder: {r[6]}) "
                f"| {r[7]} | {r[8] / 2**20:.1f} MiB | {r[9]} |"
            )
        for r in rows:
            print(
                f"{r[0]}: hub.load with env='auto' (environment reused) {r[10] * 1e3:.0f} ms, "
                f"a load with no environment {r[11] * 1e3:.0f} ms (median of {opts.runs})"
            )


if __name__ == "__main__":
    main()
