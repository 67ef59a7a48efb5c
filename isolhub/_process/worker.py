"""The parent side of a worker: start it (zygote fork or fresh spawn), talk to it, watch it die.

The parent waits on the worker's channel and on its pidfd together, so a death is noticed at
once and becomes `WorkerCrashedError` (exit code or signal name, and the tail of its output); a
`timeout` kills a hung worker (`WorkerTimeoutError`). Worker output (stdout and stderr) is
forwarded to the parent's stderr as it comes, and its tail kept for error messages.

Example (`repo` is a folder with a hubconf.py; `isolhub._engine.start_worker` builds the init):
    >>> from isolhub._engine import start_worker
    >>> from isolhub._source.snapshot import fetch_snapshot
    >>> from isolhub._spec import parse_spec
    >>> w = start_worker(fetch_snapshot(parse_spec(repo, source="local")))
    >>> from isolhub._process.messages import EntrypointsReply, ListRequest
    >>> w.request(ListRequest(), EntrypointsReply)
    EntrypointsReply(names=('net',))
    >>> w.close()
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import dataclasses
import functools
import json
import os
import pickle
import queue
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NoReturn, TypeGuard, TypeVar

import cloudpickle

from .. import _config
from .._cache.store import temp_dir
from .._errors import (
    IsolhubError,
    Option,
    ProtocolError,
    UsageError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
    describe_exit,
)
from .._escape import escape_controls
from .._sandbox import caps as _caps
from .._sandbox.policy import without_secrets
from .._transport.codec import ReplyLimits, Spinner, decode, encode, recv_frame, send_frame
from . import preload as _preload
from . import rng as _rng
from . import worker_warnings as _worker_warnings
from .messages import (
    BrokerAnswer,
    BrokerRequest,
    CloseNote,
    Effects,
    ErrorRecord,
    Forked,
    ForkRequest,
    Hello,
    InvokeRequest,
    Preloaded,
    PreloadRequest,
    Provided,
    ProvidedRequest,
    Reply,
    Request,
    Waited,
    WaitRequest,
    WorkerInit,
    ZygoteHello,
    ZygoteRequest,
    close_fds,
    decode_reply,
    zygote_refusal,
)
from .runtime import STAGES

if TYPE_CHECKING:
    from .._weights.broker import Broker

# How a remote handle's request reads in a message (`_process.runtime._OPERATIONS`, `invoke`).
_INVOKE_WORDS = {
    "call": "calling the object",
    "getattr": "reading attribute",
    "setattr": "setting attribute",
    "state_dict": "taking the state_dict()",
}

__all__ = [
    "Worker",
    "answer_download",
    "prestart_zygote",
    "settle",
    "shutdown_zygote",
    "zygote_packages",
]

_TAIL_BYTES = 8192
_ZYGOTE_START_TIMEOUT = 180.0
_HANDSHAKE_TIMEOUT = 60.0
_GRACE = 2.0
_R = TypeVar("_R", bound=Reply)
_T = TypeVar("_T")


def _isolhub_pythonpath(overlay: str | None = None) -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = os.environ.get("PYTHONPATH")
    if overlay:  # an environment of its own: its packages ahead of site-packages from the start
        here += os.pathsep + overlay
    return here + (os.pathsep + rest if rest else "")


class _Zygote:
    """The per-parent zygote process (started lazily, restarted after a fork or a death)."""

    _instance: _Zygote | None = None
    _own: dict[
        str, _Zygote
    ] = {}  # per environment of its own (`_env.environment`), by overlay folder
    _class_lock = threading.Lock()
    _starting = 0  # the pid of the process whose zygote is being started in the background

    def __init__(self, overlay: str | None = None) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # numpy's OpenBLAS starts a thread pool at import (torch imports numpy), and a
        # process with threads must not fork; workers keep single-threaded BLAS for numpy only.
        # No secret ever enters the zygote's memory, which every worker inherits; unconfined
        # workers get the parent's current environment in their init message instead.
        env = dict(
            without_secrets(os.environ),
            PYTHONPATH=_isolhub_pythonpath(overlay),
            OPENBLAS_NUM_THREADS="1",
        )
        self.overlay = overlay
        self.provided: dict[str, str] | None = None
        self.owner = os.getpid()
        self.lock = threading.RLock()
        self.retired = False  # a preload started a thread in it: it must never fork again
        self.control = parent
        self.hub_dir = _config.get_dir()
        # An environment of its own preloads nothing learned: those names came from the shared one.
        learning = _preload.enabled() and overlay is None
        names = _preload.learned(self.hub_dir) if learning else []
        self.preloaded: set[str] = set(names)
        argv = [
            sys.executable,
            "-m",
            "isolhub._process.zygote",
            str(child.fileno()),
            str(self.owner),
        ]
        # Its parent-death signal fires when the *thread* that forked it ends, so it is forked
        # from a thread that lasts as long as this process.
        self.proc = _in_lasting_thread(
            lambda: subprocess.Popen(
                [*argv, json.dumps(names)],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        )
        child.close()
        self.control.settimeout(_ZYGOTE_START_TIMEOUT)
        try:
            frame = recv_frame(self.control)
        except (OSError, ProtocolError) as e:
            self.proc.kill()
            raise WorkerError(f"the isolhub zygote did not start: {e}") from e
        finally:
            self.control.settimeout(None)
        try:
            hello = ZygoteHello.decode(decode(frame[0])) if frame else ZygoteHello(False)
        except ProtocolError as e:
            hello = ZygoteHello(False, error=str(e))
        if not hello.ready:
            self.proc.kill()
            self.proc.wait()
            if hello.unsafe is not None:
                _preload.forbid(self.hub_dir, hello.unsafe)
                raise _PreloadUnsafe(hello.unsafe)
            why = hello.error or describe_exit(self.proc.returncode)
            raise WorkerError(f"the isolhub zygote failed to start ({why}); see its stderr above")
        weakref.finalize(self, _close_zygote, self.control, self.proc)

    @classmethod
    def get(cls, overlay: str | None = None) -> _Zygote:
        """The zygote (for the environment of its own at `overlay`, if given), started if needed."""
        with cls._class_lock:
            z = cls._instance if overlay is None else cls._own.get(overlay)
            if z is not None and z.owner == os.getpid() and z.proc.poll() is not None:
                z.control.close()  # now, not whenever the dead one is garbage-collected
            if not cls._running(z):
                for _ in range(_preload.MAX_MODULES):
                    try:
                        z = _Zygote(overlay)
                        break
                    except _PreloadUnsafe:
                        continue  # forbidden now: the next one starts without it
                else:
                    raise WorkerError("the isolhub zygote could not start; set ISOLHUB_PRELOAD=0")
                if overlay is None:
                    cls._instance = z
                else:
                    cls._own[overlay] = z
            return z

    @staticmethod
    def _running(z: _Zygote | None) -> TypeGuard[_Zygote]:
        """Whether `z` is this process's zygote and alive."""
        return z is not None and z.owner == os.getpid() and z.proc.poll() is None

    @classmethod
    def prestart(cls) -> None:
        """Start this process's zygote in the background, if it is not running (first use)."""
        if cls._starting == os.getpid():
            return  # (read without the lock: the starting thread holds it until the zygote is up)
        with cls._class_lock:
            if cls._running(cls._instance):
                return
            if cls._starting == os.getpid():
                return
            cls._starting = os.getpid()

        def start() -> None:
            try:
                cls.get()
            except Exception:  # noqa: BLE001 - the call that needs the zygote reports it
                pass
            finally:
                cls._starting = 0

        threading.Thread(target=start, name="isolhub-zygote-start", daemon=True).start()

    def preload(self, names: list[str]) -> None:
        """Have the zygote import installed packages that workers import, for the next ones."""
        names = [n for n in names if n not in self.preloaded]
        if not names:
            return
        self.preloaded.update(names)
        # Under the lock from request to retirement: a load's fork request waiting for the lock
        # then finds the zygote retired instead of reaching a process that has a thread.
        with self.lock:
            try:
                reply = self._ask(PreloadRequest(tuple(names)), Preloaded.decode)
            except WorkerError:
                return  # a lost zygote is replaced by the next call
            if reply.unsafe is None:
                return
            self.retired = True
        _preload.forbid(self.hub_dir, reply.unsafe)
        _Zygote.forget(self)
        _close_zygote(self.control, self.proc)

    @classmethod
    def forget(cls, z: _Zygote) -> None:
        """Drop `z` (dead) so that the next `get` starts a new zygote."""
        with cls._class_lock:
            if cls._instance is z:
                cls._instance = None
            if z.overlay is not None and cls._own.get(z.overlay) is z:
                del cls._own[z.overlay]
        with contextlib.suppress(OSError):
            z.control.close()

    def died(self) -> bool:
        """Whether the zygote has exited (waiting briefly: a killed one takes a moment)."""
        try:
            self.proc.wait(timeout=_GRACE)
        except subprocess.TimeoutExpired:
            return False
        return True

    def death_note(self) -> str | None:
        """How the zygote died, for a worker that died with it; None while it lives."""
        if self.proc.poll() is None and not self.died():
            return None
        return (
            f"the isolhub zygote (pid {self.proc.pid}) died ({describe_exit(self.proc.returncode)})"
            " and its workers with it; the next call starts a new one"
        )

    def _ask(
        self,
        request: ZygoteRequest,
        reply: Callable[[Any], _T],
        fds: list[int] = (),  # type: ignore[assignment]
    ) -> _T:
        """Send the zygote `request` (with its `fds`); its answer, as `reply` decodes it.

        Raises:
            WorkerError: it refused, or its answer is malformed. _ZygoteLost: it is gone.
        """
        with self.lock:
            try:
                send_frame(self.control, encode(request.to_wire()), fds)
                frame = recv_frame(self.control)
            except OSError as e:
                raise _ZygoteLost(f"lost the isolhub zygote: {e}") from e
        if frame is None:
            raise _ZygoteLost("the isolhub zygote exited unexpectedly")
        close_fds(frame[1])
        try:
            raw = decode(frame[0])
            why = zygote_refusal(raw)
            if why is None:
                return reply(raw)
        except ProtocolError as e:
            raise WorkerError(f"the isolhub zygote answered wrongly: {e}") from None
        raise WorkerError(f"the isolhub zygote refused: {why}")

    def provided_packages(self) -> dict[str, str]:
        """The distributions this zygote has imported, with versions (asked once, then kept)."""
        if self.provided is None:
            self.provided = self._ask(ProvidedRequest(), Provided.decode).packages
        return self.provided

    def fork(self, channel: int, output: int) -> int:
        """A worker forked from this zygote on `channel` and `output` (the pid).

        Raises:
            _ZygoteRetired: a preload made it unable to fork (the caller starts a new one).
        """
        with self.lock:
            if self.retired:
                raise _ZygoteRetired("the isolhub zygote was retired by an unsafe preload")
            return self._ask(ForkRequest(), Forked.decode, [channel, output]).pid

    def wait(self, pid: int) -> int:
        return self._ask(WaitRequest(pid), Waited.decode).status


