"""Rows: remote calls on a handle, against a Pipe ping-pong and memcpy."""

from __future__ import annotations

import mmap
import multiprocessing
import os
from typing import Any

from bench_children import pipe_child
from bench_common import (
    MiB,
    Row,
    fmt_time,
    side_by_side,
    timed,
)


# -- 7. remote call, 12 KiB in, small out, vs a Pipe ping-pong -----------------------------
def row_call_small(bench: Any) -> Row:
    import torch

    import isolhub

    ctx = multiprocessing.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=pipe_child, args=(child_end,), daemon=True)
    child.start()
    child_end.close()
    x = torch.randn(3072)  # 12 KiB
    payload = bytes(12 * 1024)
    batch = bench.reps(100, 300)
    m = isolhub.load(str(bench.repo), "echo", source="local", mode="remote")
    # The same calls with both sides sleeping at once (no polling first), for the record.
    os.environ["ISOLHUB_SPIN_US"] = "0"
    try:
        asleep = isolhub.load(str(bench.repo), "echo", source="local", mode="remote")
    finally:
        del os.environ["ISOLHUB_SPIN_US"]
    try:
        for _ in range(50):
            m(x)
            asleep(x)

        def ours() -> None:
            for _ in range(batch):
                m(x)

        def peer() -> None:
            for _ in range(batch):
                parent_end.send_bytes(payload)
                parent_end.recv_bytes()

        def sleeping() -> None:
            for _ in range(batch):
                asleep(x)

        a, b, _, _ = side_by_side(ours, peer, bench.reps(5, 11))
        c, _, _, _ = side_by_side(sleeping, peer, bench.reps(3, 5))
        out = m(x)
        assert torch.equal(out, x[:4])
    finally:
        m.close()
        asleep.close()
        parent_end.send_bytes(b"")
        child.join(timeout=10)
        parent_end.close()
    a, b, c = a / batch, b / batch, c / batch
    ratio = a / b
    return Row(
        "call_small",
        "remote call round trip, 12 KiB tensor in, 4 floats out",
        fmt_time(a),
        f"multiprocessing.Pipe ping-pong, 12 KiB in, 64 B out: {fmt_time(b)}",
        f"{ratio:.2f}×",
        "≤ 3×",
        ratio <= 3,
        f"median of batches of {batch} calls; both isolhub processes poll up to "
        f"ISOLHUB_SPIN_US (200 µs) before sleeping, the Pipe peer sleeps in recv at once; "
        f"with ISOLHUB_SPIN_US=0 a call took {fmt_time(c)} ({c / b:.2f}×)",
        {"ours_s": a, "peer_s": b, "ratio": ratio, "ours_no_spin_s": c},
    )


# -- 8. remote call, 64 MiB in and out, vs memcpy of 128 MiB -------------------------------
def row_call_large(bench: Any) -> Row:
    import torch

    import isolhub

    x = torch.randn(16 * MiB)  # 64 MiB
    m = isolhub.load(str(bench.repo), "echo", source="local", mode="remote")
    try:

        def ours() -> Any:
            y = m(x, full=True)
            assert y.shape == x.shape
            return y

        def floor() -> Any:
            # Two copies into pages never touched before (a new anonymous mapping each):
            # torch's allocator may hand back warm memory, which no transfer result gets.
            out = []
            for _ in range(2):
                buf = mmap.mmap(-1, x.numel() * 4)
                t = torch.frombuffer(buf, dtype=torch.float32)
                t.copy_(x)
                out.append(t)
            return out

        a, b, _, _ = side_by_side(ours, floor, bench.reps(5, 11))
        y = m(x, full=True)
        assert torch.equal(y, x)
    finally:
        m.close()
    warm = torch.empty_like(x)
    warm_t = min(timed(lambda: (warm.copy_(x), warm.copy_(x)))[0] for _ in range(5))
    ratio = a / b
    return Row(
        "call_large",
        "remote call, 64 MiB tensor in and out (identity forward)",
        fmt_time(a),
        f"memcpy of 128 MiB into fresh pages (2 × 64 MiB): {fmt_time(b)}",
        f"{ratio:.2f}×",
        "≤ 2×",
        ratio <= 2,
        f"into already-touched pages memcpy of 128 MiB takes {fmt_time(warm_t)} "
        f"({a / warm_t:.1f}× by that measure); a result is new memory, so fresh pages are "
        "the floor",
        {"ours_s": a, "floor_s": b, "warm_memcpy_s": warm_t, "ratio": ratio},
    )
