"""Safe tar extraction: every member is checked before anything is written, then written by hand.

Python 3.11.7's tarfile `data` filter has known bypasses (CVE-2025-4517 and others), so it is not
used: names, links and sizes of the whole archive are validated lexically first, then the tree is
written through directory file descriptors with `O_NOFOLLOW`, so nothing can land outside `dest`.

Example (a tarball as GitHub serves it, one top-level directory):
    >>> import io, tarfile
    >>> info = tarfile.TarInfo("owner-repo-3f2a1b0/hubconf.py")
    >>> info.size = len(b"dependencies = []\\n")
    >>> with tarfile.open("repo.tar.gz", "w:gz") as tf:
    ...     tf.addfile(info, io.BytesIO(b"dependencies = []\\n"))
    >>> Path("staging").mkdir()
    >>> extract_tar(Path("repo.tar.gz"), Path("staging"), strip_top_dir=True)
    >>> [p.name for p in Path("staging").iterdir()]
    ['hubconf.py']
"""

from __future__ import annotations

import lzma
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from .._errors import ArchiveError

__all__ = ["extract_tar"]

_DRIVE = re.compile(r"^[A-Za-z]:")
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OLD_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Path_ = tuple[str, ...]
# (member, path under dest, symlink target text | hard link source path | None)
_Plan = list[tuple[tarfile.TarInfo, Path_, "str | Path_ | None"]]


def extract_tar(
    archive: Path,
    dest: Path,
    *,
    expected_commit: str | None = None,
    strip_top_dir: bool = False,
    max_bytes: int = 2 * 1024**3,
    max_members: int = 100_000,
) -> None:
    """Extract the tar (plain or compressed) `archive` into the existing, empty directory `dest`.

    Accepted: directories, regular files (mode 0o644, or 0o755 if any exec bit is set), relative
    symlinks that stay in the tree (written in normal form), hard links to earlier regular files
    (written as copies). With `strip_top_dir`, all members must share one top-level directory,
    which is dropped (GitHub tarballs hold `owner-repo-<sha7>/...`). With `expected_commit`, the
    commit id `git archive` embeds (the pax global header `comment`) must equal it.

    Example (a member that would land outside `dest`):
        >>> import io, tarfile
        >>> with tarfile.open("x.tar", "w") as tf:
        ...     tf.addfile(tarfile.TarInfo("../evil.py"), io.BytesIO())
        >>> Path("staging").mkdir()
        >>> extract_tar(Path("x.tar"), Path("staging"))
        Traceback (most recent call last):
        isolhub.ArchiveError: refusing archive member '../evil.py': name contains a '..' component

    Raises:
        ArchiveError: the archive is unreadable, hostile, over a cap or for another commit (the
            message names the member and the reason); all checks run before anything is written.
        OSError: writing into `dest` failed (disk full, read-only, ...).
    """
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 (closed by the `with` below)
    except _READ_ERRORS as e:
        raise ArchiveError(f"{archive} is not a readable tar archive: {e}") from e
    with tf:
        try:
            plan = _check(tf, strip_top_dir, max_bytes, max_members)
        except _READ_ERRORS as e:
            raise ArchiveError(f"{archive} is not a valid tar archive: {e}") from e
        found = tf.pax_headers.get("comment")
        if expected_commit is not None and found != expected_commit:
            raise ArchiveError(
                f"archive {archive} is for commit {found or '(none recorded)'}, "
                f"expected {expected_commit}"
            )
        _write(tf, plan, dest, max_bytes)


def _reject(member: str, reason: str) -> ArchiveError:
    return ArchiveError(f"refusing archive member {member!r}: {reason}")


def _parts(name: str, what: str, member: str, *, dotdot: bool = False) -> list[str]:
    """Components of a relative `name` (empty and `.` ones dropped); refuses anything else."""
    if not name or "\x00" in name:
        raise _reject(member, f"{what} is empty or contains NUL")
    if name.startswith("/") or _DRIVE.match(name):
        raise _reject(member, f"{what} {name!r} is absolute")
    if "\\" in name:
        raise _reject(member, f"{what} contains a backslash")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not dotdot and ".." in parts:
        raise _reject(member, f"{what} contains a '..' component")
    return parts


