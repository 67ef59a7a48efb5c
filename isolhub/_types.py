"""The argument types of isolhub's public signatures, as `Literal`s a type checker can check.

Example (what a type checker reads; at run time they are plain `Literal`s):
    >>> from typing import get_args
    >>> get_args(Mode)
    ('module', 'state_dict', 'remote')
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias, Union

if TYPE_CHECKING:
    from ._sandbox.policy import Sandbox

__all__ = [
    "Backend",
    "CompareMode",
    "EnvArg",
    "Mode",
    "SandboxArg",
    "Source",
    "StartMethod",
    "TrustRepo",
]

Source: TypeAlias = Literal["github", "local"]
"""torch.hub's `source`: a GitHub (or git+) spec, or a local directory."""

TrustRepo: TypeAlias = Union[bool, Literal["check"], None]  # noqa: UP007 - a runtime alias
"""torch.hub's `trust_repo`: True, False, "check" or None."""

Mode: TypeAlias = Literal["module", "state_dict", "remote"]
"""How `load` returns the result: by value, as a state dict, or as a remote handle."""

CompareMode: TypeAlias = Literal["module", "remote"]
"""How `compare` treats the two results."""

SandboxArg: TypeAlias = Union[Literal["strict"], "Sandbox", None]  # noqa: UP007 - as above
"""No sandbox (None), the strict policy ("strict"), or a `Sandbox` of one's own."""

Backend: TypeAlias = Literal["local", "ray"]
"""Where a `Hub` runs its workers."""

StartMethod: TypeAlias = Literal["zygote", "spawn"]
"""How a local worker starts: forked from the zygote, or a fresh interpreter."""

EnvArg: TypeAlias = Union[Literal["auto"], None]  # noqa: UP007 - a runtime alias
"""No environment of the repo's own (None), or its requirements installed for it ("auto")."""
