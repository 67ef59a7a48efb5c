"""The messages between the parent and its workers, one frozen dataclass each, and the
protocol's version (loky's `_CallItem`/`_ResultItem` are the model).

The parent's requests (`Request` and its subclasses) travel pickled (the parent is trusted);
the worker dispatches on their class. Everything a worker sends goes through the restricted
codec (`_transport.codec`) as a plain dict and is rebuilt here, where every field and the number of
fds passed with it are checked: a message of the wrong shape is a `ProtocolError` (the caller
kills the worker), never a `KeyError` nor a value of the wrong type further on.

    parent ──WorkerInit──▶ worker     pickled as a dict, which any isolhub reads; of another
                                      version, the worker answers with its Hello alone
    worker ──Hello──▶ parent          once, after set-up: pid and PROTOCOL_VERSION
    parent ──ListRequest──▶ worker ──EntrypointsReply──▶ parent
    parent ──HelpRequest──▶ worker ──DocReply──▶ parent
    parent ──CallRequest──▶ worker ──PickleReply | StateDictReply | ValueReply | HandleReply──▶
    parent ──InvokeRequest──▶ worker ──ValueReply | StateDictReply | RaisedReply──▶ parent
    parent ──PushRequest──▶ worker ──ArenaReply──▶ parent   (a pulled module the kernel refused)
    parent ──UnpinNote | CloseNote──▶ worker                 (no reply)
    worker ──Effects──▶ parent        before a reply: warnings, the end random state, imports
    worker ──BrokerRequest──▶ parent ──BrokerAnswer (+ a read-only fd)──▶ worker
                                      a confined worker's download, amid a request
    worker ──ErrorRecord──▶ parent    a request failed: `to_exception` is the parent's error

`decode_reply` is the one place a reply and its fds are decoded (`Worker.request` calls it);
a download request is decoded by `_process.worker.answer_download`, which answers it.
Values inside a reply have shapes of their own, checked here too once decoded:
`IterationBatch` (a remote iterator's `next`), `HandleInfo` (a kept object), `CompareSummary`
(a compare session's side, once) and `CompareStep` (one batch through it).
The zygote's requests (`ForkRequest`, `WaitRequest`, `PreloadRequest`, `ProvidedRequest`,
decoded in the zygote by `zygote_request`) and its answers (`ZygoteHello`, `Forked`, `Waited`,
`Preloaded`, `Provided`) are here too.

`ERROR_KINDS` is the one table from an error's kind on the wire to the class the parent
raises; `kind_of` (worker side) and `ErrorRecord.to_exception` (parent side) both read it.
`CALLER_ERRORS` is the same for a remote handle's protocol operations (`getattr`, `len`…).

A hello's fields `ok`, `pid` and `protocol` never change meaning, so a parent reads any
worker's version (an older isolhub sends no `protocol`: version 0); nor does an init's
`protocol`, so a worker knows a parent of another version before it reads anything else.

Example:
    >>> record = error_record(KeyError("w"))  # in the worker
    >>> error = ErrorRecord.decode(record).to_exception("net@v1", 42)  # in the parent
    >>> type(error).__name__, error.remote_type
    ('RemoteError', 'builtins.KeyError')
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from .._errors import (
    EntrypointError,
    IsolhubError,
    MissingDependenciesError,
    ProtocolError,
    ProtocolVersionError,
    RemoteAttributeError,
    RemoteError,
    RemoteIndexError,
    RemoteKeyError,
    RemoteOperationError,
    RemoteTypeError,
    SandboxError,
    TransportError,
)
from .._escape import escape_controls
from .._transport.values import bounded_text
from .._version import __version__
from .preload import valid_names
from .worker_warnings import checked as checked_warnings

__all__ = [
    "ArenaReply",
    "BrokerAnswer",
    "BrokerRequest",
    "CALLER_ERRORS",
    "CallRequest",
    "CloseNote",
    "ComparePart",
    "CompareStep",
    "CompareSummary",
    "DocReply",
    "ERROR_KINDS",
    "Effects",
    "EntrypointsReply",
    "ErrorRecord",
    "ForkRequest",
    "Forked",
    "HandleInfo",
    "HandleReply",
    "Hello",
    "HelpRequest",
    "InvokeRequest",
    "IterationBatch",
    "ListRequest",
    "PROTOCOL_VERSION",
    "PickleReply",
    "PreloadRequest",
    "Preloaded",
    "Provided",
    "ProvidedRequest",
    "PushRequest",
    "RESULT_REPLIES",
    "RaisedReply",
    "Reply",
    "Request",
    "StateDictReply",
    "UnpinNote",
    "ValueReply",
    "WorkerInit",
    "WaitRequest",
    "Waited",
    "ZygoteHello",
    "ZygoteRequest",
    "close_fds",
    "decode_reply",
    "error_record",
    "failure",
    "hello",
    "kind_of",
    "zygote_refusal",
    "zygote_refused",
    "zygote_request",
]

# Raised whenever a message changes shape or meaning. 2: requests are `Request` dataclasses.
# 3: the init carries the parent's version (`WorkerInit`). 4: the init carries `threads`.
PROTOCOL_VERSION = 4

_TEXT_LIMIT = 1 << 20  # characters of a worker's message or traceback kept in an error
_NAME_LIMIT = 1000  # characters of a type name, a missing module's name, a path
_MAX_MISSING = 1000
_MAX_THREADS = 4096  # a worker's intra-op threads (`WorkerInit.threads`)


def _where() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _text(value: Any, what: str, limit: int = _TEXT_LIMIT, *, lines: bool = True) -> str:
    """A text field a worker sent: checked to be a str, bounded, its control characters escaped
    (it ends up in an error message, on a terminal)."""
    if type(value) is not str:
        raise ProtocolError(f"{what} is a {type(value).__name__}, not text")
    return escape_controls(bounded_text(value, limit), keep_lines=lines)


def _fields(raw: Any, what: str, required: frozenset[str], optional: frozenset[str]) -> dict:
    if type(raw) is not dict:
        raise ProtocolError(f"{what} is a {type(raw).__name__}, not a message")
    keys = raw.keys()
    if not required <= keys or not keys <= required | optional:
        raise ProtocolError(
            f"{what} has the fields {sorted(keys)!r}; expected {sorted(required)!r}"
            + (f" and optionally {sorted(optional)!r}" if optional else "")
        )
    return raw


# -- the handshake -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """What a worker says once it is set up: its pid, protocol version and isolhub."""

    pid: int
    protocol: int
    version: str  # the worker's isolhub version
    where: str  # the folder the worker's isolhub was imported from

    _REQUIRED = frozenset({"ok", "pid"})
    _OPTIONAL = frozenset({"protocol", "version", "where"})

    @classmethod
    def decode(cls, raw: Any, label: str) -> Hello:
        """The hello of the worker for `label`, checked; of another protocol version, refused.

        Raises:
            ProtocolVersionError: the worker speaks another version of the protocol.
            ProtocolError: the hello is malformed.
        """
        fields = _fields(raw, "the worker's hello", cls._REQUIRED, cls._OPTIONAL)
        protocol = fields.get("protocol", 0)  # isolhub before versions said none
        if fields["ok"] is not True or type(fields["pid"]) is not int:
            raise ProtocolError("malformed hello from a worker")
        if type(protocol) is not int:
            raise ProtocolError(f"the worker's protocol version is a {type(protocol).__name__}")
        version = _text(fields.get("version", "unknown"), "its version", _NAME_LIMIT, lines=False)
        where = _text(fields.get("where", "unknown"), "its location", _NAME_LIMIT, lines=False)
        if protocol != PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"the worker for {label} speaks isolhub protocol {protocol} (isolhub {version}, "
                f"imported from {where}), this process protocol {PROTOCOL_VERSION} (isolhub "
                f"{__version__}, imported from {_where()}); the worker was stopped. Install "
                "the same isolhub where workers start (every Ray node's environment), and do "
                "not start from a directory holding another copy of isolhub (a worker started "
                "with python -m imports the one in the current directory first)",
                spec=label,
                worker_protocol=protocol,
                parent_protocol=PROTOCOL_VERSION,
                worker_version=version,
            )
        return cls(fields["pid"], protocol, version, where)


def hello() -> dict[str, Any]:
    """This worker's hello, as the codec carries it."""
    return {
        "ok": True,
        "pid": os.getpid(),
        "protocol": PROTOCOL_VERSION,
        "version": __version__,
        "where": _where(),
    }