def _check(tf: tarfile.TarFile, strip: bool, max_bytes: int, max_members: int) -> _Plan:
    plan: _Plan = []
    top: str | None = None
    seen: dict[str, Path_] = {}  # casefolded path -> path, for members and their parents
    members: set[Path_] = set()
    parents: set[Path_] = set()
    non_dirs: dict[Path_, str] = {}
    files: dict[Path_, int] = {}  # regular file -> declared size
    count = total = 0
    while (m := tf.next()) is not None:
        count += 1
        if count > max_members:
            raise _reject(m.name, f"the archive has more than {max_members} members")
        rel = tuple(_parts(m.name, "name", m.name))
        if strip:
            if not rel:
                raise _reject(m.name, "not inside a top-level directory")
            top = top or rel[0]
            if rel[0] != top:
                raise _reject(m.name, f"a second top-level directory (the first is {top!r})")
            rel = rel[1:]
        if not rel:
            if m.isdir():
                continue
            raise _reject(m.name, "the top-level entry is not a directory")
        for i in range(1, len(rel) + 1):
            pre, key = rel[:i], "/".join(rel[:i]).casefold()
            if seen.setdefault(key, pre) != pre:
                raise _reject(m.name, f"differs only in case from {'/'.join(seen[key])!r}")
            if i < len(rel) and pre in non_dirs:
                raise _reject(m.name, f"path goes through the {non_dirs[pre]} {'/'.join(pre)!r}")
            if i < len(rel):
                parents.add(pre)
        if rel in members:
            raise _reject(m.name, "duplicate name")
        members.add(rel)
        target: str | Path_ | None = None
        if m.isreg():
            files[rel] = m.size
            total += m.size
        elif m.issym():
            target = _symlink_target(m, rel)
        elif m.islnk():
            src = tuple(_parts(m.linkname, "hard link target", m.name))
            if strip:
                src = src[1:] if src[:1] == (top,) else ("",)
            if src not in files:
                raise _reject(m.name, f"hard link target {m.linkname!r} is not an earlier file")
            target = src
            total += files[src]
        elif not m.isdir():
            raise _reject(m.name, "not a file, directory or link (a device, fifo or other)")
        if not m.isdir():
            if rel in parents:
                raise _reject(m.name, "an earlier member uses this path as a directory")
            non_dirs[rel] = "symlink" if m.issym() else "file"
        if total > max_bytes:
            raise _reject(m.name, f"the archive declares more than {max_bytes} bytes")
        plan.append((m, rel, target))
    return plan


def _symlink_target(m: tarfile.TarInfo, rel: Path_) -> str:
    """The link's target resolved lexically from its own directory, as `../`* then names.

    Writing this normal form means the kernel never walks `..` out of a directory it reached
    through another symlink (the `a -> .`, `b -> a/..` chain that fools a lexical check).
    """
    here = list(rel[:-1])
    resolved = list(here)
    for p in _parts(m.linkname, "symlink target", m.name, dotdot=True):
        if p != "..":
            resolved.append(p)
        elif resolved:
            resolved.pop()
        else:
            raise _reject(m.name, f"symlink target {m.linkname!r} leaves the tree")
    common = 0
    while common < min(len(here), len(resolved)) and here[common] == resolved[common]:
        common += 1
    return "/".join([".."] * (len(here) - common) + resolved[common:]) or "."


def _open_dir(root: int, parts: Path_) -> int:
    """An fd for `parts` under `root`, making missing directories; never follows a symlink."""
    fd = root
    for name in parts:
        try:
            os.mkdir(name, 0o755, dir_fd=fd)
            made = True
        except FileExistsError:
            made = False
        child = os.open(name, _DIR, dir_fd=fd)
        if fd != root:
            os.close(fd)
        fd = child
        if made:
            os.fchmod(fd, 0o755)
    return fd


def _write(tf: tarfile.TarFile, plan: _Plan, dest: Path, max_bytes: int) -> None:
    root = os.open(dest, _DIR)
    cur: tuple[Path_, int] = ((), root)  # the directory last written to, kept open
    written = 0
    try:
        for m, rel, target in plan:
            where = rel if m.isdir() else rel[:-1]
            if cur[0] != where:
                if cur[1] != root:
                    os.close(cur[1])
                cur = ((), root)
                cur = (where, _open_dir(root, where))
            if m.isdir():
                continue
            if isinstance(target, str):
                os.symlink(target, rel[-1], dir_fd=cur[1])
                continue
            if isinstance(target, tuple):
                src_dir = _open_dir(root, target[:-1])
                try:
                    src_fd = os.open(target[-1], _OLD_FILE, dir_fd=src_dir)
                finally:
                    if src_dir != root:
                        os.close(src_dir)
                exec_bits = os.fstat(src_fd).st_mode & 0o111
                src: BinaryIO = os.fdopen(src_fd, "rb")
            else:
                exec_bits = m.mode & 0o111
                src = tf.extractfile(m)  # type: ignore[assignment]
            mode = 0o755 if exec_bits else 0o644
            with src, os.fdopen(os.open(rel[-1], _NEW_FILE, mode, dir_fd=cur[1]), "wb") as out:
                os.fchmod(out.fileno(), mode)
                while True:
                    try:
                        chunk = src.read(1 << 20)
                    except _READ_ERRORS as e:
                        raise _reject(m.name, f"its data could not be read: {e}") from e
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > max_bytes:
                        raise _reject(m.name, f"the archive holds more than {max_bytes} bytes")
                    out.write(chunk)
    finally:
        if cur[1] != root:
            os.close(cur[1])
        os.close(root)
