"""Download a URL to a file as `torch.hub.download_url_to_file` does, hardened for bad networks.

What this adds to torch.hub's version, in the order a download meets it:

* a lock (`<hub>/.locks/download-*.lock`, filelock) so that processes downloading one target wait
  for each other instead of all fetching it; correctness never depends on it;
* a uniquely named temp file beside the target (`<dst>.<uuid>.<host>-<pid>.partial`, created with
  `O_EXCL|O_NOFOLLOW`), hashed while streaming, length-checked against `Content-Length`, fsynced
  and `os.replace`d: the target appears only complete and verified;
* retries with exponential backoff and jitter on connection errors, timeouts, stalls, 429 and 5xx
  (`Retry-After` honoured up to a cap), never on other 4xx; a cut body resumes with
  `Range` + `If-Range` and a checked `Content-Range`, or restarts from byte 0 (two versions of a
  file are never joined);
* a download interrupted by Ctrl-C or a kill keeps its temp file, with a record of its URL and
  validator (`<tmp stem>.meta.partial`); the next run adopts it and resumes with `Range` +
  `If-Range`, as huggingface_hub resumes its `.incomplete` files;
* redirects followed by hand: at most 10 hops, http(s) only, loops named, `Authorization` dropped
  when the host changes; an HTML page served with 200 is refused;
* offline mode (`ISOLHUB_OFFLINE=1`): an existing target is served, anything else is an
  `OfflineError`; under a sandbox a broker set with `set_fetch_broker` fetches instead.

This module holds what surrounds the transfer: the lock, the temp file and its sweeping, the hash
check, fsync and the atomic install, offline mode, the broker, and the copy of a local file
(`file://` URLs and broker answers). Talking HTTP (the session, retries and backoff, resume,
redirects, stall detection) is `_http`'s.

Tuning, read at call time (seconds unless stated):
`ISOLHUB_HTTP_CONNECT_TIMEOUT` (10), `ISOLHUB_HTTP_TIMEOUT` (read timeout and stall window, 30),
`ISOLHUB_HTTP_MIN_RATE` (bytes/s a window must average, 1024), `ISOLHUB_HTTP_RETRIES` (5),
`ISOLHUB_HTTP_BACKOFF` (first delay, 1), `ISOLHUB_HTTP_BACKOFF_MAX` (30),
`ISOLHUB_HTTP_RETRY_AFTER_MAX` (120), `ISOLHUB_HTTP_MAX_BYTES` (no cap), `ISOLHUB_LOCK_TIMEOUT`
(600; after it the download goes ahead unlocked).

Example (a file:// URL, so no network; http(s) URLs are fetched with the steps above):
    >>> import hashlib, os
    >>> from isolhub._weights.download import download_url_to_file
    >>> from pathlib import Path
    >>> _ = Path("w.bin").write_bytes(b"weights")
    >>> prefix = hashlib.sha256(b"weights").hexdigest()[:8]
    >>> download_url_to_file(f"file://{os.path.abspath('w.bin')}", "copy.bin", hash_prefix=prefix)
    >>> Path("copy.bin").read_bytes()
    b'weights'
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .._cache.store import host_tag, hub_dir, pid_alive
from .._cache.verified import remember
from .._config import is_offline
from .._errors import CacheError, DownloadError, HashMismatchError, IsolhubError, OfflineError
from .._http import (
    READ_CHUNK,
    DiskError,
    DownloadState,
    TransferSettings,
    fetch,
    safe_url,
    write_all,
)

if TYPE_CHECKING:
    from .broker import BrokerGuard

__all__ = [
    "download_url_to_file",
    "fetch_broker",
    "hash_matches",
    "partial_is_live",
    "set_fetch_broker",
    "sha256_file",
]

log = logging.getLogger("isolhub.download")

_STALE_PARTIAL_S = 24 * 3600
_PARTIAL_RE = re.compile(
    r"^(?P<name>.+)\.[0-9a-f]{32}(?:\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+))?(?P<meta>\.meta)?"
    r"\.partial$"
)
_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)

FetchBroker = Callable[[str, "str | None"], str]
_broker: FetchBroker | None = None


def set_fetch_broker(fn: FetchBroker | None) -> None:
    """Route every download of this process through `fn(url, hash_prefix) -> local path`.

    Used inside a sandboxed worker, which has no network: the parent fetches (and hash-checks) the
    file and hands back a read-only path, which `download_url_to_file` copies from and
    `load_state_dict_from_url` loads from. `None` restores direct downloads.

    Example (a broker that serves every URL from one local file, as a parent would):
        >>> from pathlib import Path
        >>> _ = Path("served.bin").write_bytes(b"from the parent")
        >>> set_fetch_broker(lambda url, hash_prefix: os.path.abspath("served.bin"))
        >>> download_url_to_file("https://example.invalid/w.bin", "w.bin", progress=False)
        >>> Path("w.bin").read_bytes()
        b'from the parent'
        >>> set_fetch_broker(None)
    """
    global _broker
    _broker = fn


def fetch_broker() -> FetchBroker | None:
    """The broker set by `set_fetch_broker`, or None."""
    return _broker


def download_url_to_file(
    url: str,
    dst: str,
    hash_prefix: str | None = None,
    progress: bool = True,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Download `url` to `dst`, which appears only once complete and verified (torch.hub's API).

    Args:
        url: an http(s) or file URL.
        dst: the target path (`~` is expanded); an existing file is replaced only on success.
        hash_prefix: if given, the SHA-256 hex digest of the file must start with it.
        progress: show a progress bar on stderr.
        headers: extra request headers (e.g. `Authorization`; never sent to another host).

    Example:
        >>> import os
        >>> from pathlib import Path
        >>> from isolhub import download_url_to_file
        >>> _ = Path("w.bin").write_bytes(b"weights")
        >>> url = f"file://{os.path.abspath('w.bin')}"
        >>> download_url_to_file(url, "copy.bin", hash_prefix="00000000", progress=False)
        Traceback (most recent call last):
        isolhub.HashMismatchError: ...
        >>> os.path.exists("copy.bin")      # nothing is left at `dst`
        False

    Raises:
        HashMismatchError: the bytes do not match `hash_prefix` (a RuntimeError, as in torch).
        DownloadError: the server or the network failed after the allowed retries, the body was
            HTML or incomplete, or `dst` could not be written.
        CacheError: `dst` is inside the hub dir and that is not writable or full.
        OfflineError: offline mode is on and `dst` does not exist yet.
    """
    dst = os.path.expanduser(os.fspath(dst))
    broker = _broker
    if broker is not None:
        src = broker(url, hash_prefix)
        _install_local(src, dst, hash_prefix, progress, url)
        return
    download(url, dst, hash_prefix, progress, headers=headers)


