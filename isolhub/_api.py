"""The torch.hub-compatible functions: `list`, `help`, `load`, `load_state_dict`, and `fetch`.

Each builds one `HubOptions` from its arguments and hands it to the engine (`_engine`), which
runs the repo in its own worker process, so the repo's modules never enter this process's
`sys.modules` and two refs of one repo can be loaded side by side:

    spec string ──▶ RepoSpec ──▶ Snapshot (commit-pinned, cached) ──▶ Worker ──▶ result
      _spec          _source / _cache / _git / _github              _process ⇄ _worker
                                                                   _arena, _byvalue (transport)

Example (`git_repo` is a git repository whose hubconf's `net` builds a linear layer of 4 inputs
and 2 outputs at tag v1, 3 at v2):
    >>> import isolhub as hub
    >>> hub.list(f"git+file://{git_repo}@v1")
    ['net']
    >>> a = hub.load(f"git+file://{git_repo}@v1", "net", pretrained=False)
    >>> b = hub.load(f"git+file://{git_repo}@v2", "net", pretrained=False)
    >>> a.out_features, b.out_features
    (2, 3)
"""

from __future__ import annotations

import builtins
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from ._engine import admitted_snapshot, environment_for, policy_for, run_help, run_list, run_load
from ._options import HubOptions
from ._sandbox.policy import SandboxReport, probe
from ._source.snapshot import Snapshot
from ._types import EnvArg, Mode, SandboxArg, Source, TrustRepo

if TYPE_CHECKING:
    from ._env.environment import Env

__all__ = ["fetch", "help", "list", "load", "load_state_dict", "prepare_env", "sandbox_report"]


def fetch(
    repo_or_dir: str,
    *,
    source: Source = "github",
    trust_repo: TrustRepo = "check",
    force_reload: bool = False,
    verbose: bool = False,
) -> Snapshot:
    """Resolve a spec to a commit and make sure its snapshot is cached; nothing is imported.

    Example (`git_repo`: a git repository with a tag v1):
        >>> import isolhub as hub
        >>> snap = hub.fetch(f"git+file://{git_repo}@v1")
        >>> len(snap.sha), [p.name for p in snap.path.iterdir()]
        (40, ['hubconf.py'])

    Raises:
        SpecError, ResolveError, UntrustedRepoError, FetchError, ArchiveError, CacheError.
    """
    o = HubOptions(source=source, trust_repo=trust_repo, force_reload=force_reload, verbose=verbose)
    return admitted_snapshot(repo_or_dir, o, "fetch")


def prepare_env(
    repo_or_dir: str,
    *,
    requirements: builtins.list[str] | None = None,
    source: Source = "github",
    trust_repo: TrustRepo = "check",
    force_reload: bool = False,
    sandbox: SandboxArg = None,
    verbose: bool = True,
) -> Env | None:
    """Install (or find) the environment `env="auto"` gives the repo; None if it requires nothing.

    Returns the `Env`: which packages at which versions, shared or of its own, and why. It is
    what `load(..., env="auto")` runs with (the same cache entry), so it is that load's
    dependency provenance.

    Example (`repo`: a folder with a hubconf.py and no requirements):
        >>> import isolhub as hub
        >>> hub.prepare_env(repo, source="local") is None
        True

    Raises:
        EnvError, OfflineError, and what `fetch` raises.
    """
    o = HubOptions(
        source=source,
        trust_repo=trust_repo,
        force_reload=force_reload,
        verbose=verbose,
        sandbox=sandbox,
        env="auto",
        requirements=requirements,
    )
    policy = policy_for(sandbox, "prepare_env")
    return environment_for(admitted_snapshot(repo_or_dir, o, "load"), o, policy)


def list(  # noqa: A001 - torch.hub's name
    github: str,
    force_reload: bool = False,
    skip_validation: bool = False,
    trust_repo: TrustRepo = "check",
    verbose: bool = True,
    *,
    source: Source = "github",
    timeout: float | None = None,
    sandbox: SandboxArg = None,
    env: EnvArg = None,
    requirements: builtins.list[str] | None = None,
) -> builtins.list[str]:
    """The entrypoints of a repo's hubconf: its public callables, imported ones included.

    hubconf is imported in a worker, never in this process.

    Raises:
        SpecError, ResolveError, UntrustedRepoError, FetchError: the repo could not be had.
        RemoteError: importing hubconf raised. WorkerError: the worker died or timed out.
    """
    o = HubOptions(
        source=source,
        trust_repo=trust_repo,
        force_reload=force_reload,
        verbose=verbose,
        skip_validation=skip_validation,
        timeout=timeout,
        sandbox=sandbox,
        env=env,
        requirements=requirements,
    )
    return run_list(github, o)


