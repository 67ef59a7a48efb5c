"""From a spec to a snapshot on disk: resolve the ref to a commit, fetch it once, cache it.

Every branch or tag is resolved to a commit SHA before anything is imported; the snapshot is
keyed by that SHA. Offline (`ISOLHUB_OFFLINE=1`), a branch resolves through the ref stored at its
last resolution, with zero requests; a miss is an `OfflineError`.

Before a cached snapshot is used it is checked against its manifest (sizes and mtimes; a file
whose mtime moved is re-hashed). A damaged one is fetched again, replacing it atomically; where
that cannot happen (offline, read-only cache) the load fails with `CacheCorruptedError` naming
the file. A snapshot from before manifests is fetched again too, and used as it is (with a
warning) where it cannot be.

Example (`git_repo`: a git repository with a tag v1):
    >>> from isolhub._spec import parse_spec
    >>> snap = fetch_snapshot(parse_spec(f"git+file://{git_repo}@v1"))
    >>> len(snap.sha), snap.path.parent.name, snap.path.name == snap.sha
    (40, 'snapshots', True)
    >>> fetch_snapshot(parse_spec(f"git+file://{git_repo}@v1")) == snap    # cached by commit
    True
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import _config
from .._cache.manifest import Damage
from .._cache.store import (
    STAGING_PREFIX,
    install_snapshot,
    link_torch_folder,
    read_ref,
    snapshot_damage,
    snapshot_path,
    write_ref,
)
from .._config import get_dir, is_offline
from .._errors import (
    CacheCorruptedError,
    CacheError,
    DownloadError,
    FetchError,
    OfflineError,
    Option,
    RefNotFoundError,
    ResolveError,
)
from .._progress import notice
from .._spec import RepoSpec
from . import git as _git

__all__ = ["Snapshot", "fetch_snapshot"]

_SHA = re.compile(r"[0-9a-f]{40}")
log = logging.getLogger("isolhub.cache")


@dataclass(frozen=True)
class Snapshot:
    """A repository tree on disk at a known commit (`sha` is None for local directories)."""

    spec: RepoSpec
    sha: str | None
    path: Path

    @property
    def label(self) -> str:
        """`spec@sha12`, for messages."""
        return f"{self.spec}" + (f" ({self.sha[:12]})" if self.sha else "")


def fetch_snapshot(
    spec: RepoSpec,
    *,
    force_reload: bool = False,
    verbose: bool = True,
    skip_validation: bool = True,
) -> Snapshot:
    """Resolve `spec` to a commit and make sure its snapshot is in the cache.

    Trust is not decided here: the caller has asked `_source.trust.admit` first.
    `skip_validation=False` adds torch.hub's check that a GitHub ref is a branch or tag (or a
    prefix of one's head commit), made only when the snapshot is actually downloaded, as torch.hub
    does; a spec without a ref (the default branch) needs no check.

    Raises:
        ResolveError, RefNotFoundError, OfflineError: the ref cannot be resolved.
        RefValidationError: `skip_validation=False` and the ref is no branch or tag (a ValueError).
        FetchError, ArchiveError, CacheError.
        CacheCorruptedError: the cached snapshot is damaged and cannot be fetched again here.
    """
    if spec.kind == "local":
        path = Path(spec.location)
        if not (path / "hubconf.py").is_file():
            raise ResolveError(
                (f"{path} has no hubconf.py; ", Option.of(source="local"), " needs a hub repo dir")
            )
        return Snapshot(spec, None, path)
    ref_name, sha = _resolve(spec)
    path = snapshot_path(spec, sha)
    damage = None
    if path.is_dir() and not force_reload:
        damage = snapshot_damage(path)
        if damage is None:
            if verbose:
                notice(f"Using cache found in {path}")
            return _linked(Snapshot(spec, sha, path), ref_name)
    if is_offline():
        if damage is None:
            raise OfflineError(
                f"offline (ISOLHUB_OFFLINE is set) and {spec} at {sha[:12]} is not in the cache "
                f"({get_dir()}); run once online or unset ISOLHUB_OFFLINE"
            )
        return _damaged(spec, sha, path, damage, "offline (ISOLHUB_OFFLINE is set)")
    if damage is not None:
        log.warning("the cached snapshot %s is %s; fetching it again", path, _describe(damage))
    validate = not skip_validation
    try:
        path = install_snapshot(
            spec,
            sha,
            lambda dest: _populate(spec, sha, dest, validate),
            force=force_reload or damage is not None,
        )
    except CacheError as e:
        if damage is None:
            raise
        return _damaged(spec, sha, path, damage, f"fetching it again failed ({e})")
    return _linked(Snapshot(spec, sha, path), ref_name)


def _linked(snap: Snapshot, ref_name: str | None) -> Snapshot:
    """`snap`, with torch.hub's `<owner>_<name>_<ref>` folder name leading to it (GitHub)."""
    if ref_name is not None and snap.sha is not None:
        link_torch_folder(snap.spec, ref_name, snap.sha)
    return snap


