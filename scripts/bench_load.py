"""Rows: isolhub.load against torch.hub.load, a new worker, a sandboxed worker, the pool."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from bench_children import evaluate
from bench_common import (
    Row,
    fmt_time,
    forget_modules,
    median,
    side_by_side,
    timed,
)


# -- 1. isolhub.load vs torch.hub.load ------------------------------------------------------
def row_load(bench: Any) -> Row:
    import torch.hub

    import isolhub

    repo = str(bench.repo)

    def ours() -> Any:
        return isolhub.load(repo, "resnet18", source="local")

    def peer() -> Any:
        forget_modules(bench.repo)
        return torch.hub.load(repo, "resnet18", source="local", verbose=False)

    a, b, _, _ = side_by_side(ours, peer, bench.reps(5, 11))
    forget_modules(bench.repo)
    ratio = a / b
    return Row(
        "load",
        "isolhub.load, local repo, warm zygote (ResNet-18, 44.7 MiB)",
        fmt_time(a),
        f"torch.hub.load(source='local') in-process: {fmt_time(b)}",
        f"{ratio:.2f}×",
        "≤ 1.15×",
        ratio <= 1.15,
        "torch.hub side: the repo's modules are dropped from sys.modules before each load, "
        "so both sides import the repo and build the model every time",
        {"ours_s": a, "peer_s": b, "ratio": ratio},
    )


# -- 2. a new worker vs a cold interpreter importing torch ---------------------------------
def row_worker_ready(bench: Any) -> Row:
    import isolhub
    from isolhub._engine import start_worker

    snap = isolhub.fetch(str(bench.repo), source="local")

    def ours() -> None:
        dt, w = timed(lambda: start_worker(snap))
        w.close()
        starts.append(dt)

    starts: list[float] = []
    ours()  # the zygote is warm already; one more for the page cache
    starts.clear()
    for _ in range(bench.reps(15, 40)):
        ours()
    a = median(starts)
    cold: list[float] = []
    for _ in range(bench.reps(2, 5)):
        dt, _ = timed(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True))
        cold.append(dt)
    b = median(cold)
    speedup = b / a
    return Row(
        "worker_ready",
        "new worker ready to import hubconf (spare forked ahead + handshake)",
        fmt_time(a),
        f"python -c 'import torch': {fmt_time(b)}",
        f"{speedup:.0f}× faster",
        "≤ 25 ms, ≥ 40× faster",
        a <= 0.025 and speedup >= 40,
        "time of isolhub._engine.start_worker (socketpair, request to the zygote, which hands "
        "the fds to the child it forked ahead and forks the next one after replying; init "
        "message, the worker's ready reply); starts follow each other after a close; "
        "closing is not counted",
        {"ours_s": a, "peer_s": b, "speedup": speedup},
    )


# -- 10. sandboxed worker set-up ------------------------------------------------------------
def row_sandbox(bench: Any) -> Row:
    import isolhub
    from isolhub import _engine

    title = "sandboxed worker set-up vs unsandboxed"
    policy = _engine.policy_for("strict", "remote")
    snap = isolhub.fetch(str(bench.repo), source="local")

    def start(**kw: Any) -> Any:
        return _engine.start_worker(snap, **kw)

    try:
        start(sandbox=policy).close()  # the first confined worker loads the sandbox code
    except isolhub.SandboxError as e:
        return Row(
            "sandbox",
            title,
            "n/a",
            "unsandboxed worker",
            "",
            "+ ≤ 10 ms",
            None,
            f"n/a: the strict sandbox cannot be applied here ({e})",
        )
    closing: list[Any] = []

    def ours() -> None:
        closing.append(start(sandbox=policy))

    def peer() -> None:
        closing.append(start())

    def close_all() -> None:
        while closing:
            closing.pop().close()

    a_times: list[float] = []
    b_times: list[float] = []
    for i in range(bench.reps(10, 30)):
        for fn in (ours, peer) if i % 2 == 0 else (peer, ours):
            dt, _ = timed(fn)
            close_all()
            (a_times if fn is ours else b_times).append(dt)
    a, b = median(a_times), median(b_times)
    extra = a - b
    return Row(
        "sandbox",
        title,
        f"{fmt_time(a)} ({'+' if extra >= 0 else '−'}{fmt_time(abs(extra))})",
        f"unsandboxed: {fmt_time(b)}",
        f"{'+' if extra >= 0 else '−'}{abs(extra) * 1e3:.1f} ms",
        "+ ≤ 10 ms",
        extra <= 0.010,
        "start_worker(snapshot, sandbox='strict' policy) vs start_worker(snapshot): fork, "
        "init, confinement (namespaces, Landlock, seccomp, rlimits), ready reply; the "
        "first confined worker of a process (loading the sandbox code) is left out",
        {"ours_s": a, "peer_s": b, "extra_s": extra},
    )


# -- 11. the pool -------------------------------------------------------------------------
def row_pool(bench: Any) -> Row:
    return pool_row(bench, "32 small repos through the pool (2 workers)")


def pool_row(bench: Any, title: str) -> Row:
    import torch.hub

    from isolhub import Hub

    repos = [str(r) for r in bench.small_repos]

    def peer() -> list[float]:
        out = []
        for r in bench.small_repos:
            forget_modules(r)
            out.append(evaluate(torch.hub.load(str(r), "net", source="local", verbose=False)))
            forget_modules(r)
        return out

    def ours() -> list[float]:
        with Hub(max_workers=2, source="local") as pool:
            results = list(pool.map(evaluate, repos, "net"))
        bad = [r for r in results if not r.ok]
        if bad:
            raise RuntimeError(bad[0].summary())
        return [r.value for r in results]

    a, b, _, _ = side_by_side(ours, peer, bench.reps(1, 5))
    ratio = b / a
    return Row(
        "pool",
        title,
        fmt_time(a),
        f"sequential torch.hub.load in one process: {fmt_time(b)}",
        f"{ratio:.2f}× throughput",
        "≥ 1.0× throughput",
        ratio >= 1.0,
        "each repo: build its small convnet and evaluate it on a batch of 16 (the pool "
        "runs the evaluation in the worker and returns a float); the pool's time includes "
        "starting and closing it; torch.hub side: the repo's modules dropped after each load",
        {"ours_s": a, "peer_s": b, "ratio": ratio},
    )