# -- the download ------------------------------------------------------------------------------


def download(
    url: str,
    dst: str,
    hash_prefix: str | None,
    progress: bool,
    *,
    headers: Mapping[str, str] | None = None,
    guard: BrokerGuard | None = None,
) -> None:
    """Fetch `url` into `dst` (see `download_url_to_file`); the shared core of both entry points.

    `guard` is the weights broker's: its URL checks for every hop, its proxy, its size cap.
    """
    surl = safe_url(url)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        from urllib.request import url2pathname

        _install_local(url2pathname(unquote(urlsplit(url).path)), dst, hash_prefix, progress, url)
        return
    if scheme not in ("http", "https"):
        raise DownloadError(
            f"cannot download {surl}: unsupported URL scheme {scheme!r}; use an http(s) URL",
            url=surl,
        )
    if os.path.isdir(dst):
        raise DownloadError(
            f"cannot download {surl}: the destination {dst} is a directory; pass a file path",
            url=surl,
        )
    if is_offline():
        if os.path.isfile(dst) and hash_matches(dst, hash_prefix):
            return
        raise OfflineError(
            f"offline (ISOLHUB_OFFLINE is set) and {surl} is not cached at {dst}; "
            "unset ISOLHUB_OFFLINE to download it",
            url=surl,
        )
    settings = TransferSettings.from_env()
    cap = guard.max_bytes if guard is not None else None
    if cap is not None and (settings.max_bytes is None or cap < settings.max_bytes):
        settings = dataclasses.replace(
            settings, max_bytes=cap, max_bytes_name="the sandbox's max_download_bytes"
        )
    before = _identity(dst)
    with _download_lock(dst, settings.lock_timeout):
        now = _identity(dst)
        # Another process installed the target while this one waited for the lock.
        if now is not None and now != before and hash_matches(dst, hash_prefix):
            return
        adopted = _adopt_partial(dst, url)
        _sweep_partials(dst)
        if adopted is not None:
            tmp, fd, resume = adopted
        else:
            (tmp, fd), resume = _create_temp(dst, surl), None
        meta = _meta_path(tmp)
        _ACTIVE.add(tmp)
        keep = False
        state: DownloadState | None = None
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                state = DownloadState(f, hashing=True)
                if resume is not None:
                    _resume_state(state, resume, surl)
                state.on_entity = lambda st: _write_meta(meta, url, st)
                try:
                    fetch(url, state, settings, dict(headers or {}), progress, dst, surl, guard)
                except DiskError as e:
                    raise _local_error(e.error, dst, surl, need=state.total) from e
                try:
                    os.fsync(f.fileno())
                except OSError as e:
                    raise _local_error(e, tmp, surl, need=state.total) from e
                ino = os.fstat(f.fileno()).st_ino
            digest = state.hasher.hexdigest()
            if hash_prefix is not None:
                _check_hash(digest, hash_prefix, surl, dst)
            try:
                os.replace(tmp, dst)
            except OSError as e:
                raise _local_error(e, dst, surl) from e
            _fsync_dir(os.path.dirname(os.path.abspath(dst)))
            _remember_install(dst, ino, digest)
        except (KeyboardInterrupt, SystemExit):
            # Interrupted: keep what arrived, with its validator, for the next run to resume.
            keep = (
                state is not None
                and state.can_resume
                and state.validator is not None
                and state.written > 0
            )
            if keep and state is not None:
                log.info("kept %s (%d bytes) to resume %s", tmp, state.written, surl)
            raise
        finally:
            _ACTIVE.discard(tmp)
            for path in () if keep else (tmp, meta):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