# -- the worker's set-up -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInit:
    """What the parent hands a new worker first (pickled, as a dict: the parent is trusted):
    the snapshot and the module name its hubconf is imported under, its scratch folder, and
    how it is set up (the parent's environment or, sandboxed, the `policy` it confines itself
    under). `threads`: torch's intra-op threads in the worker (`torch.set_num_threads`; None:
    torch's default), the caller's share of its own. `protocol` is the parent's: a worker of
    another version answers with its `Hello` alone (`same_protocol`), so that the parent refuses
    it by name.

    Example:
        >>> init = WorkerInit(snapshot="/s", module_name="isolhub_hubconf_0", scratch="/t")
        >>> WorkerInit.decode(init.to_wire()) == init
        True
    """

    snapshot: str
    module_name: str
    scratch: str = ""  # `Worker.start` makes one
    hub_dir: str | None = None
    env: dict[str, str] | None = None  # replaces the zygote's environment (None: keep it)
    env_overrides: dict[str, str] | None = None
    memory_bytes: int | None = None
    overlay: str | None = None  # the repo's environment's site folder (`_env.environment`)
    policy: Any = None  # a `_sandbox.policy.Sandbox`: confined, downloads through the parent
    spin: float = 0.0  # `_transport.codec.Spinner`'s seconds of spinning for the next request
    threads: int | None = None
    protocol: int = PROTOCOL_VERSION

    @staticmethod
    def same_protocol(raw: Any) -> bool:
        """Whether `raw` (an init as it came) is of this worker's protocol version."""
        return type(raw) is dict and raw.get("protocol") == PROTOCOL_VERSION

    @classmethod
    def decode(cls, raw: Any) -> WorkerInit:
        """The init `raw`, checked.

        Raises:
            ProtocolError: a field is missing, unknown or of the wrong type.
        """
        names = frozenset(f.name for f in dataclasses.fields(cls))
        required = frozenset({"snapshot", "module_name", "scratch", "protocol"})
        fields = _fields(raw, "the worker's init", required, names - required)

        def check(name: str, ok: bool) -> None:
            if not ok:
                shown = type(fields[name]).__name__
                raise ProtocolError(f"the worker's init has a {shown} {name}")

        def text_map(value: Any) -> bool:
            return value is None or (
                type(value) is dict and all(type(x) is str for kv in value.items() for x in kv)
            )

        for name in ("snapshot", "module_name", "scratch"):
            check(name, type(fields[name]) is str)
        for name in ("hub_dir", "overlay"):
            check(name, fields.get(name) is None or type(fields[name]) is str)
        for name in ("env", "env_overrides"):
            check(name, text_map(fields.get(name)))
        memory = fields.get("memory_bytes")
        check("memory_bytes", memory is None or (type(memory) is int and memory > 0))
        check("spin", type(fields.get("spin", 0.0)) in (int, float))
        threads = fields.get("threads")
        check("threads", threads is None or (type(threads) is int and 1 <= threads <= _MAX_THREADS))
        check("protocol", type(fields["protocol"]) is int)
        if fields.get("policy") is not None:
            from .._sandbox.policy import Sandbox

            check("policy", isinstance(fields["policy"], Sandbox))
        return cls(**dict(fields, spin=float(fields.get("spin", 0.0))))

    def to_wire(self) -> dict[str, Any]:
        """This init as the parent pickles it: a dict, which any isolhub reads."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# -- a sandboxed worker's downloads --------------------------------------------------------------
#
# A confined worker has no network: it asks the parent for a file (`BrokerRequest`), and the
# parent's weights broker (`_weights.broker`) downloads it under the policy and answers
# (`BrokerAnswer`) with a read-only fd of it. What the worker asks is hostile; it is answered,
# malformed or not, and the worker lives on.

_URL_TEXT_LIMIT = 1 << 16  # characters of a URL; the broker refuses those past 4096 itself
_HASH_PREFIX_LIMIT = 64  # a sha256 in hex


@dataclass(frozen=True, slots=True)
class BrokerRequest:
    """A confined worker asks the parent for the file at `url` (of that hash prefix, if any).

    Example:
        >>> BrokerRequest.decode(BrokerRequest("https://h.example/w.pt").to_wire())
        BrokerRequest(url='https://h.example/w.pt', hash_prefix=None)
    """

    url: str
    hash_prefix: str | None = None

    @classmethod
    def decode(cls, raw: Any, fds: Sequence[int] = ()) -> BrokerRequest:
        """A request a worker sent (with `fds`, which are closed), checked; the broker checks
        the URL and the hash prefix themselves.

        Raises:
            ProtocolError: malformed, or sent with fds.
        """
        close_fds(fds)
        if fds:
            raise ProtocolError("a download request came with fds")
        outer = _fields(raw, "a download request", frozenset({"broker"}), frozenset())
        what = "a download request"
        ask = _fields(outer["broker"], what, frozenset({"url", "hash_prefix"}), frozenset())
        url, prefix = ask["url"], ask["hash_prefix"]
        if type(url) is not str or len(url) > _URL_TEXT_LIMIT:
            raise ProtocolError(f"{what}'s URL is not text of at most {_URL_TEXT_LIMIT} characters")
        if prefix is not None and (type(prefix) is not str or len(prefix) > _HASH_PREFIX_LIMIT):
            raise ProtocolError(f"{what}'s hash prefix is not text of at most 64 characters")
        return cls(url, prefix)

    def to_wire(self) -> dict[str, Any]:
        """This request as the codec carries it."""
        return {"broker": {"url": self.url, "hash_prefix": self.hash_prefix}}


@dataclass(frozen=True, slots=True)
class BrokerAnswer:
    """The parent's answer to a `BrokerRequest`: the file's `name` and a read-only `fd` of it
    (passed with the frame), or why it will not serve it (`error`)."""

    name: str | None = None
    error: str | None = None
    fd: int | None = None

    @classmethod
    def decode(cls, raw: Any, fds: Sequence[int]) -> BrokerAnswer:
        """The answer `raw` (with `fds`), checked; the fds are closed if it is refused.

        Raises:
            ProtocolError: malformed, or not one fd with a file and none with a refusal.
        """
        try:
            if type(raw) is dict and raw.get("ok") is False:
                fields = _fields(raw, "a download answer", frozenset({"ok", "error"}), frozenset())
                if fds:
                    raise ProtocolError("a refused download came with fds")
                return cls(error=_text(fields["error"], "a download answer's error"))
            fields = _fields(raw, "a download answer", frozenset({"ok", "name"}), frozenset())
            if fields["ok"] is not True or len(fds) != 1:
                raise ProtocolError(f"a download answer is not ok with one fd ({len(fds)})")
            name = _text(fields["name"], "a downloaded file's name", _NAME_LIMIT, lines=False)
            return cls(name=name, fd=fds[0])
        except ProtocolError:
            close_fds(fds)
            raise

    def to_wire(self) -> dict[str, Any]:
        """This answer as the codec carries it (its fd, if any, travels beside, with the frame)."""
        if self.error is not None:
            return {"ok": False, "error": self.error}
        return {"ok": True, "name": self.name}


# -- errors --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """A request that failed in the worker: its kind (a key of `ERROR_KINDS`) and what it said."""

    kind: str
    type: str  # the exception's qualified type name
    message: str
    traceback: str
    missing: tuple[str, ...] = ()  # modules or protections (`dependencies`, `sandbox`)

    _REQUIRED = frozenset({"kind", "type", "message", "traceback"})
    _OPTIONAL = frozenset({"missing"})

    @classmethod
    def decode(cls, raw: Any) -> ErrorRecord:
        """A record a worker sent, checked (its text bounded and escaped).

        Raises:
            ProtocolError: it is malformed or of an unknown kind.
        """
        fields = _fields(raw, "an error record", cls._REQUIRED, cls._OPTIONAL)
        kind = fields["kind"]
        if type(kind) is not str or kind not in ERROR_KINDS:
            raise ProtocolError(f"an error record of unknown kind {escape_controls(str(kind))!r}")
        missing = fields.get("missing", [])
        if type(missing) is not list or len(missing) > _MAX_MISSING:
            raise ProtocolError("an error record's missing names are not a list of text")
        return cls(
            kind,
            _text(fields["type"], "an error record's type", _NAME_LIMIT, lines=False),
            _text(fields["message"], "an error record's message"),
            _text(fields["traceback"], "an error record's traceback"),
            tuple(
                _text(m, "an error record's missing name", _NAME_LIMIT, lines=False)
                for m in missing
            ),
        )

    def to_exception(self, label: str, pid: int | None) -> IsolhubError:
        """The error the parent raises for this record (the worker for `label`, `pid`)."""
        return ERROR_KINDS[self.kind][1](self, label, pid)


def _remote(r: ErrorRecord, label: str, pid: int | None) -> IsolhubError:
    short = r.type.removeprefix("builtins.")
    return RemoteError(
        f"{short}: {r.message}\n(raised by hubconf code in the worker for {label}; "
        f"remote traceback follows)\n{r.traceback.rstrip()}",
        spec=label,
        pid=pid,
        remote_type=r.type,
        remote_message=r.message,
        remote_traceback=r.traceback,
    )


# kind on the wire → (the class the parent raises, how it builds it from the record).
ERROR_KINDS: dict[str, tuple[type[IsolhubError], Callable[[ErrorRecord, str, int | None], Any]]] = {
    "remote": (RemoteError, _remote),
    "entrypoint": (EntrypointError, lambda r, label, pid: EntrypointError(r.message, spec=label)),
    "dependencies": (
        MissingDependenciesError,
        lambda r, label, pid: MissingDependenciesError(
            r.message, spec=label, missing=list(r.missing)
        ),
    ),
    "sandbox": (
        SandboxError,
        lambda r, label, pid: SandboxError(
            f"{r.message} (worker for {label})", spec=label, missing=list(r.missing)
        ),
    ),
    # isolhub's own failure to ship a result (`unshippable`), not the hubconf's.
    "transport": (
        TransportError,
        lambda r, label, pid: TransportError(
            f"{r.message} (worker for {label})", spec=label, pid=pid, remote_traceback=r.traceback
        ),
    ),
}
_KIND_OF: dict[type, str] = {cls: kind for kind, (cls, _) in ERROR_KINDS.items()}
# What the worker's own protocol checks raise (a released handle, an unknown request) is
# reported as hubconf errors are, not as a failure to ship a result.
_KIND_OF[ProtocolError] = "remote"

# What torch's CPU allocator raises (as a RuntimeError) where Python would raise MemoryError.
_TORCH_NO_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def kind_of(e: BaseException) -> str:
    """The kind of `e` on the wire: that of the nearest of its classes in `ERROR_KINDS`."""
    for cls in type(e).__mro__:
        kind = _KIND_OF.get(cls)
        if kind is not None:
            return kind
    return "remote"


def failure(e: BaseException) -> dict[str, Any]:
    """The answer of a request that raised `e` in the worker, as the codec carries it."""
    return {"ok": False, "error": error_record(e)}


def error_record(e: BaseException) -> dict[str, Any]:
    """The record of `e` raised in the worker, as the codec carries it (`ErrorRecord` fields)."""
    rtype = f"{type(e).__module__}.{type(e).__qualname__}"
    if isinstance(e, RuntimeError) and _TORCH_NO_MEMORY in str(e):
        rtype = "builtins.MemoryError"  # torch's allocator says it with a RuntimeError
    return {
        "kind": kind_of(e),
        "type": rtype,
        "message": str(e),
        "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__)),
        "missing": [str(m) for m in getattr(e, "missing", None) or ()],
    }


# A handle's protocol operation that failed as it would locally: the built-in error the worker
# caught → the error the parent raises, which is that built-in error too.
CALLER_ERRORS: dict[type[Exception], type[RemoteOperationError]] = {
    AttributeError: RemoteAttributeError,
    IndexError: RemoteIndexError,
    KeyError: RemoteKeyError,
    TypeError: RemoteTypeError,
}


# -- replies -------------------------------------------------------------------------------------
#
# What a worker answers a request with, as the codec carries it: a dict with `ok: True`, the
# reply's `kind` (none for `list` and `help`) and its fields, plus the fds passed with the frame.
# `decode(raw, fds)` checks every field's type and the number of fds; on a wrong shape it
# closes the fds and raises `ProtocolError`, so a reply's fds are either in the reply it returns
# (its `fd`, the caller's to close) or closed. `decode_reply` picks the class by `kind`.

_R = TypeVar("_R", bound="Reply")


def close_fds(fds: Sequence[int]) -> None:
    """Close `fds` (a refused reply's), whatever state each is in."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _layout(value: Any, what: str) -> bytes | list[Any]:
    """An arena layout or storage addresses: packed bytes or a list (`_transport.arena` checks the rest)."""
    if type(value) not in (bytes, list):
        raise ProtocolError(f"{what}'s layout is a {type(value).__name__}")
    return value


def _bytes(value: Any, what: str) -> bytes:
    if type(value) is not bytes:
        raise ProtocolError(f"{what} is a {type(value).__name__}, not bytes")
    return value


class Reply:
    """What every reply class shares: its kind on the wire, its fields, how many fds it takes."""

    __slots__ = ()
    KIND: ClassVar[str | None] = None
    MAX_FDS: ClassVar[int] = 0
    _FIELDS: ClassVar[frozenset[str]] = frozenset()  # besides `ok` and `kind`
    _OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    _WHAT: ClassVar[str] = "a reply"

    @classmethod
    def decode(cls, raw: Any, fds: Sequence[int] = ()) -> Self:
        """The reply `raw` (with `fds`), checked; the fds are closed if it is refused.

        Raises:
            ProtocolError: a field is missing, unknown or of the wrong type, or too many fds.
        """
        try:
            keys = cls._FIELDS | {"ok"} | ({"kind"} if cls.KIND is not None else set())
            fields = _fields(raw, cls._WHAT, frozenset(keys), cls._OPTIONAL)
            if fields["ok"] is not True:
                raise ProtocolError(f"{cls._WHAT} is not marked ok")
            if cls.KIND is not None and fields["kind"] != cls.KIND:
                raise ProtocolError(f"{cls._WHAT} is of kind {fields['kind']!r}")
            if len(fds) > cls.MAX_FDS:
                raise ProtocolError(
                    f"{cls._WHAT} came with {len(fds)} fds; it takes at most {cls.MAX_FDS}"
                )
            return cls._build(fields, fds[0] if fds else None)
        except ProtocolError:
            close_fds(fds)
            raise

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        raise NotImplementedError

    def to_wire(self) -> dict[str, Any]:
        """This reply as the codec carries it (its fd, if any, travels beside, with the frame)."""
        wire: dict[str, Any] = {"ok": True}
        if self.KIND is not None:
            wire["kind"] = self.KIND
        wire.update(self._fields())
        return wire

    def _fields(self) -> dict[str, Any]:
        raise NotImplementedError


def decode_reply(raw: Any, fds: Sequence[int], expect: tuple[type[_R], ...]) -> _R:
    """The reply `raw` as the one of the `expect`ed classes its `kind` names, checked.

    The one place a worker's reply and its fds are decoded (`Worker.request` calls it).

    Example:
        >>> decode_reply({"ok": True, "value": ["net"]}, [], (EntrypointsReply,))
        EntrypointsReply(names=('net',))

    Raises:
        ProtocolError: a reply of another kind or shape (its fds are closed).
    """
    kind = raw.get("kind") if type(raw) is dict else None
    for cls in expect:
        if kind == cls.KIND:
            return cls.decode(raw, fds)
    close_fds(fds)
    wanted = " or ".join(repr(c.KIND or "value") for c in expect)
    shown = escape_controls(repr(kind))[:100]
    raise ProtocolError(f"a reply of kind {shown} where {wanted} was asked for")


@dataclass(frozen=True, slots=True)
class EntrypointsReply(Reply):
    """The answer to `list`: the hubconf's public callables."""

    names: tuple[str, ...]

    _FIELDS = frozenset({"value"})
    _WHAT = "a list reply"

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        names = fields["value"]
        if type(names) is not list or any(type(n) is not str for n in names):
            raise ProtocolError(f"malformed {type(names).__name__} answer to list")
        return cls(tuple(names))

    def _fields(self) -> dict[str, Any]:
        return {"value": list(self.names)}


@dataclass(frozen=True, slots=True)
class DocReply(Reply):
    """The answer to `help`: the entrypoint's docstring, or None."""

    doc: str | None

    _FIELDS = frozenset({"value"})
    _WHAT = "a help reply"

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        doc = fields["value"]
        if doc is not None and type(doc) is not str:
            raise ProtocolError(f"malformed {type(doc).__name__} answer to help")
        return cls(doc)

    def _fields(self) -> dict[str, Any]:
        return {"value": self.doc}


@dataclass(frozen=True, slots=True)
class PickleReply(Reply):
    """A `module` result: the by-value pickle and its storages, in an arena (`fd`, `layout`) or,
    `pull`ed, at the packed addresses `layout` in the worker's memory (no fd)."""

    data: bytes
    layout: bytes | list[Any]
    fd: int | None = None
    pull: bool = False

    KIND = "pickle"
    MAX_FDS = 1
    _FIELDS = frozenset({"data", "layout"})
    _OPTIONAL = frozenset({"pull"})
    _WHAT = "a module result"

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        pull = fields.get("pull", False)
        if pull is not False and pull is not True:
            raise ProtocolError(f"a module result's pull is a {type(pull).__name__}")
        layout = _layout(fields["layout"], "a module result")
        if pull and (fd is not None or type(layout) is not bytes):
            raise ProtocolError("a pulled module result with an fd or unpacked addresses")
        return cls(_bytes(fields["data"], "a module result's pickle"), layout, fd, pull)

    def _fields(self) -> dict[str, Any]:
        return {"data": self.data, "layout": self.layout, **({"pull": True} if self.pull else {})}


@dataclass(frozen=True, slots=True)
class ArenaReply(Reply):
    """The answer to `push`: the pinned storages, in order, in a sealed arena."""

    layout: bytes | list[Any]
    fd: int | None = None

    KIND = "arena"
    MAX_FDS = 1
    _FIELDS = frozenset({"layout"})
    _WHAT = "an arena reply"

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        return cls(_layout(fields["layout"], "an arena reply"), fd)

    def _fields(self) -> dict[str, Any]:
        return {"layout": self.layout}


def _encoded(fields: dict[str, Any], what: str) -> tuple[bytes, bytes | list[Any]]:
    return _bytes(fields["body"], f"{what}'s body"), _layout(fields["layout"], what)


@dataclass(frozen=True, slots=True)
class ValueReply(Reply):
    """A value through the restricted codec (`body`), its tensors in an arena (`fd`, `layout`)."""

    body: bytes
    layout: bytes | list[Any]
    fd: int | None = None

    KIND = "value"
    MAX_FDS = 1
    _FIELDS = frozenset({"body", "layout"})
    _WHAT = "a value reply"

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        return cls(*_encoded(fields, cls._WHAT), fd)

    def _fields(self) -> dict[str, Any]:
        return {"body": self.body, "layout": self.layout}


@dataclass(frozen=True, slots=True)
class StateDictReply(Reply):
    """A state dict: the names and tensor descriptions (`body`), the storages in an arena."""

    body: bytes
    layout: bytes | list[Any]
    fd: int | None = None

    KIND = "state_dict"
    MAX_FDS = 1
    _FIELDS = frozenset({"body", "layout"})
    _WHAT = "a state dict reply"

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        return cls(*_encoded(fields, cls._WHAT), fd)

    def _fields(self) -> dict[str, Any]:
        return {"body": self.body, "layout": self.layout}


@dataclass(frozen=True, slots=True)
class HandleInfo:
    """An object the worker keeps for the parent (`RemoteObject`): its id and what it is."""

    id: int
    type: str  # its qualified type name, escaped
    module: bool  # an `nn.Module`
    callable: bool

    _REQUIRED = frozenset({"id", "type", "module", "callable"})

    @classmethod
    def decode(cls, raw: Any) -> HandleInfo:
        """A handle described in a reply, checked.

        Raises:
            ProtocolError: it is malformed.
        """
        fields = _fields(raw, "a handle", cls._REQUIRED, frozenset())
        if type(fields["id"]) is not int:
            raise ProtocolError("malformed handle in a reply: its id is not an int")
        if type(fields["module"]) is not bool or type(fields["callable"]) is not bool:
            raise ProtocolError("malformed handle in a reply")
        kind = _text(fields["type"], "a handle's type", _NAME_LIMIT, lines=False)
        return cls(fields["id"], kind, fields["module"], fields["callable"])

    def to_wire(self) -> dict[str, Any]:
        """This handle as the codec carries it."""
        return {"id": self.id, "type": self.type, "module": self.module, "callable": self.callable}


@dataclass(frozen=True, slots=True)
class HandleReply(Reply):
    """A `handle` result: the object stays in the worker."""

    handle: HandleInfo

    KIND = "handle"
    _FIELDS = frozenset({"handle"})
    _WHAT = "a handle reply"

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        return cls(HandleInfo.decode(fields["handle"]))

    def _fields(self) -> dict[str, Any]:
        return {"handle": self.handle.to_wire()}


# A call's `result=` → the reply that answers it.
RESULT_REPLIES: dict[str, type[Reply]] = {
    "module": PickleReply,
    "state_dict": StateDictReply,
    "value": ValueReply,
    "handle": HandleReply,
}

_RAISED_TEXT = 2000  # characters of a refused operation's message kept in the parent's error


@dataclass(frozen=True, slots=True)
class RaisedReply(Reply):
    """A handle's protocol operation the object refused as it would locally (a key of
    `CALLER_ERRORS` by name: `builtin`), on the remote `target` (attribute `name`, if any)."""

    builtin: str
    target: str
    name: str
    suggestions: tuple[str, ...]
    type: str
    message: str
    traceback: str

    KIND = "raised"
    _FIELDS = frozenset({"error"})
    _WHAT = "a refused operation"
    # An error record (`error_record`) with what the parent needs to raise the built-in error.
    _RECORD = frozenset(
        {
            "kind",
            "type",
            "message",
            "traceback",
            "missing",
            "builtin",
            "target",
            "name",
            "suggestions",
        }
    )

    @classmethod
    def _build(cls, fields: dict[str, Any], fd: int | None) -> Self:
        r = _fields(fields["error"], "a refused operation's record", cls._RECORD, frozenset())
        if r["builtin"] not in {b.__name__ for b in CALLER_ERRORS}:
            shown = escape_controls(repr(r["builtin"]))[:100]
            raise ProtocolError(f"a refused operation of unknown type {shown}")
        suggestions = r["suggestions"]
        if type(suggestions) is not list or type(r["missing"]) is not list:
            raise ProtocolError("a refused operation's suggestions are not a list")

        def text(value: Any, what: str, limit: int = _RAISED_TEXT) -> str:
            return _text(value, f"a refused operation's {what}", limit)

        return cls(
            r["builtin"],
            text(r["target"], "target").removeprefix("builtins."),
            text(r["name"], "name"),
            tuple(text(s, "suggestion") for s in suggestions[:3]),
            text(r["type"], "type"),
            text(r["message"], "message"),
            text(r["traceback"], "traceback", 20 * _RAISED_TEXT),
        )

    def _fields(self) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "remote", "type": self.type, "message": self.message}
        record.update(traceback=self.traceback, missing=[], builtin=self.builtin)
        record.update(target=self.target, name=self.name, suggestions=list(self.suggestions))
        return {"error": record}

    def to_exception(self, label: str) -> RemoteOperationError:
        """The error the parent raises (the built-in error too) for the worker of `label`."""
        cls = next(c for b, c in CALLER_ERRORS.items() if b.__name__ == self.builtin)
        message = self.message
        if self.suggestions:
            message += f"; did you mean {' or '.join(repr(s) for s in self.suggestions)}?"
        error = cls(
            f"{message}\n(the remote {self.target} in the worker for {label})",
            spec=label,
            remote_type=self.type,
            remote_message=self.message,
            remote_traceback=self.traceback,
        )
        if self.name and isinstance(error, AttributeError):
            error.name = self.name
        return error


