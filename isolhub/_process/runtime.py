"""The worker runtime: runs inside the child process, one per repo@sha.

It imports only the layers below it (`_transport.codec`, `_transport.arena`, `_transport.byvalue`, `_errors`, `_config`,
`_process.messages`), so the zygote that preloads it stays lean. The parent sends requests as pickled
`_process.messages.Request`s (the parent is trusted) and the worker dispatches on their class; it
answers with a `_process.messages` reply through the restricted codec, plus one arena fd for tensors.

    parent ──WorkerInit (as a dict)──▶ worker: chdir(scratch), snapshot first on sys.path,
                                       torch's threads set
    parent ──ListRequest / HelpRequest / CallRequest──▶ worker: import hubconf (once), run, answer
    parent ──CloseNote (or EOF)──▶ worker exits

`serve(channel_fd)` is what the zygote runs after a fork; it never returns. A worker is started
and spoken to through `isolhub._process.worker.Worker` (`repo` is a folder with a hubconf.py):

    >>> from isolhub._engine import start_worker
    >>> from isolhub._process.messages import DocReply, HelpRequest
    >>> from isolhub._source.snapshot import fetch_snapshot
    >>> from isolhub._spec import parse_spec
    >>> with start_worker(fetch_snapshot(parse_spec(repo, source="local"))) as w:
    ...     w.request(HelpRequest(entry="net"), DocReply)
    DocReply(doc='A linear layer: 4 inputs, `width` outputs.')
"""

from __future__ import annotations

import difflib
import faulthandler
import importlib.util
import itertools
import os
import pickle
import select
import socket
import sys
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn

from .. import _config, _libc
from .._errors import EntrypointError, MissingDependenciesError, ProtocolError
from .._transport.arena import ArenaWriter
from .._transport.byvalue import (
    dumps,
    dumps_pinned,
    loads,
    mark_loaded_modules,
    register_snapshot_modules,
    unshippable,
)
from .._transport.codec import Spinner, encode, recv_frame, send_frame
from .._transport.values import bounded_text, encode_state_dict, encode_value
from . import preload as _preload
from . import rng as _rng
from . import worker_warnings as _worker_warnings
from .messages import (
    CALLER_ERRORS,
    ArenaReply,
    BrokerAnswer,
    BrokerRequest,
    CallRequest,
    CloseNote,
    DocReply,
    Effects,
    EntrypointsReply,
    HandleInfo,
    HandleReply,
    HelpRequest,
    InvokeRequest,
    IterationBatch,
    ListRequest,
    PickleReply,
    PushRequest,
    RaisedReply,
    Reply,
    Request,
    StateDictReply,
    UnpinNote,
    ValueReply,
    WorkerInit,
    error_record,
    failure,
    hello,
)

__all__ = ["REPR_LIMIT", "STAGES", "kept_object", "prepare", "serve"]

# What the worker is doing, as its thread name (`/proc/PID/comm`, 15 bytes): the parent reads it
# when the worker dies or hangs (a zombie keeps its name until the zygote reaps it, on the
# parent's request), so `os._exit`, a signal or a hang are reported with the stage they hit.
STAGES = {
    b"isolhub:import": "importing hubconf",
    b"isolhub:list": "listing the entrypoints",
    b"isolhub:help": "reading the entrypoint's docstring",
    b"isolhub:entry": "calling the entrypoint",
    b"isolhub:then": "running then= on the entrypoint's result",
    b"isolhub:pickle": "pickling the result",
    b"isolhub:value": "encoding the result",
    b"isolhub:sdict": "taking the result's state_dict()",
}


def _stage(name: bytes) -> None:
    """Name the stage this worker enters (one of `STAGES`)."""
    _libc.set_thread_name(name)


def _say_hello_only(sock: socket.socket) -> NoReturn:
    """Answer an init of another protocol version with this worker's hello (which names its
    version, so the parent refuses it by name), and exit when the parent hangs up."""
    send_frame(sock, encode(hello()))
    while recv_frame(sock) is not None:
        pass
    os._exit(0)


