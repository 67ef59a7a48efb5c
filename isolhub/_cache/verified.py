"""What isolhub knows about a file it has hashed: its identity and SHA-256, kept in a small record.

Hashing a multi-gigabyte checkpoint on every load is too slow, and never hashing it lets a changed
file through. A record `<hub>/.verified/<key>.json` (the key is a hash of the file's real path)
keeps the file's size, mtime_ns, ctime_ns, inode and device with its digest, whether isolhub
downloaded it (then the digest is what the server sent), and whether its zip members passed their
CRC check. While the identity matches, the record is believed without reading the file; when it
does not, the file is read again. Records are written atomically and best effort: a read-only hub
only costs the re-hash. Who can write the hub dir can forge a record; that is the same person who
can write the checkpoint itself (see docs/security.md).

Example (a file isolhub did not download):
    >>> from pathlib import Path
    >>> _ = Path("w.pt").write_bytes(b"x")
    >>> fd = os.open("w.pt", os.O_RDONLY)
    >>> fd_digest(fd, os.path.abspath("w.pt"))
    ('2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881', False)
    >>> os.close(fd)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, replace

from .._config import get_dir

__all__ = ["Record", "fd_digest", "record_file", "recorded", "remember", "sha256_fd", "update"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Record:
    """One file's identity and what was verified about it."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    sha256: str | None = None
    downloaded: bool = False  # `sha256` is what isolhub received from the URL
    zip_ok: bool | None = None  # the zip members' CRCs were checked (None: not a zip / not yet)

    def same_file(self, st: os.stat_result) -> bool:
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino, self.dev) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            st.st_dev,
        )


def record_file(path: str) -> str:
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:40]
    return os.path.join(get_dir(), ".verified", f"{key}.json")


def recorded(path: str) -> Record | None:
    """The record of `path`, whatever the file's identity is now; None if none or unreadable."""
    try:
        with open(record_file(path), encoding="utf-8") as f:
            data = json.load(f)
        rec = Record(**data)
    except (OSError, ValueError, TypeError):
        return None
    return rec if rec.path == os.path.realpath(path) else None


def remember(
    path: str,
    st: os.stat_result,
    *,
    sha256: str | None,
    downloaded: bool = False,
    zip_ok: bool | None = None,
) -> Record:
    """Record what is known about `path` as it is now (`st`); best effort."""
    ident = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    return _write(Record(os.path.realpath(path), *ident, sha256, downloaded, zip_ok))


def update(rec: Record, **changes: object) -> Record:
    """`rec` with more verified facts (`changes`), written back; best effort."""
    return _write(replace(rec, **changes))  # type: ignore[arg-type]


def _write(rec: Record) -> Record:
    target = record_file(rec.path)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(rec), f)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return rec


def sha256_fd(fd: int) -> str:
    """The SHA-256 of the whole file open at `fd` (read with pread: the offset is untouched)."""
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def fd_digest(fd: int, path: str) -> tuple[str, bool]:
    """The SHA-256 of the file open at `fd` (known as `path`), and whether isolhub downloaded it.

    Cheap when the record matches the file's identity; otherwise the file is hashed, and it
    counts as downloaded only if its bytes are still those that were downloaded.
    """
    st = os.fstat(fd)
    rec = recorded(path)
    if rec is not None and rec.same_file(st) and rec.sha256 is not None:
        return rec.sha256, rec.downloaded
    digest = sha256_fd(fd)
    downloaded = rec is not None and rec.downloaded and rec.sha256 == digest
    remember(path, os.fstat(fd), sha256=digest, downloaded=downloaded)
    return digest, downloaded
