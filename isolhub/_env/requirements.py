"""What a repo requires: read from its snapshot, checked, normalized; nothing is installed here.

Which source wins, first match only:

    requirements=[...] (the caller's)  >  requirements.txt (and the files it includes with -r)
                                        >  pyproject.toml [project] dependencies

`dependencies` in hubconf stays torch.hub's import check. Every line must be a plain PEP 508
requirement from the index (`name[extras] specifier ; marker`): a repo's file cannot point the
installer at another index, a URL, a local path or an editable checkout, and `-r` includes must
stay inside the snapshot. That keeps what a repo (maybe untrusted) can make the parent do down to
"install these names at these versions".

Example:
    >>> Path("snap").mkdir()
    >>> _ = Path("snap/requirements.txt").write_text("# pinned\\ntinypkg==2.0\\n")
    >>> read_requirements(Path("snap"), None)
    Requirements(lines=('tinypkg==2.0',), source='requirements.txt')
    >>> read_requirements(Path("snap"), ["numpy>=1"])      # given ones win
    Requirements(lines=('numpy>=1',), source='argument')
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .._errors import EnvError

__all__ = ["Requirements", "read_requirements"]

_MAX_INCLUDES = 32


@dataclass(frozen=True)
class Requirements:
    """Normalized requirement lines (sorted, deduplicated) and where they came from."""

    lines: tuple[str, ...]
    source: str

    def parsed(self) -> list[Requirement]:
        return [Requirement(line) for line in self.lines]


def read_requirements(snapshot: Path, explicit: Any) -> Requirements:
    """The requirements of the repo at `snapshot`; `explicit` (a list of strings) wins.

    Raises:
        EnvError: a line is not a plain requirement, an include leaves the snapshot, or the
            pyproject is unreadable.
    """
    if explicit is not None:
        if isinstance(explicit, str) or not all(isinstance(r, str) for r in explicit):
            raise EnvError("requirements= takes a list of requirement strings, e.g. ['timm>=0.9']")
        return _normalized(
            [(r, "requirements=", i + 1) for i, r in enumerate(explicit)], "argument"
        )
    txt = snapshot / "requirements.txt"
    if txt.is_file():
        return _normalized(_read_txt(snapshot, txt, set()), "requirements.txt")
    pyproject = snapshot / "pyproject.toml"
    if pyproject.is_file():
        try:
            project = tomllib.loads(pyproject.read_text()).get("project") or {}
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise EnvError(f"cannot read pyproject.toml of the repo: {e}") from e
        deps = project.get("dependencies") or []
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise EnvError("pyproject.toml: [project] dependencies must be a list of strings")
        return _normalized(
            [(d, "pyproject.toml", i + 1) for i, d in enumerate(deps)], "pyproject.toml"
        )
    return Requirements((), "none")


def _read_txt(root: Path, path: Path, seen: set[Path]) -> list[tuple[str, str, int]]:
    real = Path(os.path.realpath(path))
    rel = _inside(root, real, path)
    if real in seen:
        return []
    if len(seen) >= _MAX_INCLUDES:
        raise EnvError(f"{rel}: more than {_MAX_INCLUDES} requirement files included")
    seen.add(real)
    try:
        text = real.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise EnvError(f"cannot read {rel} of the repo: {e}") from e
    out: list[tuple[str, str, int]] = []
    for number, line in _logical_lines(text):
        if line.startswith(("-r ", "--requirement ", "-r", "--requirement=")):
            target = line.split("=", 1)[1] if line.startswith("--requirement=") else line
            target = target.removeprefix("--requirement").removeprefix("-r").strip()
            out += _read_txt(root, real.parent / target, seen)
        elif line.startswith("-"):
            option = line.split()[0]
            raise EnvError(
                f"{rel} line {number}: {option!r} is not supported; isolhub installs plain "
                "requirements from the index the installer is configured with (no other "
                "indexes, URLs, paths or editable installs)"
            )
        else:
            out.append((line, rel, number))
    return out


def _inside(root: Path, real: Path, given: Path) -> str:
    base = os.path.realpath(root)
    if os.path.commonpath([base, str(real)]) != base:
        raise EnvError(f"the requirements file {given} is outside the repository")
    return os.path.relpath(real, base)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) without comments and blanks, `\\` continuations joined."""
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("#"):
            raw = ""
        elif " #" in raw or "\t#" in raw:
            raw = raw[: min(i for i in (raw.find(" #"), raw.find("\t#")) if i >= 0)]
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        line, pending = (pending + raw).strip(), ""
        if line:
            lines.append((start, line))
    if pending.strip():
        lines.append((start, pending.strip()))
    return lines


def _normalized(items: list[tuple[str, str, int]], source: str) -> Requirements:
    lines: set[str] = set()
    for text, where, number in items:
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise EnvError(f"{where} line {number}: not a requirement: {text!r} ({e})") from e
        if req.url:
            raise EnvError(
                f"{where} line {number}: {text!r} names a URL; isolhub installs requirements "
                "from the configured index only"
            )
        req.name = canonicalize_name(req.name)
        lines.add(str(req))
    return Requirements(tuple(sorted(lines)), source)