def answer_download(broker: Broker, raw: Any, fds: list[int]) -> BrokerAnswer:
    """The answer to what a worker sent to ask for a download (`raw`, with `fds`): `broker`'s
    file (its fd, the caller's to close), or why not. A malformed request is answered too.

    Example (a request of the wrong shape never reaches the broker):
        >>> answer_download(lambda url, prefix: ("w.pt", 0), {"broker": "w.pt"}, []).error
        'malformed download request (a download request is a str, not a message)'
    """
    try:
        ask = BrokerRequest.decode(raw, fds)
    except ProtocolError as e:
        return BrokerAnswer(error=f"malformed download request ({e})")
    try:
        name, fd = broker(ask.url, ask.hash_prefix)
    except IsolhubError as e:
        return BrokerAnswer(error=str(e))
    return BrokerAnswer(name=name, fd=fd)


def prestart_zygote() -> None:
    """Start this process's zygote in the background if it is not up (a worker is wanted soon)."""
    _Zygote.prestart()


def _learn_imports(zygote: _Zygote, names: list[str]) -> None:
    """Record what an unconfined worker imported; its zygote imports it now, off this path."""
    allowed = _preload.learn(_config.get_dir(), names)
    if any(n not in zygote.preloaded for n in allowed):
        threading.Thread(
            target=zygote.preload, args=(allowed,), name="isolhub-preload", daemon=True
        ).start()