def serve(fd: int) -> NoReturn:
    """Serve the parent on the connected socket `fd` until it closes; then exit the process."""
    code = 0
    try:
        sock = socket.socket(fileno=fd)
        faulthandler.enable()
        frame = recv_frame(sock)
        if frame is None:
            os._exit(0)
        try:
            init = pickle.loads(frame[0])
            if not WorkerInit.same_protocol(init):  # a parent of another isolhub
                _say_hello_only(sock)
            state = _WorkerState(WorkerInit.decode(init), sock)
        except Exception as e:
            # Set-up failed (e.g. the sandbox could not be applied): say why, then exit.
            send_frame(sock, encode(failure(e)))
            raise SystemExit(78) from e
        send_frame(sock, encode(hello()))
        wait = _spin_waiter(sock, state.spin)
        while True:
            wait()
            frame = recv_frame(sock)
            if frame is None:
                break
            in_fds = frame[1]
            try:
                request = pickle.loads(frame[0])
            except Exception as e:
                # e.g. a `then=` function whose module this worker cannot import: the caller's
                # error, reported as such, and the worker stays usable.
                for f in in_fds:
                    os.close(f)
                send_frame(sock, encode(failure(e)))
                continue
            if not isinstance(request, Request):  # from a parent of another isolhub
                for f in in_fds:
                    os.close(f)
                error = ProtocolError(f"unknown request {type(request).__name__!r}")
                send_frame(sock, encode(failure(error)))
                continue
            if isinstance(request, CloseNote):
                break
            if isinstance(request, UnpinNote):  # the parent has read them; no reply is awaited
                state.pinned = None
                continue
            reply, fds = state.handle(request, in_fds)
            try:
                effects = _effects(request).to_wire()
                if effects:  # before the reply, so the parent has them whatever the reply says
                    send_frame(sock, encode({"effects": effects}))
                send_frame(sock, reply, fds)
            finally:
                for f in fds:
                    os.close(f)
            if request.last and state.pinned is None:
                break  # the parent wants nothing more: exit while it decodes the reply
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 70
    _flush()
    _release_output()
    os._exit(code)


def prepare() -> None:
    """What a worker sets up before it knows its repo; a spare does it while it waits.

    Done after the fork and before the worker's init arrives, it is off the load's path: in a
    fresh fork, reseeding numpy and reading ~1,100 module names (each read writes a reference
    count, so copies a page) took 10-16 ms of a 23 ms tiny load here. `_WorkerState` runs it
    again if the init evicts preloaded modules.

    Example (in a child, as in the zygote's, since it takes over the process's warnings):
        >>> import os, warnings
        >>> from isolhub._process import worker_warnings as _worker_warnings
        >>> pid = os.fork()
        >>> if pid == 0:
        ...     try:
        ...         prepare()
        ...         warnings.warn("old", FutureWarning)
        ...         os._exit(0 if _worker_warnings.take()[0] else 1)   # recorded, not printed
        ...     finally:
        ...         os._exit(2)
        >>> os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        0
    """
    global _PREPARED
    _worker_warnings.install()  # the parent re-issues them, through its own filters
    _rng.fresh_numpy()  # not the zygote's state, shared by every worker
    mark_loaded_modules()  # before a line of the repo is imported
    _PREPARED = ({n.partition(".")[0] for n in sys.modules}, len(sys.modules))


# What `prepare` saw: the top-level modules loaded before the repo's, and how many in all.
_PREPARED: tuple[set[str], int] | None = None


def _effects(request: Request) -> Effects:
    """What the parent must see besides the reply: the warnings raised, the end random state."""
    records, dropped = _worker_warnings.take()
    rng = _rng.capture() if request.rng_back else None
    imported: list[str] = []
    state = _STATE
    # Nothing was imported since the last look (most remote calls): the scan is skipped.
    if state is not None and state.learn and len(sys.modules) != state.modules_seen:
        # Installed packages the repo imported: the zygote imports them for the next workers.
        imported = _preload.reported(state.baseline, [state.snapshot])
        state.baseline.update(n for n in sys.modules if "." not in n)
        state.modules_seen = len(sys.modules)
    return Effects(records, dropped, rng, tuple(imported) if imported else None)


