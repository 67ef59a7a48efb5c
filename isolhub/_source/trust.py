"""torch.hub's `trust_repo` rules (those of the installed torch, 2.13), with its `trusted_list`.

As torch.hub's `_check_repo_is_trusted`:
* the hub dir and `<hub>/trusted_list` are created on every check (the file empty);
* a repository is trusted when `owner_name` is in the list, its owner is one of
  `TRUSTED_OWNERS`, or the folder torch.hub would download it to (`<hub>/owner_name_ref`, a
  directory or a link to one) exists (torch's "already downloaded" rule);
* `False` always asks through `input()`, `"check"` asks when untrusted; `True`, `None` (and
  nothing else: other values are refused) trust without asking;
* whatever was trusted by the answer or by the argument, and was not trusted yet, is appended.

GitHub repositories are keyed `owner_name` (as torch.hub, so one file serves both); remote git
repositories by URL. Local directories and `git+file://` repositories need no trust, as
`source='local'` in torch.hub.

`admit` is the one trust decision of every entry point (`isolhub.load`, `Hub`, `compare`, the
torch.hub patch): code that will only ever run confined needs no trust (that is the point of the
sandbox); anything else is asked about with `check_trust`, one prompt at a time in this process.
Fetching (`_source.snapshot.fetch_snapshot`) decides nothing about trust.

Example:
    >>> from isolhub._spec import parse_spec
    >>> admit(parse_spec("someone/net"), HubOptions(trust_repo=True))   # appends someone_net
    >>> is_trusted(parse_spec("someone/net"))
    True
    >>> is_trusted(parse_spec("other/net")), is_trusted(parse_spec("pytorch/vision"))
    (False, True)
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from .._cache.store import hub_dir
from .._errors import Option, TrustResponseError, UntrustedRepoError
from .._options import HubOptions
from .._spec import RepoSpec

__all__ = ["TRUSTED_OWNERS", "TRUST_VALUES", "admit", "check_trust", "is_trusted", "trust_key"]

TRUSTED_OWNERS = ("pytorch", "facebookresearch", "facebookincubator", "fairinternal")
TRUST_VALUES = (None, "check", True, False)


# One prompt at a time, never two threads (a Hub's tasks, compare's sides) on one terminal.
_PROMPT_LOCK = threading.Lock()


def admit(spec: RepoSpec, o: HubOptions, calling_fn: str = "load") -> None:
    """Decide whether `spec` may be fetched and run with options `o`: the one trust decision.

    Confined code (`o.sandbox` names a policy) needs no trust; otherwise torch.hub's
    `trust_repo` rules apply (`check_trust`). `calling_fn` names the public function in messages.

    Raises:
        UntrustedRepoError, TrustResponseError: as `check_trust`.
        SandboxError: `o.sandbox` is no sandbox value.
    """
    if o.policy is not None:
        return
    with _PROMPT_LOCK:
        check_trust(spec, o.trust_repo, calling_fn)


def trust_key(spec: RepoSpec) -> str | None:
    """The `trusted_list` entry for `spec`, or None when it needs no trust (local, file://)."""
    if spec.kind == "local" or (spec.kind == "git" and spec.location.startswith("file://")):
        return None
    if spec.kind == "github":
        return spec.location.replace("/", "_")
    return spec.location


def torch_folder_names(spec: RepoSpec) -> tuple[str, ...]:
    """The names torch.hub gives `spec`'s download folder in the hub dir (GitHub specs only).

    `owner_name_ref` with `/` in the ref made `_`; without a ref, torch.hub probes `main` then
    `master`, so either name may be the one.
    """
    if spec.kind != "github":
        return ()
    stem = spec.location.replace("/", "_")
    refs = (spec.ref,) if spec.ref is not None else ("main", "master")
    return tuple(f"{stem}_{ref.replace('/', '_')}" for ref in refs)


def is_trusted(spec: RepoSpec) -> bool:
    """Whether `spec`'s repository is trusted without asking (reads, never writes)."""
    key = trust_key(spec)
    if key is None:
        return True
    if spec.kind == "github" and spec.owner in TRUSTED_OWNERS:
        return True
    if key in _read_list():
        return True
    root = hub_dir()
    return any((root / name).is_dir() for name in torch_folder_names(spec))


def _list_path() -> os.PathLike[str]:
    return hub_dir() / "trusted_list"


def _read_list() -> set[str]:
    try:
        with open(_list_path()) as f:
            return {line.strip() for line in f}
    except OSError:
        return set()


def _touch_list() -> None:
    # torch.hub makes the hub dir and an empty trusted_list on every check. A read-only cache
    # must still serve what it holds, so failing to create them is not an error here.
    with contextlib.suppress(OSError):
        root = hub_dir()
        root.mkdir(parents=True, exist_ok=True)
        (root / "trusted_list").touch()


def _add(key: str) -> None:
    root = hub_dir(create=True)
    with open(root / "trusted_list", "a") as f:
        f.write(key + "\n")


def check_trust(spec: RepoSpec, trust_repo: Any, calling_fn: str = "load") -> None:
    """Apply torch.hub's `trust_repo` rules (None, 'check', True, False) before any download.

    `calling_fn` names the public function in messages.

    Raises:
        UntrustedRepoError: the user said no, there was no one to ask (stdin closed or not
            readable), or `trust_repo` is none of None, 'check', True, False.
        TrustResponseError: an answer other than y/yes/n/no/'' (also a `ValueError`, as in torch).
    """
    key = trust_key(spec)
    if key is None:
        return
    if not any(trust_repo is v or (isinstance(v, str) and trust_repo == v) for v in TRUST_VALUES):
        raise UntrustedRepoError(
            f"{calling_fn}(..., trust_repo={trust_repo!r}): trust_repo must be None, 'check', "
            "True or False",
            spec=str(spec),
        )
    _touch_list()
    trusted = is_trusted(spec)
    if trust_repo is False or (trust_repo == "check" and not trusted):
        _prompt(spec, key, trusted)
    if not trusted:
        _add(key)


def _prompt(spec: RepoSpec, key: str, trusted: bool) -> None:
    """Ask through `input()` as torch.hub does; return only when the answer is yes."""
    hint = (
        "pass ",
        Option.of(trust_repo=True),
        f", or add the line '{key}' to {hub_dir() / 'trusted_list'}, or load it confined with ",
        Option.of(mode="remote", sandbox="strict"),
    )
    try:
        answer = input(
            f"The repository {key} does not belong to the list of trusted repositories and as such "
            "cannot be downloaded. Do you trust this repository and wish to add it to the trusted "
            "list of repositories (y/N)?"
        )
    except (EOFError, OSError) as e:
        # torch.hub lets the EOFError through; here it says what to do instead.
        raise UntrustedRepoError(
            (
                f"Untrusted repository {spec}: it is not trusted and there is no one to ask "
                f"(stdin gave {type(e).__name__}); ",
                *hint,
            ),
            spec=str(spec),
        ) from None
    if answer.lower() in ("y", "yes"):
        if trusted:
            print("The repository is already trusted.")
        return
    if answer.lower() in ("n", "no", ""):
        raise UntrustedRepoError((f"Untrusted repository {spec}; ", *hint), spec=str(spec))
    raise TrustResponseError(
        f"Unrecognized response {answer}. (to trust {spec}, answer y or yes; to refuse, n, no or "
        "nothing)",
        spec=str(spec),
    )