# -- what comes with a reply ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Effects:
    """What the parent must see besides a reply (sent just before it): the warnings the request
    raised (`_process.worker_warnings` records and a count of those dropped), the worker's end random
    state (`rng`, for `rng_back`) and the installed packages it imported (unconfined only)."""

    warnings: list[dict[str, Any]]
    warnings_dropped: int
    rng: Any = None  # `_process.rng.restore` checks it, before setting anything
    imported: tuple[str, ...] | None = None

    _OPTIONAL = frozenset({"rng", "warnings", "warnings_dropped", "imported"})

    @classmethod
    def decode(cls, raw: Any, fds: Sequence[int] = ()) -> Effects:
        """The side effects `raw` (a frame's `effects`), checked; its fds are closed.

        Raises:
            ProtocolError: malformed, or sent with fds.
        """
        close_fds(fds)
        if fds:
            raise ProtocolError("side effects came with fds")
        if type(raw) is not dict or not raw.keys() <= cls._OPTIONAL:
            shown = sorted(raw) if type(raw) is dict else type(raw).__name__
            raise ProtocolError(f"malformed side effects {escape_controls(repr(shown))[:200]}")
        if "rng" in raw and raw["rng"] is None:
            raise ProtocolError("malformed random state from a worker")
        imported = raw.get("imported")
        if imported is not None and not valid_names(imported):
            raise ProtocolError("a malformed list of imported packages")
        warned, dropped = checked_warnings(raw.get("warnings", []), raw.get("warnings_dropped", 0))
        return cls(warned, dropped, raw.get("rng"), None if imported is None else tuple(imported))

    def to_wire(self) -> dict[str, Any]:
        """These side effects as the codec carries them (only those there are; {}: none)."""
        wire: dict[str, Any] = {}
        if self.warnings or self.warnings_dropped:
            wire["warnings"], wire["warnings_dropped"] = self.warnings, self.warnings_dropped
        if self.rng is not None:
            wire["rng"] = self.rng
        if self.imported is not None:
            wire["imported"] = list(self.imported)
        return wire


