"""isolhub's one HTTP stack, and `download_url_to_file`'s transfer: one URL streamed into an
open temp file, with retries.

What every request isolhub makes shares (the GitHub API's in `_source.github` too): sessions
(`new_session`, confined under the weights broker's guard), redirects followed by hand
(`follow`: at most `MAX_REDIRECTS` hops, http(s) only, loops named, `Authorization` and
`Cookie` dropped when the host changes), `Retry-After` (`retry_after`), URLs redacted for
messages (`safe_url`), and requests'/urllib3's exceptions mapped into isolhub's errors
(`_errormap.foreign_errors`).

The transfer only talks to the server; what `_weights.download` does around it (the lock, the temp file,
the hash check, fsync and the atomic rename, offline mode, the broker) is not its business.
In the order a transfer meets it:

* one session per download, `GET` with `Accept-Encoding: identity`, a connect and a
  read timeout, and a stall window: each `ISOLHUB_HTTP_TIMEOUT` seconds must average
  `ISOLHUB_HTTP_MIN_RATE` bytes/s;
* redirects through `follow`;
* status codes: 429 and 5xx are retried (`Retry-After` honoured up to a cap), other 4xx become a
  `DownloadError` with advice; an HTML page served with 200 is refused;
* retries with exponential backoff and jitter, a fresh budget after progress (not after a
  trickle), and a hard cap on attempts;
* a cut body resumes with `Range` + `If-Range` and a checked `Content-Range`, or restarts from
  byte 0 (`DownloadState.restart`): two versions of a file are never joined.

`TransferSettings.from_env()` reads the tuning variables (listed in `_weights.download`) at call time. A failed
write to the temp file surfaces as `DiskError`, never retried, for the caller to name.

A transfer needs a server, so the example shows the shared pieces:
    >>> safe_url("https://me:secret@host/w.pt?token=abc&v=2")
    'https://host/w.pt?token=%2A%2A%2A&v=2'
    >>> retry_after("120"), retry_after("soon")
    (120.0, None)
    >>> TransferSettings.from_env().retries      # $ISOLHUB_HTTP_RETRIES, read at call time
    5
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from ._errormap import foreign_errors
from ._errors import DownloadError

if TYPE_CHECKING:
    import requests
    from tqdm import tqdm

__all__ = [
    "DiskError",
    "DownloadState",
    "Guard",
    "MAX_REDIRECTS",
    "READ_CHUNK",
    "TransferSettings",
    "USER_AGENT",
    "fetch",
    "follow",
    "new_session",
    "retry_after",
    "safe_url",
    "write_all",
]


class Guard(Protocol):
    """The weights broker's rules for a download (`_weights.broker.BrokerGuard`)."""

    @property
    def proxy(self) -> str | None: ...

    def check(self, url: str, after: Any = None) -> Any: ...

    def same_target(self, checked: Any, url: str) -> None: ...


# The same logger as `_weights.download`: one name for everything a download logs.
log = logging.getLogger("isolhub.download")