# -- resuming across runs ----------------------------------------------------------------------

# Temp files this process is writing now (a leftover of this pid is otherwise dead).
_ACTIVE: set[str] = set()


def _meta_path(tmp: str) -> str:
    """The resume record beside the temp file `<x>.partial`: `<x>.meta.partial`."""
    return tmp.removesuffix(".partial") + ".meta.partial"


def _url_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _write_meta(meta: str, url: str, state: DownloadState) -> None:
    """Record which version of which URL the temp file holds (called on each 200)."""
    if not state.can_resume:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meta)
        return
    record = {"url": _url_key(url), "validator": state.validator, "total": state.total}
    part = f"{meta}.{uuid.uuid4().hex}.tmp"
    try:
        with open(part, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(part, meta)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(part)


def _adopt_partial(dst: str, url: str) -> tuple[str, int, dict[str, object]] | None:
    """Take over the largest resumable temp file of `dst` left by a dead download of `url`.

    It is renamed to a temp name of this process first, so no one else adopts it too.
    """
    parent = os.path.dirname(os.path.abspath(dst))
    base = os.path.basename(dst)
    try:
        names = os.listdir(parent)
    except OSError:
        return None
    found: list[tuple[int, str, dict[str, object]]] = []
    for name in names:
        m = _PARTIAL_RE.match(name)
        if m is None or m.group("name") != base or m.group("meta"):
            continue
        path = os.path.join(parent, name)
        if partial_is_live(path):
            continue
        try:
            with open(_meta_path(path), encoding="utf-8") as f:
                record = json.load(f)
            size = os.lstat(path).st_size
        except (OSError, ValueError):
            continue
        if (
            isinstance(record, dict)
            and record.get("url") == _url_key(url)
            and isinstance(record.get("validator"), str)
            and size > 0
        ):
            found.append((size, path, record))
    for _size, path, record in sorted(found, reverse=True):
        tag = f"{host_tag()}-{os.getpid()}"
        tmp = f"{dst}.{uuid.uuid4().hex}.{tag}.partial"
        try:
            os.rename(path, tmp)
        except OSError:
            continue  # another process took it
        with contextlib.suppress(OSError):
            os.rename(_meta_path(path), _meta_path(tmp))
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            continue
        _ACTIVE.add(tmp)  # before the sweep that follows, which would take it for a leftover
        return tmp, fd, record
    return None


def _resume_state(state: DownloadState, record: dict[str, object], surl: str) -> None:
    """Continue `state` from the adopted temp file: its bytes, hash and validator."""
    fd = state.f.fileno()
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, READ_CHUNK * 8, offset):
        h.update(chunk)
        offset += len(chunk)
    total = record.get("total")
    state.f.seek(offset)
    state.written = state.high_water = offset
    state.total = total if isinstance(total, int) else None
    state.validator = str(record["validator"])
    state.can_resume = True
    state.hasher = h
    log.info("%s: resuming an interrupted download at byte %d", surl, offset)


