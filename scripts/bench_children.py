"""Children the benchmark peers start with "spawn" (top-level functions, stdlib imports
at module level only), and helpers the rows share.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any


def evaluate(model: Any) -> float:
    """What a harness does with each model (runs in the pool's worker, or in-process)."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        return float(model(torch.randn(16, 3, 32, 32)).sum())


# ---------------------------------------------------------------------------------------------
# Children (spawned: top-level functions, stdlib imports at module level only)
# ---------------------------------------------------------------------------------------------


def tmp_child(qin: Any, qout: Any, count: int, nbytes: int) -> None:
    import torch

    sd = {f"layer{i}.weight": torch.full((nbytes // 4,), float(i)) for i in range(count)}
    while qin.get() is not None:
        qout.put({k: v.clone() for k, v in sd.items()})


def memfd_write(state_dict: Any) -> float:
    """Runs in the worker: the bare floor, a pwrite of each tensor into a fresh memfd."""
    import ctypes

    t0 = time.perf_counter()
    fd = os.memfd_create("bench-floor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, sum(t.nbytes for t in state_dict.values()))
        offset = 0
        for t in state_dict.values():
            view = memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())).cast("B")
            done = 0
            while done < t.nbytes:
                done += os.pwrite(fd, view[done:], offset + done)
            offset += t.nbytes
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def pipe_child(conn: Any) -> None:
    while True:
        data = conn.recv_bytes()
        if not data:
            break
        conn.send_bytes(data[:64])


def rss_child(repo: str, mib: int) -> None:
    """In a fresh interpreter: peak RSS of loading a `mib` MiB model in module mode."""
    import torch

    import isolhub

    def hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    isolhub.load(repo, "echo", source="local")  # warm: zygote, cloudpickle, the arena path
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current RSS
        how = "/proc/self/clear_refs reset"
    except OSError:
        how = "getrusage baseline (clear_refs not writable)"
    baseline = hwm()
    m = isolhub.load(repo, "stack", mib, keep=False, source="local")
    after_load = hwm()
    model_bytes = 0
    with torch.no_grad():
        for p in m.parameters():
            model_bytes += p.numel() * p.element_size()
            float(p.sum())
    print(
        json.dumps(
            {
                "baseline": baseline,
                "after_load": after_load,
                "peak": hwm(),
                "model_bytes": model_bytes,
                "how": how,
            }
        )
    )
