"""The zygote: a process that preloads torch and the worker runtime, then forks workers.

Spawned once per parent (lazily). It runs no torch op and starts no thread, so each fork is a
cheap copy-on-write clone (~10 ms) instead of a fresh interpreter importing torch (~1 s). It keeps
one child forked ahead (the spare) and hands it the next worker's fds, so the fork is off the
critical path: a worker is ready in the time of the handshake. It talks to the parent over one
control socket:

    ForkRequest + fds [channel, output]  →  Forked(pid)
    WaitRequest(pid)                     →  Waited(returncode)   (after pid has exited)
    PreloadRequest(names)                →  Preloaded(names imported, the unsafe one or None)
    ProvidedRequest                      →  Provided({distribution: version})
    any other shape                      →  a refusal, {"error": why}

(`_process.messages`' dataclasses through the restricted codec: `zygote_request` decodes a
request, and the zygote dispatches on its class.)

Before it says it is ready it imports the installed packages that workers were seen to import
(`_process.preload`), and it imports more when asked; then the spare is forked again, so that it has them.

It dies with its parent: its very first act, before torch is imported, is to ask the kernel for
SIGKILL when the parent dies, and then to check that the parent has not died already (the race
that asking closes only from then on). Its workers die with it the same way. When the parent
closes the control socket instead, it kills its workers and exits.

Example:
    $ python -m isolhub._process.zygote 5 4242  # fd 5: the control socket; 4242: the parent's pid
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from typing import Any

from .._libc import set_pdeathsig

__all__ = ["die_with_parent", "main"]


def _preload() -> None:
    import importlib

    import torch  # noqa: F401

    if "numpy" in sys.modules:  # torch imports it; its `random` is imported lazily, by the
        importlib.import_module("numpy.random")  # reseed in every worker: 7 ms of CPU each

    # What every worker shares, fixed, besides torch (`ISOLHUB_ZYGOTE_IMPORTS=numpy,timm`):
    # imported once here and never replaced by a repo's environment (`_env.environment`).
    for name in os.environ.get("ISOLHUB_ZYGOTE_IMPORTS", "").replace(" ", "").split(","):
        if name:
            importlib.import_module(name)

    import torch.utils.model_zoo  # noqa: F401

    # The sandbox's code: the spare's cgroups, and the policy that a confined worker's init holds
    # (unpickling it imported the policy, Landlock and seccomp code in each one: 5-13 ms).
    from .._sandbox import caps as _caps  # noqa: F401
    from .._sandbox import policy as _policy  # noqa: F401
    from .._transport.byvalue import prime_module_paths
    from .._weights import checkpoints as _checkpoints  # noqa: F401
    from . import preload as _learned
    from . import runtime as _runtime  # noqa: F401  (20-30 ms of imports in each fork otherwise)

    # Workers inherit all of this. Resolve module paths once here (by-value pickling and the
    # scan for packages to preload look them up), and freeze the objects: a worker's garbage
    # collector then never walks them, which would write to, and so copy, every page holding
    # one (a 0.1-0.2 s stall).
    prime_module_paths()
    _learned.prime()
    gc.collect()
    gc.freeze()


def _provided() -> dict[str, str]:
    """The distributions whose modules this process imported at start, with their versions.

    Every worker inherits them, so a per-repo environment must never replace them (`_env.environment`).
    Learned preloads (`_process.preload`) are left out: a worker whose environment ships another
    version evicts them, as it does for a snapshot's own module of the same name.
    """
    import importlib.metadata as md

    from .preload import preloaded_modules

    learned = preloaded_modules()
    owners = md.packages_distributions()
    found: dict[str, str] = {}
    for top in {name.partition(".")[0] for name in list(sys.modules)} - learned:
        for dist in owners.get(top, ()):
            try:
                found[dist] = md.version(dist)
            except md.PackageNotFoundError:
                pass
    return found


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fork_spare(control: socket.socket) -> tuple[int, socket.socket]:
    """Fork a child that waits for a worker's fds, then serves as that worker: (pid, its socket)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    zygote_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            # The worker dies with the zygote, which dies with the parent.
            set_pdeathsig(signal.SIGKILL)
            if os.getppid() != zygote_pid:
                os._exit(1)
            control.close()
            ours.close()
            from .._sandbox.caps import prepare
            from .._transport.codec import recv_frame

            prepare()  # a sandbox's cgroups, entered while it waits (moving in is slow)
            from .runtime import prepare as prepare_worker

            prepare_worker()  # and what the worker sets up before it knows its repo

            frame = recv_frame(theirs)
            if frame is None or len(frame[1]) != 2:
                os._exit(0)  # the zygote is closing
            theirs.close()
            _child(*frame[1])
        finally:
            os._exit(71)
    theirs.close()
    return pid, ours