# -- local files -------------------------------------------------------------------------------


def _install_local(src: str, dst: str, hash_prefix: str | None, progress: bool, url: str) -> None:
    """Copy a local file (a broker's answer or a file:// URL) to `dst` the same careful way."""
    from .._progress import bytes_bar

    surl = safe_url(url)
    if os.path.abspath(src) == os.path.abspath(dst):
        if not hash_matches(dst, hash_prefix):
            digest = sha256_file(dst)
            _check_hash(digest, hash_prefix or "", surl, dst)
        return
    try:
        fin = open(src, "rb")  # noqa: SIM115
    except OSError as e:
        raise DownloadError(
            f"cannot download {surl}: cannot read {src} ({e.strerror}); check the path",
            url=surl,
        ) from e
    tmp, fd = _create_temp(dst, surl)
    try:
        with fin, os.fdopen(fd, "wb", buffering=0) as fout:
            size = os.fstat(fin.fileno()).st_size
            hasher = hashlib.sha256()
            with bytes_bar(progress, os.path.basename(dst)) as pbar:
                pbar.reset(total=size)
                while chunk := fin.read(READ_CHUNK):
                    try:
                        write_all(fout, chunk)
                    except OSError as e:
                        raise _local_error(e, tmp, surl, need=size) from e
                    hasher.update(chunk)
                    pbar.update(len(chunk))
            try:
                os.fsync(fout.fileno())
            except OSError as e:
                raise _local_error(e, tmp, surl, need=size) from e
            ino = os.fstat(fout.fileno()).st_ino
        if hash_prefix is not None:
            _check_hash(hasher.hexdigest(), hash_prefix, surl, dst)
        try:
            os.replace(tmp, dst)
        except OSError as e:
            raise _local_error(e, dst, surl) from e
        _remember_install(dst, ino, hasher.hexdigest())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _remember_install(dst: str, ino: int, digest: str) -> None:
    """Record the digest of what was just installed at `dst`, if `dst` is still that file."""
    try:
        st = os.stat(dst)
    except OSError:
        return
    if st.st_ino == ino:
        remember(dst, st, sha256=digest, downloaded=True)


def _check_hash(digest: str, hash_prefix: str, surl: str, dst: str) -> None:
    if not digest.startswith(hash_prefix.lower()):
        raise HashMismatchError(
            f'invalid hash value (expected "{hash_prefix}", got "{digest}") for {surl}; '
            f"{dst} was left as it was. The server sent different bytes than expected: check "
            "the URL and the expected hash, or try again",
            url=surl,
            expected=hash_prefix,
            actual=digest,
        )


