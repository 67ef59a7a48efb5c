"""git sources through the `git` command line: resolve a ref, fetch one commit, export it.

git always runs with transports restricted to file, https and ssh (never `ext::`), hooks off,
no terminal prompts, and no system config.

Example:
    >>> resolve("file:///srv/net.git", "v1")
    ('refs/tags/v1', '57dad2b497074fac03b88b433efcff9349f9bc6c')
    >>> export("file:///srv/net.git", "57dad2b4...", Path("/tmp/staging"))
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from ._archive import extract_tar
from ._cache import remove_tree, temp_dir
from ._errors import FetchError, RefNotFoundError, ResolveError

_SHA = re.compile(r"[0-9a-f]{40}")
_HEX = re.compile(r"[0-9a-f]{4,40}")
_GIT_TIMEOUT = 600


def _git(*args: str, cwd: str | None = None, timeout: float = _GIT_TIMEOUT) -> str:
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
        raise FetchError("the `git` command is not installed; install git to use git+ specs") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"`git {args[0]}` took longer than {timeout:g} s") from e
    except subprocess.CalledProcessError as e:
        msg = (e.stderr or "").strip().splitlines()
        raise FetchError(f"`git {args[0]}` failed: {msg[-1] if msg else e}") from e
    return out.stdout


def resolve(url: str, ref: str | None) -> tuple[str, str]:
    """Resolve `ref` (None: the remote's HEAD) at `url` to `(ref name, commit sha)`.

    Raises:
        RefNotFoundError: no branch, tag or commit of that name.
        ResolveError: the repository cannot be reached or the ref is ambiguous.
    """
    if ref is not None and _SHA.fullmatch(ref):
        return ref, ref
    try:
        listing = _git("ls-remote", url)
    except FetchError as e:
        raise ResolveError(f"cannot list refs of {url}: {e}") from e
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
    if _HEX.fullmatch(ref) and urlsplit(url).scheme == "file":
        return ref, _rev_parse_local(url, ref)
    raise RefNotFoundError(
        f"{url} has no branch or tag {ref!r} (abbreviated commits resolve only for file:// "
        "repositories; give the full 40-character SHA)"
    )


def _rev_parse_local(url: str, ref: str) -> str:
    path = urlsplit(url).path
    try:
        return _git(
            "--git-dir", _git_dir(path), "rev-parse", "--verify", f"{ref}^{{commit}}"
        ).strip()
    except FetchError as e:
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
            _git("fetch", "--quiet", "--depth", "1", "--no-tags", url, sha, cwd=repo)
        except FetchError:
            if not ref or ref == sha:
                raise
            _git("fetch", "--quiet", "--depth", "1", "--no-tags", url, ref, cwd=repo)
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