def _hand_over(spare: tuple[int, socket.socket], fds: list[int], children: set[int]) -> bool:
    """Give the spare its worker's fds; False (and the spare reaped) if it is gone."""
    from .._transport.codec import send_frame

    pid, sock = spare
    try:
        send_frame(sock, b"worker", fds)
        return True
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        children.discard(pid)
        return False
    finally:
        sock.close()


def _drop_spare(spare: tuple[int, socket.socket], children: set[int]) -> None:
    pid, sock = spare
    sock.close()  # it exits: "the zygote is closing"
    os.waitpid(pid, 0)
    children.discard(pid)


def _child(channel: int, output: int) -> None:
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from .runtime import serve

    serve(channel)


def main(control_fd: int, names: list[str] | None = None) -> None:
    """Serve fork and wait requests on `control_fd` until the parent closes it.

    `names`: installed packages to preload for the workers (`_process.preload`).
    """
    from .._errors import ProtocolError
    from .._transport.codec import decode, encode, recv_frame, send_frame
    from .messages import (
        Forked,
        ForkRequest,
        Preloaded,
        PreloadRequest,
        Provided,
        ProvidedRequest,
        Waited,
        WaitRequest,
        ZygoteHello,
        ZygoteRequest,
        zygote_refused,
        zygote_request,
    )
    from .preload import preload

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    control = socket.socket(fileno=control_fd)
    children: set[int] = set()

    def new_spare() -> tuple[int, socket.socket] | None:
        if _threads() != 1:
            return None  # a process with threads must not fork; the request will say why
        pid, sock = _fork_spare(control)
        children.add(pid)
        return pid, sock

    try:
        _preload()
        loaded, unsafe = preload(names or (), _threads)
        if unsafe is not None:  # it cannot fork now: the parent starts one without it
            send_frame(control, encode(ZygoteHello(False, unsafe=unsafe).to_wire()))
            return
        send_frame(control, encode(ZygoteHello(True, os.getpid()).to_wire()))
    except BaseException as e:
        why = f"{type(e).__name__}: {e}"
        send_frame(control, encode(ZygoteHello(False, error=why).to_wire()))
        raise
    spare = new_spare()
    while True:
        try:
            frame = recv_frame(control)
        except OSError:  # the parent reset the connection as it exited: as good as closing it
            frame = None
        if frame is None:
            break
        payload, fds = frame
        request: ZygoteRequest | None
        try:
            request, refused = zygote_request(decode(payload), len(fds)), None
        except ProtocolError as e:
            request, refused = None, f"bad zygote request: {e}"
        reply: dict[str, Any]
        forked = False
        if isinstance(request, ForkRequest):
            if _threads() != 1:
                reply = zygote_refused(f"the zygote has {_threads()} threads; refusing to fork")
            else:
                # A spare that died meanwhile (OOM killer) is reaped and replaced by a new fork.
                if spare is None or not _hand_over(spare, fds, children):
                    spare = new_spare()
                    if spare is not None and not _hand_over(spare, fds, children):
                        spare = None
                died = zygote_refused("a new worker died at once")
                reply = Forked(spare[0]).to_wire() if spare else died
                spare, forked = None, True
        elif isinstance(request, PreloadRequest):
            loaded, unsafe = preload(request.names, _threads)
            reply = Preloaded(tuple(loaded), unsafe).to_wire()
            if loaded and spare is not None:  # the next worker gets them too
                _drop_spare(spare, children)
                spare = None if unsafe else new_spare()
        elif isinstance(request, WaitRequest) and request.pid in children:
            pid = request.pid
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            reply = Waited(os.waitstatus_to_exitcode(status)).to_wire()
        elif isinstance(request, ProvidedRequest):
            reply = Provided(_provided()).to_wire()
        else:
            reply = zygote_refused(refused or f"no child {request!r} to wait for")
        for fd in fds:
            os.close(fd)
        send_frame(control, encode(reply))
        if forked:  # the next worker's fork, while the parent talks to this one
            spare = new_spare()
    if spare is not None:
        spare[1].close()
    from .._sandbox.caps import release

    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        release(pid)  # the spare's cgroups (a worker's are the parent's to remove)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL when the parent dies; exit now if it already has (we were reparented)."""
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)


if __name__ == "__main__":
    die_with_parent(int(sys.argv[2]))  # first, before the seconds of importing torch
    import json

    main(int(sys.argv[1]), json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
    # Not the interpreter's shutdown: finalizing torch and the preloaded packages took 0.5-0.7 s,
    # and the parent waits for this process as it exits.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
