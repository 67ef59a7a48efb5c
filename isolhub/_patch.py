"""Route `torch.hub` to isolhub while a patch is on, so existing torch.hub code gets isolation.

    >>> import isolhub, torch
    >>> isolhub.patch_torch_hub()                        # until unpatch_torch_hub()
    >>> torch.hub.load(repo, "net", source="local")      # served by isolhub, built in a worker
    Linear(in_features=4, out_features=2, bias=True)
    >>> isolhub.unpatch_torch_hub()
    >>> with isolhub.patched_torch_hub(mode="remote"):
    ...     with torch.hub.load(repo, "net", source="local") as m:   # a RemoteModule
    ...         m(torch.ones(1, 4)).shape
    torch.Size([1, 2])

(`repo` is a folder whose hubconf's `net` builds `torch.nn.Linear(4, 2)`.)

Routed: `torch.hub.list`, `help`, `load`, `load_state_dict_from_url`, `download_url_to_file`,
`get_dir`, `set_dir` and `torch.utils.model_zoo.load_url` (the same callable as
`torch.hub.load_state_dict_from_url`, as in torch). The rules, decided here and listed in
`docs/torchhub-compat.md`:

* **Signatures are torch.hub's.** Every keyword torch.hub forwards to the entrypoint is still
  forwarded, `mode=`, `sandbox=`, `timeout=` and `seed=` included: isolhub's own options come from
  the patch, never from the call. `skip_validation=False` (torch's default) makes torch.hub's ref
  check (`isolhub._source.github.validate_ref`) when a snapshot is downloaded.
* **The hub dir is torch.hub's.** `torch.hub.get_dir()` is `isolhub.get_dir()`, which is what
  torch.hub would answer (its `set_dir` setting, `$TORCH_HOME/hub`, ...; it also warns when
  `$TORCH_HUB` is set) unless `isolhub.set_dir()` or `$ISOLHUB_HOME` chose another;
  `torch.hub.set_dir(d)` sets isolhub's dir, which outlasts the patch, as `isolhub.set_dir` does.
  torch's own setting is never touched.
* **Aliases are rebound.** Modules imported before the patch that bound torch.hub's functions at
  module level (`from torch.hub import load as hub_load`) are rebound too, and put back when the
  patch ends, where nobody changed them meanwhile. References held elsewhere (a dict, a closure, a
  default argument, `functools.partial`) keep torch's function; those still find `get_dir` and
  `download_url_to_file` in torch.hub's namespace when called, so they too use isolhub's dir and
  downloader while the patch is on (torch's `load` through such a reference is not isolated).
* **A wrapper outliving the patch is harmless.** A module that imported `torch.hub.load` while
  the patch was on keeps isolhub's wrapper, which calls torch.hub's original once no patch is on.
* **Nesting and threads.** `patched_torch_hub()` nests: an inner block's options apply inside it
  (unset ones inherit from the enclosing patch) and the outer ones come back after it; torch.hub is
  restored when the last patch ends. The patch changes module attributes, so it is process-wide,
  not per thread: a block in one thread routes every thread's torch.hub calls. Installing and
  restoring hold a lock; blocks may end in any order.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from . import _config, _engine
from ._options import HubOptions
from ._types import Mode, SandboxArg, Source
from ._weights import checkpoints as _checkpoints
from ._weights import download as _download

__all__ = ["patch_torch_hub", "patched_torch_hub", "unpatch_torch_hub"]

HUB_NAMES = (
    "list",
    "help",
    "load",
    "load_state_dict_from_url",
    "download_url_to_file",
    "get_dir",
    "set_dir",
)
_UNSET: Any = object()


_lock = threading.RLock()
# The isolhub half of a patch's options (mode, sandbox, timeout, seed); each torch.hub call
# fills in its own half (`_options`).
_base: HubOptions | None = None  # set by patch_torch_hub()
_frames: list[HubOptions] = []  # one per active patched_torch_hub() block, innermost last
_installed: list[tuple[types.ModuleType, str, Any, Any]] = []  # (module, name, before, wrapper)
_fallthrough: dict[str, Any] = {}  # torch.hub's functions, called when no patch is on


def patch_torch_hub(
    *,
    mode: Mode = "module",
    sandbox: SandboxArg = None,
    timeout: float | None = None,
    seed: int | None = None,
) -> None:
    """Route torch.hub to isolhub until `unpatch_torch_hub()`; calling it again replaces the options.

    Args:
        mode: what `torch.hub.load` returns: "module" (the object, its classes by value),
            "state_dict" or "remote" (a handle; the object stays in its worker).
        sandbox: None, "strict" or an `isolhub.Sandbox`: confine the workers (needs "remote" or
            "state_dict").
        timeout: seconds each worker may take per call before it is killed.
        seed: seeds torch and random in the worker before each entrypoint runs.

    Example:
        >>> import isolhub, torch
        >>> isolhub.patch_torch_hub(mode="remote")
        >>> m = torch.hub.load(repo, "net", source="local")   # `repo`: a folder with a hubconf.py
        >>> type(m).__name__, m.out_features
        ('RemoteModule', 2)
        >>> m.close(); isolhub.unpatch_torch_hub()

    Raises:
        UsageError: an unknown mode or a bad timeout (a ValueError).
        SandboxError: an unknown sandbox, or a sandbox with mode="module".
    """
    global _base
    opts = _check(HubOptions(mode=mode, sandbox=sandbox, timeout=timeout, seed=seed))
    with _lock:
        _base = opts
        _install()


def unpatch_torch_hub() -> None:
    """End the patch started by `patch_torch_hub()`; torch.hub is restored unless a block is open.

    Calling it when no patch is on does nothing.

    Example:
        >>> import isolhub, torch
        >>> before = torch.hub.load
        >>> isolhub.patch_torch_hub()
        >>> torch.hub.load is before
        False
        >>> isolhub.unpatch_torch_hub()
        >>> torch.hub.load is before
        True

    Raises:
        Nothing.
    """
    global _base
    with _lock:
        _base = None
        if not _frames:
            _restore()


@contextlib.contextmanager
def patched_torch_hub(
    *,
    mode: Mode = _UNSET,
    sandbox: SandboxArg = _UNSET,
    timeout: float | None = _UNSET,
    seed: int | None = _UNSET,
) -> Iterator[None]:
    """Route torch.hub to isolhub inside a `with` block; options left out inherit the outer patch.

    Takes the options of `patch_torch_hub` (defaults: mode="module", no sandbox, no timeout).

    Example:
        >>> import isolhub, torch
        >>> with isolhub.patched_torch_hub(mode="remote"):
        ...     m = torch.hub.load(repo, "net", source="local")   # `repo`: a folder with a hubconf.py
        >>> m(torch.ones(1, 4)).shape          # the handle outlives the patch
        torch.Size([1, 2])
        >>> m.close()

    Raises:
        UsageError: an unknown mode or a bad timeout. SandboxError: an unknown sandbox, or one with mode="module".
    """
    given: dict[str, Any] = {"mode": mode, "sandbox": sandbox, "timeout": timeout, "seed": seed}
    with _lock:
        frame = _check(
            replace(
                _active() or HubOptions(), **{k: v for k, v in given.items() if v is not _UNSET}
            )
        )
        _frames.append(frame)
        try:
            _install()
        except BaseException:
            _pop(frame)
            raise
    try:
        yield
    finally:
        with _lock:
            _pop(frame)


def _pop(frame: HubOptions) -> None:
    for i in range(len(_frames) - 1, -1, -1):
        if _frames[i] is frame:
            del _frames[i]
            break
    if not _frames and _base is None:
        _restore()


def _active() -> HubOptions | None:
    with _lock:
        return _frames[-1] if _frames else _base


def _check(opts: HubOptions) -> HubOptions:
    _engine.policy_for(opts.sandbox, opts.mode)
    return opts


# --- installing and restoring -----------------------------------------------------------------


def _install() -> None:
    """Put the wrappers in place (once; the caller holds `_lock`)."""
    if _installed:
        return
    import torch.hub
    import torch.utils.model_zoo

    targets = [(torch.hub, name, name) for name in HUB_NAMES]
    targets.append((torch.utils.model_zoo, "load_url", "load_state_dict_from_url"))
    replaced: dict[int, tuple[Any, Any]] = {}
    for module, attr, name in targets:
        before, wrapper = getattr(module, attr), _WRAPPERS[name]
        if before is wrapper:
            continue  # a wrapper left behind by someone: it already calls _fallthrough
        if module is torch.hub:
            _fallthrough[name] = before
            replaced[id(before)] = (before, wrapper)
        setattr(module, attr, wrapper)
        _installed.append((module, attr, before, wrapper))
    _rebind_aliases(replaced, skip={torch.hub, torch.utils.model_zoo})


def _rebind_aliases(replaced: dict[int, tuple[Any, Any]], skip: set[types.ModuleType]) -> None:
    """Rebind module-level names bound to a replaced function, in every imported module."""
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType) or module in skip:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        name = namespace.get("__name__")
        if isinstance(name, str) and name.split(".")[0] == "isolhub":
            continue
        for attr, value in list(namespace.items()):
            hit = replaced.get(id(value))
            if hit is not None and hit[0] is value:
                namespace[attr] = hit[1]
                _installed.append((module, attr, value, hit[1]))


def _restore() -> None:
    """Put back what the wrappers replaced, where a wrapper is still in place (holds `_lock`)."""
    while _installed:
        module, attr, before, wrapper = _installed.pop()
        if module.__dict__.get(attr) is wrapper:
            setattr(module, attr, before)


# --- the wrappers: torch.hub's signatures, isolhub's behaviour --------------------------------


def _hub_list(
    github: str,
    force_reload: bool = False,
    skip_validation: bool = False,
    trust_repo: Any = "check",
    verbose: bool = True,
) -> list[str]:
    """torch.hub.list, served by isolhub: hubconf is imported in a worker."""
    opts = _active()
    if opts is None:
        return _fallthrough["list"](github, force_reload, skip_validation, trust_repo, verbose)
    return _engine.run_list(
        github, _options(opts, force_reload, skip_validation, trust_repo, verbose)
    )


def _hub_help(
    github: str,
    model: str,
    force_reload: bool = False,
    skip_validation: bool = False,
    trust_repo: Any = "check",
) -> str | None:
    """torch.hub.help, served by isolhub: the docstring is read in a worker."""
    opts = _active()
    if opts is None:
        return _fallthrough["help"](github, model, force_reload, skip_validation, trust_repo)
    o = _options(opts, force_reload, skip_validation, trust_repo, True)
    return _engine.run_help(github, model, o)


def _hub_load(
    repo_or_dir: str,
    model: str,
    *args: Any,
    source: Source = "github",
    trust_repo: Any = "check",
    force_reload: bool = False,
    verbose: bool = True,
    skip_validation: bool = False,
    **kwargs: Any,
) -> Any:
    """torch.hub.load, served by isolhub: the entrypoint runs in a worker; all kwargs reach it."""
    opts = _active()
    if opts is None:
        return _fallthrough["load"](
            repo_or_dir,
            model,
            *args,
            source=source,
            trust_repo=trust_repo,
            force_reload=force_reload,
            verbose=verbose,
            skip_validation=skip_validation,
            **kwargs,
        )
    o = _options(opts, force_reload, skip_validation, trust_repo, verbose, source)
    return _engine.run_load(repo_or_dir, model, args, kwargs, o)


def _hub_load_state_dict_from_url(
    url: str,
    model_dir: str | None = None,
    map_location: Any = None,
    progress: bool = True,
    check_hash: bool = False,
    file_name: str | None = None,
    weights_only: bool = False,
) -> dict[str, Any]:
    """torch.hub.load_state_dict_from_url, served by isolhub's (hardened download, same layout)."""
    fn = _checkpoints.load_state_dict_from_url
    if _active() is None:
        fn = _fallthrough["load_state_dict_from_url"]
    return fn(url, model_dir, map_location, progress, check_hash, file_name, weights_only)