def _describe(damage: Damage) -> str:
    if damage.what == "unverified":
        return damage.detail
    return f"damaged: {damage.path} {damage.what} ({damage.detail})"


def _damaged(spec: RepoSpec, sha: str, path: Path, damage: Damage, why: str) -> Snapshot:
    """A damaged snapshot that cannot be fetched again: refused, unless it merely predates manifests."""
    if damage.what == "unverified":
        log.warning("using the cached snapshot %s as it is: %s; %s", path, damage.detail, why)
        if not (path / "hubconf.py").is_file():
            raise FetchError(f"{spec} at commit {sha[:12]} has no hubconf.py at its top level")
        return Snapshot(spec, sha, path)
    file = damage.path if os.path.isabs(damage.path) else str(path / damage.path)
    raise CacheCorruptedError(
        (
            f"the cached snapshot of {spec} at {sha[:12]} is damaged: {file} {damage.what} "
            f"({damage.detail}), and {why}; run `isolhub cache verify --fix` and load it again "
            "online, or pass ",
            Option.of(force_reload=True),
        ),
        path=str(path),
        file=file,
    )


def _resolve(spec: RepoSpec) -> tuple[str | None, str]:
    """(the ref's name, or None when unknown offline; the commit SHA)."""
    if spec.ref is not None and _SHA.fullmatch(spec.ref):
        return spec.ref, spec.ref
    ref_key = spec.ref or "HEAD"
    if is_offline():
        sha = read_ref(spec, ref_key)
        if sha is None:
            raise OfflineError(
                f"offline (ISOLHUB_OFFLINE is set) and {spec} was never resolved here, so its "
                f"commit is unknown (hub dir {get_dir()}); run once online or unset ISOLHUB_OFFLINE"
            )
        notice(f"offline: using {spec} = {sha[:12]} as last resolved (it may be stale)")
        return spec.ref, sha
    if spec.kind == "github":
        from . import github as _github

        owner, name = spec.location.split("/")
        ref_name, sha = _github.resolve_ref(owner, name, spec.ref)
    else:
        ref_name, sha = _git.resolve(spec.location, spec.ref)
    write_ref(spec, ref_key, sha)
    return ref_name, sha


def _populate(spec: RepoSpec, sha: str, dest: Path, validate: bool = False) -> None:
    _fill(spec, sha, dest, validate)
    # Checked in the staging folder, so a commit without one never becomes a snapshot.
    if not (dest / "hubconf.py").is_file():
        raise FetchError(f"{spec} at commit {sha[:12]} has no hubconf.py at its top level")


def _fill(spec: RepoSpec, sha: str, dest: Path, validate: bool) -> None:
    if spec.kind == "git":
        _git.export(spec.location, sha, dest, spec.ref)
        return
    from . import archive as _archive
    from . import github as _github

    owner, name = spec.location.split("/")
    if validate and spec.ref is not None:
        _github.validate_ref(owner, name, spec.ref)
    fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{sha[:12]}-{os.getpid()}-", dir=dest.parent)
    os.close(fd)
    try:
        try:
            _github.download_tarball(owner, name, sha, Path(tmp))
        except DownloadError as e:
            if getattr(e, "status", None) != 404:
                raise
            # A full SHA is never resolved first: the tarball's 404 is the first "no such commit".
            api = _config.github_api()
            raise RefNotFoundError(
                f"{_github.torch_not_found(owner, name, sha, api)} (GitHub has no commit {sha} "
                f"in {owner}/{name}: {e})",
                repo=f"{owner}/{name}",
                ref=sha,
            ) from e
        _archive.extract_tar(Path(tmp), dest, expected_commit=sha, strip_top_dir=True)
    finally:
        os.unlink(tmp)