@dataclass(frozen=True, slots=True)
class IterationBatch:
    """The next items of a remote iterator (`next`), and whether more may follow."""

    items: tuple[Any, ...]
    more: bool

    @classmethod
    def decode(cls, value: Any, batch: int) -> IterationBatch:
        """The decoded value of a `next` request for `batch` items, checked.

        Raises:
            ProtocolError: not `{"items": [...], "more": bool}` of at most `batch` items.
        """
        fields = _fields(value, "an iteration batch", frozenset({"items", "more"}), frozenset())
        items, more = fields["items"], fields["more"]
        if type(items) not in (list, tuple) or type(more) is not bool or len(items) > batch:
            raise ProtocolError("a malformed iteration batch")
        return cls(tuple(items), more)

    def to_wire(self) -> dict[str, Any]:
        """This batch as the codec carries it, in the value of a `next` reply."""
        return {"items": list(self.items), "more": self.more}


# -- requests ------------------------------------------------------------------------------------
#
# What the parent asks a worker, pickled (the parent is trusted; `Hello` has agreed on the
# protocol's version before the first one), and dispatched on its class in the worker.
# Every request may carry the caller's random state (`rng`, and `rng_back` for the worker's
# end state), a `seed`, and the ids of handles to release.


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What every request carries besides its own fields."""

    rng: Any = None  # `_process.rng.capture()`: the worker starts from it
    rng_back: bool = False  # the worker's end state comes back in its `Effects`
    seed: int | None = None
    release: tuple[int, ...] = ()  # handles the parent has dropped
    last: bool = False  # the worker exits after answering (unless storages are pinned)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListRequest(Request):
    """`list`: the hubconf's public callables (`EntrypointsReply`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HelpRequest(Request):
    """`help`: the docstring of `entry` (`DocReply`)."""

    entry: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRequest(Request):
    """Call `entry(*args, **kwargs)`, then `then` on its result, answered as `result` says:
    `module` (`PickleReply`, `pull`ed if asked), `state_dict`, `value` or `handle`."""

    entry: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    result: str = "module"
    then: Any = None
    pull: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class InvokeRequest(Request):
    """Act on the kept object `id`: `action` (a call, an attribute, a protocol operation) with
    the arguments pickled by value in `payload`, their tensors in the arena passed with it."""

    id: int
    action: str
    name: str = ""
    payload: bytes
    layout: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class PushRequest(Request):
    """The pinned storages of a pulled module result, in a sealed arena (`ArenaReply`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpinNote(Request):
    """The parent has read the pinned storages (no reply)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseNote(Request):
    """The worker exits (no reply)."""


