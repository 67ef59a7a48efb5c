"""What a `Hub` hands its backend: the job, the outcome that comes back, and the local backend.

    Hub ──Job──▶ backend.run(executor, job, timeout) ──▶ Outcome(ok, value | error, ...)
                  LocalBackend: a worker forked on this machine, driven by `run_job`
                  RayBackend (in `_pool.ray_backend`): a worker that a Ray actor forks on its node

A backend starts, drives, kills and closes executors (local workers or Ray actors); the `Hub`
above it only schedules. `fn` is pickled by value once (`ship_by_value`) and unpickled only in
the worker (`Shipped`). `is_infrastructure_failure` says which failures a `Hub` may retry.

Example (`repo` is a folder with a hubconf.py whose `net()` builds `torch.nn.Linear(4, 2)`):
    >>> from isolhub._engine import start_worker
    >>> from isolhub._source.snapshot import fetch_snapshot
    >>> from isolhub._spec import parse_spec
    >>> snapshot = fetch_snapshot(parse_spec(repo, source="local"))
    >>> with start_worker(snapshot) as worker:
    ...     job = Job("call", "net", then=ship_by_value(lambda m: m.out_features))
    ...     run_job(worker, job, timeout=60).value
    2
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import cloudpickle

from .._engine import (
    call,
    caller_threads,
    entrypoint_doc,
    environment_for,
    list_entrypoints,
    rng_handoff,
    start_worker,
)
from .._errors import IsolhubError, WorkerCrashedError, WorkerError
from .._options import HubOptions
from .._process.worker import Worker, settle
from .._sandbox.policy import Sandbox
from .._source.snapshot import Snapshot

__all__ = [
    "Job",
    "JobBackend",
    "LocalBackend",
    "Outcome",
    "PoolSettings",
    "Shipped",
    "execute",
    "for_task",
    "is_infrastructure_failure",
    "job_of",
    "run_job",
    "ship_by_value",
]


@dataclass(frozen=True)
class PoolSettings:
    """What a Hub was made with, handed to its backend as one object: the `HubOptions` every
    call of the Hub runs with, and the pool's own settings."""

    options: HubOptions
    max_workers: int | None = None
    memory_bytes: int | None = None
    retries: int = 1
    backend: str = "local"
    start_method: str = "zygote"
    progress: bool = False
    ray_address: str | None = None
    ray_actor_options: dict[str, Any] | None = None

    @property
    def policy(self) -> Sandbox | None:
        """The sandbox policy of the options (None: unconfined)."""
        return self.options.policy

    @property
    def timeout(self) -> float | None:
        """Seconds each call may take: `timeout=`, else the sandbox's `wall_seconds`."""
        return self.options.watchdog


@dataclass(frozen=True)
class Job:
    """One request for a worker: `call` an entrypoint (then `fn`), or `list` / `help`."""

    op: str
    entry: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    result: str = "value"
    then: bytes | None = None  # `fn`, pickled by value here, unpickled only in the worker
    seed: int | None = None
    rng: bool = False  # unseeded: hand the caller's random state in, and the end state back
    seed_base: int | None = None  # unseeded `map`: task i is seeded with seed_base + i


_SEED_SPAN = 1 << 62


def job_of(
    o: HubOptions,
    op: str,
    entry: str | None = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    result: str = "value",
    then: bytes | None = None,
    per_task: bool = False,
) -> Job:
    """The job for one `Hub` call, its seeding from `o` (as `isolhub.load` does it).

    A seed seeds every call. Without one, a single call starts from the caller's random state
    and hands its end state back; `per_task` calls (a `map`, run at once in many workers) are
    instead seeded with `seed_base + index`, `seed_base` drawn once from the caller's torch
    generator: each task draws its own numbers, reproducibly after `torch.manual_seed`.
    """
    base = None
    if per_task and o.seed is None:
        import torch

        base = int(torch.randint(0, _SEED_SPAN, (), dtype=torch.int64))
    return Job(
        op,
        entry,
        tuple(args),
        dict(kwargs or {}),
        result=result,
        then=then,
        seed=o.seed,
        rng=not per_task and o.seed is None,
        seed_base=base,
    )


