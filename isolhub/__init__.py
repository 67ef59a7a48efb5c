"""isolhub: load PyTorch Hub models with every repo@ref in its own worker process.

A drop-in for `torch.hub` (here `git_repo` is a git repository whose tags v1 and v2 ship a
hubconf.py with an entrypoint `net`):

    >>> import sys
    >>> import isolhub as hub
    >>> hub.list(f"git+file://{git_repo}@v1")
    ['net']
    >>> a = hub.load(f"git+file://{git_repo}@v1", "net", pretrained=False)
    >>> b = hub.load(f"git+file://{git_repo}@v2", "net", pretrained=False)
    >>> a.out_features, b.out_features      # two refs of one repo, side by side
    (2, 3)
    >>> "hubconf" in sys.modules            # imported in the workers, never here
    False
"""

import builtins as _builtins
import importlib as _importlib
import typing as _typing

from ._version import __version__ as __version__

# Names are loaded on first use, so `import isolhub._process.runtime` (in the zygote) and
# `isolhub --help` stay cheap. The TYPE_CHECKING block mirrors the table for tools.
_EXPORTS = {
    "_api": ("fetch", "help", "list", "load", "load_state_dict", "prepare_env", "sandbox_report"),
    "_weights.checkpoints": ("load_state_dict_from_url",),
    "_compare.compare": ("CompareReport", "compare"),
    "_pool.hub": ("Hub", "Result"),
    "_patch": ("patch_torch_hub", "patched_torch_hub", "unpatch_torch_hub"),
    "_config": ("get_dir", "set_dir"),
    "_weights.download": ("download_url_to_file",),
    "_env.environment": ("Env",),
    "_errors": (
        "ArchiveError",
        "CacheCorruptedError",
        "CacheError",
        "DownloadError",
        "EntrypointError",
        "EnvError",
        "FetchError",
        "HandleClosedError",
        "HashMismatchError",
        "IsolhubError",
        "MissingDependenciesError",
        "OfflineError",
        "PoolClosedError",
        "ProtocolError",
        "ProtocolVersionError",
        "RefNotFoundError",
        "RefValidationError",
        "RemoteAttributeError",
        "RemoteError",
        "RemoteIndexError",
        "RemoteKeyError",
        "RemoteOperationError",
        "RemoteTypeError",
        "ResolveError",
        "SandboxError",
        "SpecError",
        "TransportError",
        "UntrustedRepoError",
        "UsageError",
        "WorkerCrashedError",
        "WorkerError",
        "WorkerTimeoutError",
    ),
    "_handle": ("RemoteModule", "RemoteObject"),
    "_sandbox.policy": ("Sandbox",),
    "_source.snapshot": ("Snapshot",),
    "_spec": ("RepoSpec", "parse_spec"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_WHERE, "__version__"], key=str.lower)

if _typing.TYPE_CHECKING:
    from ._api import fetch, help, list, load, load_state_dict, prepare_env, sandbox_report  # noqa: F401
    from ._compare.compare import CompareReport, compare  # noqa: F401
    from ._config import get_dir, set_dir  # noqa: F401
    from ._env.environment import Env  # noqa: F401
    from ._errors import *  # noqa: F403
    from ._handle import RemoteModule, RemoteObject  # noqa: F401
    from ._patch import patch_torch_hub, patched_torch_hub, unpatch_torch_hub  # noqa: F401
    from ._pool.hub import Hub, Result  # noqa: F401
    from ._sandbox.policy import Sandbox  # noqa: F401
    from ._source.snapshot import Snapshot  # noqa: F401
    from ._spec import RepoSpec, parse_spec  # noqa: F401
    from ._weights.checkpoints import load_state_dict_from_url  # noqa: F401
    from ._weights.download import download_url_to_file  # noqa: F401


def __getattr__(name: str) -> _typing.Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'isolhub' has no attribute {name!r}")
    obj = getattr(_importlib.import_module(f"isolhub.{module}"), name)
    if isinstance(obj, type) or callable(obj):
        try:
            obj.__module__ = "isolhub"
        except (AttributeError, TypeError):
            pass
    globals()[name] = obj
    return obj


def __dir__() -> _builtins.list[str]:
    return sorted(set(globals()) | set(_WHERE))