class _PreloadUnsafe(Exception):
    """Importing a learned package started a thread in the zygote (it is now forbidden)."""


class _ZygoteLost(WorkerError):
    """The control socket to the zygote broke (it died)."""


class _ZygoteRetired(WorkerError):
    """The zygote imported a package that started a thread; it is being replaced."""


def _zygote_fork(channel: int, output: int, overlay: str | None = None) -> tuple[int, _Zygote]:
    """Fork a worker from the zygote; a zygote found dead (killed while idle) is replaced once."""
    zygote = _Zygote.get(overlay)
    try:
        return zygote.fork(channel, output), zygote
    except _ZygoteRetired:
        pass
    except _ZygoteLost:
        if not zygote.died():
            raise
    _Zygote.forget(zygote)
    zygote = _Zygote.get(overlay)
    return zygote.fork(channel, output), zygote


def zygote_packages() -> dict[str, str]:
    """The distributions (and versions) the common zygote has imported: what workers share."""
    return _Zygote.get().provided_packages()


_spawn_jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_spawner_owner = 0


def _in_lasting_thread(fn: Callable[[], Any]) -> Any:
    """`fn()`, run on the main thread or on one started for this and never ended."""
    global _spawner_owner
    if threading.current_thread() is threading.main_thread():
        return fn()
    with _reaper_lock:
        if _spawner_owner != os.getpid():
            _spawner_owner = os.getpid()
            threading.Thread(target=_spawner, name="isolhub-spawner", daemon=True).start()
    done: Future[Any] = Future()
    _spawn_jobs.put((fn, done))
    return done.result()