def help(  # noqa: A001 - torch.hub's name
    github: str,
    model: str,
    force_reload: bool = False,
    skip_validation: bool = False,
    trust_repo: TrustRepo = "check",
    *,
    source: Source = "github",
    verbose: bool = True,
    timeout: float | None = None,
    sandbox: SandboxArg = None,
    env: EnvArg = None,
    requirements: builtins.list[str] | None = None,
) -> str | None:
    """The docstring of entrypoint `model` (None if it has none).

    Raises:
        EntrypointError: no such callable. MissingDependenciesError: `dependencies` unmet.
        and what `list` raises.
    """
    o = HubOptions(
        source=source,
        trust_repo=trust_repo,
        force_reload=force_reload,
        verbose=verbose,
        skip_validation=skip_validation,
        timeout=timeout,
        sandbox=sandbox,
        env=env,
        requirements=requirements,
    )
    return run_help(github, model, o)


def load(
    repo_or_dir: str,
    model: str,
    *args: Any,
    source: Source = "github",
    trust_repo: TrustRepo = "check",
    force_reload: bool = False,
    verbose: bool = True,
    skip_validation: bool = False,
    mode: Mode = "module",
    timeout: float | None = None,
    seed: int | None = None,
    sandbox: SandboxArg = None,
    env: EnvArg = None,
    requirements: builtins.list[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Call entrypoint `model(*args, **kwargs)` of the repo in a worker and return its result.

    `mode="module"` (trusted code) ships the returned object back with its classes by value and
    its tensors read out of the worker's memory; `mode="state_dict"` is `load_state_dict`.
    `timeout` bounds the worker's time (it is killed past it). Without `seed`, the worker
    starts from this process's random state (torch's CPU generator, `random`, numpy's) and hands
    its end state back, so `torch.manual_seed(s); load(...)` draws what torch.hub would, and
    leaves the generators where torch.hub would; `seed` seeds the worker's torch, random and
    numpy instead, right before the entrypoint, and leaves this process's state untouched.
    Warnings the repo raises are re-issued here, through this process's filters.
    `env="auto"` installs what the repo requires (its requirements.txt, pyproject
    dependencies, or `requirements=[...]`) into a cached environment, sharing the packages
    the zygote has imported (see docs/environments.md).

    Raises:
        EntrypointError, MissingDependenciesError, RemoteError: as torch.hub, but typed.
        WorkerCrashedError, WorkerTimeoutError: the worker died or hung.
        and what `list` raises.
    """
    o = HubOptions(
        source=source,
        trust_repo=trust_repo,
        force_reload=force_reload,
        verbose=verbose,
        skip_validation=skip_validation,
        mode=mode,
        timeout=timeout,
        seed=seed,
        sandbox=sandbox,
        env=env,
        requirements=requirements,
    )
    return run_load(repo_or_dir, model, args, kwargs, o)


def load_state_dict(
    repo_or_dir: str,
    model: str,
    *args: Any,
    source: Source = "github",
    trust_repo: TrustRepo = "check",
    force_reload: bool = False,
    verbose: bool = True,
    skip_validation: bool = False,
    timeout: float | None = None,
    seed: int | None = None,
    sandbox: SandboxArg = None,
    env: EnvArg = None,
    requirements: builtins.list[str] | None = None,
    **kwargs: Any,
) -> OrderedDict[str, Any]:
    """The `state_dict()` of what entrypoint `model` returns, through shared memory, no pickle.

    Tied weights stay tied (one storage). Same arguments and errors as `load`.
    """
    return load(
        repo_or_dir,
        model,
        *args,
        source=source,
        trust_repo=trust_repo,
        force_reload=force_reload,
        verbose=verbose,
        skip_validation=skip_validation,
        mode="state_dict",
        timeout=timeout,
        seed=seed,
        sandbox=sandbox,
        env=env,
        requirements=requirements,
        **kwargs,
    )


def sandbox_report() -> SandboxReport:
    """What this kernel can enforce for `sandbox="strict"`, and what it cannot.

    Example:
        >>> import isolhub as hub
        >>> print(hub.sandbox_report())
        isolhub sandbox: what this kernel can enforce (Linux ...)
          [...] environment    os.environ, cwd, umask
        ...
    """
    return probe()