def _hub_download_url_to_file(
    url: str, dst: str, hash_prefix: str | None = None, progress: bool = True
) -> None:
    """torch.hub.download_url_to_file, served by isolhub's (atomic, resumed, locked)."""
    fn = (
        _download.download_url_to_file
        if _active() is not None
        else _fallthrough["download_url_to_file"]
    )
    fn(url, dst, hash_prefix, progress)


def _hub_get_dir() -> str:
    """torch.hub.get_dir, served by isolhub's (torch's answer, unless isolhub was given a dir)."""
    if _active() is None:
        return _fallthrough["get_dir"]()
    if os.getenv("TORCH_HUB"):
        warnings.warn(
            "TORCH_HUB is deprecated, please use env TORCH_HOME instead", stacklevel=2
        )  # torch.hub's own words
    return _config.get_dir()


def _hub_set_dir(d: Any) -> None:
    """torch.hub.set_dir, served by isolhub's: sets isolhub's hub dir while patched."""
    fn = _config.set_dir if _active() is not None else _fallthrough["set_dir"]
    fn(d)


_WRAPPERS: dict[str, Any] = {
    "list": _hub_list,
    "help": _hub_help,
    "load": _hub_load,
    "load_state_dict_from_url": _hub_load_state_dict_from_url,
    "download_url_to_file": _hub_download_url_to_file,
    "get_dir": _hub_get_dir,
    "set_dir": _hub_set_dir,
}
for _name, _fn in _WRAPPERS.items():
    _fn.__name__ = _fn.__qualname__ = _name  # reprs and tracebacks read like torch.hub's
del _name, _fn


def _options(
    opts: HubOptions,
    force_reload: bool,
    skip_validation: bool,
    trust_repo: Any,
    verbose: bool,
    source: Source = "github",
) -> HubOptions:
    """torch.hub's per-call options joined with the patch's isolhub options."""
    return replace(
        opts,
        source=source,
        trust_repo=trust_repo,
        force_reload=force_reload,
        verbose=verbose,
        skip_validation=skip_validation,
    )
