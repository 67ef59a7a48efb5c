"""The on-disk store: immutable snapshots keyed by commit, moving refs, locks.

Layout under `get_dir()`:

    repos/<repo-key>/origin              the spec location, for `isolhub cache ls`
    repos/<repo-key>/refs/<ref>          a text file holding the commit SHA the ref last resolved to
    repos/<repo-key>/snapshots/<sha>/    the repository tree at that commit; never changes once there
    repos/<repo-key>/manifests/<sha>.json  what that tree held at install (`_cache.manifest`)
    checkpoints/<file>                   weights (torch.hub's layout, shared with it)
    trusted_list                         torch.hub's trust file
    <owner>_<name>_<ref> -> repos/github--<owner>--<name>/snapshots/<sha>
                                         torch.hub's folder name for a GitHub ref, as a link
    .locks/<name>.lock                   filelocks (only avoid duplicate work)

`get_dir()` is torch.hub's hub dir (see `_config`). torch.hub never touches `repos/` or `.locks/`:
its own names are `<owner>_<name>_<ref>`, `<owner>-<name>-<sha7>` (while extracting) and
`<ref>.zip`, besides `checkpoints/` and `trusted_list`.

A snapshot is written into a uniquely named staging folder beside its final place and renamed in,
so a reader sees either nothing or the whole tree; correctness never depends on the lock, because
`flock` succeeds for everyone on some network filesystems. Its manifest is written just before
the rename, so every snapshot installed by this version has one.

Example:
    >>> from isolhub._spec import parse_spec
    >>> spec, sha = parse_spec("git+file:///srv/net.git@v1"), "3f2a" * 10
    >>> path = install_snapshot(spec, sha, lambda staging: (staging / "hubconf.py").touch())
    >>> path == snapshot_path(spec, sha), path.relative_to(hub_dir()).parts[-2:]
    (True, ('snapshots', '3f2a3f2a3f2a3f2a3f2a3f2a3f2a3f2a3f2a3f2a'))
    >>> [p.name for p in path.iterdir()]
    ['hubconf.py']
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from .._config import get_dir
from .._errors import CacheError
from .._locks import held
from .._spec import RepoSpec
from . import manifest as _manifest

__all__ = [
    "STAGING_PREFIX",
    "TEMP_PREFIX",
    "dead_temp_dirs",
    "host_tag",
    "hub_dir",
    "install_snapshot",
    "link_torch_folder",
    "lock",
    "make_read_only",
    "manifest_path",
    "pid_alive",
    "read_ref",
    "remove_tree",
    "repo_dir",
    "repo_key",
    "snapshot_damage",
    "snapshot_path",
    "sweep_staging",
    "sweep_temp_dirs",
    "sweep_torch_links",
    "temp_dir",
    "torch_folder",
    "write_ref",
    "write_text_atomic",
]

STAGING_PREFIX = ".staging-"
_STALE_STAGING_S = 3600
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def hub_dir(*, create: bool = False) -> Path:
    """The hub dir as a Path; with `create`, made if missing (a clear error if it cannot be)."""
    root = Path(get_dir())
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(
                f"cache not writable: {root} ({e.strerror}); set ISOLHUB_HOME or call set_dir()"
            ) from e
    return root


def repo_key(spec: RepoSpec) -> str:
    """A filesystem-safe, collision-free folder name for the repository of `spec`."""
    if spec.kind == "github":
        owner, name = spec.location.split("/")
        return f"github--{owner}--{name}"
    digest = hashlib.sha256(spec.location.encode()).hexdigest()[:12]
    return f"{spec.kind}--{_SAFE.sub('_', spec.name)[:40]}--{digest}"


def repo_dir(spec: RepoSpec) -> Path:
    """`<hub>/repos/<repo-key>` for `spec`'s repository."""
    return hub_dir() / "repos" / repo_key(spec)


def snapshot_path(spec: RepoSpec, sha: str) -> Path:
    """Where the snapshot of `spec`'s repository at commit `sha` lives (it may not exist yet)."""
    return repo_dir(spec) / "snapshots" / sha


def manifest_path(snapshot: Path) -> Path:
    """Where the manifest of the snapshot folder `snapshot` is kept (outside the tree itself)."""
    return snapshot.parent.parent / "manifests" / f"{snapshot.name}.json"


