"""What changed in the code between two snapshots: `git diff --stat`, computed from the trees.

Works for any source (a git commit, a GitHub archive, a local directory), because it needs no
history: both snapshot trees are walked here, in the parent, and each text file that differs is
diffed line by line with `difflib`. Nothing from either worker is involved, so a repo cannot
misreport its own change.

Example:
    >>> from pathlib import Path
    >>> for tree, files in {"old": {"hubconf.py": "w = 2\\n"},
    ...                     "new": {"hubconf.py": "w = 3\\nd = 0\\n", "net.py": "x = 1\\n"}}.items():
    ...     for name, text in files.items():
    ...         _ = (Path(tree) / name).parent.mkdir(exist_ok=True)
    ...         _ = (Path(tree) / name).write_text(text)
    >>> [f"{c.path} +{c.added} -{c.removed}" for c in diff_trees("old", "new")]
    ['hubconf.py +2 -1', 'net.py +1 -0']
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import final

__all__ = ["FileChange", "diff_trees", "stat_text", "totals_text"]

_SKIP_DIRS = frozenset({".git", "__pycache__", ".hg", ".svn"})
_MAX_TEXT = 4 << 20  # bytes: a larger file is counted as changed, without a line diff
_MAX_FILES = 20_000  # per tree: past this the walk stops (the report says it was cut short)


@final
@dataclass(frozen=True)
class FileChange:
    """One file that differs between the two snapshots: added, removed or modified.

    `added`/`removed` count lines as `git diff --stat` does; `binary` files (or ones too large
    or undecodable to diff as text) have no counts.
    """

    path: str
    status: str
    added: int = 0
    removed: int = 0
    binary: bool = False


def diff_trees(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> tuple[FileChange, ...]:
    """The files added, removed or modified from tree `a` to tree `b`, sorted by path.

    Text files get line counts as `git diff --stat` counts them (a changed line is one added
    and one removed); binary, undecodable or very large files get `binary=True` and no counts.
    Symlinks compare by target. Unreadable files are reported as modified with `binary=True`.
    """
    files_a, files_b = dict(_walk(Path(a))), dict(_walk(Path(b)))
    out = []
    for rel in sorted(set(files_a) | set(files_b)):
        pa, pb = files_a.get(rel), files_b.get(rel)
        if pa is not None and pb is not None and _same(pa, pb):
            continue
        status = "added" if pa is None else "removed" if pb is None else "modified"
        lines_a, lines_b = _lines(pa), _lines(pb)
        if lines_a is None or lines_b is None:
            out.append(FileChange(rel, status, binary=True))
            continue
        added = removed = 0
        matcher = difflib.SequenceMatcher(None, lines_a, lines_b, autojunk=False)
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op != "equal":
                removed += i2 - i1
                added += j2 - j1
        out.append(FileChange(rel, status, added, removed))
    return tuple(out)


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    count = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            count += 1
            if count > _MAX_FILES:
                return
            path = Path(folder, name)
            yield path.relative_to(root).as_posix(), path


def _same(a: Path, b: Path) -> bool:
    try:
        if a.is_symlink() or b.is_symlink():
            return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
        if a.stat().st_size != b.stat().st_size:
            return False
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def _lines(path: Path | None) -> list[str] | None:
    """The file's lines, [] for no file, None where it cannot be diffed as text."""
    if path is None:
        return []
    try:
        if path.is_symlink():
            return [os.readlink(path) + "\n"]
        if path.stat().st_size > _MAX_TEXT:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def stat_text(changes: tuple[FileChange, ...], width: int = 40) -> list[str]:
    """`git diff --stat`-like lines: one per file, then the totals line."""
    if not changes:
        return []
    name_w = min(max(len(c.path) for c in changes), 60)
    most = max((c.added + c.removed for c in changes), default=0)
    lines = []
    for c in changes:
        name = c.path if len(c.path) <= name_w else "…" + c.path[-(name_w - 1) :]
        if c.binary:
            lines.append(f" {name:<{name_w}} | Bin ({c.status})")
            continue
        n = c.added + c.removed
        scale = min(1.0, width / most) if most else 1.0
        plus = round(c.added * scale) or (1 if c.added else 0)
        minus = round(c.removed * scale) or (1 if c.removed else 0)
        tag = "" if c.status == "modified" else f" ({c.status})"
        lines.append(f" {name:<{name_w}} | {n:>4} {'+' * plus}{'-' * minus}{tag}")
    lines.append(" " + totals_text(changes))
    return lines


def totals_text(changes: tuple[FileChange, ...]) -> str:
    """`3 files changed, 14 insertions(+), 2 deletions(-)`."""
    n = len(changes)
    added = sum(c.added for c in changes)
    removed = sum(c.removed for c in changes)
    return (
        f"{n} file{'s' if n != 1 else ''} changed, {added} insertion{'s' if added != 1 else ''}"
        f"(+), {removed} deletion{'s' if removed != 1 else ''}(-)"
    )
