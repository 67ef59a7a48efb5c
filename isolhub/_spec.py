"""Parse spec strings into frozen `RepoSpec` objects, with no I/O.

Accepted forms:
* `owner/name[:ref]` — a GitHub repository, as torch.hub (default branch when no ref);
* `git+<url>[@ref]` — any git repository, pip's VCS syntax (`git+file:///srv/x.git@v1`);
* a directory, with `source="local"`, as torch.hub.

Example:
    >>> parse_spec("pytorch/vision:v0.10.0")
    RepoSpec(kind='github', location='pytorch/vision', ref='v0.10.0')
    >>> str(parse_spec("git+file:///srv/net.git@v2"))
    'git+file:///srv/net.git@v2'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from ._errors import Option, SpecError

__all__ = ["ACCEPTED_FORMS", "GIT_SCHEMES", "Kind", "RepoSpec", "parse_spec"]

ACCEPTED_FORMS = (
    "accepted forms: 'owner/name[:ref]' (GitHub), 'git+<url>[@ref]' with a file, https or ssh "
    "URL (e.g. 'git+file:///srv/repo.git@v1'), or a directory with ",
    Option.of(source="local"),
)
GIT_SCHEMES = ("file", "https", "ssh")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_BAD_REF = re.compile(r"(^[-/.])|(\.\.)|[\x00-\x20~^:?*\[\\]|(@\{)|(/$)|(\.lock$)")

Kind = Literal["github", "git", "local"]


@dataclass(frozen=True)
class RepoSpec:
    """One repository at one (possibly unresolved) ref.

    `location` is `owner/name` for GitHub, the git URL for git, an absolute directory for local.
    `ref` is None when the default branch is meant (never for local).
    """

    kind: Kind
    location: str
    ref: str | None = None

    def __str__(self) -> str:
        if self.kind == "github":
            return self.location + (f":{self.ref}" if self.ref else "")
        if self.kind == "git":
            return f"git+{self.location}" + (f"@{self.ref}" if self.ref else "")
        return self.location

    @property
    def owner(self) -> str:
        """GitHub owner (GitHub specs only)."""
        return self.location.split("/")[0]

    @property
    def name(self) -> str:
        """Repository name: the GitHub name, the git URL's last path part, or the dir name."""
        if self.kind == "github":
            return self.location.split("/")[1]
        tail = self.location.rstrip("/").rsplit("/", 1)[-1]
        return tail[:-4] if tail.endswith(".git") else tail

    def with_ref(self, ref: str | None) -> RepoSpec:
        """The same repository at another ref."""
        return RepoSpec(self.kind, self.location, ref)


def parse_spec(text: str | os.PathLike[str], source: str = "github") -> RepoSpec:
    """Parse `text` into a `RepoSpec`; `source` is torch.hub's ("github" or "local").

    Raises:
        SpecError: the text matches none of the accepted forms, or `source` is unknown.
    """
    if isinstance(text, os.PathLike):
        text = os.fspath(text)
    if not isinstance(text, str):
        raise _bad(f"a spec must be a string, not {type(text).__name__}")
    src = source.lower() if isinstance(source, str) else source
    if src == "local":
        if not text:
            raise SpecError(
                ("empty directory for ", Option.of(source="local"), "; ", *ACCEPTED_FORMS)
            )
        return RepoSpec("local", os.path.abspath(os.path.expanduser(text)))
    if src != "github":
        raise SpecError(f'Unknown source: "{source}". Allowed values: "github" | "local".')
    if text.startswith("git+"):
        return _parse_git(text)
    return _parse_github(text)


def _parse_github(text: str) -> RepoSpec:
    if text.startswith(("/", "./", "../", "~")) or text in (".", ".."):
        raise SpecError(
            (
                f"bad spec {text!r}: a path, not a GitHub 'owner/name'; for a directory pass ",
                Option.of(source="local"),
                "; ",
                *ACCEPTED_FORMS,
            )
        )
    repo, sep, ref = text.partition(":")
    if not sep and repo.count("@") == 1:
        name, at_ref = repo.split("@")
        if at_ref and len(name.split("/")) == 2:
            raise _bad(
                f"bad spec {text!r}: did you mean {name}:{at_ref}? (a GitHub ref follows ':')"
            )
    if ":" in ref or (sep and not ref):
        raise _bad(f"bad spec {text!r}: expected one ':' before a non-empty ref")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts) or parts[1] in {".", ".."}:
        raise _bad(f"bad spec {text!r}: expected 'owner/name[:ref]'")
    _check_ref(text, ref or None)
    return RepoSpec("github", repo, ref or None)


def _parse_git(text: str) -> RepoSpec:
    url = text[len("git+") :]
    parts = urlsplit(url)
    if parts.scheme not in GIT_SCHEMES:
        raise _bad(f"bad spec {text!r}: git URL scheme {parts.scheme!r} is not allowed")
    if parts.query or parts.fragment:
        raise _bad(f"bad spec {text!r}: a git URL takes no query or fragment")
    path, ref = parts.path, None
    if "@" in path:
        path, ref = path.rsplit("@", 1)
        if not ref:
            raise _bad(f"bad spec {text!r}: empty ref after '@'")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise _bad(f"bad spec {text!r}: expected 'git+file:///abs/path'")
    elif not parts.netloc:
        raise _bad(f"bad spec {text!r}: the URL has no host")
    if not path.strip("/"):
        raise _bad(f"bad spec {text!r}: the URL has no repository path")
    _check_ref(text, ref)
    location = f"{parts.scheme}://{parts.netloc}{path}"
    return RepoSpec("git", location, ref)


def _check_ref(text: str, ref: str | None) -> None:
    if ref is not None and _BAD_REF.search(ref):
        raise _bad(f"bad spec {text!r}: {ref!r} is not a valid git ref name")


def _bad(what: str) -> SpecError:
    return SpecError((what, "; ", *ACCEPTED_FORMS))