def _spin_waiter(sock: socket.socket, seconds: float) -> Callable[[], None]:
    """Wait for the next request by polling up to `seconds` before sleeping in recv.

    Calls on a remote handle come back to back; a worker that went to sleep between them pays
    a wake-up per call (the parent spins on its side for the same reason).
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poll = poller.poll
    spin = Spinner(seconds)

    def wait() -> None:
        if not poll(0):
            spin(poll)

    return wait


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _release_output() -> None:
    """Let go of the output pipe before exiting: the parent, which reads it to its end, knows
    all was said without waiting for the kernel to tear this process down (5-13 ms)."""
    for fd in (1, 2):
        try:
            os.close(fd)
        except OSError:
            pass


class _WorkerState:
    def __init__(self, init: WorkerInit, sock: socket.socket) -> None:
        global _STATE
        _STATE = self
        # What the zygote preloaded but the snapshot ships under the same name: the repo's own.
        # So is what the repo's environment (`_env.environment`) installs in another version.
        evicted = _preload.evict_shadowed([init.snapshot, *filter(None, [init.overlay])])
        if _PREPARED is None or evicted:
            prepare()  # (again: the mark and the baseline are taken before a line of the repo)
        assert _PREPARED is not None
        self.baseline, self.modules_seen = _PREPARED
        self.learn = init.policy is None and _preload.enabled()
        self.sock = sock
        self.scratch = init.scratch
        self.spin = init.spin
        self.snapshot = init.snapshot
        self.module_name = init.module_name
        self.hubconf: ModuleType | None = None
        self.import_error: BaseException | None = None
        self.handles: dict[int, Any] = {}
        # Storages the parent is reading out of this process (a module result, pulled).
        self.pinned: list[Any] | None = None
        self.handle_ids: dict[int, int] = {}
        self.next_handle = 1
        if init.env is not None:
            # The zygote's environment is from its start; the parent's current one wins.
            os.environ.clear()
            os.environ.update(init.env)
        os.environ.update(init.env_overrides or {})
        if init.memory_bytes:
            import resource

            cap = init.memory_bytes
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        os.chdir(self.scratch)
        sys.path.insert(0, self.snapshot)
        # The repo's environment (`_env.environment`): after the snapshot, before site-packages.
        overlay = init.overlay
        if overlay and overlay not in sys.path:
            sys.path.insert(1, overlay)
        # Bytecode of the repo's modules is cached in the snapshot (`__pycache__`, which cache
        # checks ignore), as a torch.hub process caches it in its hub dir; unless the caller's
        # environment says not to. A confined worker cannot write there: Python goes without.
        sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
        policy = init.policy
        if policy is not None:
            # Confined before a line of the repo runs; downloads go through the parent.
            from .._sandbox import policy as _sandbox
            from .._weights import download as _download

            _sandbox.apply(
                policy,
                scratch=self.scratch,
                read_paths=[self.snapshot, *([overlay] if overlay else [])],
                keep_fds=[sock.fileno()],
            )
            _download.set_fetch_broker(self.fetch_through_parent)
            _route_torch_hub(None)
        else:
            if init.hub_dir:
                _config.set_dir(init.hub_dir)
            _route_torch_hub(init.hub_dir)
        _set_threads(init.threads)  # after the sandbox, if any (`_set_threads`)

    def fetch_through_parent(self, url: str, hash_prefix: str | None) -> str:
        """Ask the parent for the file at `url` (it downloads, checks, and passes a read-only fd)."""
        from .._errors import DownloadError
        from .._transport.codec import decode

        send_frame(self.sock, encode(BrokerRequest(url, hash_prefix).to_wire()))
        frame = recv_frame(self.sock)
        if frame is None:
            raise DownloadError(f"the parent went away while fetching {url}")
        try:  # the parent's (`_process.worker.answer_download`): trusted, decoded all the same
            answer = BrokerAnswer.decode(decode(frame[0]), frame[1])
        except ProtocolError as e:
            raise DownloadError(f"the parent could not fetch {url}: {e}") from None
        if answer.fd is None:
            raise DownloadError(answer.error or f"the parent could not fetch {url}")
        dest_dir = os.path.join(self.scratch, "weights")
        os.makedirs(dest_dir, exist_ok=True)
        dest = os.path.join(dest_dir, os.path.basename(answer.name or "download"))
        with os.fdopen(answer.fd, "rb") as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        return dest

    def handle(self, request: Request, in_fds: list[int]) -> tuple[bytes, list[int]]:
        try:
            if isinstance(request, PushRequest):  # the parent could not pull: the sealed arena
                return self.push()
            self.pinned = None  # the parent has read them: the next request says so
            if request.rng is not None:  # the caller's generators, as torch.hub uses them
                _rng.restore(request.rng)
            elif request.seed is not None:  # what importing hubconf draws is seeded too
                _rng.seed_all(int(request.seed))
            for handle_id in request.release:
                self.release(handle_id)
            if isinstance(request, ListRequest):
                return _reply(EntrypointsReply(tuple(self.entrypoints())))
            if isinstance(request, HelpRequest):
                fn = self.entrypoint(request.entry)
                _stage(b"isolhub:help")
                return _reply(DocReply(fn.__doc__))
            if isinstance(request, CallRequest):
                return self.call(request)
            if isinstance(request, InvokeRequest):
                fd = in_fds.pop() if in_fds else None
                args, kwargs = loads(request.payload, fd, request.layout)
                return self.invoke(request, args, kwargs)
            raise ProtocolError(f"unknown request {type(request).__name__!r}")
        except SystemExit:
            raise
        except BaseException as e:
            return encode(failure(e)), []
        finally:
            for fd in in_fds:
                os.close(fd)

    def push(self) -> tuple[bytes, list[int]]:
        """The pinned storages, in order, through a sealed arena."""
        arena = ArenaWriter()
        for storage in self.pinned or ():
            arena.storage_index(storage)
        self.pinned = None
        fd, layout = arena.seal()
        return _reply(ArenaReply(layout, fd))

    def new_handle(self, obj: Any) -> HandleInfo:
        """Keep `obj` in the worker and describe it; one id per object."""
        import torch

        handle_id = self.handle_ids.get(id(obj))
        if handle_id is None:
            handle_id = self.next_handle
            self.next_handle += 1
            self.handle_ids[id(obj)] = handle_id
            self.handles[handle_id] = obj
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        return HandleInfo(handle_id, kind, isinstance(obj, torch.nn.Module), callable(obj))

    def release(self, handle_id: Any) -> None:
        obj = self.handles.pop(handle_id, None)
        if obj is not None:
            self.handle_ids.pop(id(obj), None)

    def invoke(
        self, request: InvokeRequest, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[bytes, list[int]]:
        """Act on a kept object: call it, read or set an attribute, index it, take its state dict.

        A protocol operation (attribute, index, len, in, iteration) that fails the way it would
        on a local object answers `kind="raised"` with the built-in error's name, so the parent
        raises that error (an `AttributeError` for `hasattr`), not a hubconf `RemoteError`.
        """
        target = self.handles.get(request.id)
        if target is None:
            raise ProtocolError(f"no object {request.id!r} in this worker (released?)")
        action, name = request.action, request.name
        if action == "call":
            result = target(*args, **kwargs)
        elif action == "setattr":
            setattr(target, name, args[0])
            result = None
        elif action == "state_dict":
            return _state_dict_reply(target.state_dict(*args, **kwargs))
        elif action in _OPERATIONS:
            try:
                result = _OPERATIONS[action](target, name, *args)
            except _CALLER_ERRORS as e:
                return _raised_reply(e, target, name if action == "getattr" else "")
        else:
            raise ProtocolError(f"unknown action {action!r}")
        body, fd, layout = encode_value(result, handle_for=lambda o: self.new_handle(o).to_wire())
        return _reply(ValueReply(body, layout, fd))

    def module(self) -> ModuleType:
        if self.import_error is not None:
            raise self.import_error
        if self.hubconf is None:
            path = os.path.join(self.snapshot, "hubconf.py")
            spec = importlib.util.spec_from_file_location(self.module_name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot import {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[self.module_name] = module
            _stage(b"isolhub:import")
            try:
                spec.loader.exec_module(module)
            except BaseException as e:
                sys.modules.pop(self.module_name, None)
                self.import_error = e
                raise
            self.hubconf = module
        return self.hubconf

    def entrypoints(self) -> list[str]:
        m = self.module()
        _stage(b"isolhub:list")
        return [f for f in dir(m) if callable(getattr(m, f)) and not f.startswith("_")]

    def entrypoint(self, name: Any) -> Any:
        if not isinstance(name, str):
            raise EntrypointError("Invalid input: model should be a string of function name")
        m = self.module()
        deps = getattr(m, "dependencies", None)
        if deps:
            missing = [d for d in deps if importlib.util.find_spec(d) is None]
            if missing:
                raise MissingDependenciesError(
                    f"Missing dependencies: {', '.join(missing)}", missing=missing
                )
        fn = getattr(m, name, None) if name in dir(m) else None
        if fn is None or not callable(fn):
            raise EntrypointError(
                f"Cannot find callable {name} in hubconf{_suggest(name, self.entrypoints())}",
                entry=name,
            )
        return fn

    def call(self, request: CallRequest) -> tuple[bytes, list[int]]:
        fn = self.entrypoint(request.entry)
        if request.seed is not None:
            _rng.seed_all(int(request.seed))
        _stage(b"isolhub:entry")
        obj = fn(*request.args, **(request.kwargs or {}))
        if request.then is not None:
            _stage(b"isolhub:then")
            obj = request.then(obj)
        result = request.result
        if result == "module":
            _stage(b"isolhub:pickle")
            register_snapshot_modules(self.snapshot)
            try:
                if request.pull:
                    data, addresses, self.pinned = dumps_pinned(obj)
                    return _reply(PickleReply(data, addresses, pull=True))
                data, fd, layout = dumps(obj)
            except Exception as e:
                raise unshippable(obj, request.entry, e) from e
            return _reply(PickleReply(data, layout, fd))
        if result == "state_dict":
            _stage(b"isolhub:sdict")
            return _state_dict_reply(_state_dict_of(obj))
        if result == "value":
            _stage(b"isolhub:value")
            body, fd, layout = encode_value(obj)
            return _reply(ValueReply(body, layout, fd))
        if result == "handle":
            return _reply(HandleReply(self.new_handle(obj)))
        raise ProtocolError(f"unknown result mode {result!r}")


REPR_LIMIT = 100_000  # characters of a handle's repr/str; the parent bounds it again

# What a handle's protocol operations do to the object: (target, name, *args).
_OPERATIONS: dict[str, Callable[..., Any]] = {
    "getattr": lambda t, name: getattr(t, name),
    "dir": lambda t, _: [str(n) for n in dir(t)],
    "repr": lambda t, _: bounded_text(repr(t), REPR_LIMIT),
    "str": lambda t, _: bounded_text(str(t), REPR_LIMIT),
    "len": lambda t, _: len(t),
    "bool": lambda t, _: bool(t),
    "getitem": lambda t, _, key: t[key],
    "setitem": lambda t, _, key, value: t.__setitem__(key, value),
    "delitem": lambda t, _, key: t.__delitem__(key),
    "contains": lambda t, _, item: item in t,
    "iter": lambda t, _: iter(t),
    "next": lambda t, _, n: _next_items(t, n),
}
_CALLER_ERRORS = tuple(CALLER_ERRORS)
_STATE: _WorkerState | None = (
    None  # this process's one state, for handles sent back (`kept_object`)
)


def _next_items(iterator: Any, n: Any) -> dict[str, Any]:
    """Up to `n` (at most 256) next items of `iterator`; `more` is False once it is exhausted."""
    n = max(1, min(int(n), 256))
    items = tuple(itertools.islice(iterator, n))
    return IterationBatch(items, len(items) == n).to_wire()


def _raised_reply(e: BaseException, target: Any, name: str) -> tuple[bytes, list[int]]:
    """The answer for a protocol operation that raised one of `_CALLER_ERRORS`."""
    suggestions: list[str] = []
    if name and isinstance(e, AttributeError):
        try:
            suggestions = difflib.get_close_matches(name, [str(n) for n in dir(target)], n=3)
        except Exception:
            pass
    record = error_record(e)
    return _reply(
        RaisedReply(
            builtin=next(c.__name__ for c in _CALLER_ERRORS if isinstance(e, c)),
            target=f"{type(target).__module__}.{type(target).__qualname__}",
            name=name,
            suggestions=tuple(suggestions),
            type=record["type"],
            message=record["message"],
            traceback=record["traceback"],
        )
    )


def kept_object(handle_id: int) -> Any:
    """The object behind a handle the parent passed back as an argument (see `RemoteObject`)."""
    obj = None if _STATE is None else _STATE.handles.get(handle_id)
    if obj is None:
        raise ProtocolError(f"no object {handle_id!r} in this worker (released?)")
    return obj


def _reply(reply: Reply) -> tuple[bytes, list[int]]:
    """`reply` encoded, and the fd that goes with it."""
    fd = getattr(reply, "fd", None)
    return encode(reply.to_wire()), [] if fd is None else [fd]


def _state_dict_reply(sd: Any) -> tuple[bytes, list[int]]:
    body, fd, layout = encode_state_dict(sd.items())
    return _reply(StateDictReply(body, layout, fd))


def _state_dict_of(obj: Any) -> Any:
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if hasattr(item, "state_dict") and callable(item.state_dict):
                return item.state_dict()
    raise TypeError(
        f"the entrypoint returned a {type(obj).__qualname__}, which has no state_dict()"
    )


def _set_threads(threads: int | None) -> None:
    """Run torch's intra-op work on `threads` threads (None: torch's default), as the caller
    asked (`WorkerInit.threads`).

    After the sandbox, if any: it starts threads (torch's own pool), and the sandbox applies
    only to a single-threaded process. The zygote ran no torch op, so OpenMP's pool is not yet
    made and the fork takes the new count.
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _route_torch_hub(hub_dir: str | None) -> None:
    """Point torch.hub's dir and download functions at isolhub's (same cache, same locks)."""
    import torch.hub

    if hub_dir:
        torch.hub.set_dir(hub_dir)
    import torch.utils.model_zoo

    from .._weights import checkpoints as _checkpoints
    from .._weights import download as _download

    torch.hub.download_url_to_file = _download.download_url_to_file
    torch.hub.load_state_dict_from_url = _checkpoints.load_state_dict_from_url
    torch.utils.model_zoo.load_url = _checkpoints.load_state_dict_from_url


def _suggest(name: str, names: list[str]) -> str:
    """`; did you mean net? available: Net, net` (torch.hub's message stays in front)."""
    if not names:
        return "; the hubconf has no public callables"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if not close:
        close = [n for n in names if n.lower() == name.lower()]
    shown = ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
    mean = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{mean}{';' if not mean else ''} available: {shown}"


_SHOWN_NAMES = 30


if __name__ == "__main__":
    # The "spawn" start method: a fresh interpreter serving the fd it was given.
    serve(int(sys.argv[1]))