# -- the zygote's requests -----------------------------------------------------------------------
#
# What the parent asks its zygote, through the codec (`to_wire`), on the control socket; the
# zygote decodes each with `zygote_request` and dispatches on its class. A shape it does not
# serve is refused (`zygote_refused`), as is a fork without its two fds.


@dataclass(frozen=True, slots=True)
class ZygoteRequest:
    """What every request to the zygote shares: its `op` on the wire and the fds it takes."""

    OP: ClassVar[str] = ""
    FDS: ClassVar[int] = 0

    def to_wire(self) -> dict[str, Any]:
        """This request as the codec carries it (its fds, if any, travel beside, with the frame)."""
        return {"op": self.OP}


@dataclass(frozen=True, slots=True)
class ForkRequest(ZygoteRequest):
    """Fork a worker on the channel and output fds passed with the request (`Forked`)."""

    OP = "fork"
    FDS = 2


@dataclass(frozen=True, slots=True)
class WaitRequest(ZygoteRequest):
    """Reap the worker `pid` once it has exited (`Waited`)."""

    pid: int

    OP = "wait"

    def to_wire(self) -> dict[str, Any]:
        """This request as the codec carries it."""
        return {"op": self.OP, "pid": self.pid}


@dataclass(frozen=True, slots=True)
class PreloadRequest(ZygoteRequest):
    """Import these installed packages for the next workers (`Preloaded`)."""

    names: tuple[str, ...]

    OP = "preload"

    def to_wire(self) -> dict[str, Any]:
        """This request as the codec carries it."""
        return {"op": self.OP, "names": list(self.names)}