def _spawner() -> None:
    while True:
        fn, done = _spawn_jobs.get()
        try:
            done.set_result(fn())
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            done.set_exception(e)


def _close_zygote(control: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    control.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def shutdown_zygote() -> None:
    """Stop this process's zygotes (they also stop by themselves when the parent exits)."""
    with _Zygote._class_lock:
        z, _Zygote._instance = _Zygote._instance, None
        own, _Zygote._own = list(_Zygote._own.values()), {}
    for one in [z, *own]:
        if one is not None and one.owner == os.getpid():
            _close_zygote(one.control, one.proc)


def _pickled_request(message: Request, label: str) -> bytes:
    """`message` pickled for the worker; an argument that cannot be is named.

    Raises:
        UsageError: an argument (or `then`) cannot be pickled, even by value.
    """
    try:
        return cloudpickle.dumps(message)
    except Exception as e:  # noqa: BLE001 - pickling raises whatever the object's reducer does
        what: list[str | Option] = ["the request"]
        args = getattr(message, "args", None) or ()
        kwargs = getattr(message, "kwargs", None) or {}
        named = [(f"argument {i}", v) for i, v in enumerate(args)]
        named += [(k, v) for k, v in kwargs.items()] + [("then", getattr(message, "then", None))]
        for name, value in named:
            try:
                cloudpickle.dumps(value)
            except Exception:  # noqa: BLE001 - as above
                what = (
                    [f"the {name}"]
                    if name.startswith("argument")
                    else ["the argument ", Option.of(name)]
                )
                break
        raise UsageError(
            (
                *what,
                f" cannot be sent to the worker for {label} (arguments travel pickled): "
                f"{type(e).__name__}: {e}; pass values that pickle (tensors, numbers, strings, "
                "containers of them, importable or by-value functions)",
            )
        ) from e


class Worker:
    """One live worker process serving one snapshot. Use `Worker.start`, then `request`/`call`."""

    def __init__(
        self,
        label: str,
        pid: int,
        sock: socket.socket,
        status: Callable[[], int],
        output_fd: int,
        scratch: str,
        limits: ReplyLimits | None = None,
    ) -> None:
        self.label = label
        self.limits = limits or ReplyLimits()  # what one reply may make the parent hold
        self.pid = pid
        self.sock = sock
        self.pidfd = os.pidfd_open(pid)
        self._status = status
        self.returncode: int | None = None
        self.scratch = scratch
        self.cap_note = ""  # e.g. that its memory cap was hit, from its cgroup once reaped
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self._poller.register(self.pidfd, select.POLLIN)
        self._spin = _config.spin_seconds()
        self._spinner = Spinner(self._spin)
        self.closed = False
        self.zygote: _Zygote | None = None  # the zygote it was forked from
        self.confined = True  # until `start` knows: a confined worker's word is never learned
        # Serves requests the worker makes while answering (a sandbox's downloads).
        self.on_request: Broker | None = None  # serves the worker's downloads
        self._lock = threading.RLock()  # one request at a time on the channel
        self._rng_back = False  # the request in flight asked for the worker's random state
        self._request: Request | None = None  # the last request sent, to name its stage
        self._hello_due: float | None = None  # the handshake's deadline while its answer is due
        self._tail = bytearray()
        self._reader = threading.Thread(
            target=_drain,
            args=(
                output_fd,
                self._tail,
                pid,
                _OutputCap(total=self.limits.output_bytes),
                self.limits.output_cr,
            ),
            name=f"isolhub-out-{pid}",
            daemon=True,
        )  # started by `start`
        # Dropped without close(): killed, reaped and cleaned up all the same.
        _start_reaper()
        self._finalizer = weakref.finalize(self, _reap, self.pidfd, sock, status, scratch, pid)

    @classmethod
    def start(
        cls,
        label: str,
        init: WorkerInit,
        *,
        start_method: str = "zygote",
        on_request: Broker | None = None,
        limits: ReplyLimits | None = None,
        own_overlay: str | None = None,
        lazy: bool = False,
    ) -> Worker:
        """Start a worker for `label` and hand it `init` (snapshot, module name, hub dir...).

        `on_request` serves its downloads (`_weights.broker.weights_broker`: a sandboxed one's).
        `lazy`: return once the init is sent; its answer (the hello, or why the set-up failed)
        is read before the first request's, which is sent meanwhile: one round trip less.

        `limits` caps what it may make this process hold or print (`ReplyLimits`).
        `own_overlay`: fork it from the zygote of that environment of its own (`_env.environment`).

        Raises:
            WorkerError: the worker could not be started.
            WorkerCrashedError: it died during set-up.
        """
        scratch = temp_dir("worker")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        try:
            zygote = None
            if start_method == "zygote":
                pid, zygote = _zygote_fork(child.fileno(), out_w, own_overlay)
                status: Callable[[], int] = lambda: zygote.wait(pid)  # noqa: E731
            elif start_method == "spawn":
                proc = subprocess.Popen(
                    [sys.executable, "-m", "isolhub._process.runtime", str(child.fileno())],
                    pass_fds=[child.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=out_w,
                    stderr=out_w,
                    env=dict(os.environ, PYTHONPATH=_isolhub_pythonpath(own_overlay)),
                )
                pid, status = proc.pid, proc.wait
            else:
                raise WorkerError(f"unknown start method {start_method!r}: use 'zygote' or 'spawn'")
        except BaseException:
            os.close(out_r)
            parent.close()
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        finally:
            child.close()
            os.close(out_w)
        worker = cls(label, pid, parent, status, out_r, scratch, limits)
        worker.on_request = on_request
        worker.zygote = zygote
        worker.confined = init.policy is not None
        try:
            init = dataclasses.replace(init, scratch=scratch, spin=worker._spin)
            send_frame(parent, cloudpickle.dumps(init.to_wire()))
        except BaseException:
            worker.kill()
            raise
        finally:
            worker._reader.start()  # after the send: starting a thread waits for it to run
        worker._hello_due = time.monotonic() + _HANDSHAKE_TIMEOUT
        if not lazy:
            worker._read_hello()
        return worker

    def _read_hello(self) -> None:
        """Read the worker's answer to its init: its hello, or the error its set-up raised."""
        due, self._hello_due = self._hello_due, None
        if due is None:
            return
        try:
            reply, fds = self._reply(due)
            _close_fds(fds)
            Hello.decode(reply, self.label)
        except BaseException:
            self.kill()
            raise

    def request(
        self,
        message: Request,
        expect: type[_R] | tuple[type[_R], ...],
        timeout: float | None = None,
        fds: list[int] = (),  # type: ignore[assignment]
        *,
        deadline: float | None = None,
    ) -> _R:
        """Send one request and wait for its reply, one of the `expect`ed classes; errors are
        raised typed.

        The reply and its fds are decoded by `_process.messages.decode_reply` (every field and the
        number of fds checked); its fd, if any, is then the caller's. `timeout` and `deadline`
        are `exchange`'s.

        Raises:
            WorkerCrashedError: the worker died. WorkerTimeoutError: it overran the deadline.
            RemoteError, EntrypointError, MissingDependenciesError: hubconf code failed.
            ProtocolError: a reply of another kind or shape (the worker is killed).
        """
        classes = expect if isinstance(expect, tuple) else (expect,)
        most = max(c.MAX_FDS for c in classes)
        raw, got = self.exchange(message, timeout, fds, deadline=deadline, max_fds=most)
        try:
            return decode_reply(raw, got, classes)
        except ProtocolError as e:
            self.kill()
            raise ProtocolError(f"bad reply from the worker for {self.label}: {e}") from None

    def exchange(
        self,
        message: Request,
        timeout: float | None = None,
        fds: list[int] = (),  # type: ignore[assignment]
        *,
        deadline: float | None = None,
        max_fds: int = 0,
    ) -> tuple[dict[str, Any], list[int]]:
        """Send one request and wait for its answer, undecoded: `(reply, fds)` (for a relay:
        the Ray actor passes it to the driver, which decodes it); errors are raised typed.

        `timeout` (seconds from now) or `deadline` (a `time.monotonic()` value, for a call made
        of several requests) bounds every read of the answer together, however the worker
        spaces its bytes. The answer may carry up to `max_fds` fds, which the caller then owns;
        one with more is a `ProtocolError` and its fds are closed here: the one place every fd
        of every reply is either handed over or closed.

        Raises:
            WorkerCrashedError: the worker died. WorkerTimeoutError: it overran the deadline.
            RemoteError, EntrypointError, MissingDependenciesError: hubconf code failed.
            ProtocolError: a malformed answer (the worker is killed).
        """
        if self.closed:
            raise WorkerCrashedError(f"the worker for {self.label} is gone", spec=self.label)
        data = _pickled_request(message, self.label)
        with self._lock:
            if deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            elif deadline is not None and timeout is None:
                timeout = max(0.0, deadline - time.monotonic())
            self._rng_back = message.rng_back
            self._request = message
            try:
                send_frame(self.sock, data, fds)
            except OSError:
                self._read_hello()  # a set-up that failed says why
                self._raise_death()
            self._read_hello()
            reply, got = self._reply(deadline, timeout)
            if len(got) > max_fds:
                _close_fds(got)
                self.kill()
                raise ProtocolError(
                    f"the worker for {self.label} sent {len(got)} fds with an answer that takes "
                    f"at most {max_fds}; it was killed"
                )
            return reply, got

    def _reply(
        self, deadline: float | None, timeout: float | None = None
    ) -> tuple[dict[str, Any], list[int]]:
        """The worker's answer; its warnings are re-issued here, after it, whatever it was."""
        relayed: list[Effects] = []
        try:
            reply, fds = self._answer(deadline, timeout, relayed)
        except BaseException:
            self._reissue(relayed)  # warnings raised before a failure are the caller's too
            raise
        try:
            self._reissue(relayed)
        except BaseException:  # an error filter (-W error) made a warning the outcome
            for fd in fds:
                os.close(fd)
            raise
        return reply, fds

    def _reissue(self, relayed: list[Effects]) -> None:
        for effects in relayed:
            _worker_warnings.reissue(effects.warnings, effects.warnings_dropped, self.label)

    def _answer(
        self,
        deadline: float | None,
        timeout: float | None,
        relayed: list[Effects],
    ) -> tuple[dict[str, Any], list[int]]:
        """Read frames up to the reply; serve requests (a sandbox's downloads) and side effects."""
        while True:
            frame, fds = self._frame(deadline, timeout)
            if "ok" in frame:
                return frame, fds
            if "effects" in frame:
                relayed.append(self._effects(frame["effects"], fds))
                continue
            if self.on_request is None:
                close_fds(fds)
                self.kill()
                raise ProtocolError(f"the worker for {self.label} made a request nobody serves")
            answer = answer_download(self.on_request, frame, fds)
            answer_fds = [] if answer.fd is None else [answer.fd]
            try:
                send_frame(self.sock, encode(answer.to_wire()), answer_fds)
            except OSError:
                self._raise_death()
            finally:
                for fd in answer_fds:
                    os.close(fd)

    def _effects(self, raw: Any, fds: list[int]) -> Effects:
        """Apply the worker's end random state (if asked for); check its warnings for later."""
        try:
            effects = Effects.decode(raw, fds)
            if effects.imported is not None and self.confined:
                raise ProtocolError("a list of imported packages from a confined worker")
            if effects.rng is not None:
                if not self._rng_back:
                    raise ProtocolError("a random state nobody asked for")
                self._rng_back = False
                _rng.restore(effects.rng)
            if effects.imported and self.zygote is not None:
                _learn_imports(self.zygote, list(effects.imported))
        except ProtocolError as e:
            self.kill()
            raise ProtocolError(f"bad reply from the worker for {self.label}: {e}") from None
        return effects

    def _frame(
        self, deadline: float | None, timeout: float | None
    ) -> tuple[dict[str, Any], list[int]]:
        sock_fd = self.sock.fileno()
        poll = self._poller.poll
        events = poll(0) or self._spinner(poll)
        while True:
            if events:
                ready = {fd for fd, _ in events}
                if sock_fd in ready:
                    break
                if self.pidfd in ready:
                    self._raise_death()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._raise_timeout(timeout)
            events = poll(None if remaining is None else remaining * 1e3)
        try:
            # One deadline for the whole frame: a worker trickling its bytes cannot stretch it.
            frame = recv_frame(self.sock, self.limits.frame_bytes, deadline)
        except TimeoutError:
            self._raise_timeout(timeout)
        except (ProtocolError, OSError) as e:
            if self._dead_within(_GRACE):
                self._raise_death()
            self.kill()
            raise ProtocolError(f"bad frame from the worker for {self.label}: {e}") from e
        if frame is None:
            self._dead_within(_GRACE)
            self._raise_death()
        payload, fds = frame
        try:
            message = decode(payload)
            if not isinstance(message, dict) or not (
                "ok" in message or "broker" in message or "effects" in message
            ):
                raise ProtocolError("the reply is not a message")
        except ProtocolError as e:
            close_fds(fds)
            self.kill()
            raise ProtocolError(f"bad reply from the worker for {self.label}: {e}") from e
        if message.get("ok") is False:
            close_fds(fds)
            try:
                if message.keys() != {"ok", "error"}:
                    raise ProtocolError(f"a failure with the fields {sorted(message)!r}")
                record = ErrorRecord.decode(message["error"])
            except ProtocolError as e:
                self.kill()
                raise ProtocolError(f"bad reply from the worker for {self.label}: {e}") from None
            raise record.to_exception(self.label, self.pid)
        return message, fds

    def _stage(self) -> str:
        """` while <what the worker was doing>`, read before it is reaped; "" when unknown."""
        request = self._request
        if isinstance(request, InvokeRequest):
            action, name = request.action, request.name
            doing = _INVOKE_WORDS.get(str(action), f"serving {action!r}")
            return f" while {doing}{f' {name!r}' if name else ''} on the remote handle"
        try:
            with open(f"/proc/{self.pid}/comm", "rb") as f:
                stage = STAGES.get(f.read().rstrip(b"\n"))
        except OSError:
            stage = None
        return f" while {stage}" if stage else ""

    def _raise_timeout(self, timeout: float | None) -> NoReturn:
        stage = self._stage()
        self.kill()
        raise WorkerTimeoutError(
            (
                f"the worker for {self.label} (pid {self.pid}) did not answer within "
                f"{timeout or _HANDSHAKE_TIMEOUT:g} s{stage} and was killed; raise ",
                Option.of("timeout"),
                f" if the load is just slow{self._tail_text()}",
            ),
            spec=self.label,
            pid=self.pid,
        )

    def _dead_within(self, seconds: float) -> bool:
        with selectors.DefaultSelector() as sel:
            sel.register(self.pidfd, selectors.EVENT_READ)
            return bool(sel.select(seconds))

    def _raise_death(self) -> NoReturn:
        self._dead_within(_GRACE)
        stage = self._stage()
        code = self._collect()
        cause = describe_exit(code)
        if code is None and self.zygote is not None:
            cause = self.zygote.death_note() or cause
        why = f" ({self.cap_note})" if self.cap_note else ""
        raise WorkerCrashedError(
            f"the worker for {self.label} (pid {self.pid}) died{stage}: {cause}{why}"
            f"{self._tail_text()}",
            spec=self.label,
            pid=self.pid,
            returncode=code,
            output_tail=self.output_tail(),
        )

    def output_tail(self) -> str:
        """The last few KiB the worker wrote to stdout/stderr (control characters escaped)."""
        return escape_controls(bytes(self._tail).decode("utf-8", "replace"))

    def _tail_text(self) -> str:
        self._reader.join(timeout=1.0)
        tail = self.output_tail().strip()
        return f"\n--- last output of the worker ---\n{tail}" if tail else ""

    def _collect(self) -> int | None:
        """Reap the (dead) worker once and release everything it held."""
        if self.returncode is None and not self.closed:
            try:
                self.returncode = self._status()
            except (WorkerError, OSError, ChildProcessError):
                self.returncode = None
        self._release()
        return self.returncode

    def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._finalizer.detach()
        _kill_and_close(self.pidfd, self.sock)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.cap_note = _caps.oom_note(self.pid)
        # The worker is reaped; its emptied cgroups take the kernel 10-30 ms to let go of.
        _later(_caps.remove, self.pid)

    def kill(self) -> None:
        """Kill the worker at once (SIGKILL) and reap it."""
        if self.closed:
            return
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self._dead_within(_GRACE)
        self._collect()

    def notify(self, note: Request) -> None:
        """Send a request that gets no reply (`CloseNote`, `UnpinNote`), without waiting."""
        if not self.closed:
            with contextlib.suppress(OSError):
                send_frame(self.sock, pickle.dumps(note))

    def close(self, wait: bool = True) -> None:
        """Ask the worker to exit; kill it if it has not within two seconds.

        `wait=False`: return as soon as the worker has let go of its output, which it does
        last before exiting, so all it printed has been forwarded; the reaper thread waits for
        its exit, reaps it and removes its scratch folder and cgroups (`settle` waits for that).
        """
        if self.closed:
            return
        self.notify(CloseNote())
        if not wait:
            # Not at its end within a second: something the worker started holds the pipe.
            self._reader.join(timeout=1.0)
            if not self._reader.is_alive():
                self.closed = True
                self._finalizer.detach()
                self.sock.close()
                _later(_clean_up, self.pidfd, self._status, self.scratch, self.pid)
                return
        if not self._dead_within(_GRACE):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            self._dead_within(_GRACE)
        self._collect()
        self._reader.join(timeout=1.0)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_and_close(pidfd: int, sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.close(pidfd)
    sock.close()


# A finalizer runs wherever the garbage collector strikes, possibly in a thread that holds the
# zygote's lock, so reaping (which asks the zygote) happens in a thread of its own.
# SimpleQueue.put is safe to call from a finalizer.
_reaper_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_reaper_owner = 0
_reaper_lock = threading.Lock()


def _start_reaper() -> None:
    global _reaper_owner
    with _reaper_lock:
        if _reaper_owner != os.getpid():  # none yet, or this is a forked copy without it
            _reaper_owner = os.getpid()
            threading.Thread(target=_reaper, name="isolhub-reaper", daemon=True).start()


def _reap(
    pidfd: int, sock: socket.socket, status: Callable[[], int], scratch: str, pid: int
) -> None:
    """A dropped worker: kill it now; reap it and remove its scratch and cgroups soon."""
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    sock.close()
    _later(_clean_up, pidfd, status, scratch, pid)


def _later(job: Callable[..., None], *args: Any) -> None:
    """Run `job(*args)` in the reaper thread (now, at interpreter exit: no thread runs again)."""
    if threading.main_thread().is_alive():  # the reaper started with the first worker
        _reaper_jobs.put(functools.partial(job, *args))
    else:  # no lock is held either
        job(*args)


def _reaper() -> None:
    while True:
        job = _reaper_jobs.get()
        with contextlib.suppress(Exception):  # a reaper must outlive any one failure
            job()


@atexit.register
def _finish_reaping() -> None:
    """What the reaper has not done yet (a CLI exits right after its load), done now."""
    while True:
        try:
            job = _reaper_jobs.get_nowait()
        except queue.Empty:
            return
        with contextlib.suppress(Exception):
            job()


def settle(timeout: float = 30.0) -> bool:
    """Wait until the reaper thread has done what it was given so far: closed workers reaped,
    their scratch folders and cgroups removed. False if that took over `timeout` seconds.

    Example:
        >>> settle()
        True
    """
    if _reaper_owner != os.getpid():  # no worker was started in this process
        _finish_reaping()
        return True
    done = threading.Event()
    _reaper_jobs.put(done.set)
    return done.wait(timeout)


def _clean_up(pidfd: int, status: Callable[[], int], scratch: str, pid: int) -> None:
    with contextlib.suppress(Exception):  # a reaper must outlive any one failure
        if not select.select([pidfd], [], [], _GRACE)[0]:  # closed, yet not exiting
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], _GRACE)
        status()
    with contextlib.suppress(OSError):
        os.close(pidfd)
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):
        _caps.release(pid)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _OutputCap:
    """How much of a worker's output reaches this process's stderr: a rate, a burst, a total.

    A token bucket (`rate` bytes a second, up to `burst` at once) and a `total` (None: none);
    what is over them is dropped, and a note says how much. The tail kept for error messages
    is the worker's last output whatever was dropped.
    """

    def __init__(self, rate: int = 1 << 20, burst: int = 4 << 20, total: int | None = None):
        self.rate, self.burst, self.total = rate, burst, total
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.forwarded = 0

    def allow(self, n: int) -> int:
        """How many of the next `n` bytes may be forwarded now."""
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        ok = min(n, int(self.tokens))
        if self.total is not None:
            ok = min(ok, max(0, self.total - self.forwarded))
        self.tokens -= ok
        self.forwarded += ok
        return ok

    def describe(self) -> str:
        total = "" if self.total is None else f", {self.total} bytes in all"
        return f"{self.rate} bytes/s with bursts of {self.burst}{total}"


def _drain(fd: int, tail: bytearray, pid: int, cap: _OutputCap, keep_cr: bool) -> None:
    """Forward the worker's output to stderr, escaped and capped, keeping its tail."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    dropped = 0

    def write(text: str) -> None:
        with contextlib.suppress(Exception):
            sys.stderr.write(text)
            sys.stderr.flush()

    def note_dropped() -> None:
        write(
            f"\n[isolhub: dropped {dropped} bytes of output from worker pid {pid}, over its "
            f"cap of {cap.describe()}]\n"
        )

    try:
        while chunk := os.read(fd, 65536):
            tail.extend(chunk)
            del tail[:-_TAIL_BYTES]
            n = cap.allow(len(chunk))
            if n and dropped:
                note_dropped()
                dropped = 0
            if n:
                write(escape_controls(decoder.decode(chunk[:n]), keep_cr=keep_cr))
            if n < len(chunk):
                dropped += len(chunk) - n
                decoder.reset()  # what comes next does not continue what was forwarded
    except OSError:
        pass
    finally:
        os.close(fd)
        if dropped:
            note_dropped()
