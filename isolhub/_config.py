"""Where isolhub keeps things and how it reaches the outside, resolved at call time.

The hub dir is torch.hub's, found as torch.hub finds it, so checkpoints and `trusted_list` are
shared with it: `set_dir()` > `$ISOLHUB_HOME` > `torch.hub.set_dir()` (when torch.hub is
imported) > `$TORCH_HOME/hub` > `$XDG_CACHE_HOME/torch/hub` > `~/.cache/torch/hub`.
Nothing here is read at import time.

Example:
    >>> import isolhub
    >>> isolhub.set_dir("/tmp/hub")
    >>> isolhub.get_dir()
    '/tmp/hub'
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "DEFAULT_GITHUB_API",
    "DEFAULT_SPIN_US",
    "get_dir",
    "github_api",
    "github_token",
    "is_offline",
    "set_dir",
    "spin_seconds",
    "torch_home",
]

DEFAULT_GITHUB_API = "https://api.github.com"

_hub_dir_override: str | None = None


def set_dir(d: str | os.PathLike[str]) -> None:
    """Use `d` as the hub dir for this process (`~` is expanded), as `torch.hub.set_dir`."""
    global _hub_dir_override
    _hub_dir_override = os.path.expanduser(os.fspath(d))


def get_dir() -> str:
    """Return the hub dir: `set_dir()`, else `$ISOLHUB_HOME`, else torch.hub's own answer.

    torch.hub's answer is its `set_dir()` setting when torch.hub is imported and was given one,
    else `$TORCH_HOME/hub`, `$XDG_CACHE_HOME/torch/hub`, `~/.cache/torch/hub`, in that order
    (computed here, without importing torch).
    """
    if _hub_dir_override is not None:
        return _hub_dir_override
    if os.environ.get("ISOLHUB_HOME"):
        return os.path.expanduser(os.environ["ISOLHUB_HOME"])
    torch_set = getattr(sys.modules.get("torch.hub"), "_hub_dir", None)
    if isinstance(torch_set, str):
        return torch_set
    return os.path.join(torch_home(), "hub")


def torch_home() -> str:
    """`$TORCH_HOME`, else `$XDG_CACHE_HOME/torch`, else `~/.cache/torch` (torch's rule, `~`
    expanded; an empty variable counts as set, as in torch)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(xdg, "torch")))


def is_offline() -> bool:
    """True when `ISOLHUB_OFFLINE` is set to a true value (1, true, yes, on)."""
    return os.environ.get("ISOLHUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def github_api() -> str:
    """Base URL of the GitHub REST API (`$ISOLHUB_GITHUB_API`, default the public API)."""
    return os.environ.get("ISOLHUB_GITHUB_API", DEFAULT_GITHUB_API).rstrip("/")


def github_token() -> str | None:
    """`$GITHUB_TOKEN`, or None; sent only to the `github_api()` host."""
    return os.environ.get("GITHUB_TOKEN") or None


DEFAULT_SPIN_US = 200


def spin_seconds() -> float:
    """How long a side of a worker channel polls before it sleeps (`$ISOLHUB_SPIN_US`, µs).

    Waking a sleeping process costs more than a short call's whole round trip on many virtual
    machines; polling for a short while first keeps remote calls fast. 0 turns it off.
    """
    try:
        us = float(os.environ.get("ISOLHUB_SPIN_US", DEFAULT_SPIN_US))
    except ValueError:
        us = DEFAULT_SPIN_US
    return max(0.0, min(us, 10_000.0)) * 1e-6