@dataclass(frozen=True, slots=True)
class ProvidedRequest(ZygoteRequest):
    """The distributions the zygote has imported, with their versions (`Provided`)."""

    OP = "provided"


_ZYGOTE_REQUESTS: dict[str, type[ZygoteRequest]] = {
    c.OP: c for c in (ForkRequest, WaitRequest, PreloadRequest, ProvidedRequest)
}


def zygote_request(raw: Any, nfds: int) -> ZygoteRequest:
    """The request `raw` the zygote received with `nfds` fds, checked.

    Example:
        >>> zygote_request(WaitRequest(42).to_wire(), 0)
        WaitRequest(pid=42)

    Raises:
        ProtocolError: it is none the zygote serves (another op or shape, or the wrong fds).
    """
    op = raw.get("op") if type(raw) is dict else None
    cls = _ZYGOTE_REQUESTS.get(op) if type(op) is str else None
    if cls is None:
        raise ProtocolError(f"no zygote request {escape_controls(repr(raw))[:200]}")
    fields = {f.name for f in dataclasses.fields(cls)}
    _fields(raw, f"a zygote {op} request", frozenset(fields | {"op"}), frozenset())
    if nfds != cls.FDS:
        raise ProtocolError(f"a zygote {op} request came with {nfds} fds, not {cls.FDS}")
    if cls is WaitRequest:
        if type(raw["pid"]) is not int:
            raise ProtocolError("a zygote wait request's pid is not an int")
        return WaitRequest(raw["pid"])
    if cls is PreloadRequest:
        names = raw["names"]
        if type(names) is not list or any(type(n) is not str for n in names):
            raise ProtocolError("a zygote preload request's names are not a list of text")
        return PreloadRequest(tuple(names))
    return cls()