def hash_matches(path: str, hash_prefix: str | None) -> bool:
    if hash_prefix is None:
        return True
    try:
        return sha256_file(path).startswith(hash_prefix.lower())
    except OSError:
        return False


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _create_temp(dst: str, surl: str) -> tuple[str, int]:
    """Create `<dst>.<uuid>.<host>-<pid>.partial` exclusively, never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    tag = f"{host_tag()}-{os.getpid()}"
    for _ in range(tempfile.TMP_MAX):
        tmp = f"{dst}.{uuid.uuid4().hex}.{tag}.partial"
        try:
            # 0o666 minus the umask: the permissions a normally created file gets.
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise _local_error(e, tmp, surl) from e
    raise DownloadError(
        f"cannot download {surl}: no usable temporary file name beside {dst}", url=surl
    )


def partial_is_live(path: str) -> bool:
    """Whether the temp file `path` may still be written by a running download (not a leftover)."""
    m = _PARTIAL_RE.match(os.path.basename(path))
    try:
        age = time.time() - os.lstat(path).st_mtime
    except OSError:
        return False
    if m is None or age > _STALE_PARTIAL_S:
        return False
    if m.group("pid") is None:
        # torch.hub's own temp files carry no pid: only their age tells.
        return age < 3600
    if m.group("host") != host_tag():
        return True
    if int(m.group("pid")) == os.getpid():
        data = path.removesuffix(".meta.partial") + ".partial" if m.group("meta") else path
        return data in _ACTIVE
    return pid_alive(int(m.group("pid")))


def _sweep_partials(dst: str) -> None:
    """Remove temp files of `dst` left by dead downloads (by pid on this host, or by age)."""
    parent = os.path.dirname(os.path.abspath(dst))
    base = os.path.basename(dst)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = _PARTIAL_RE.match(name)
        if m is None or m.group("name") != base:
            continue
        path = os.path.join(parent, name)
        if not partial_is_live(path):
            with contextlib.suppress(OSError):
                os.unlink(path)
                log.info("removed %s, left by an interrupted download", path)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _within_hub(path: str) -> bool:
    try:
        hub = os.path.realpath(hub_dir())
        where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        return os.path.commonpath([hub, where]) == hub
    except (OSError, ValueError):
        return False


def _local_error(e: OSError, path: str, surl: str, *, need: int | None = None) -> IsolhubError:
    """A typed error for a failure to write `path`, saying what to do about it."""
    where = os.path.dirname(os.path.abspath(path))
    in_hub = _within_hub(path)
    if e.errno in _DISK_FULL:
        free: int | str = "unknown"
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(where).free
        needed = f"{need} bytes" if need is not None else "an unknown number of bytes"
        message = (
            f"cannot download {surl}: no space left writing {path} ({e.strerror}); "
            f"needed {needed}, {free} bytes free in {where}; free some space or "
            + ("set ISOLHUB_HOME to a larger disk" if in_hub else "choose another destination")
        )
        return (CacheError if in_hub else DownloadError)(message, url=surl, path=path)
    if e.errno in _NOT_WRITABLE:
        if in_hub:
            return CacheError(
                f"cache not writable: {where} ({e.strerror}) while downloading {surl}; "
                "set ISOLHUB_HOME or call set_dir() to use a writable cache",
                url=surl,
                path=path,
            )
        return DownloadError(
            f"cannot download {surl}: {where} is not writable ({e.strerror}); choose another "
            "destination",
            url=surl,
            path=path,
        )
    if e.errno == errno.ENOENT:
        return DownloadError(
            f"cannot download {surl}: the folder {where} does not exist; create it first",
            url=surl,
            path=path,
        )
    return DownloadError(f"cannot download {surl}: cannot write {path}: {e}", url=surl, path=path)


def _lock_path(dst: str) -> str:
    absolute = os.path.abspath(dst)
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    digest = hashlib.sha256(real.encode()).hexdigest()[:24]
    return os.path.join(hub_dir(), ".locks", f"download-{digest}.lock")


def _download_lock(dst: str, timeout: float) -> contextlib.AbstractContextManager[None]:
    """Hold the download lock of `dst` if possible; it only avoids duplicate downloads."""
    from .._locks import held

    return held(_lock_path(dst), timeout, log=log)
