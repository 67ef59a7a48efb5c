"""How a hub call runs, as one frozen object: torch.hub's options plus isolhub's.

Every public entry point (`isolhub.load`/`list`/`help`/`fetch`, `Hub`, `compare`, the torch.hub
patch, the CLI through them) builds one `HubOptions`; it flows unchanged to the fetch, the trust
decision (`_source.trust.admit`) and the worker. `policy` is the sandbox it names, resolved once per use.

Example:
    >>> o = HubOptions(trust_repo=True, mode="remote", sandbox="strict")
    >>> o.policy == Sandbox()
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import SandboxError
from ._sandbox.policy import Sandbox, resolve_policy
from ._types import EnvArg, Mode, SandboxArg, Source, TrustRepo
from ._usage import check_choice, check_timeout

__all__ = ["MODES", "HubOptions", "sandbox_policy"]

MODES = ("module", "state_dict", "remote")


def sandbox_policy(sandbox: object) -> Sandbox | None:
    """The policy a `sandbox=` argument names (None: unconfined).

    Raises:
        SandboxError: an unknown sandbox value.
    """
    try:
        return resolve_policy(sandbox)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise SandboxError(f"{e}; use sandbox=None, 'strict' or an isolhub.Sandbox(...)") from e


@dataclass(frozen=True)
class HubOptions:
    """How a hub call runs: torch.hub's options plus isolhub's, carried as one frozen object."""

    source: Source = "github"
    trust_repo: TrustRepo = "check"
    force_reload: bool = False
    verbose: bool = True
    skip_validation: bool = False
    mode: Mode = "module"
    timeout: float | None = None
    seed: int | None = None
    sandbox: SandboxArg = None
    env: EnvArg = None
    requirements: Sequence[str] | None = None

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", MODES)
        check_timeout(self.timeout)

    @property
    def policy(self) -> Sandbox | None:
        """The sandbox policy of `sandbox` (None: trusted code, unconfined).

        Raises:
            SandboxError: an unknown sandbox value.
        """
        return sandbox_policy(self.sandbox)

    @property
    def watchdog(self) -> float | None:
        """The parent's wall-clock limit per call: `timeout`, else the sandbox's `wall_seconds`."""
        if self.timeout is not None:
            return self.timeout
        policy = self.policy
        return None if policy is None else policy.wall_seconds
