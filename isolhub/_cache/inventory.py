"""The cache as entries: what `isolhub cache ls|verify|rm|prune` shows and removes.

The command line (`_cli.cache`) prints; this module finds. Nothing here deletes anything except
`fix`, `remove_entries`, `remove` and `prune`, and only inside the hub dir (see `docs/cache.md`).

Example (an empty hub dir):
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> scan(root)
    []
    >>> find_problems(root)
    ([], 0, [])
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .._errors import CacheError
from .._process.preload import TEMP_PREFIX as PRELOAD_TEMP_PREFIX
from . import manifest as _manifest
from .store import (
    STAGING_PREFIX,
    dead_temp_dirs,
    manifest_path,
    pid_alive,
    remove_tree,
    sweep_torch_links,
)

__all__ = [
    "ORPHAN_RECORD",
    "Entry",
    "Problem",
    "entry_json",
    "find_problems",
    "fix",
    "group_by_repo",
    "prune",
    "remove",
    "remove_entries",
    "resolve_target",
    "scan",
    "size_of",
]

_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_STAGING_PID = re.compile(rf"{re.escape(STAGING_PREFIX)}[0-9a-f]+-(\d+)-")
# Staging folders and temp files younger than this may belong to a running process.
_LEFTOVER_AGE_S = 3600
_SHOWN_DAMAGE = 10
_VERIFIED = ".verified"  # `_cache.verified`'s records of what was hashed
ORPHAN_RECORD = "verification record of a file that is gone"


@dataclass
class Entry:
    """One thing in the cache, as `cache ls` shows it."""

    id: str  # path relative to the hub dir; what `cache rm` takes
    kind: str  # snapshot | checkpoint | broker (a sandboxed worker's download) | ref
    path: str
    size: int
    last_used: float
    repo: str | None = None
    sha: str | None = None
    ref: str | None = None
    unused: bool | None = None  # snapshots: no ref points at them
    refs: list[str] = field(default_factory=list)


def scan(root: Path) -> list[Entry]:
    """Every snapshot, ref and checkpoint under the hub dir `root` (leftovers excluded)."""
    entries: list[Entry] = []
    repos = root / "repos"
    for repo in _dirs(repos):
        origin = _read(repo / "origin") or repo.name
        refs: list[Entry] = []
        for f in _children(repo / "refs"):
            if f.name.startswith(".") or not f.is_file():
                continue
            st = f.lstat()
            target = (_read(f) or "").strip()
            refs.append(
                Entry(
                    id=_rel(f, root),
                    kind="ref",
                    path=str(f),
                    size=st.st_size,
                    last_used=st.st_mtime,
                    repo=origin,
                    sha=target or None,
                    ref=unquote(f.name),
                )
            )
        for d in _children(repo / "snapshots"):
            if d.name.startswith(STAGING_PREFIX) or not d.is_dir() or d.is_symlink():
                continue
            size, last = _tree_usage(d)
            pointing = sorted(r.ref or "" for r in refs if r.sha == d.name)
            entries.append(
                Entry(
                    id=_rel(d, root),
                    kind="snapshot",
                    path=str(d),
                    size=size,
                    last_used=last,
                    repo=origin,
                    sha=d.name,
                    unused=not pointing,
                    refs=pointing,
                )
            )
        entries.extend(refs)
    for f in _children(root / "checkpoints"):
        if _is_leftover_name(f.name) or f.is_symlink():
            continue
        size, last = _tree_usage(f) if f.is_dir() else _file_usage(f)
        entries.append(
            Entry(id=_rel(f, root), kind="checkpoint", path=str(f), size=size, last_used=last)
        )
    # What the weights broker downloaded for sandboxed workers: broker/<key of the URL>/<name>.
    for key in _dirs(root / "broker"):
        for f in _children(key):
            if _is_leftover_name(f.name) or f.is_symlink() or not f.is_file():
                continue
            size, last = _file_usage(f)
            entries.append(
                Entry(id=_rel(f, root), kind="broker", path=str(f), size=size, last_used=last)
            )
    return entries


def _is_leftover_name(name: str) -> bool:
    return name.endswith((".partial", ".incomplete")) or name.startswith(STAGING_PREFIX)


def _children(d: Path) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except OSError:
        return []


def _dirs(d: Path) -> list[Path]:
    return [p for p in _children(d) if p.is_dir() and not p.name.startswith(".")]


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _file_usage(p: Path) -> tuple[int, float]:
    st = p.lstat()
    return st.st_size, max(st.st_atime, st.st_mtime)


def _tree_usage(d: Path) -> tuple[int, float]:
    """Total size under `d` and its last use: the newest access or change of a file in it.

    Folder access times are left out: listing a folder (as this does) would count as a use.
    """
    size, last = 0, d.lstat().st_mtime
    for dirpath, _dirs, files in os.walk(d):
        for name in files:
            with contextlib.suppress(OSError):
                fst = os.lstat(os.path.join(dirpath, name))
                size += fst.st_size
                last = max(last, fst.st_atime, fst.st_mtime)
    return size, last


def group_by_repo(entries: list[Entry]) -> list[dict[str, Any]]:
    """Snapshots and refs of `entries` grouped per repo, largest first.

    Example:
        >>> snap = Entry("repos/r/snapshots/ab12", "snapshot", "/hub/repos/r/snapshots/ab12", 3, 0.0,
        ...              repo="o/r", sha="ab12")
        >>> [(r["repo"], r["size"], r["snapshots"]) for r in group_by_repo([snap])]
        [('o/r', 3, ['ab12'])]
    """
    repos: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.kind not in ("snapshot", "ref") or e.repo is None:
            continue
        r = repos.setdefault(
            e.repo,
            {
                "repo": e.repo,
                "size": 0,
                "snapshots": [],
                "unused": 0,
                "refs": {},
                "last_used_ts": 0.0,
            },
        )
        r["size"] += e.size
        r["last_used_ts"] = max(r["last_used_ts"], e.last_used)
        if e.kind == "snapshot":
            r["snapshots"].append(e.sha)
            r["unused"] += bool(e.unused)
        else:
            r["refs"][e.ref or ""] = e.sha
    out = sorted(repos.values(), key=lambda r: (-r["size"], r["repo"]))
    for r in out:
        r["last_used"] = _iso(r["last_used_ts"])
    return out


def entry_json(e: Entry) -> dict[str, Any]:
    d = asdict(e)
    d["last_used"] = _iso(e.last_used)
    if e.kind != "snapshot":
        d.pop("refs")
        d.pop("unused")
    return d


@dataclass
class Problem:
    """Something `cache verify` found wrong."""

    id: str
    path: str
    problem: str
    fixable: bool = True
    fixed: bool = False


def find_problems(root: Path) -> tuple[list[Problem], int, list[str]]:
    """Corrupt checkpoints, dangling refs, empty snapshots and leftovers under `root`.

    Returns the problems, how many entries were checked, and temp files that look in use.
    """
    from .._weights.checkpoints import HASH_REGEX
    from .._weights.download import partial_is_live

    problems: list[Problem] = []
    in_progress: list[str] = []
    checked = 0
    entries = scan(root)
    snapshots = {(Path(e.path).parent.parent, e.sha) for e in entries if e.kind == "snapshot"}
    for where in _unreadable_folders(root):
        problems.append(where)
    for e in entries:
        checked += 1
        path = Path(e.path)
        try:
            if e.kind in ("checkpoint", "broker") and path.is_file():
                what = _checkpoint_problem(path, HASH_REGEX)
                if what:
                    problems.append(Problem(e.id, e.path, what))
            elif e.kind == "snapshot":
                what = _snapshot_problem(path)
                if what:
                    problems.append(Problem(e.id, e.path, what))
            elif e.kind == "ref":
                repo = path.parent.parent
                if e.sha is None or not _SHA.fullmatch(e.sha):
                    problems.append(Problem(e.id, e.path, f"ref holds no commit SHA ({e.sha!r})"))
                elif (repo, e.sha) not in snapshots:
                    problems.append(
                        Problem(e.id, e.path, f"ref points at {e.sha[:12]}, whose tree is missing")
                    )
        except OSError as err:
            problems.append(
                Problem(e.id, e.path, f"unreadable ({err.strerror or err}); check its permissions")
            )
    for path, kind in _leftovers(root):
        if kind in (ORPHAN_RECORD, "empty broker folder"):
            live = False
        elif path.name.endswith(".partial"):
            live = partial_is_live(str(path))
        else:
            live = _young_or_live(path, kind)
        if live:
            in_progress.append(str(path))
        elif kind in (ORPHAN_RECORD, "empty broker folder"):
            problems.append(Problem(_rel(path, root), str(path), kind))
        else:
            problems.append(Problem(_rel(path, root), str(path), f"{kind} left by a dead process"))
    return problems, checked, in_progress


def _open_quietly(path: Path) -> Any:
    """Open for reading without updating the access time, which is how `ls` tells last use."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)  # O_NOATIME needs ownership
    return os.fdopen(fd, "rb")


