"""git sources through the `git` command line: resolve a ref, fetch one commit, export it.

git always runs with transports restricted to file, https and ssh (never `ext::`), hooks off,
no terminal prompts, and no system config.

Example (`git_repo` is a local git repository with a tag v1 holding a hubconf.py):
    >>> ref, sha = resolve(f"file://{git_repo}", "v1")
    >>> ref, len(sha)
    ('refs/tags/v1', 40)
    >>> Path("staging").mkdir()
    >>> export(f"file://{git_repo}", sha, Path("staging"))
    >>> sorted(p.name for p in Path("staging").iterdir())
    ['hubconf.py']
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from .._cache.store import remove_tree, temp_dir
from .._errors import FetchError, RefNotFoundError, ResolveError, describe_exit
from .archive import extract_tar

__all__ = ["export", "resolve"]

_SHA = re.compile(r"[0-9a-f]{40}")
_HEX = re.compile(r"[0-9a-f]{4,40}")
_GIT_TIMEOUT = 600
_STDERR_CHARS = 2000
# What git servers answer to a fetch of a commit they do not have.
_NO_SUCH_REF = re.compile(r"not our ref|couldn't find remote ref|no such remote ref", re.I)


def _git(
    *args: str, cwd: str | None = None, timeout: float = _GIT_TIMEOUT, url: str | None = None
) -> str:
    """Run git; `url` is the remote it talks to, named when git's error is about it.

    Raises:
        FetchError: git is missing, timed out or failed; the message keeps git's stderr (bounded)
            and names the cause when it is one of the common ones (no such repository, not a
            repository, no space left).
    """
    env = dict(
        os.environ,
        GIT_TERMINAL_PROMPT="0",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_ALLOW_PROTOCOL="file:https:ssh",
        GIT_ASKPASS="true",
    )
    cmd = ["git", "-c", "core.hooksPath=/dev/null", "-c", "protocol.ext.allow=never", *args]
    try:
        out = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, timeout=timeout, check=True, text=True
        )
    except FileNotFoundError as e:
        raise FetchError(
            "the `git` command is not installed; install git to use git+ specs", stderr=""
        ) from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"`git {args[0]}` took longer than {timeout:g} s", stderr="") from e
    except subprocess.CalledProcessError as e:
        said = _said(e.stderr or "")
        cause = _cause(said, url or "", cwd)
        raise FetchError(
            f"`git {args[0]}` failed ({describe_exit(e.returncode)}){cause}; git said: {said or '-'}",
            stderr=said,
        ) from e
    return out.stdout


def _said(stderr: str) -> str:
    """git's stderr on one line (its lines joined by ' | '), at most `_STDERR_CHARS` of it."""
    lines = [" ".join(line.split()) for line in stderr.splitlines()]
    text = " | ".join(line for line in lines if line)
    if len(text) > _STDERR_CHARS:
        half = _STDERR_CHARS // 2
        text = f"{text[:half]} […] {text[-half:]}"
    return text


def _cause(said: str, url: str, cwd: str | None) -> str:
    """What git's words mean, for the causes a user can act on; '' when none is recognised."""
    low = said.lower()
    if "no space left on device" in low or "disk quota exceeded" in low:
        tmp = tempfile.gettempdir()
        where = tmp if cwd is None or cwd.startswith(tmp) else cwd
        return f": no space left on the disk at {where}; free space there or point TMPDIR elsewhere"
    local = urlsplit(url).path if urlsplit(url).scheme == "file" else None
    if local is not None and (
        "does not appear to be a git repository" in low or "not a git repository" in low
    ):
        if not os.path.exists(local):
            return f": there is no repository at {local} (no such file or directory)"
        return f": {local} is not a git repository"
    if "repository not found" in low or ("repository '" in low and "not found" in low):
        return (
            f": the repository {url} does not exist (or is private and no credentials were given)"
        )
    if "could not resolve host" in low:
        return f": the host of {url} cannot be resolved (offline, or a mistyped host?)"
    return ""


