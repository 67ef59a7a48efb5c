"""isolhub: load PyTorch Hub models with every repo@ref in its own worker process.

A drop-in for `torch.hub`:

    >>> import isolhub as hub
    >>> hub.list("owner/repo:v2")
    >>> a = hub.load("git+file:///srv/repos/net.git@v1", "resnet", pretrained=False)
    >>> b = hub.load("git+file:///srv/repos/net.git@v2", "resnet", pretrained=False)
"""

from ._api import help, list, load, load_state_dict
from ._config import get_dir, set_dir
from ._errors import (
    ArchiveError,
    CacheCorruptedError,
    CacheError,
    DownloadError,
    EntrypointError,
    FetchError,
    HandleClosedError,
    HashMismatchError,
    IsolhubError,
    MissingDependenciesError,
    OfflineError,
    ProtocolError,
    RefNotFoundError,
    RemoteError,
    ResolveError,
    SandboxError,
    SpecError,
    TransportError,
    UntrustedRepoError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
)
from ._spec import RepoSpec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "ArchiveError",
    "CacheCorruptedError",
    "CacheError",
    "DownloadError",
    "EntrypointError",
    "FetchError",
    "HandleClosedError",
    "HashMismatchError",
    "IsolhubError",
    "MissingDependenciesError",
    "OfflineError",
    "ProtocolError",
    "RefNotFoundError",
    "RemoteError",
    "RepoSpec",
    "ResolveError",
    "SandboxError",
    "SpecError",
    "TransportError",
    "UntrustedRepoError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerTimeoutError",
    "__version__",
    "get_dir",
    "help",
    "list",
    "load",
    "load_state_dict",
    "parse_spec",
    "set_dir",
]

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, str):
        try:
            _obj.__module__ = "isolhub"
        except (AttributeError, TypeError):
            pass
del _name, _obj