def snapshot_damage(snapshot: Path) -> _manifest.Damage | None:
    """The first damage a cheap check finds in an installed snapshot, or None when it is intact.

    A snapshot without a manifest (installed by an older isolhub) is `what="unverified"`.
    """
    where = manifest_path(snapshot)
    try:
        manifest = _manifest.load(where)
    except ValueError as e:
        return _manifest.Damage(str(where), "changed", str(e))
    if manifest is None:
        return _manifest.Damage(
            ".", "unverified", "no manifest (installed by an older isolhub): it cannot be checked"
        )
    found = _manifest.quick_check(snapshot, manifest)
    return found[0] if found else None


def _ref_file(spec: RepoSpec, ref: str) -> Path:
    # quote() keeps refs with '/' in one file and keeps 'a/b' and 'a_b' apart.
    return repo_dir(spec) / "refs" / quote(ref, safe="")


def read_ref(spec: RepoSpec, ref: str) -> str | None:
    """The SHA `ref` last resolved to, from the cache; None when unknown."""
    try:
        sha = _ref_file(spec, ref).read_text().strip()
    except OSError:
        return None
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else None


def write_ref(spec: RepoSpec, ref: str, sha: str) -> None:
    """Record that `ref` resolved to `sha` (atomically; best effort on a read-only cache)."""
    path = _ref_file(spec, ref)
    if read_ref(spec, ref) == sha:
        return
    with contextlib.suppress(OSError):
        write_text_atomic(path, sha + "\n")
        origin = repo_dir(spec) / "origin"
        if not origin.exists():
            write_text_atomic(origin, spec.location + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a unique temp file and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def lock(name: str, timeout: float = 600) -> Iterator[None]:
    """Hold the cross-process lock `<hub>/.locks/<name>.lock`; it only avoids duplicate work.

    Where it cannot be had the body still runs, unlocked (`_locks.held`'s policy).
    """
    with held(hub_dir() / ".locks" / f"{_SAFE.sub('_', name)}.lock", timeout):
        yield


def install_snapshot(
    spec: RepoSpec, sha: str, populate: Callable[[Path], None], *, force: bool = False
) -> Path:
    """Make `snapshots/<sha>` exist, filling a fresh staging folder with `populate(staging)`.

    `populate` must write the whole tree into the (empty, existing) folder it is given or raise;
    on any failure the staging folder is removed and nothing changes. With `force`, an existing
    snapshot is replaced by a freshly populated one. The manifest of the tree is recorded first.

    Raises:
        CacheError: the cache is not writable.
    """
    final = snapshot_path(spec, sha)
    if final.is_dir() and not force:
        return final
    parent = final.parent
    hub_dir(create=True)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(
            f"cache not writable: {parent} ({e.strerror}); set ISOLHUB_HOME or call set_dir()"
        ) from e
    with lock(f"{repo_key(spec)}-{sha}"):
        if final.is_dir() and not force:
            return final
        sweep_staging(parent)
        staging = parent / f"{STAGING_PREFIX}{sha[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            populate(staging)
            make_read_only(staging)
            manifest = manifest_path(final)
            write_text_atomic(manifest, _manifest.dumps(_manifest.build(staging, commit=sha)))
            if not _move_into_place(staging, final, replace=force):
                # Another installer's identical tree won: record its mtimes, not ours.
                write_text_atomic(manifest, _manifest.dumps(_manifest.build(final, commit=sha)))
        except OSError as e:
            raise _disk_error(e, parent) from e
        finally:
            if staging.exists():
                remove_tree(staging)
    return final


def _move_into_place(staging: Path, final: Path, *, replace: bool) -> bool:
    """Rename `staging` to `final`; False when another process put an identical tree there first."""
    if replace and final.exists():
        trash = final.with_name(f"{STAGING_PREFIX}old-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, trash)
        try:
            os.rename(staging, final)
        finally:
            if trash.exists():
                remove_tree(trash)
        return True
    try:
        os.rename(staging, final)
    except OSError as e:
        # Another process (maybe with a lying lock) won the race with identical content.
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise
        return False
    return True


def make_read_only(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, st.st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _disk_error(e: OSError, where: Path) -> CacheError:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return CacheError(
            f"no space left while writing under {where}: {e}; free space or move the hub"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CacheError(
            f"cache not writable: {where} ({e.strerror}); set ISOLHUB_HOME or call set_dir()"
        )
    return CacheError(f"could not write under {where}: {e}")


def sweep_staging(parent: Path, max_age_s: float = _STALE_STAGING_S) -> None:
    """Remove staging folders left by dead processes (by pid) or older than `max_age_s`."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        m = re.match(rf"{re.escape(STAGING_PREFIX)}[0-9a-f]+-(\d+)-", entry.name)
        dead = m is not None and not pid_alive(int(m.group(1)))
        with contextlib.suppress(OSError):
            if dead or now - entry.lstat().st_mtime > max_age_s:
                remove_tree(entry)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (for sweeping dead writers' leftovers).

    A zombie counts as dead: it has released its locks before anyone reaps it.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def remove_tree(path: Path) -> None:
    """Remove `path` (a folder or file), never following symlinks out of it."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    shutil.rmtree(path, ignore_errors=True)


# -- temp folders outside the hub dir ------------------------------------------------------------

TEMP_PREFIX = "isolhub-"
_TEMP_NAME = re.compile(rf"{TEMP_PREFIX}(?P<kind>[a-z]+)-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-")
_swept: set[tuple[int, str]] = set()  # (pid, temp dir) already swept


@functools.cache
def host_tag() -> str:
    """8 hex digits naming this host in temp names, so a pid is only judged where it lives."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_dir(kind: str) -> str:
    """A new private folder `isolhub-<kind>-<host>-<pid>-XXXXXXXX` in the temp dir.

    The name says who owns it, so a folder left by a process killed before it could clean up is
    removed later: by the first `temp_dir` call of every later process (per temp dir), and by
    `isolhub cache prune`. The caller still removes it when done.
    """
    where = (os.getpid(), tempfile.gettempdir())
    if where not in _swept:
        _swept.add(where)
        sweep_temp_dirs()
    return tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{kind}-{host_tag()}-{os.getpid()}-")


def dead_temp_dirs(parent: str | None = None) -> list[Path]:
    """isolhub's temp folders in `parent` (the temp dir) whose owner, on this host, is dead."""
    parent = parent or tempfile.gettempdir()
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    me, uid = host_tag(), os.geteuid()
    dead = []
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None or m.group("host") != me or pid_alive(int(m.group("pid"))):
            continue
        path = Path(parent, name)
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                dead.append(path)
    return dead


def sweep_temp_dirs(parent: str | None = None) -> list[Path]:
    """Remove `dead_temp_dirs(parent)`; returns what was removed."""
    removed = []
    for path in dead_temp_dirs(parent):
        remove_tree(path)
        if not path.exists():
            removed.append(path)
    return removed


# -- torch.hub's view of the snapshots ----------------------------------------------------------


def torch_folder(spec: RepoSpec, ref: str) -> Path | None:
    """`<hub>/<owner>_<name>_<ref>`, the folder torch.hub would download `spec` to (GitHub only)."""
    if spec.kind != "github":
        return None
    return hub_dir() / f"{spec.location.replace('/', '_')}_{ref.replace('/', '_')}"


def link_torch_folder(spec: RepoSpec, ref: str, sha: str) -> None:
    """Point torch.hub's folder name for `spec` at `ref` to the snapshot of `sha` (a relative link).

    Code that looks for `get_dir()/<owner>_<name>_<ref>` finds the snapshot; torch.hub itself uses
    it as its cache. A real folder there is torch.hub's own download and is left alone; a link is
    repointed when the ref moved. Best effort: a read-only hub dir just gets no link.
    """
    link = torch_folder(spec, ref)
    if link is None:
        return
    target = os.path.relpath(snapshot_path(spec, sha), link.parent)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.link")
    try:
        if link.is_symlink():
            if os.readlink(link) == target:
                return
        elif link.exists():
            return
        os.symlink(target, tmp)
        os.replace(tmp, link)  # fails (EISDIR) if torch.hub made a real folder meanwhile
    except OSError:
        pass
    finally:
        if tmp.is_symlink():
            tmp.unlink(missing_ok=True)
    sweep_torch_links()


def sweep_torch_links() -> list[Path]:
    """Remove links in the hub dir that lead into `repos/` to a snapshot no longer there.

    torch.hub treats a dangling link as no cache and then fails to move its download onto it.
    """
    root = hub_dir()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.is_symlink():
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if os.readlink(path).startswith("repos" + os.sep) and not path.exists():
                path.unlink()
                removed.append(path)
    return removed
