"""The zygote: a process that preloads torch and the worker runtime, then forks workers.

Spawned once per parent (lazily). It runs no torch op and starts no thread, so each fork is a
cheap copy-on-write clone (~10 ms) instead of a fresh interpreter importing torch (~1 s). It talks
to the parent over one control socket:

    {"op": "fork"} + fds [channel, output]  →  {"pid": N}
    {"op": "wait", "pid": N}                 →  {"status": returncode}   (after N has exited)

When the parent goes away (end of stream on the control socket) it kills its workers and exits.

Example:
    $ python -m isolhub._zygote 5      # fd 5: the control socket (started by _process.Zygote)
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def _preload() -> None:
    import torch  # noqa: F401

    from . import _checkpoints, _download, _sandbox, _worker  # noqa: F401
    from ._byvalue import prime_module_paths

    # Workers inherit all of this. Resolve module paths once here (by-value pickling looks
    # them up), and freeze the objects: a worker's garbage collector then never walks them,
    # which would write to, and so copy, every page holding one (a 0.1-0.2 s stall).
    prime_module_paths()
    gc.collect()
    gc.freeze()


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _set_pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _child(control: socket.socket, channel: int, output: int, zygote_pid: int) -> None:
    # The worker dies with the zygote, which dies with the parent.
    _set_pdeathsig()
    if os.getppid() != zygote_pid:
        os._exit(1)
    control.close()
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from ._worker import serve

    serve(channel)


def main(control_fd: int) -> None:
    """Serve fork and wait requests on `control_fd` until the parent closes it."""
    from ._protocol import decode, encode, recv_frame, send_frame

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    control = socket.socket(fileno=control_fd)
    children: set[int] = set()
    try:
        _preload()
        send_frame(control, encode({"ready": True, "pid": os.getpid()}))
    except BaseException as e:
        send_frame(control, encode({"ready": False, "error": f"{type(e).__name__}: {e}"}))
        raise
    while True:
        frame = recv_frame(control)
        if frame is None:
            break
        payload, fds = frame
        request: dict[str, Any] = decode(payload)
        reply: dict[str, Any]
        if request.get("op") == "fork" and len(fds) == 2:
            if _threads() != 1:
                reply = {"error": f"the zygote has {_threads()} threads; refusing to fork"}
            else:
                pid = os.fork()
                if pid == 0:
                    try:
                        _child(control, fds[0], fds[1], os.getppid())
                    finally:
                        os._exit(71)
                children.add(pid)
                reply = {"pid": pid}
        elif request.get("op") == "wait" and request.get("pid") in children:
            pid = request["pid"]
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            reply = {"status": os.waitstatus_to_exitcode(status)}
        else:
            reply = {"error": f"bad zygote request {request!r}"}
        for fd in fds:
            os.close(fd)
        send_frame(control, encode(reply))
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