def resolve(url: str, ref: str | None) -> tuple[str, str]:
    """Resolve `ref` (None: the remote's HEAD) at `url` to `(ref name, commit sha)`.

    Raises:
        RefNotFoundError: no branch, tag or commit of that name.
        ResolveError: the repository cannot be reached or the ref is ambiguous.
    """
    if ref is not None and _SHA.fullmatch(ref):
        if urlsplit(url).scheme == "file":  # checked here; elsewhere the fetch says (`export`)
            return ref, _rev_parse_local(url, ref)
        return ref, ref
    try:
        listing = _git("ls-remote", url, url=url)
    except FetchError as e:
        raise ResolveError(
            f"cannot list refs of {url}: {e}", stderr=getattr(e, "stderr", "")
        ) from e
    refs: dict[str, str] = {}
    for line in listing.splitlines():
        sha, _, name = line.partition("\t")
        if name.endswith("^{}"):  # annotated tag: the peeled commit wins
            refs[name[:-3]] = sha
        else:
            refs.setdefault(name, sha)
    if ref is None:
        if "HEAD" not in refs:
            raise RefNotFoundError(f"{url} has no HEAD (an empty repository?); give a ref")
        return "HEAD", refs["HEAD"]
    candidates = [n for n in (ref, f"refs/heads/{ref}", f"refs/tags/{ref}") if n in refs]
    if len(candidates) > 1 and refs[candidates[0]] != refs[candidates[-1]]:
        raise ResolveError(
            f"{ref!r} is both a branch and a tag in {url}; say refs/heads/{ref} or refs/tags/{ref}"
        )
    if candidates:
        return candidates[0], refs[candidates[0]]
    if urlsplit(url).scheme == "file":
        if _HEX.fullmatch(ref):
            return ref, _rev_parse_local(url, ref)
        raise RefNotFoundError(f"{url} has no branch, tag or commit {ref!r}")
    if _HEX.fullmatch(ref):
        raise RefNotFoundError(
            f"{url} has no branch or tag {ref!r} (abbreviated commits resolve only for file:// "
            "repositories; give the full 40-character SHA)"
        )
    raise RefNotFoundError(f"{url} has no branch or tag {ref!r}")


def _rev_parse_local(url: str, ref: str) -> str:
    path = urlsplit(url).path
    try:
        return _git(
            "--git-dir", _git_dir(path), "rev-parse", "--verify", f"{ref}^{{commit}}", url=url
        ).strip()
    except FetchError as e:
        if "not a git repository" in e.stderr.lower():
            raise ResolveError(f"cannot read {url}: {e}", stderr=e.stderr) from e
        raise RefNotFoundError(f"{url} has no branch, tag or commit {ref!r}") from e


def _git_dir(path: str) -> str:
    dotgit = os.path.join(path, ".git")
    return dotgit if os.path.isdir(dotgit) else path


def export(url: str, sha: str, dest: Path, ref: str | None = None) -> None:
    """Write the tree of commit `sha` of `url` into the empty folder `dest`.

    Fetches just that commit (shallow) into a temporary bare repository, then `git archive`s it
    through isolhub's checked extractor, which also checks the embedded commit id.

    Raises:
        FetchError: the commit cannot be fetched. ArchiveError: the export is refused.
    """
    # Named for its owner, so a fetch killed mid-way (a whole pack) is swept by a later run.
    tmp = temp_dir("git")
    try:
        repo = os.path.join(tmp, "repo.git")
        _git("init", "--quiet", "--bare", repo)
        try:
            _git("fetch", "--quiet", "--depth", "1", "--no-tags", url, sha, cwd=repo, url=url)
        except FetchError as e:
            if not ref or ref == sha:
                if _NO_SUCH_REF.search(e.stderr):
                    raise RefNotFoundError(
                        f"{url} has no commit {sha}: {e}", stderr=e.stderr
                    ) from e
                raise
            _git("fetch", "--quiet", "--depth", "1", "--no-tags", url, ref, cwd=repo, url=url)
            got = _git("rev-parse", "FETCH_HEAD", cwd=repo).strip()
            if got != sha:
                raise FetchError(
                    f"{url} moved {ref} from {sha[:12]} to {got[:12]} while fetching; try again"
                ) from None
        archive = os.path.join(tmp, "tree.tar")
        _git("archive", "--format=tar", "-o", archive, sha, cwd=repo)
        extract_tar(Path(archive), dest, expected_commit=sha)
    finally:
        remove_tree(Path(tmp))