def _sha256_quietly(path: Path) -> str:
    h = hashlib.sha256()
    with _open_quietly(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_problem(path: Path, hash_regex: re.Pattern[str]) -> str | None:
    from .verified import recorded

    st = path.stat()
    if st.st_size == 0:
        return "empty checkpoint file"
    rec = recorded(str(path))
    if rec is not None and rec.downloaded and rec.sha256 is not None:
        # isolhub downloaded it: its bytes must still be those the server sent.
        digest = _sha256_quietly(path)
        if digest != rec.sha256:
            return (
                f"corrupt: sha256 {digest[:16]}... is not the {rec.sha256[:16]}... it was "
                "downloaded with (changed on disk since)"
            )
    if path.name.endswith(".safetensors"):
        what = _safetensors_problem(path, st.st_size)
        if what:
            return what
    m = hash_regex.search(path.name)
    prefix = m.group(1) if m else ""
    # torch.hub's names carry 8+ hex digits; an all-digit group is more likely a date or version.
    if len(prefix) >= 8 and not prefix.isdigit():
        digest = _sha256_quietly(path)
        if not digest.startswith(prefix):
            return f"corrupt: sha256 {digest[:16]}... does not start with {prefix} (from its name)"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    with _open_quietly(path) as f:
        head = f.read(8)
        if len(head) < 8:
            return "corrupt safetensors file: shorter than its header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"corrupt safetensors file: header of {n} bytes in a {size}-byte file"
        try:
            json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "corrupt safetensors file: unreadable header"
    return None


def _snapshot_problem(path: Path) -> str | None:
    """What is wrong with the snapshot folder `path`, checked file by file against its manifest."""
    try:
        if not any(path.iterdir()):
            return "snapshot with a missing tree (empty folder)"
    except OSError as e:
        return f"unreadable snapshot folder ({e.strerror or e})"
    try:
        manifest = _manifest.load(manifest_path(path))
    except ValueError as e:
        return str(e)
    if manifest is None:
        return "no manifest (installed by an older isolhub), so its files cannot be checked"
    damage = _manifest.full_check(path, manifest)
    if not damage:
        return None
    shown = "; ".join(str(d) for d in damage[:_SHOWN_DAMAGE])
    more = f"; and {len(damage) - _SHOWN_DAMAGE} more" if len(damage) > _SHOWN_DAMAGE else ""
    return f"damaged: {shown}{more}"


def _unreadable_folders(root: Path) -> Iterator[Problem]:
    """The cache's own folders that cannot be listed (their entries would go unchecked)."""
    folders = [root / "repos", root / "checkpoints", root / "broker", root / _VERIFIED]
    folders += _dirs(root / "broker")
    for repo in _dirs(root / "repos"):
        folders += [repo, repo / "refs", repo / "snapshots", repo / "manifests"]
    for d in folders:
        try:
            os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            yield Problem(
                _rel(d, root),
                str(d),
                f"unreadable folder ({e.strerror or e}); its entries were not checked",
                fixable=False,
            )


def _leftovers(root: Path) -> Iterator[tuple[Path, str]]:
    for f in _children(root / "checkpoints"):
        if f.name.endswith(".partial"):
            yield f, "partial download"
        elif f.name.endswith(".incomplete"):
            yield f, "incomplete file"
    for repo in _dirs(root / "repos"):
        for f in _children(repo / "refs"):
            if f.name.startswith(".") and f.name.endswith(".tmp"):
                yield f, "temp file"
        for d in _children(repo / "snapshots"):
            if d.name.startswith(STAGING_PREFIX):
                yield d, "staging folder"
        for f in _children(repo / "manifests"):
            if not (repo / "snapshots" / f.name.removesuffix(".json")).is_dir():
                yield f, "manifest of a missing snapshot"
    for d in _children(root / "repos"):
        if d.name.startswith(STAGING_PREFIX):
            yield d, "staging folder"
    for key in _dirs(root / "broker"):
        files = _children(key)
        for f in files:
            if f.name.endswith(".partial"):
                yield f, "partial download"
            elif _is_leftover_name(f.name):
                yield f, "incomplete file"
        if not files:
            yield key, "empty broker folder"
    for f in _children(root / "preload"):
        if f.name.startswith(PRELOAD_TEMP_PREFIX):
            yield f, "temp file"
    for f in _children(root / _VERIFIED):
        if f.name.endswith(".tmp"):
            yield f, "temp file"
        elif f.name.endswith(".json") and _record_is_orphan(f):
            yield f, ORPHAN_RECORD


def _record_is_orphan(record: Path) -> bool:
    """Whether a `.verified` record describes a file that no longer exists."""
    try:
        target = json.loads(record.read_text(encoding="utf-8")).get("path")
    except (OSError, ValueError, AttributeError):
        return True  # unreadable or malformed: no use to anyone (isolhub re-hashes without it)
    return not isinstance(target, str) or not os.path.lexists(target)


def _young_or_live(path: Path, kind: str) -> bool:
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    m = _STAGING_PID.match(path.name)
    if m is not None:
        return pid_alive(int(m.group(1))) and age < 24 * 3600
    return age < _LEFTOVER_AGE_S


def resolve_target(target: str, root: Path, entries: list[Entry]) -> list[Entry]:
    by_path = {os.path.normpath(e.path): e for e in entries}
    candidates = [Path(target).expanduser(), root / target]
    for cand in candidates:
        try:
            absolute = os.path.normpath(os.path.abspath(cand))
        except (OSError, ValueError):
            continue
        if absolute in by_path:
            return [by_path[absolute]]
        repos = os.path.normpath(root / "repos")
        if os.path.dirname(absolute) == repos and os.path.isdir(absolute):
            inside = [e for e in entries if e.path.startswith(absolute + os.sep)]
            return inside or [_bare_repo_entry(Path(absolute), root)]
    name_hits = [e for e in entries if e.kind == "checkpoint" and Path(e.path).name == target]
    if len(name_hits) == 1:
        return name_hits
    if re.fullmatch(r"[0-9a-f]{7,64}", target):
        hits = [e for e in entries if e.kind == "snapshot" and (e.sha or "").startswith(target)]
        if len(hits) == 1:
            return hits
        if len(hits) > 1:
            raise CacheError(
                f"{target!r} matches {len(hits)} snapshots; give more of the SHA or the entry "
                "shown by `isolhub cache ls`"
            )
    repo_hits = {Path(e.path).parent.parent for e in entries if e.repo == target}
    if len(repo_hits) == 1:
        repo = repo_hits.pop()
        return [e for e in entries if e.path.startswith(str(repo) + os.sep)]
    raise CacheError(
        f"no cache entry matches {target!r} in {root}; see `isolhub cache ls` for the entries "
        "(nothing outside the hub dir is ever removed)"
    )


def _bare_repo_entry(repo: Path, root: Path) -> Entry:
    size, last = _tree_usage(repo)
    return Entry(id=_rel(repo, root), kind="repo", path=str(repo), size=size, last_used=last)


def remove_entries(
    chosen: list[Entry], entries: list[Entry], root: Path, *, dry_run: bool
) -> list[dict[str, Any]]:
    """Remove `chosen` plus the refs to removed snapshots and repo folders left empty."""
    doomed = {e.path: e for e in chosen}
    gone_snapshots = {(Path(e.path).parent.parent, e.sha) for e in chosen if e.kind == "snapshot"}
    for e in entries:
        if e.kind == "ref" and (Path(e.path).parent.parent, e.sha) in gone_snapshots:
            doomed.setdefault(e.path, e)
    removed = []
    for e in doomed.values():
        if dry_run or remove(Path(e.path)):
            removed.append({"id": e.id, "kind": e.kind, "size": e.size})
            if e.kind == "snapshot" and not dry_run:
                remove(manifest_path(Path(e.path)))
            if e.kind in ("checkpoint", "broker") and not dry_run:
                remove(_record_of(Path(e.path)))
            if e.kind == "broker" and not dry_run:
                with contextlib.suppress(OSError):
                    Path(e.path).parent.rmdir()  # its URL's folder, now empty
    if not dry_run:
        for e in chosen:
            repo = _repo_of(Path(e.path), root)
            if repo is not None:
                _drop_empty_repo(repo)
        sweep_torch_links()  # torch.hub-named links to what is gone
    return removed


def _record_of(path: Path) -> Path:
    """The `.verified` record that `_cache.verified` keeps for `path` (it may not exist)."""
    from .verified import record_file

    return Path(record_file(str(path)))


def _repo_of(path: Path, root: Path) -> Path | None:
    try:
        rel = path.relative_to(root / "repos")
    except ValueError:
        return None
    return root / "repos" / rel.parts[0] if rel.parts else None


def _drop_empty_repo(repo: Path) -> None:
    """Remove a repo folder that has no snapshot and no ref left (only its `origin`)."""
    for sub in ("snapshots", "refs"):
        if any(not p.name.startswith(".") for p in _children(repo / sub)):
            return
    if repo.is_dir():
        remove(repo)


def remove(path: Path) -> bool:
    """Remove a file or folder of the cache; a folder is renamed aside first (atomic to readers)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        aside = path.with_name(f"{STAGING_PREFIX}rm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except OSError:
            return False
        remove_tree(aside)
        return not aside.exists()
    try:
        path.unlink()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def size_of(path: Path) -> int:
    try:
        return _tree_usage(path)[0] if path.is_dir() else path.lstat().st_size
    except OSError:
        return 0


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="seconds")


def fix(problems: list[Problem], root: Path) -> None:
    """Remove what each fixable problem names (a snapshot with its manifest and refs)."""
    entries = scan(root)
    snapshots = {e.path: e for e in entries if e.kind == "snapshot"}
    for p in problems:
        if not p.fixable:
            continue
        if p.path in snapshots:
            remove_entries([snapshots[p.path]], entries, root, dry_run=False)
            p.fixed = not Path(p.path).exists()
        else:
            p.fixed = remove(Path(p.path))


def prune(root: Path, older_than: float, *, dry_run: bool) -> list[dict[str, Any]]:
    """Remove what was last used more than `older_than` seconds ago, and every leftover.

    Snapshots (with their refs), checkpoints and broker downloads by age; leftovers of dead
    processes, dangling refs and isolhub's temp folders in `$TMPDIR` whatever their age.
    """
    entries = scan(root)
    cutoff = time.time() - older_than
    old = [
        e
        for e in entries
        if e.kind in ("snapshot", "checkpoint", "broker") and e.last_used < cutoff
    ]
    removed = remove_entries(old, entries, root, dry_run=dry_run)
    problems, _checked, _live = find_problems(root)
    for p in problems:
        leftover = p.problem.endswith("left by a dead process") or p.problem in (
            ORPHAN_RECORD,
            "empty broker folder",
        )
        if not (leftover or p.problem.startswith("ref points")):
            continue
        size = size_of(Path(p.path))
        if dry_run or remove(Path(p.path)):
            removed.append({"id": p.id, "kind": "leftover", "size": size})
    for path in dead_temp_dirs():  # isolhub's own, in $TMPDIR, left by dead processes
        size = size_of(path)
        if not dry_run:
            remove_tree(path)
        if dry_run or not path.exists():
            removed.append({"id": str(path), "kind": "temp folder", "size": size})
    return removed