def for_task(job: Job, index: int) -> Job:
    """`job` as task `index` of a `map` runs it (its own seed when the map has none)."""
    if job.seed_base is None:
        return job
    return dataclasses.replace(job, seed=(job.seed_base + index) % _SEED_SPAN, seed_base=None)


@dataclass
class Outcome:
    """What running a `Job` gave; built where the worker lives (here or in a Ray actor)."""

    ok: bool
    value: Any = None
    error: BaseException | None = None
    returncode: int | None = None
    stderr_tail: str = ""
    reusable: bool = False  # the executor may take the next job for the same repo@sha
    infrastructure: bool = False  # not the repo's doing: worth a retry


class Shipped:
    """A function pickled once, by value, that only the worker unpickles."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (pickle.loads, (self.payload,))


class JobBackend(Protocol):
    """Starts, drives and stops the executors (local workers or Ray actors) of a Hub."""

    def default_workers(self) -> int: ...
    def environment(self, snapshot: Snapshot) -> Any: ...
    def start(self, snapshot: Snapshot) -> Any: ...
    def run(self, executor: Any, job: Job, timeout: float | None) -> Outcome: ...
    def kill(self, executor: Any) -> None: ...
    def close(self, executor: Any) -> None: ...
    def shutdown(self) -> None: ...


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.realpath(r) + os.sep for r in roots)


def ship_by_value(fn: Callable[..., Any] | None) -> bytes | None:
    """Pickle `fn` so a worker can run it without importing the caller's own modules.

    Functions from `__main__`, lambdas and closures are pickled by value anyway; a function
    from a module of the caller's that is not installed (a harness script's helper module, a
    test file) would be pickled by reference and fail to import in the worker, so its
    top-level package is registered by value for this one pickling.
    """
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"fn must be callable or None, not {type(fn).__name__}")
    top = (getattr(fn, "__module__", None) or "").split(".")[0]
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None)
    by_value = (
        module is not None
        and top not in ("__main__", "isolhub")
        and path is not None
        and not os.path.realpath(path).startswith(_installed_roots())
        and top not in cloudpickle.list_registry_pickle_by_value()
    )
    with _BY_VALUE_LOCK:
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            return cloudpickle.dumps(fn)
        except Exception as e:  # noqa: BLE001 - pickling fails in many ways; all mean "this fn"
            raise TypeError(
                f"fn {fn!r} cannot be sent to the workers: {type(e).__name__}: {e} (it runs in "
                "another process; avoid capturing open files, locks or sockets)"
            ) from e
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)


_BY_VALUE_LOCK = threading.Lock()


def execute(worker: Worker, job: Job, timeout: float | None) -> Any:
    """Run `job` in a live local worker and return its decoded value.

    Example (`repo` is a folder with a hubconf.py whose one entrypoint is `net`):
        >>> from isolhub._engine import start_worker
        >>> from isolhub._source.snapshot import fetch_snapshot
        >>> from isolhub._spec import parse_spec
        >>> with start_worker(fetch_snapshot(parse_spec(repo, source="local"))) as worker:
        ...     execute(worker, Job("list"), timeout=30)
        ['net']

    Raises:
        RemoteError, EntrypointError, MissingDependenciesError, WorkerCrashedError,
        WorkerTimeoutError, ProtocolError: as `isolhub._engine.call`.
    """
    handoff = rng_handoff(None) if job.rng else {}
    if job.op == "list":
        return list_entrypoints(worker, timeout, handoff)
    if job.op == "help":
        return entrypoint_doc(worker, job.entry or "", timeout, handoff)
    then = None if job.then is None else Shipped(job.then)
    return call(
        worker,
        job.entry or "",
        job.args,
        job.kwargs,
        result=job.result,
        timeout=timeout,
        seed=job.seed,
        then=then,
        rng=job.rng,
    )


def run_job(worker: Worker, job: Job, timeout: float | None) -> Outcome:
    """Run `job` in `worker`; every isolhub failure becomes a failed `Outcome`.

    Example (`repo` is a folder with a hubconf.py whose one entrypoint is `net`):
        >>> from isolhub._engine import start_worker
        >>> from isolhub._source.snapshot import fetch_snapshot
        >>> from isolhub._spec import parse_spec
        >>> with start_worker(fetch_snapshot(parse_spec(repo, source="local"))) as worker:
        ...     outcome = run_job(worker, Job("call", "resnet"), timeout=60)
        >>> outcome.ok, type(outcome.error).__name__
        (False, 'EntrypointError')

    Raises:
        Only what is not an `IsolhubError` (a bug, KeyboardInterrupt).
    """
    try:
        value = execute(worker, job, timeout)
    except IsolhubError as e:
        tail = getattr(e, "output_tail", None) or worker.output_tail()
        code = getattr(e, "returncode", None) if worker.returncode is None else worker.returncode
        return Outcome(
            ok=False,
            error=e,
            returncode=code if worker.closed else None,
            stderr_tail=tail,
            infrastructure=is_infrastructure_failure(e),
        )
    return Outcome(ok=True, value=value, reusable=not worker.closed)


def is_infrastructure_failure(e: BaseException) -> bool:
    """Whether a failure may be the machine's rather than the repo's, so a retry may help.

    Retried: a worker that could not be started or lost its zygote (a plain `WorkerError`), a
    worker killed by SIGKILL that isolhub did not send (the kernel's OOM killer, a batch
    scheduler, a Ray node going away), and failures a backend marks as its own. Never retried:
    `RemoteError` (the repo or `fn` raised, `MemoryError` at the memory cap included), exits,
    other signals (a segfault is the repo's), timeouts, `EntrypointError`, fetch errors.

    Example:
        >>> is_infrastructure_failure(WorkerCrashedError("oom", returncode=-9))
        True

    Raises:
        Nothing.
    """
    if type(e) is WorkerError:
        return True
    if isinstance(e, WorkerCrashedError):
        return getattr(e, "returncode", None) == -signal.SIGKILL or bool(
            getattr(e, "infrastructure", False)
        )
    return False


class LocalBackend:
    """Workers forked from this process's zygote (or spawned), one per repo@sha."""

    def __init__(self, settings: PoolSettings) -> None:
        self._settings = settings

    def default_workers(self) -> int:
        return max(1, len(os.sched_getaffinity(0)))

    def environment(self, snapshot: Snapshot) -> Any:
        """The `_env.environment.Env` for `snapshot` (installed on first use), or None."""
        s = self._settings
        return environment_for(snapshot, s.options, s.policy)

    def start(self, snapshot: Snapshot) -> Worker:
        return start_worker(
            snapshot,
            start_method=self._settings.start_method,
            memory_bytes=self._settings.memory_bytes,
            sandbox=self._settings.policy,
            env=self.environment(snapshot),
            # The workers share this process's threads, as many at once as the pool allows.
            threads=caller_threads(self._settings.max_workers or self.default_workers()),
        )

    def run(self, executor: Worker, job: Job, timeout: float | None) -> Outcome:
        return run_job(executor, job, timeout)

    def kill(self, executor: Worker) -> None:
        # From another thread: only signal; the thread that owns the worker reaps it.
        if not executor.closed:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(executor.pidfd, signal.SIGKILL)

    def close(self, executor: Worker) -> None:
        executor.close(wait=False)

    def shutdown(self) -> None:
        settle()  # every closed worker reaped and cleaned up before the pool says it is shut
