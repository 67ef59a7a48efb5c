"""The single exception tree of isolhub.

* `IsolhubError` — root; catch it to catch everything isolhub raises.
  * `UsageError(IsolhubError, ValueError)` — an argument or flag has a wrong type or value.
  * `SpecError(IsolhubError, ValueError)` — a spec string is malformed.
  * `ResolveError` — a ref could not be turned into a commit.
    * `RefNotFoundError(ResolveError, ValueError)` — no such branch, tag or commit (torch.hub: ValueError).
      * `RefValidationError` — not a branch or tag head (torch.hub's check).
    * `OfflineError(ResolveError, ConnectionError)` — offline and not in the cache.
  * `UntrustedRepoError` — the trust check refused the repository.
    * `TrustResponseError(UntrustedRepoError, ValueError)` — the prompt's answer was no y/n.
  * `FetchError` — a source or file could not be downloaded.
    * `DownloadError` — an HTTP download failed (names the URL).
      * `HashMismatchError(DownloadError, RuntimeError)` — bytes do not match the expected hash.
  * `ArchiveError(IsolhubError, ValueError)` — an archive is malformed or hostile; nothing was written.
  * `CacheError` — the cache could not be used (not writable, corrupt entry).
    * `CacheCorruptedError` — a cached entry failed verification.
  * `EntrypointError(IsolhubError, RuntimeError)` — the hubconf has no such callable.
  * `MissingDependenciesError(IsolhubError, RuntimeError)` — `dependencies` names absent modules.
  * `EnvError` — a repo's requirements could not be read or installed (`env="auto"`).
  * `WorkerError` — something went wrong in or with a worker process.
    * `WorkerCrashedError` — the worker died (exit code, signal name, stderr tail).
    * `WorkerTimeoutError` — the worker overran its timeout and was killed.
    * `SandboxError` — a requested protection could not be applied.
    * `RemoteError` — the hubconf code raised; carries the remote type, message, traceback.
  * `TransportError` — a result could not be moved between processes.
    * `ProtocolError` — a malformed, oversize or unexpected frame.
      * `ProtocolVersionError` — the worker runs an isolhub speaking another protocol version.
  * `HandleClosedError` — a remote handle was used after its worker went away.
  * `RemoteOperationError` — an attribute read, index, `len`, `in` or iteration on a handle
    failed as it would on the object itself; each subclass is also the built-in error:
    * `RemoteAttributeError(RemoteOperationError, AttributeError)` — no such attribute.
    * `RemoteIndexError(RemoteOperationError, IndexError)`, `RemoteKeyError(…, KeyError)`,
      `RemoteTypeError(…, TypeError)` — the object's own answer to the operation.
  * `PoolClosedError` — a `Hub` was used after `close()`.

Every error pickles (so it can cross process boundaries) with its attributes intact.

A message that names an argument (`pass trust_repo=True`) is built from parts, some of them
`Option`s, so each interface renders them in its own words: `str(e)` in Python's, the command
line through `e.render(...)` in its flags' (`pass --trust`).

Example:
    >>> e = UntrustedRepoError(("pass ", Option.of(trust_repo=True), " to trust it"))
    >>> str(e)
    'pass trust_repo=True to trust it'
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ArchiveError",
    "CacheCorruptedError",
    "CacheError",
    "DownloadError",
    "EntrypointError",
    "EnvError",
    "FetchError",
    "HandleClosedError",
    "HashMismatchError",
    "IsolhubError",
    "MessageParts",
    "MissingDependenciesError",
    "OfflineError",
    "Option",
    "PoolClosedError",
    "ProtocolError",
    "ProtocolVersionError",
    "RefNotFoundError",
    "RefValidationError",
    "RemoteAttributeError",
    "RemoteError",
    "RemoteIndexError",
    "RemoteKeyError",
    "RemoteOperationError",
    "RemoteTypeError",
    "ResolveError",
    "SandboxError",
    "SpecError",
    "TransportError",
    "TrustResponseError",
    "UntrustedRepoError",
    "UsageError",
    "Words",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerTimeoutError",
    "describe_exit",
    "python_words",
    "signal_name",
]


@dataclass(frozen=True)
class Option:
    """Arguments an error message names: a setting (`trust_repo=True`) or a bare name (`timeout=`).

    `settings` holds `(name, value)` pairs; `names` the arguments named without a value.
    """

    settings: tuple[tuple[str, Any], ...] = ()
    names: tuple[str, ...] = ()

    @classmethod
    def of(cls, *names: str, **settings: Any) -> Option:
        """`Option.of("timeout")` names the argument; `Option.of(sandbox="strict")` a setting."""
        return cls(tuple(settings.items()), names)

    def python(self) -> str:
        """The Python words: `mode='remote', sandbox='strict'`, or `timeout=`."""
        return ", ".join(
            [*(f"{n}=" for n in self.names), *(f"{k}={v!r}" for k, v in self.settings)]
        )


Words = Callable[[Option], str]
MessageParts = Sequence["str | Option"]


def python_words(option: Option) -> str:
    """How Python callers read an `Option`: the argument names they pass."""
    return option.python()


class IsolhubError(Exception):
    """Root of every error isolhub raises.

    Example:
        >>> import isolhub as hub
        >>> try:
        ...     hub.load("git+file:///nowhere/net.git@v1", "net")
        ... except hub.IsolhubError as e:
        ...     print(type(e).__name__, isinstance(e, hub.ResolveError))
        ResolveError True
    """

    def __init__(self, message: str | MessageParts = "", **attrs: Any) -> None:
        parts = (message,) if isinstance(message, str) else tuple(message)
        self.parts = parts
        self.message = _render(parts, python_words)
        super().__init__(self.message)
        for key, value in attrs.items():
            setattr(self, key, value)
        self._attrs = attrs

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.parts, self._attrs))

    def __str__(self) -> str:
        return self.message

    def render(self, words: Words) -> str:
        """The message with each `Option` in `words` (the command line's flags, say)."""
        return _render(self.parts, words)


def _render(parts: Sequence[str | Option], words: Words) -> str:
    return "".join(p if isinstance(p, str) else words(p) for p in parts)


def _rebuild_error(
    cls: type[IsolhubError], parts: tuple[str | Option, ...], attrs: dict[str, Any]
) -> IsolhubError:
    return cls(parts, **attrs)


class UsageError(IsolhubError, ValueError):
    """Raised when an argument (or a command-line flag) has a wrong type or value.

    The message names the argument in the words of the interface used: `timeout=` in Python,
    `--timeout` on the command line. A `ValueError`, as Python's own argument checks are.
    """


class SpecError(IsolhubError, ValueError):
    """Raised when a spec string matches none of the accepted forms."""


class ResolveError(IsolhubError):
    """Raised when a branch, tag or commit cannot be resolved to a commit SHA."""


class RefNotFoundError(ResolveError, ValueError):
    """Raised when the repository has no such branch, tag or commit (or is not there at all).

    A `ValueError`, as torch.hub's "Cannot find <ref> in https://github.com/<o>/<n>. If it's a
    commit from a forked repo, ..." is; for GitHub refs the message carries that sentence.
    """


class RefValidationError(RefNotFoundError):
    """Raised when torch.hub's ref validation (`skip_validation=False`) finds no match.

    The ref is neither the name of a branch or tag of the repository nor a prefix of the head
    commit of one: a commit from a fork (GitHub serves those through the parent's URLs too) or an
    older commit. A `ValueError`, as torch.hub raises.
    """


class OfflineError(ResolveError, ConnectionError):
    """Raised in offline mode (`ISOLHUB_OFFLINE=1`) when what is asked for is not cached."""


class UntrustedRepoError(IsolhubError):
    """Raised when the trust check refused a repository: the answer was no, or there was no one
    to ask (`input()` met the end of stdin), or `trust_repo` had a value torch.hub does not know.

    The message starts "Untrusted repository" where torch.hub raises `Exception("Untrusted
    repository.")`.
    """


class TrustResponseError(UntrustedRepoError, ValueError):
    """Raised when the trust prompt's answer is none of y, yes, n, no or nothing.

    A `ValueError` whose message starts "Unrecognized response", as torch.hub's.
    """


class FetchError(IsolhubError):
    """Raised when a source snapshot could not be fetched (git or HTTP).

    `stderr`: what git said (on one line, bounded), when git failed.
    """

    stderr: str = ""


class DownloadError(FetchError):
    """Raised when an HTTP download fails; the message names the URL and the cause."""


class HashMismatchError(DownloadError, RuntimeError):
    """Raised when downloaded bytes do not match the expected hash; the target is untouched."""


class ArchiveError(IsolhubError, ValueError):
    """Raised when an archive is malformed or hostile; the offending member is named.

    A `ValueError`, as torch.hub's zip-slip refusals ("Archive entry escapes target directory").
    """


class CacheError(IsolhubError):
    """Raised when the cache cannot be read or written."""


class CacheCorruptedError(CacheError):
    """Raised when a cached entry fails verification (size, hash or embedded commit)."""


class EntrypointError(IsolhubError, RuntimeError):
    """Raised when the hubconf has no callable of the requested name."""


class MissingDependenciesError(IsolhubError, RuntimeError):
    """Raised when modules named in the hubconf's `dependencies` list cannot be found."""


class EnvError(IsolhubError):
    """Raised when a repo's requirements could not be read or installed (`env="auto"`).

    The message names the requirement and carries the installer's last lines; `packages` lists
    what was asked for. Offline with no environment installed yet is an `OfflineError`.
    """


class WorkerError(IsolhubError):
    """Something went wrong in or with a worker process (carries `spec` and `pid`)."""


class WorkerCrashedError(WorkerError):
    """Raised when a worker dies before answering: exit code or signal, and its stderr tail."""


class WorkerTimeoutError(WorkerError):
    """Raised when a worker overruns its `timeout`; it has been killed."""


class SandboxError(WorkerError):
    """Raised when a protection the sandbox policy asks for cannot be applied."""


class RemoteError(WorkerError):
    """Raised when hubconf code raised inside the worker.

    Attributes: `remote_type` (the exception's qualified type name), `remote_message` and
    `remote_traceback` (the worker's formatted traceback, as text).
    """


class TransportError(IsolhubError):
    """Raised when a result cannot be moved from a worker to the parent."""


class ProtocolError(TransportError):
    """Raised on a malformed, oversize or unexpected frame from a worker."""


class ProtocolVersionError(ProtocolError):
    """Raised when a worker speaks another version of isolhub's protocol (another isolhub).

    Attributes: `worker_protocol`, `parent_protocol` (the two versions), `worker_version`
    (the worker's isolhub version, as it says).
    """


class PoolClosedError(IsolhubError):
    """Raised when a `Hub` is used (or a `map` iterated) after `close()`."""


class HandleClosedError(IsolhubError):
    """Raised when a remote handle is used after it was closed or its worker died."""


class RemoteOperationError(IsolhubError):
    """Raised when an operation on a remote handle fails the way it would on the object itself.

    Not an error of the hubconf code (that is `RemoteError`): the caller asked for an attribute,
    index or protocol the object does not have. Attributes: `remote_type`, `remote_message`,
    `remote_traceback`, `spec`.
    """


class RemoteAttributeError(RemoteOperationError, AttributeError):
    """Raised when the object behind a handle has no such attribute (`hasattr` sees False)."""


class RemoteIndexError(RemoteOperationError, IndexError):
    """Raised when indexing the object behind a handle raised `IndexError` (ends iteration)."""


class RemoteKeyError(RemoteOperationError, KeyError):
    """Raised when indexing the object behind a handle raised `KeyError`."""


class RemoteTypeError(RemoteOperationError, TypeError):
    """Raised when the object behind a handle does not support the operation (`len`, `iter`…)."""


def signal_name(status: int | None) -> str | None:
    """The signal a decoded return code (`Popen.returncode`, negative for a signal) names:
    `SIGSEGV` for -11, `signal 99` for an unknown one; None for an exit code or None."""
    if status is None or status >= 0:
        return None
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"


def describe_exit(status: int | None) -> str:
    """Describe a decoded return code: `exit code 3`, or `killed by SIGSEGV (-11)`.

    Example:
        >>> describe_exit(-11), describe_exit(3), describe_exit(None)
        ('killed by SIGSEGV (-11)', 'exit code 3', 'unknown exit status')
    """
    if status is None:
        return "unknown exit status"
    if status < 0:
        return f"killed by {signal_name(status)} ({status})"
    return f"exit code {status}"
