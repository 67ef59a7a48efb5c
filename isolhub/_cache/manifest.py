"""Snapshot manifests: what a snapshot held when it was installed, to notice later damage.

A manifest lists every regular file of the tree with its size, modification time and SHA-256, and
every symlink with its target. It is written when the snapshot is installed, before the tree is
renamed into place (`_cache.store.install_snapshot`), and stored outside the tree, so the repository's
own files can never collide with it.

Two checks use it:

* `quick_check` (every load): one `lstat` per file. A missing file or a changed size is damage; a
  changed mtime alone costs a re-hash of that one file (a copied cache, or two racing installs
  of the same commit, change mtimes but not content).
* `full_check` (`isolhub cache verify`): re-hashes every file and also reports files and
  folders it cannot read, and files nobody installed (except bytecode in `__pycache__`).

Example:
    >>> Path("snap").mkdir()
    >>> _ = Path("snap/hubconf.py").write_text("dependencies = []\\n")
    >>> m = build(Path("snap"), commit="3f2a" * 10)
    >>> quick_check(Path("snap"), m)
    []
    >>> _ = Path("snap/hubconf.py").write_text("dependencies = ['x']\\n")
    >>> quick_check(Path("snap"), m)
    [Damage(path='hubconf.py', what='changed', detail='size 18 -> 21 bytes')]
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Damage", "FORMAT", "build", "dumps", "full_check", "load", "quick_check"]

FORMAT = 1
_BYTECODE_DIR = "__pycache__"


@dataclass(frozen=True)
class Damage:
    """One thing wrong in a snapshot: `path` (relative to it), `what` and a human `detail`.

    `what` is one of `missing`, `changed`, `unreadable`, `unexpected`.
    """

    path: str
    what: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what} ({self.detail})" if self.detail else self.path


def build(root: Path, *, commit: str | None = None) -> dict[str, Any]:
    """The manifest of the tree at `root`, which must be fully readable (a fresh staging folder).

    Raises:
        OSError: a file or folder could not be read.
    """
    files: dict[str, list[Any]] = {}
    links: dict[str, str] = {}

    def fail(e: OSError) -> None:
        raise e

    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames.sort()
        for name in [
            *filenames,
            *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))),
        ]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                links[rel] = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                files[rel] = [st.st_size, st.st_mtime_ns, _sha256(full)]
    return {"format": FORMAT, "commit": commit, "files": files, "links": links}


def dumps(manifest: dict[str, Any]) -> str:
    """The manifest as the JSON text stored on disk."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")) + "\n"


def load(path: Path) -> dict[str, Any] | None:
    """The manifest stored at `path`; None when there is none.

    Raises:
        ValueError: the file exists but is not a manifest this version understands.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot read the manifest {path}: {e.strerror}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the manifest {path} is not valid JSON") from e
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("files"), dict)
        or not isinstance(data.get("links"), dict)
        or not all(_is_entry(v) for v in data["files"].values())
    ):
        raise ValueError(f"the manifest {path} is malformed or of an unknown format")
    return data


def _is_entry(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 3
        and isinstance(v[0], int)
        and isinstance(v[1], int)
        and isinstance(v[2], str)
    )


def quick_check(root: Path, manifest: dict[str, Any]) -> list[Damage]:
    """Damage found by `lstat`ing what the manifest lists (re-hashing only files whose mtime moved).

    Stops at the first damaged file: one is enough to refuse the snapshot.
    """
    for rel, (size, mtime_ns, digest) in manifest["files"].items():
        full = os.path.join(root, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return [Damage(rel, "missing", "deleted since it was installed")]
        except OSError as e:
            return [Damage(rel, "unreadable", e.strerror or str(e))]
        if not stat.S_ISREG(st.st_mode):
            return [Damage(rel, "changed", "no longer a regular file")]
        if st.st_size != size:
            return [Damage(rel, "changed", f"size {size} -> {st.st_size} bytes")]
        if st.st_mtime_ns != mtime_ns:
            damage = _content_damage(rel, full, digest)
            if damage:
                return [damage]
    return _link_damage(root, manifest)[:1]


def full_check(root: Path, manifest: dict[str, Any]) -> list[Damage]:
    """Every damaged, missing, unreadable or unexpected file under `root`, re-hashing all of them."""
    damage: list[Damage] = []
    files: dict[str, list[Any]] = manifest["files"]
    for rel, (size, _mtime_ns, digest) in files.items():
        full = os.path.join(root, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            damage.append(Damage(rel, "missing", "deleted since it was installed"))
            continue
        except OSError as e:
            damage.append(Damage(rel, "unreadable", e.strerror or str(e)))
            continue
        if not stat.S_ISREG(st.st_mode):
            damage.append(Damage(rel, "changed", "no longer a regular file"))
        elif st.st_size != size:
            damage.append(Damage(rel, "changed", f"size {size} -> {st.st_size} bytes"))
        else:
            found = _content_damage(rel, full, digest)
            if found:
                damage.append(found)
    damage.extend(_link_damage(root, manifest))
    damage.extend(_extras(root, set(files) | set(manifest["links"])))
    return damage


def _content_damage(rel: str, full: str, digest: str) -> Damage | None:
    try:
        actual = _sha256(full)
    except OSError as e:
        return Damage(rel, "unreadable", e.strerror or str(e))
    if actual != digest:
        return Damage(rel, "changed", f"sha256 {actual[:12]}..., installed {digest[:12]}...")
    return None


def _link_damage(root: Path, manifest: dict[str, Any]) -> list[Damage]:
    damage = []
    for rel, target in manifest["links"].items():
        try:
            now = os.readlink(os.path.join(root, rel))
        except FileNotFoundError:
            damage.append(Damage(rel, "missing", "symlink deleted since it was installed"))
            continue
        except OSError as e:
            damage.append(Damage(rel, "changed", f"no longer a symlink ({e.strerror})"))
            continue
        if now != target:
            damage.append(Damage(rel, "changed", f"symlink now -> {now!r}, installed {target!r}"))
    return damage


def _extras(root: Path, known: set[str]) -> list[Damage]:
    found: list[Damage] = []

    def unreadable(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else "."
        found.append(Damage(rel, "unreadable", f"folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        bytecode = os.path.basename(dirpath) == _BYTECODE_DIR
        for name in [
            *filenames,
            *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))),
        ]:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in known and not bytecode:
                found.append(Damage(rel, "unexpected", "not part of the installed snapshot"))
    return found


def _sha256(path: str) -> str:
    """SHA-256 of a file, read without updating its access time (`cache ls` shows last use)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # O_NOATIME needs ownership
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
