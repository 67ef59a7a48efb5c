"""The messages a worker sends the parent, one frozen dataclass each, and the protocol's version.

The parent's requests travel pickled (the parent is trusted); everything a worker sends goes
through the restricted codec (`_protocol`) as a plain dict and is rebuilt here, where every
field is checked: a message of the wrong shape is a `ProtocolError` (the caller kills the
worker), never a `KeyError` nor a value of the wrong type further on.

    worker ──Hello──▶ parent          once, after set-up: pid and PROTOCOL_VERSION
    worker ──ErrorRecord──▶ parent    a request failed: `to_exception` is the parent's error

`ERROR_KINDS` is the one table from an error's kind on the wire to the class the parent
raises; `kind_of` (worker side) and `ErrorRecord.to_exception` (parent side) both read it.
`CALLER_ERRORS` is the same for a remote handle's protocol operations (`getattr`, `len`…).

A hello's fields `ok`, `pid` and `protocol` never change meaning, so a parent reads any
worker's version (an older isolhub sends no `protocol`: version 0).

Example:
    >>> record = error_record(KeyError("w"))  # in the worker
    >>> error = ErrorRecord.decode(record).to_exception("net@v1", 42)  # in the parent
    >>> type(error).__name__, error.remote_type
    ('RemoteError', 'builtins.KeyError')
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._errors import (
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
from ._escape import escape_controls
from ._values import bounded_text
from ._version import __version__

__all__ = [
    "CALLER_ERRORS",
    "ERROR_KINDS",
    "PROTOCOL_VERSION",
    "ErrorRecord",
    "Hello",
    "error_record",
    "hello",
    "kind_of",
]

# Raised whenever a message a worker sends changes shape or meaning.
PROTOCOL_VERSION = 1

_TEXT_LIMIT = 1 << 20  # characters of a worker's message or traceback kept in an error
_NAME_LIMIT = 1000  # characters of a type name, a missing module's name, a path
_MAX_MISSING = 1000


def _where() -> str:
    return os.path.dirname(os.path.abspath(__file__))


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
