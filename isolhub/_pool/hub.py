"""A worker pool for evaluation harnesses: one function over many repos, every result kept.

    specs ──▶ fetch (once per spec) ──▶ a worker per repo@sha (reused when idle) ──▶ fn(model)
    runs in the worker ──▶ Result(spec, sha, ok, value | error, ...) streamed to the caller

Each task is driven by a thread of this process; the repo's code runs only in the worker
process (or, with `backend="ray"`, in a worker that a Ray actor forks on its node). Whatever a
repo does — raise, exit, segfault, hang, run out of memory — becomes that spec's failed `Result`
with a typed error, and the pool carries on with a fresh worker.

This module holds `Hub` (scheduling, worker reuse, retries, cancellation) and `Result`; the job
a backend runs and the local backend are in `_pool.backend`, the progress display in `_progress`.

Example (`git_repo` is a git repository tagged v1 and v2, whose hubconf's `net` builds a linear
layer of 4 inputs and 2 outputs at v1, 3 at v2):
    >>> import isolhub as hub
    >>> def evaluate(model):
    ...     return {"params": sum(p.numel() for p in model.parameters())}
    >>> specs = [f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v2"]
    >>> with hub.Hub(max_workers=2, timeout=300) as h:
    ...     for r in h.map(evaluate, specs, entrypoint="net", ordered=True):
    ...         print(r.spec[-2:], r.ok, r.value if r.ok else r.error)
    v1 True {'params': 10}
    v2 True {'params': 15}
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, final

from .._engine import policy_for, snapshot_of
from .._errors import IsolhubError, Option, PoolClosedError, UsageError, signal_name
from .._options import HubOptions
from .._progress import PoolProgress
from .._source import trust as _trust
from .._source.snapshot import Snapshot
from .._spec import parse_spec
from .._types import Backend, EnvArg, SandboxArg, Source, StartMethod, TrustRepo
from .._usage import check_choice, check_count, check_timeout
from .backend import (
    Job,
    JobBackend,
    LocalBackend,
    Outcome,
    PoolSettings,
    for_task,
    is_infrastructure_failure,
    job_of,
    ship_by_value,
)

__all__ = ["BACKENDS", "Hub", "Result"]

BACKENDS = ("local", "ray")
_JOIN_TIMEOUT = 30.0


@final
@dataclass(frozen=True)
class Result:
    """The outcome of one spec in `Hub.map`.

    Attributes:
        spec: the spec exactly as given to `map`.
        sha: the commit it resolved to (None for local directories or when it did not resolve).
        ok: whether `fn` returned; then `value` holds what it returned.
        value: `fn`'s return value (plain values and tensors), or None.
        error: the typed isolhub error when not `ok`: `RemoteError` (the repo or `fn` raised,
            `MemoryError` past the memory cap included), `WorkerCrashedError` (it died),
            `WorkerTimeoutError` (it hung), `EntrypointError`, `ResolveError`, `FetchError`, ...
        elapsed: seconds from the task's start (fetch included) to its result.
        returncode: the worker's exit status when it died or was killed: an exit code, or minus
            the signal number (as `subprocess`); None while it lived.
        signal: the signal's name (`"SIGSEGV"`) when it died of one.
        stderr_tail: the last few KiB the worker wrote (stdout and stderr together).
        attempts: how many times it ran (more than one only after infrastructure failures).
        index: the spec's position in the input.
        env: with `env="auto"`, the environment it ran in (`Env.provenance()`: the resolved
            versions, shared or of its own, and why); None without one.
    """

    spec: Any
    sha: str | None
    ok: bool
    value: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0
    returncode: int | None = None
    signal: str | None = None
    stderr_tail: str = ""
    attempts: int = 1
    index: int = 0
    env: dict[str, Any] | None = None

    def summary(self) -> str:
        """One line: `ok <spec> (0.12 s)` or `FAILED <spec>: WorkerCrashedError: ...`.

        Example:
            >>> from isolhub import WorkerTimeoutError
            >>> print(Result("net@v1", "3f2a", True, value=0.9, elapsed=0.123).summary())
            ok net@v1 (0.12 s)
            >>> error = WorkerTimeoutError("no reply in 30 s")
            >>> print(Result("net@v1", None, False, error=error, elapsed=30.02).summary())
            FAILED net@v1: WorkerTimeoutError: no reply in 30 s (30.02 s)
        """
        if self.ok:
            return f"ok {self.spec} ({self.elapsed:.2f} s)"
        text = str(self.error).strip()
        first = text.splitlines()[0] if text else ""
        return f"FAILED {self.spec}: {type(self.error).__name__}: {first} ({self.elapsed:.2f} s)"


class _Cancelled(Exception):
    """Internal: the run was cancelled (Hub closed, Ctrl-C, or the consumer stopped)."""


@dataclass(eq=False)
class _Slot:
    key: str
    executor: Any


@dataclass(eq=False)
class _Run:
    """One `map` (or one synchronous call): its threads, its events, its busy executors."""

    total: int = 0
    events: queue.Queue[tuple[str, Any]] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    busy: set[_Slot] = field(default_factory=set)
    threads: list[threading.Thread] = field(default_factory=list)
    next_index: int = 0


@final
class Hub:
    """A pool of isolated workers for running one function over many hub repos.

    Each spec is fetched once (identical specs share one download), run in a worker for its
    repo@sha (a live idle worker for the same repo@sha is reused), and `fn` is applied to the
    entrypoint's result inside that worker; only `fn`'s return value (plain values and
    tensors, through the restricted codec) comes back. At most `max_workers` workers live at
    once. A `Hub` resolves each spec once: a branch stays at the commit it first resolved to
    for the Hub's life (make a new Hub to pick up new commits).

    Args:
        max_workers: tasks (and worker processes) at once; default the CPUs this process may
            use (for Ray: the cluster's CPUs).
        timeout: seconds a worker may take per task (hubconf import, entrypoint and `fn`);
            past it the worker is killed and the spec fails with `WorkerTimeoutError`.
        memory_bytes: address-space cap of each worker (RLIMIT_AS); past it allocations fail
            with `MemoryError` in the worker (a `RemoteError` result).
        retries: extra attempts for infrastructure failures only (see
            `is_infrastructure_failure`), never for the repo's own exception.
        backend: `"local"` (workers on this machine) or `"ray"` (one Ray actor per repo@sha,
            needs `isolhub[ray]`; uses the running Ray session, else starts one with
            `ray.init(address=ray_address)`).
        start_method: `"zygote"` (fast fork) or `"spawn"` (a fresh interpreter per worker).
        source, trust_repo, force_reload, skip_validation, verbose: as `isolhub.load` (one
            `HubOptions` carries them for both, so a Hub fetches and validates refs as it does).
        progress: show a progress bar on stderr (plain lines when stderr is not a terminal).
        seed: seed torch, random and numpy in the worker before each entrypoint call (every
            task of a `map` alike). Without a seed, `load`, `load_state_dict`, `list` and `help`
            start from this process's random state and hand the end state back, as
            `isolhub.load` does (a reused worker does not import hubconf again, so what hubconf
            draws at import is drawn once per worker); a `map` draws one number from this
            process's torch generator and seeds task i with it plus i, so every task draws
            its own weights, the same ones again after the same `torch.manual_seed`, whatever
            the scheduling. With `backend="ray"` single calls are seeded that way too.
        env: `"auto"`: each repo's requirements installed into a cached environment (as
            `isolhub.load`); `requirements` overrides what every repo declares.
        sandbox: None, "strict" or an `isolhub.Sandbox`: every worker confines itself before
            importing its repo (then untrusted repos need no trust prompt, `load` in module mode
            is refused, and `timeout` defaults to the policy's `wall_seconds`).
        ray_address: the Ray cluster to connect to when no Ray session is running.
        ray_actor_options: extra `.options()` for each Ray actor (`num_cpus`, `memory`,
            `resources`, `runtime_env`, ...). When it reserves resources, keep `max_workers`
            at most what the cluster can hold at once.

    Example (`git_repo`: a hub repository tagged v1 and v2, whose `net` is a linear layer):
        >>> from isolhub import Hub
        >>> specs = [f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v2"]
        >>> with Hub(max_workers=2, timeout=60) as h:
        ...     results = [r for r in h.map(lambda m: m.out_features, specs, "net", ordered=True)]
        ...     sd = h.load_state_dict(specs[0], "net")
        >>> [r.value for r in results], sd["weight"].shape
        ([2, 3], torch.Size([2, 4]))

    Raises:
        UsageError: an argument is out of range or unknown (a `ValueError`).
        IsolhubError: `backend="ray"` and Ray is not installed or cannot be reached.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        timeout: float | None = None,
        memory_bytes: int | None = None,
        retries: int = 0,
        backend: Backend = "local",
        start_method: StartMethod = "zygote",
        *,
        source: Source = "github",
        trust_repo: TrustRepo = "check",
        force_reload: bool = False,
        skip_validation: bool = False,
        verbose: bool = False,
        progress: bool = False,
        seed: int | None = None,
        ray_address: str | None = None,
        ray_actor_options: dict[str, Any] | None = None,
        sandbox: SandboxArg = None,
        env: EnvArg = None,
        requirements: list[str] | None = None,
    ) -> None:
        check_count(max_workers, "max_workers")
        timeout = check_timeout(timeout)
        check_count(memory_bytes, "memory_bytes")
        check_count(retries, "retries", minimum=0, none=False)
        check_choice(backend, "backend", BACKENDS)
        check_choice(start_method, "start_method", ("zygote", "spawn"))
        policy = policy_for(sandbox, "value")
        if env is not None:
            check_choice(env, "env", ("auto",))
            if backend == "ray":
                raise UsageError(
                    (Option.of("env"), "='auto' works with backend='local' only (for now)")
                )
        if policy is not None and timeout is None:
            timeout = policy.wall_seconds
        self._options = HubOptions(
            source=source,
            trust_repo=trust_repo,
            force_reload=force_reload,
            verbose=verbose,
            skip_validation=skip_validation,
            timeout=timeout,
            seed=seed,
            sandbox=sandbox,
            env=env,
            requirements=requirements,
        )
        self._settings = PoolSettings(
            self._options,
            max_workers=max_workers,
            memory_bytes=memory_bytes,
            retries=retries,
            backend=backend,
            start_method=start_method,
            progress=progress,
            ray_address=ray_address,
            ray_actor_options=dict(ray_actor_options or {}),
        )
        self._backend: JobBackend
        if backend == "ray":
            from .ray_backend import RayBackend

            self._backend = RayBackend(self._settings)
        else:
            self._backend = LocalBackend(self._settings)
        self.max_workers = max_workers or self._backend.default_workers()
        self._cond = threading.Condition()
        self._snapshots: dict[tuple[str, str], Future[Snapshot]] = {}
        self._idle: OrderedDict[str, list[_Slot]] = OrderedDict()
        self._live = 0
        self._runs: set[_Run] = set()
        self._closed = False

    def __repr__(self) -> str:
        s = self._settings
        state = "closed" if self._closed else f"{self._live} live workers"
        return (
            f"Hub(max_workers={self.max_workers}, timeout={s.timeout}, backend={s.backend!r}, "
            f"{state})"
        )

    # -- the harness API -------------------------------------------------------------------

    def map(
        self,
        fn: Callable[[Any], Any] | None,
        specs: Iterable[Any],
        entrypoint: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        ordered: bool = False,
    ) -> Iterator[Result]:
        """Run `fn(entrypoint(*args, **kwargs))` in a worker for each spec; yield `Result`s.

        Results stream as they finish (in input order with `ordered=True`); there is exactly
        one per spec, failures included. `fn` runs inside the worker next to the model (a
        lambda or closure works; it is pickled by value); it must return plain values and
        tensors. With `fn=None` the entrypoint's result itself must be such a value.

        Leaving the loop early (`break`), an exception in the loop body, Ctrl-C, or `close()`
        cancels the rest: running workers are killed, and nothing is left behind.

        Example (`git_repo`: a hub repository tagged v1 and v2, whose `net` is a linear layer):
            >>> import torch
            >>> from isolhub import Hub
            >>> specs = [f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v2", "./nowhere"]
            >>> with Hub(max_workers=2) as h:
            ...     for r in h.map(lambda m: m(torch.ones(1, 4)).shape, specs, "net", ordered=True):
            ...         print(r.ok, r.value if r.ok else type(r.error).__name__)
            True torch.Size([1, 2])
            True torch.Size([1, 3])
            False SpecError

        Raises:
            TypeError: `fn` is not callable, or cannot be pickled.
            IsolhubError: the Hub is closed, or was closed while results were pending.
            KeyboardInterrupt: after cancelling, when Ctrl-C arrives while waiting.
        """
        self._check_open()
        if not isinstance(entrypoint, str):
            raise TypeError(f"entrypoint must be a str, not {type(entrypoint).__name__}")
        items = list(specs)
        job = job_of(
            self._options, "call", entrypoint, args, kwargs, then=ship_by_value(fn), per_task=True
        )
        return self._stream(items, job, ordered)

    def load(self, repo_or_dir: Any, model: str, *args: Any, **kwargs: Any) -> Any:
        """`isolhub.load` with this Hub's settings, in a pooled worker (trusted code only).

        Example (`git_repo`: a hub repository tagged v1, whose `net` is a linear layer):
            >>> from isolhub import Hub
            >>> with Hub() as h:
            ...     net = h.load(f"git+file://{git_repo}@v1", "net", pretrained=False)
            >>> net
            Linear(in_features=4, out_features=2, bias=True)

        Raises:
            EntrypointError, MissingDependenciesError, RemoteError, WorkerCrashedError,
            WorkerTimeoutError, and what `fetch` raises; IsolhubError if the Hub was closed.
        """
        policy_for(self._options.sandbox, "module")  # refuses module mode under a sandbox
        job = job_of(self._options, "call", model, args, kwargs, result="module")
        return self._sync(repo_or_dir, job)

    def load_state_dict(self, repo_or_dir: Any, model: str, *args: Any, **kwargs: Any) -> Any:
        """`isolhub.load_state_dict` with this Hub's settings, in a pooled worker.

        Example (`git_repo`: a hub repository tagged v1, whose `net` is a linear layer):
            >>> from isolhub import Hub
            >>> with Hub() as h:
            ...     sd = h.load_state_dict(f"git+file://{git_repo}@v1", "net")
            >>> {name: tuple(t.shape) for name, t in sd.items()}
            {'weight': (2, 4), 'bias': (2,)}

        Raises:
            What `load` raises.
        """
        job = job_of(self._options, "call", model, args, kwargs, result="state_dict")
        return self._sync(repo_or_dir, job)

    def list(self, repo_or_dir: Any) -> builtins.list[str]:  # noqa: A003 - torch.hub's name
        """`isolhub.list` with this Hub's settings, in a pooled worker.

        Example (`git_repo`: a hub repository tagged v1, whose one entrypoint is `net`):
            >>> from isolhub import Hub
            >>> with Hub() as h:
            ...     h.list(f"git+file://{git_repo}@v1")
            ['net']

        Raises:
            RemoteError (importing hubconf raised), WorkerError, and what `fetch` raises.
        """
        return self._sync(repo_or_dir, job_of(self._options, "list"))

    def help(self, repo_or_dir: Any, model: str) -> str | None:  # noqa: A003
        """`isolhub.help` with this Hub's settings, in a pooled worker.

        Example (`git_repo`: a hub repository tagged v1, whose one entrypoint is `net`):
            >>> from isolhub import Hub
            >>> with Hub() as h:
            ...     h.help(f"git+file://{git_repo}@v1", "net")
            'A linear layer: 4 inputs, `width` outputs.'

        Raises:
            EntrypointError, and what `list` raises.
        """
        job = job_of(self._options, "help", model)
        return self._sync(repo_or_dir, job)

    def close(self) -> None:
        """Cancel running maps (their workers are killed) and stop every worker; idempotent.

        A `map` still being iterated raises `IsolhubError` at its next step.

        Example (`git_repo`: a hub repository tagged v1; `with Hub(...) as h:` closes too):
            >>> from isolhub import Hub
            >>> h = Hub(max_workers=2)
            >>> h.list(f"git+file://{git_repo}@v1")
            ['net']
            >>> h.close()
            >>> h.list(f"git+file://{git_repo}@v1")
            Traceback (most recent call last):
            isolhub.PoolClosedError: ...

        Raises:
            Nothing: workers that will not stop are killed.
        """
        with self._cond:
            first = not self._closed
            self._closed = True
            runs = [*self._runs]
            idle = [slot for slots in self._idle.values() for slot in slots]
            self._idle.clear()
            self._live -= len(idle)
            self._cond.notify_all()
        for run in runs:
            self._cancel(run)
            run.events.put(("closed", None))
        for run in runs:
            self._join(run)
        for slot in idle:
            self._close_quietly(slot)
        if first:
            self._backend.shutdown()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scheduling ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolClosedError("this Hub is closed; make a new one")

    def _stream(self, items: builtins.list[Any], job: Job, ordered: bool) -> Iterator[Result]:
        run = _Run(total=len(items))
        with self._cond:
            self._check_open()
            self._runs.add(run)
        progress = PoolProgress(len(items), self._settings.progress)
        buffered: dict[int, Result] = {}
        next_out = done = 0
        try:
            for _ in range(min(self.max_workers, len(items))):
                t = threading.Thread(
                    target=self._work, args=(run, items, job), name="isolhub-pool", daemon=True
                )
                run.threads.append(t)
                t.start()
            progress.launched(len(run.threads))
            while done < len(items):
                kind, payload = run.events.get()
                if kind == "closed" or self._closed:
                    raise PoolClosedError(
                        f"the Hub was closed with {len(items) - done} of {len(items)} results "
                        "still pending"
                    )
                if kind == "start":
                    progress.started(payload)
                    continue
                if kind == "running":
                    progress.running_now(payload)
                    continue
                done += 1
                progress.finished(payload)
                if not ordered:
                    yield payload
                    continue
                buffered[payload.index] = payload
                while next_out in buffered:
                    yield buffered.pop(next_out)
                    next_out += 1
        finally:
            self._cancel(run)
            self._join(run)
            with self._cond:
                self._runs.discard(run)
            progress.close()

    def _work(self, run: _Run, items: builtins.list[Any], job: Job) -> None:
        while True:
            with self._cond:
                if run.cancelled.is_set() or run.next_index >= len(items):
                    return
                index = run.next_index
                run.next_index += 1
            run.events.put(("start", index))
            try:
                result = self._task(run, index, items[index], job)
            except _Cancelled:
                return
            except BaseException as e:  # noqa: BLE001 - a bug here must not lose the result
                result = Result(
                    spec=items[index],
                    sha=None,
                    ok=False,
                    error=_wrap_unexpected(e),
                    index=index,
                )
            run.events.put(("done", result))

    def _task(self, run: _Run, index: int, spec: Any, job: Job) -> Result:
        start = time.monotonic()
        try:
            snap = self._snapshot(spec)
        except IsolhubError as e:
            if run.cancelled.is_set():
                raise _Cancelled from None
            return Result(spec, None, False, error=e, elapsed=time.monotonic() - start, index=index)
        try:
            env = self._backend.environment(snap) if self._options.env else None
        except IsolhubError as e:
            return Result(
                spec, snap.sha, False, error=e, elapsed=time.monotonic() - start, index=index
            )
        outcome, attempts = self._perform(run, snap, for_task(job, index), index)
        code = outcome.returncode
        return Result(
            spec=spec,
            sha=snap.sha,
            ok=outcome.ok,
            value=outcome.value,
            error=outcome.error,
            elapsed=time.monotonic() - start,
            returncode=code,
            signal=signal_name(code),
            stderr_tail=outcome.stderr_tail,
            attempts=attempts,
            index=index,
            env=None if env is None else env.provenance(),
        )

    def _perform(
        self, run: _Run, snap: Snapshot, job: Job, index: int | None = None
    ) -> tuple[Outcome, int]:
        """Run `job` on `snap` in a worker, retrying infrastructure failures; `index` (a map's
        spec) is reported running once its first worker is ready."""
        attempts = 0
        while True:
            attempts += 1
            try:
                slot = self._acquire(run, snap)
            except IsolhubError as e:
                outcome = Outcome(
                    ok=False,
                    error=e,
                    returncode=getattr(e, "returncode", None),
                    stderr_tail=getattr(e, "output_tail", "") or "",
                    infrastructure=is_infrastructure_failure(e),
                )
            else:
                if index is not None and attempts == 1:
                    run.events.put(("running", index))
                try:
                    outcome = self._backend.run(slot.executor, job, self._settings.timeout)
                except BaseException:
                    self._backend.kill(slot.executor)
                    self._release(run, slot, reusable=False)
                    raise
                self._release(run, slot, reusable=outcome.reusable)
            if outcome.ok:
                return outcome, attempts
            if run.cancelled.is_set():
                raise _Cancelled
            if not (outcome.infrastructure and attempts <= self._settings.retries):
                return outcome, attempts

    def _sync(self, spec: Any, job: Job) -> Any:
        self._check_open()
        if job.rng and self._settings.backend == "ray":  # its worker is on another machine
            seeded = job_of(self._options, job.op, job.entry, job.args, job.kwargs, per_task=True)
            job = for_task(dataclasses.replace(seeded, result=job.result), 0)
        run = _Run(total=1)
        with self._cond:
            self._runs.add(run)
        try:
            snap = self._snapshot(spec)
            outcome, _ = self._perform(run, snap, job)
        except _Cancelled:
            raise PoolClosedError("the Hub was closed during the call") from None
        finally:
            with self._cond:
                self._runs.discard(run)
        if not outcome.ok:
            assert outcome.error is not None
            raise outcome.error
        return outcome.value

    def _snapshot(self, spec: Any) -> Snapshot:
        """Fetch `spec` once per Hub; concurrent tasks for one spec wait for one download."""
        source = self._options.source
        parsed = parse_spec(spec, source)
        key = (source, str(parsed))
        with self._cond:
            future = self._snapshots.get(key)
            owner = future is None
            if future is None:
                future = self._snapshots[key] = Future()
        if not owner:
            return future.result()
        try:
            _trust.admit(parsed, self._options, "load")
            snap = snapshot_of(parsed, self._options)
        except BaseException as e:
            with self._cond:  # a failure is shared by those waiting now, not cached for later
                self._snapshots.pop(key, None)
            future.set_exception(e)
            raise
        future.set_result(snap)
        return snap

    def _acquire(self, run: _Run, snap: Snapshot) -> _Slot:
        key = str(snap.path)
        evict: _Slot | None = None
        with self._cond:
            while True:
                if run.cancelled.is_set() or self._closed:
                    raise _Cancelled
                idle = self._idle.get(key)
                if idle:
                    slot = idle.pop()
                    if not idle:
                        del self._idle[key]
                    run.busy.add(slot)
                    return slot
                if self._live < self.max_workers:
                    self._live += 1
                    break
                if self._idle:  # replace the least recently used idle worker
                    old_key = next(iter(self._idle))
                    evict = self._idle[old_key].pop(0)
                    if not self._idle[old_key]:
                        del self._idle[old_key]
                    break
                self._cond.wait()
        if evict is not None:
            self._close_quietly(evict)
        try:
            executor = self._backend.start(snap)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify_all()
            raise
        slot = _Slot(key, executor)
        with self._cond:
            if not (run.cancelled.is_set() or self._closed):
                run.busy.add(slot)
                return slot
            self._live -= 1
            self._cond.notify_all()
        self._close_quietly(slot)
        raise _Cancelled

    def _release(self, run: _Run, slot: _Slot, *, reusable: bool) -> None:
        with self._cond:
            run.busy.discard(slot)
            self._cond.notify_all()
            if reusable and not (self._closed or run.cancelled.is_set()):
                self._idle.setdefault(slot.key, []).append(slot)
                self._idle.move_to_end(slot.key)
                return
            self._live -= 1
        self._close_quietly(slot)

    def _cancel(self, run: _Run) -> None:
        with self._cond:
            run.cancelled.set()
            busy = [*run.busy]
            self._cond.notify_all()
        for slot in busy:
            self._backend.kill(slot.executor)

    def _join(self, run: _Run) -> None:
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for t in run.threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def _close_quietly(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            self._backend.close(slot.executor)


def _wrap_unexpected(e: BaseException) -> IsolhubError:
    if isinstance(e, IsolhubError):
        return e
    err = IsolhubError(f"internal error in the isolhub pool: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err
