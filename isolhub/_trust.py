"""torch.hub's `trust_repo` semantics, with the `trusted_list` file in the hub dir.

GitHub repositories are keyed `owner_name` (as torch.hub, so one file serves both); remote git
repositories by URL. Local directories and `git+file://` repositories are always trusted, as
`source='local'` is in torch.hub.

Example:
    >>> check_trust(parse_spec("someone/net"), trust_repo=True)   # appends someone_net
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from ._cache import hub_dir, repo_dir
from ._errors import UntrustedRepoError
from ._spec import RepoSpec

TRUSTED_OWNERS = ("pytorch", "facebookresearch", "facebookincubator", "fairinternal")


def trust_key(spec: RepoSpec) -> str | None:
    """The `trusted_list` entry for `spec`, or None when it needs no trust (local, file://)."""
    if spec.kind == "local" or (spec.kind == "git" and spec.location.startswith("file://")):
        return None
    if spec.kind == "github":
        return spec.location.replace("/", "_")
    return spec.location


def is_trusted(spec: RepoSpec) -> bool:
    """Whether `spec`'s repository is trusted without asking."""
    key = trust_key(spec)
    if key is None:
        return True
    if spec.kind == "github" and spec.owner in TRUSTED_OWNERS:
        return True
    if key in _read_list():
        return True
    # torch.hub's legacy rule: what was already downloaded counts as trusted.
    return (repo_dir(spec) / "snapshots").is_dir()


def _read_list() -> set[str]:
    try:
        return {line.strip() for line in (hub_dir() / "trusted_list").read_text().splitlines()}
    except OSError:
        return set()


def _add(key: str) -> None:
    root = hub_dir(create=True)
    with open(root / "trusted_list", "a") as f:
        f.write(key + "\n")


def check_trust(spec: RepoSpec, trust_repo: Any, calling_fn: str = "load") -> None:
    """Apply torch.hub's `trust_repo` rules (None, 'check', True, False) before any download.

    Raises:
        UntrustedRepoError: the user said no, or there is no terminal to ask on.
    """
    key = trust_key(spec)
    if key is None:
        return
    trusted = is_trusted(spec)
    if trust_repo is None:
        if not trusted:
            warnings.warn(
                "You are about to download and run code from an untrusted repository. In a future "
                f"release, this won't be allowed. To add the repository to your trusted list, "
                f"change the command to {calling_fn}(..., trust_repo=False) and a command "
                f"prompt will appear asking for an explicit confirmation of trust, or "
                f"{calling_fn}(..., trust_repo=True), which will assume that the prompt is to be "
                "answered with 'yes'. You can also use load(..., trust_repo='check') which will "
                "only prompt for confirmation if the repo is not already trusted. This will "
                "eventually be the default behaviour",
                UserWarning,
                stacklevel=3,
            )
        return
    if trust_repo is True:
        if not trusted:
            _add(key)
        return
    if trust_repo == "check" and trusted:
        return
    if trust_repo not in (False, "check"):
        raise UntrustedRepoError(
            f"trust_repo must be None, 'check', True or False, not {trust_repo!r}"
        )
    _prompt(spec, key, trusted)


def _prompt(spec: RepoSpec, key: str, trusted: bool) -> None:
    hint = (
        f"pass trust_repo=True, or add the line '{key}' to {hub_dir() / 'trusted_list'}, "
        "or load it confined with mode='remote', sandbox='strict'"
    )
    if not (sys.stdin and sys.stdin.isatty()):
        raise UntrustedRepoError(
            f"the repository {spec} is not trusted and there is no terminal to ask on; {hint}",
            spec=str(spec),
        )
    answer = (
        input(
            f"The repository {key} does not belong to the list of trusted repositories and as such "
            "cannot be downloaded. Do you trust this repository and wish to add it to the trusted "
            "list of repositories (y/N)?"
        )
        .strip()
        .lower()
    )
    if answer in ("y", "yes"):
        if trusted:
            print("The repository is already trusted.")
        else:
            _add(key)
        return
    if answer in ("", "n", "no"):
        raise UntrustedRepoError(f"Untrusted repository {spec}; {hint}", spec=str(spec))
    raise UntrustedRepoError(f"Unrecognized response {answer!r}; answer y or n", spec=str(spec))