# -- the zygote's answers ------------------------------------------------------------------------
#
# The zygote is isolhub's own process (it imports no repo), but its answers are checked all the
# same: a wrong shape is a `ProtocolError`, a refusal (`{"error": why}`) is `refusal(raw)`.


def zygote_refused(why: str) -> dict[str, Any]:
    """The zygote's answer to a request it will not serve, as the codec carries it."""
    return {"error": why}


def zygote_refusal(raw: Any) -> str | None:
    """Why the zygote refused a request (`{"error": why}`), or None if it did not."""
    if type(raw) is dict and raw.keys() == {"error"}:
        return _text(raw["error"], "the zygote's refusal")
    return None


@dataclass(frozen=True, slots=True)
class ZygoteHello:
    """What the zygote says once started: `ready`, or why not (a preload that started a
    thread: `unsafe`, its name; any other failure: `error`)."""

    ready: bool
    pid: int | None = None
    unsafe: str | None = None
    error: str | None = None

    @classmethod
    def decode(cls, raw: Any) -> ZygoteHello:
        """The zygote's hello, checked.

        Raises:
            ProtocolError: malformed.
        """
        fields = _fields(
            raw,
            "the zygote's hello",
            frozenset({"ready"}),
            frozenset({"pid", "preloaded", "unsafe", "error"}),
        )
        ready, pid, unsafe, error = (fields.get(k) for k in ("ready", "pid", "unsafe", "error"))
        if type(ready) is not bool or (ready and type(pid) is not int):
            raise ProtocolError("malformed hello from the zygote")
        if unsafe is not None and type(unsafe) is not str:
            raise ProtocolError("malformed hello from the zygote")
        return cls(
            ready, pid, unsafe, None if error is None else _text(error, "the zygote's error")
        )

    def to_wire(self) -> dict[str, Any]:
        """This hello as the codec carries it."""
        wire: dict[str, Any] = {"ready": self.ready}
        wire.update(
            (k, v)
            for k, v in (("pid", self.pid), ("unsafe", self.unsafe), ("error", self.error))
            if v is not None
        )
        return wire


@dataclass(frozen=True, slots=True)
class Forked:
    """The zygote forked a worker (`ForkRequest`): its pid."""

    pid: int

    @classmethod
    def decode(cls, raw: Any) -> Forked:
        """Raises: ProtocolError: malformed."""
        fields = _fields(raw, "the zygote's fork reply", frozenset({"pid"}), frozenset())
        if type(fields["pid"]) is not int:
            raise ProtocolError("malformed fork reply from the zygote")
        return cls(fields["pid"])

    def to_wire(self) -> dict[str, Any]:
        """This reply as the codec carries it."""
        return {"pid": self.pid}


@dataclass(frozen=True, slots=True)
class Waited:
    """A worker the zygote reaped (`WaitRequest`): its return code."""

    status: int

    @classmethod
    def decode(cls, raw: Any) -> Waited:
        """Raises: ProtocolError: malformed."""
        fields = _fields(raw, "the zygote's wait reply", frozenset({"status"}), frozenset())
        if type(fields["status"]) is not int:
            raise ProtocolError("malformed wait reply from the zygote")
        return cls(fields["status"])

    def to_wire(self) -> dict[str, Any]:
        """This reply as the codec carries it."""
        return {"status": self.status}


@dataclass(frozen=True, slots=True)
class Preloaded:
    """What the zygote imported when asked (`PreloadRequest`), and the name that started a
    thread (`unsafe`: it must not fork any more)."""

    preloaded: tuple[str, ...]
    unsafe: str | None

    @classmethod
    def decode(cls, raw: Any) -> Preloaded:
        """Raises: ProtocolError: malformed."""
        fields = _fields(
            raw, "the zygote's preload reply", frozenset({"preloaded", "unsafe"}), frozenset()
        )
        loaded, unsafe = fields["preloaded"], fields["unsafe"]
        if type(loaded) is not list or any(type(n) is not str for n in loaded):
            raise ProtocolError("malformed preload reply from the zygote")
        if unsafe is not None and type(unsafe) is not str:
            raise ProtocolError("malformed preload reply from the zygote")
        return cls(tuple(loaded), unsafe)

    def to_wire(self) -> dict[str, Any]:
        """This reply as the codec carries it."""
        return {"preloaded": list(self.preloaded), "unsafe": self.unsafe}


@dataclass(frozen=True, slots=True)
class Provided:
    """The distributions the zygote has imported, with their versions (`ProvidedRequest`)."""

    packages: dict[str, str]

    @classmethod
    def decode(cls, raw: Any) -> Provided:
        """Raises: ProtocolError: malformed."""
        fields = _fields(raw, "the zygote's package list", frozenset({"provided"}), frozenset())
        got = fields["provided"]
        if type(got) is not dict:
            raise ProtocolError("the isolhub zygote sent no package list")
        return cls({str(k): str(v) for k, v in got.items()})

    def to_wire(self) -> dict[str, Any]:
        """This reply as the codec carries it."""
        return {"provided": dict(self.packages)}


# -- compare -------------------------------------------------------------------------------------

_MAX_LAYERS = 100_000  # layer records one step may report