READ_CHUNK = 128 * 1024
USER_AGENT = "isolhub (torch.hub compatible)"
MAX_REDIRECTS = 10  # for every request isolhub makes; urllib's limit, so torch.hub's
# A hard cap on attempts, even when each one makes progress (a server that cuts every response).
_MAX_ATTEMPTS = 100
_SENSITIVE_QUERY = re.compile(r"token|sig|key|secret|pass|auth|cred", re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


def safe_url(url: str) -> str:
    """`url` without user info and with secret-looking query values masked, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    with contextlib.suppress(ValueError):
        if parts.port is not None:
            netloc += f":{parts.port}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SENSITIVE_QUERY.search(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# -- the one HTTP stack: sessions and redirects (the GitHub API's too) --------------------------


def new_session(
    guard: Guard | None = None, headers: dict[str, str] | None = None
) -> requests.Session:
    """A `requests.Session` with `headers` as its defaults; every isolhub request is made on one.

    With a `guard` (the weights broker's) it is confined: it reads nothing from the environment
    (`trust_env=False`: no `.netrc`, proxy variables or credentials; only a CA bundle variable is
    kept) and uses only the guard's proxy.
    """
    import requests

    session = requests.Session()
    session.headers.update(headers or {})
    if guard is not None:
        session.trust_env = False
        session.proxies = {"http": guard.proxy, "https": guard.proxy} if guard.proxy else {}
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if ca_bundle:
            session.verify = ca_bundle
    return session


def follow(
    session: requests.Session,
    url: str,
    headers: dict[str, str],
    *,
    timeout: tuple[float, float],
    fail: Callable[[str], Exception],
    guard: Guard | None = None,
    per_hop: Callable[[str], dict[str, str]] | None = None,
    stream: bool = True,
) -> requests.Response:
    """GET `url`, following at most `MAX_REDIRECTS` redirects by hand, each hop checked.

    Only http(s) targets are followed, a loop is named, and `Authorization` and `Cookie` are
    dropped from `headers` once the host changes; `per_hop(url)` adds headers for one hop only
    (GitHub's token, for the API's own host). With a `guard`, every URL requested, the first and
    each hop, is the one `guard.check` rebuilt. A refused redirect raises `fail(detail)`.
    """
    import requests

    checked = guard.check(url) if guard is not None else None
    current = checked.url if checked is not None else url
    chain = [current]
    hdrs = dict(headers)
    for _hop in range(MAX_REDIRECTS + 1):
        sent = {**hdrs, **per_hop(current)} if per_hop is not None else hdrs
        prep = session.prepare_request(requests.Request("GET", current, headers=sent))
        if guard is not None and checked is not None:
            # What is sent is what was checked: requests' own reading of the prepared URL.
            guard.same_target(checked, prep.url or "")
        env = session.merge_environment_settings(prep.url or current, {}, stream, None, None)
        env["stream"] = stream
        resp = session.send(prep, timeout=timeout, allow_redirects=False, **env)
        target = session.get_redirect_target(resp)
        if target is None:
            return resp
        resp.close()
        nxt = urljoin(current, target)
        if guard is not None:
            checked = guard.check(nxt, after=checked)
            nxt = checked.url
        shown = " -> ".join(safe_url(u) for u in [*chain, nxt])
        if urlsplit(nxt).scheme.lower() not in ("http", "https"):
            raise fail(f"redirected to a non-http(s) URL ({shown}); refusing to follow it")
        if nxt in chain:
            raise fail(f"redirect loop ({shown}); report it to the server's owner")
        if session.should_strip_auth(current, nxt):
            hdrs = {k: v for k, v in hdrs.items() if k.lower() not in ("authorization", "cookie")}
        chain.append(nxt)
        current = nxt
    raise fail(
        f"more than {MAX_REDIRECTS} redirects ({' -> '.join(safe_url(u) for u in chain)}); "
        "report it to the server's owner"
    )


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferSettings:
    """A download's tuning (timeouts, retries, size cap), read from `ISOLHUB_HTTP_*` at call time."""

    connect_timeout: float
    read_timeout: float
    min_rate: float
    retries: int
    backoff: float
    backoff_max: float
    retry_after_max: float
    max_bytes: int | None
    lock_timeout: (
        float  # `_weights.download`'s, read here so one bad variable fails before any work
    )
    max_bytes_name: str = "ISOLHUB_HTTP_MAX_BYTES"  # where the cap comes from, for messages

    @classmethod
    def from_env(cls) -> TransferSettings:
        max_bytes = _env_number("ISOLHUB_HTTP_MAX_BYTES", 0)
        return cls(
            connect_timeout=_env_number("ISOLHUB_HTTP_CONNECT_TIMEOUT", 10.0),
            read_timeout=_env_number("ISOLHUB_HTTP_TIMEOUT", 30.0),
            min_rate=_env_number("ISOLHUB_HTTP_MIN_RATE", 1024.0),
            retries=int(_env_number("ISOLHUB_HTTP_RETRIES", 5)),
            backoff=_env_number("ISOLHUB_HTTP_BACKOFF", 1.0),
            backoff_max=_env_number("ISOLHUB_HTTP_BACKOFF_MAX", 30.0),
            retry_after_max=_env_number("ISOLHUB_HTTP_RETRY_AFTER_MAX", 120.0),
            max_bytes=int(max_bytes) if max_bytes > 0 else None,
            lock_timeout=_env_number("ISOLHUB_LOCK_TIMEOUT", 600.0),
        )


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DownloadError(f"invalid {name}={raw!r}: expected a number; fix or unset it") from None
    if value < 0:
        raise DownloadError(f"invalid {name}={raw!r}: must not be negative; fix or unset it")
    return value


# -- one transfer ----------------------------------------------------------------------------


class _Retryable(Exception):
    """A failure worth another attempt (network, timeout, stall, 429/5xx, bad resume)."""

    def __init__(
        self, reason: str, *, retry_after: float | None = None, stalled: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.stalled = stalled


class DiskError(Exception):
    """Writing the temp file failed; never retried."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class DownloadState:
    """What has been written to the temp file so far, and which version of the file it is."""

    f: IO[bytes]
    hashing: bool
    written: int = 0
    high_water: int = 0
    total: int | None = None
    validator: str | None = None
    can_resume: bool = False
    hasher: Any = field(default=None)
    # Called once a 200 has said what the file is (size, validator): the resume record.
    on_entity: Callable[[DownloadState], None] | None = None

    def __post_init__(self) -> None:
        self.hasher = hashlib.sha256() if self.hashing else None

    def restart(self) -> None:
        try:
            self.f.seek(0)
            self.f.truncate()
        except OSError as e:
            raise DiskError(e) from e
        self.written = 0
        self.total = None
        self.validator = None
        self.can_resume = False
        self.hasher = hashlib.sha256() if self.hashing else None

    def write(self, data: bytes) -> None:
        try:
            write_all(self.f, data)
        except OSError as e:
            raise DiskError(e) from e
        if self.hasher is not None:
            self.hasher.update(data)
        self.written += len(data)


def write_all(f: IO[bytes], data: bytes) -> None:
    """Write all of `data` to the unbuffered `f`, continuing after short writes.

    Temp files are unbuffered so that a failed write cannot linger in a buffer and fail again,
    untyped, when the file is closed.
    """
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.ENOSPC, "no progress writing")
        view = view[n:]


def fetch(
    url: str,
    state: DownloadState,
    s: TransferSettings,
    headers: dict[str, str],
    progress: bool,
    dst: str,
    surl: str,
    guard: Guard | None = None,
) -> None:
    """Stream `url` into `state` until the body is complete, retrying what is worth it.

    With a `guard` (the weights broker's), the session reads nothing from the environment (no
    `.netrc`, proxy variables or credentials; only a CA bundle variable is kept), uses only the
    guard's proxy, and every URL requested, the first and each redirect hop, is the one
    `guard.check` rebuilt.

    Raises:
        DownloadError: a refused request, a non-retryable status, an HTML page, a body past the
            cap, or the retries ran out.
        DiskError: writing the temp file failed (the caller names the path and the fix).
    """
    from ._progress import bytes_bar

    failures = 0
    attempts = 0
    with (
        new_session(guard) as session,
        bytes_bar(progress, os.path.basename(dst)) as pbar,
    ):
        while True:
            attempts += 1
            try:
                with foreign_errors(_failure(surl), (s.connect_timeout, s.read_timeout)):
                    _attempt(session, url, state, s, headers, pbar, dst, surl, guard)
                return
            except _Retryable as e:
                problem = e
            if state.written > state.high_water:
                state.high_water = state.written
                # Progress earns a fresh retry budget, but a trickle does not.
                if not problem.stalled:
                    failures = 0
            failures += 1
            if failures > s.retries or attempts >= _MAX_ATTEMPTS:
                raise DownloadError(
                    f"cannot download {surl}: {problem.reason} (gave up after {attempts} "
                    f"attempt{'s' if attempts != 1 else ''}; received {state.written} of "
                    f"{state.total if state.total is not None else 'an unknown number of'} bytes); "
                    f"{_advice(problem.reason)}",
                    url=surl,
                    attempts=attempts,
                )
            delay = problem.retry_after
            if delay is None:
                delay = min(s.backoff_max, s.backoff * 2 ** (failures - 1))
                delay *= 0.5 + random.random() / 2
            log.info("%s: %s; retrying in %.2f s", surl, problem.reason, delay)
            time.sleep(delay)


def _failure(surl: str) -> Callable[[str, bool], Exception]:
    """How a download reports a foreign error: a retry, or a `DownloadError` naming `surl`."""

    def fail(reason: str, retryable: bool) -> Exception:
        if retryable:
            return _Retryable(reason)
        return DownloadError(f"cannot download {surl}: {reason}", url=surl)

    return fail


def _attempt(
    session: requests.Session,
    url: str,
    state: DownloadState,
    s: TransferSettings,
    headers: dict[str, str],
    pbar: tqdm,
    dst: str,
    surl: str,
    guard: Guard | None = None,
) -> None:
    req_headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
    resuming = state.written > 0 and state.can_resume and state.validator is not None
    if state.written > 0 and not resuming:
        state.restart()
        pbar.reset(total=None)
    if resuming:
        req_headers["Range"] = f"bytes={state.written}-"
        req_headers["If-Range"] = state.validator or ""
    resp = _open(session, url, req_headers, s, surl, guard)
    with contextlib.closing(resp):
        status = resp.status_code
        if status == 416 and resuming:
            _finish_unsatisfiable_resume(resp, state)
            return
        if status == 206:
            if not resuming:
                raise DownloadError(
                    f"cannot download {surl}: the server sent a partial response (206) to a "
                    "request for the whole file; report it to the server's owner",
                    url=surl,
                )
            _check_resume(resp, state)
            log.info("%s: resuming at byte %d", surl, state.written)
        elif status == 200:
            if state.written > 0:
                # Range ignored, or If-Range saw a new version: start over, never join.
                log.info("%s: the server sent the whole file again; restarting", surl)
                state.restart()
                pbar.reset(total=None)
            _start_entity(resp, state, s, surl)
            if state.on_entity is not None:
                state.on_entity(state)
            pbar.reset(total=state.total)
        else:
            raise _status_problem(resp, s, surl)
        _stream_body(resp, state, s, pbar, dst, surl)


def _open(
    session: requests.Session,
    url: str,
    headers: dict[str, str],
    s: TransferSettings,
    surl: str,
    guard: Guard | None = None,
) -> requests.Response:
    """GET `url` for a download, following redirects by hand so that each hop is checked."""

    def fail(detail: str) -> DownloadError:
        return DownloadError(f"cannot download {surl}: {detail}", url=surl)

    return follow(
        session, url, headers, timeout=(s.connect_timeout, s.read_timeout), fail=fail, guard=guard
    )


def _start_entity(
    resp: requests.Response, state: DownloadState, s: TransferSettings, surl: str
) -> None:
    """Record what a 200 says about the file: its size and a validator for a later resume."""
    encoded = _content_encoding(resp) not in ("", "identity")
    length = _content_length(resp)
    state.total = None if encoded else length
    if state.total is not None and s.max_bytes is not None and state.total > s.max_bytes:
        raise DownloadError(
            f"cannot download {surl}: the file is {state.total} bytes, more than the "
            f"{s.max_bytes}-byte cap ({s.max_bytes_name}); raise the cap if it is expected",
            url=surl,
        )
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        state.validator = etag
    else:
        # If-Range needs a strong validator; Last-Modified is the other one.
        state.validator = resp.headers.get("Last-Modified")
    state.can_resume = state.validator is not None and not encoded


def _check_resume(resp: requests.Response, state: DownloadState) -> None:
    """A 206 must continue exactly where the temp file ends, for the same version of the file."""
    m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    etag = resp.headers.get("ETag")
    same_version = not (
        etag and state.validator and state.validator.startswith('"') and etag != state.validator
    )
    total = None if m is None or m.group(3) == "*" else int(m.group(3))
    if (
        m is None
        or int(m.group(1)) != state.written
        or (state.total is not None and total is not None and total != state.total)
        or not same_version
    ):
        got = resp.headers.get("Content-Range", "none")
        at = state.written
        state.restart()
        raise _Retryable(
            f"the server answered a resume at byte {at} with Content-Range {got!r}; "
            "restarting from byte 0"
        )


def _finish_unsatisfiable_resume(resp: requests.Response, state: DownloadState) -> None:
    m = _UNSATISFIED_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
    size = int(m.group(1)) if m else None
    if size is not None and size == state.written and state.total in (None, size):
        return
    announced = state.total
    got = state.written
    state.restart()
    if announced is not None and size is not None:
        raise _Retryable(f"the server announced {announced} bytes but has only {size}")
    raise _Retryable(f"the server refused to resume at byte {got} (416)")


def _stream_body(
    resp: requests.Response,
    state: DownloadState,
    s: TransferSettings,
    pbar: tqdm,
    dst: str,
    surl: str,
) -> None:
    raw = resp.raw
    content_type = resp.headers.get("Content-Type", "")
    head = bytearray()
    sniffing = state.written == 0
    window_start = time.monotonic()
    window_bytes = 0
    while True:
        chunk = raw.read1(READ_CHUNK, decode_content=True)
        if not chunk:
            break
        if sniffing:
            head += chunk[:64]
            if len(head) >= 64:
                sniffing = False
                _refuse_html(bytes(head), content_type, dst, surl)
        if s.max_bytes is not None and state.written + len(chunk) > s.max_bytes:
            # Checked before writing: not a byte past the cap reaches the disk.
            raise DownloadError(
                f"cannot download {surl}: the body exceeds the {s.max_bytes}-byte cap "
                f"({s.max_bytes_name}); raise the cap if it is expected",
                url=surl,
            )
        state.write(chunk)
        pbar.update(len(chunk))
        window_bytes += len(chunk)
        elapsed = time.monotonic() - window_start
        if elapsed >= s.read_timeout:
            if window_bytes < s.min_rate * elapsed:
                raise _Retryable(
                    f"download stalled: {window_bytes} bytes in the last {elapsed:.1f} s, below "
                    f"the minimum rate of {s.min_rate:g} bytes/s (ISOLHUB_HTTP_MIN_RATE)",
                    stalled=True,
                )
            window_start = time.monotonic()
            window_bytes = 0
    if sniffing:
        _refuse_html(bytes(head), content_type, dst, surl)
    length = _content_length(resp)
    received = raw.tell()
    if length is not None and received < length:
        raise _Retryable(f"incomplete body: expected {length} bytes, got {received}")
    if state.total is not None and state.written != state.total:
        raise _Retryable(f"incomplete body: expected {state.total} bytes, got {state.written}")


def _refuse_html(head: bytes, content_type: str, dst: str, surl: str) -> None:
    if dst.lower().endswith((".html", ".htm")):
        return
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    looks_html = text.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))
    if looks_html or ("html" in content_type.lower() and text.startswith(b"<")):
        raise DownloadError(
            f"cannot download {surl}: the server sent an HTML page (Content-Type "
            f"{content_type or 'unset'}) where a file was expected, not a checkpoint or archive; "
            "a login page or captive portal? Check the URL and the network",
            url=surl,
        )


def _status_problem(resp: requests.Response, s: TransferSettings, surl: str) -> Exception:
    code = resp.status_code
    what = f"HTTP {code} {resp.reason or ''}".strip()
    if code == 429 or 500 <= code <= 599:
        wait = retry_after(resp.headers.get("Retry-After"))
        if wait is not None and wait > s.retry_after_max:
            return DownloadError(
                f"cannot download {surl}: {what}; the server asks to retry after {wait:.0f} s, "
                f"longer than the {s.retry_after_max:g} s cap (ISOLHUB_HTTP_RETRY_AFTER_MAX); "
                "try again later",
                url=surl,
                status=code,
            )
        return _Retryable(what, retry_after=wait)
    if code in (404, 410):
        advice = "the file is not there; check the URL"
    elif code in (401, 403):
        advice = "access denied; check the URL and any credentials"
    elif code == 407:
        advice = (
            "the proxy requires authentication; put credentials in HTTPS_PROXY / HTTP_PROXY "
            "or bypass it with NO_PROXY"
        )
        what += " (from the proxy)"
    else:
        advice = "the server refused the request; check the URL"
    return DownloadError(f"cannot download {surl}: {what}; {advice}", url=surl, status=code)


def retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks to wait (delta-seconds or an HTTP date; a date in the
    past is 0); None when it is missing or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "").strip()
    return int(value) if value.isdigit() else None


def _content_encoding(resp: requests.Response) -> str:
    return resp.headers.get("Content-Encoding", "").strip().lower()


def _advice(reason: str) -> str:
    if "unreachable" in reason or "resolved" in reason or "connect timeout" in reason:
        return "check the URL and the network, or set ISOLHUB_OFFLINE=1 to use only cached files"
    if "stalled" in reason or "timeout" in reason:
        return "check the network, or raise ISOLHUB_HTTP_TIMEOUT / ISOLHUB_HTTP_RETRIES"
    return "try again later, or raise ISOLHUB_HTTP_RETRIES"