@dataclass(frozen=True, slots=True)
class CompareStep:
    """One batch through a compare session (`_compare.worker.CompareSession.step`), checked:
    repo code ran beside the session in the worker. `errors` and `forward_s` are by part path,
    `outputs`, `values` and `uncompared` by output name, `layers` the per-layer statistics
    (dicts of `name`, `type`, `dtype`, `shape`, `mean`, `std`, `min`, `max`) and `activations`
    the layer outputs kept, by layer name."""

    forward_s: dict[str, float]
    errors: dict[str, str]
    outputs: dict[str, Any]  # tensors
    values: dict[str, None | bool | int | float | str]
    uncompared: dict[str, str]
    layers: list[dict[str, Any]]
    activations: dict[str, Any]  # tensors

    _REQUIRED = frozenset(
        {"forward_s", "errors", "outputs", "values", "uncompared", "layers", "activations"}
    )

    @classmethod
    def decode(cls, raw: Any) -> CompareStep:
        """A step's decoded value, checked.

        Raises:
            ProtocolError: it is malformed.
        """
        import torch

        def strs(d: Any) -> bool:
            return isinstance(d, dict) and all(isinstance(k, str) for k in d)

        def number(x: Any) -> bool:
            return x is None or type(x) is float

        try:
            r = _fields(raw, "it", cls._REQUIRED, frozenset())
        except ProtocolError as e:
            raise ProtocolError(f"the worker's compare step reply is malformed: {e}") from None
        ok = all(strs(r[k]) for k in cls._REQUIRED - {"layers"})
        ok = ok and all(type(v) is float and v >= 0 for v in r["forward_s"].values())
        ok = ok and all(isinstance(v, str) for k in ("errors", "uncompared") for v in r[k].values())
        ok = ok and all(
            v is None or type(v) in (bool, int, float, str) for v in r["values"].values()
        )
        ok = ok and all(
            isinstance(v, torch.Tensor) for k in ("outputs", "activations") for v in r[k].values()
        )
        layers = r["layers"]
        ok = ok and isinstance(layers, list) and len(layers) <= _MAX_LAYERS
        ok = ok and all(
            isinstance(x, dict)
            and isinstance(x.get("name"), str)
            and isinstance(x.get("type"), str)
            and isinstance(x.get("dtype"), str)
            and isinstance(x.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in x["shape"])
            and all(number(x.get(k)) for k in ("mean", "std", "min", "max"))
            for x in layers
        )
        if not ok:
            raise ProtocolError("the worker's compare step reply is malformed")
        return cls(
            r["forward_s"], r["errors"], r["outputs"], r["values"], r["uncompared"], layers,
            r["activations"],
        )  # fmt: skip


_PART_FIELDS = frozenset({"parameters", "training", "forward_s", "forward_error"})
_ENTRYPOINT_FIELDS = frozenset({"kind", "signature", "doc", "source"})


@dataclass(frozen=True, slots=True)
class ComparePart:
    """A module-like part of a compared result (`path` "" is the result itself): its type, its
    parameter count (None: not an `nn.Module`), and what its forward took or raised."""

    path: str
    type: str
    parameters: int | None = None
    training: bool | None = None
    forward_s: float | None = None
    forward_error: str | None = None

    @classmethod
    def decode(cls, raw: Any) -> ComparePart:
        """A part as the worker described it, checked.

        Raises:
            ProtocolError: it is malformed.
        """
        p = _fields(raw, "a compared part", frozenset({"path", "type"}), _PART_FIELDS)
        parameters, training = p.get("parameters"), p.get("training")
        forward_s, error = p.get("forward_s"), p.get("forward_error")
        ok = type(p["path"]) is str and type(p["type"]) is str
        ok = ok and (parameters is None or (type(parameters) is int and parameters >= 0))
        ok = ok and (training is None or type(training) is bool)
        ok = ok and (forward_s is None or (type(forward_s) is float and forward_s >= 0))
        if not (ok and (error is None or type(error) is str)):
            raise ProtocolError("a compared part is malformed")
        return cls(p["path"], p["type"], parameters, training, forward_s, error)


@dataclass(frozen=True, slots=True)
class CompareSummary:
    """What a compare session says of its side once (`_compare.worker.CompareSession`'s
    `summary`), checked: repo code ran beside it in the worker. `t0` is the worker's monotonic
    clock when the result was summarised, `entrypoints` the hubconf's public callables (their
    `kind`, `signature`, `doc`, `source`; None: unknown), `tensors` the state dicts, `outputs`,
    `values` and `uncompared` by name. A batch's step adds to it (`after_step`): a new record.

    Example:
        >>> import torch
        >>> from isolhub._compare.worker import open_session
        >>> session = open_session(torch.nn.Linear(2, 3), seed=0)
        >>> s = CompareSummary.decode(session("summary"))
        >>> s.result_type, sorted(s.tensors), s.parts[0].parameters
        ('Linear', ['bias', 'weight'], 9)
    """

    t0: float
    result_type: str
    entrypoints: dict[str, dict[str, str | None]] | None
    parts: tuple[ComparePart, ...]
    tensors: dict[str, Any]  # tensors
    outputs: dict[str, Any]  # tensors
    values: dict[str, None | bool | int | float | str]
    uncompared: dict[str, str]

    _REQUIRED = frozenset(
        {"t0", "result_type", "entrypoints", "parts", "tensors", "outputs", "values", "uncompared"}
    )

    @classmethod
    def decode(cls, raw: Any) -> CompareSummary:
        """A session's summary as the worker sent it, checked.

        Raises:
            ProtocolError: it is malformed.
        """
        import torch

        def by_name(d: Any, ok: Callable[[Any], bool]) -> bool:
            return type(d) is dict and all(type(k) is str and ok(v) for k, v in d.items())

        def tensor(v: Any) -> bool:
            return isinstance(v, torch.Tensor)

        def entrypoint(e: Any) -> bool:
            return (
                by_name(e, lambda v: v is None or type(v) is str) and e.keys() <= _ENTRYPOINT_FIELDS
            )

        try:
            r = _fields(raw, "it", cls._REQUIRED, frozenset())
            parts = r["parts"]
            if type(parts) is not list or len(parts) > _MAX_LAYERS:
                raise ProtocolError("its parts are not a list")
            decoded = tuple(ComparePart.decode(p) for p in parts)
        except ProtocolError as e:
            raise ProtocolError(f"the worker's compare summary is malformed: {e}") from None
        entrypoints = r["entrypoints"]
        ok = type(r["t0"]) is float and type(r["result_type"]) is str
        ok = ok and (entrypoints is None or by_name(entrypoints, entrypoint))
        ok = ok and by_name(r["tensors"], tensor) and by_name(r["outputs"], tensor)
        ok = ok and by_name(r["values"], lambda v: v is None or type(v) in (bool, int, float, str))
        ok = ok and by_name(r["uncompared"], lambda v: type(v) is str)
        if not ok:
            raise ProtocolError("the worker's compare summary is malformed")
        return cls(
            r["t0"], r["result_type"], entrypoints, decoded, r["tensors"], r["outputs"],
            r["values"], r["uncompared"],
        )  # fmt: skip

    def after_step(self, step: CompareStep, *, first: bool) -> CompareSummary:
        """This summary with what a batch through the session added: each part's first forward
        error and, from the first batch, its values and what it could not compare (its outputs
        are compared through the stream instead)."""
        parts = tuple(
            dataclasses.replace(p, forward_error=step.errors[p.path])
            if p.forward_error is None and p.path in step.errors
            else p
            for p in self.parts
        )
        if not first:
            return dataclasses.replace(self, parts=parts)
        return dataclasses.replace(
            self,
            parts=parts,
            outputs={},
            values={**self.values, **step.values},
            uncompared={**self.uncompared, **step.uncompared},
        )
