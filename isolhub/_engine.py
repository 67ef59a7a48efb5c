"""The engine under every public call: options → snapshot → worker → request → result.

`isolhub._api` (the torch.hub surface), `_patch`, `_pool.hub`, `_compare.compare` and `_pool.ray_backend` all reach a
repo's code through these functions, so a load follows one path whoever asks:

    HubOptions ──admitted_snapshot──▶ Snapshot ──start_worker──▶ Worker
        ──call / list_entrypoints / entrypoint_doc──▶ request ──▶ reply ──decode_result──▶ object

Requests and replies are `_process.messages`' frozen dataclasses; `Worker.request` decodes each reply
(its fds included) as the class the request expects.

`run_load`, `run_list` and `run_help` are that path whole (every load ends in `run_load`, as
every torch.hub load ends in `_load_local`); the pieces are public here for the callers that
keep a worker for more than one request (the pool, compare, remote handles).

Example:
    >>> from isolhub._options import HubOptions
    >>> from isolhub._engine import run_list
    >>> run_list(repo, HubOptions(source="local"))   # `repo`: a folder with a hubconf.py
    ['net']
"""

from __future__ import annotations

import builtins
import dataclasses
import gc
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ._config import get_dir
from ._errors import ProtocolError, SandboxError, UsageError
from ._handle import open_handle
from ._options import HubOptions, sandbox_policy
from ._process import rng as _rng
from ._process.messages import (
    RESULT_REPLIES,
    ArenaReply,
    CallRequest,
    CloseNote,
    DocReply,
    EntrypointsReply,
    HandleReply,
    HelpRequest,
    ListRequest,
    PickleReply,
    PushRequest,
    StateDictReply,
    UnpinNote,
    ValueReply,
    WorkerInit,
)
from ._process.worker import Worker, prestart_zygote
from ._sandbox.policy import PRETEND_MISSING_ENV, Sandbox
from ._source import trust as _trust
from ._source.snapshot import Snapshot, fetch_snapshot
from ._spec import RepoSpec, parse_spec
from ._transport import byvalue as _byvalue
from ._transport import pull as _pull
from ._transport.arena import ArenaReader
from ._transport.codec import MAX_FRAME, ReplyLimits
from ._transport.pull import PullError, read_storages
from ._transport.values import decode_state_dict, decode_value
from ._weights.broker import weights_broker

if TYPE_CHECKING:
    from ._env.environment import Env

__all__ = [
    "admitted_snapshot",
    "call",
    "call_message",
    "caller_threads",
    "check_model_name",
    "decode_result",
    "entrypoint_doc",
    "environment_for",
    "list_entrypoints",
    "policy_for",
    "reply_limits",
    "rng_handoff",
    "run_help",
    "run_list",
    "run_load",
    "snapshot_of",
    "start_worker",
    "watchdog",
]


def caller_threads(share: int = 1) -> int:
    """This process's torch intra-op threads split `share` ways (at least 1): what a worker
    runs torch with, so that a load uses the threads torch.hub's would in this process, and a
    pool's workers share them instead of each taking every core.

    Without torch imported here, the CPUs this process may run on stand for its default.

    Example:
        >>> caller_threads() >= caller_threads(2) >= 1
        True
        >>> caller_threads(10**6)
        1
    """
    if "torch" in sys.modules:
        total = sys.modules["torch"].get_num_threads()
    else:
        total = len(os.sched_getaffinity(0))
    return max(1, total // share)


def start_worker(
    snapshot: Snapshot,
    *,
    start_method: str = "zygote",
    memory_bytes: int | None = None,
    sandbox: Sandbox | None = None,
    limits: ReplyLimits | None = None,
    env: Env | None = None,
    lazy: bool = False,
    threads: int | None = None,
) -> Worker:
    """Start a worker serving `snapshot` (the caller closes it).

    `threads`: torch's intra-op threads in the worker (`caller_threads`; None: torch's default).

    `env` (an `_env.environment.Env`) puts the repo's installed requirements on its `sys.path`; one of
    its own runs in a worker forked from that environment's own zygote.

    `memory_bytes` caps the worker's address space (RLIMIT_AS): past it, allocations fail with
    MemoryError in the worker instead of the machine swapping or the OOM killer striking.
    With a `sandbox` policy the worker confines itself before importing the repo, and its
    downloads are served by this process (`_weights.broker`). `limits` caps what one reply may make
    this process hold or print (default: `reply_limits(sandbox)`). `lazy` (`Worker.start`): its
    set-up's outcome is read with the first request's answer, so a failed set-up is raised there.

    Raises:
        SandboxError: a sandbox with another start method than the zygote.
    """
    tag = (snapshot.sha or str(abs(hash(str(snapshot.path)))))[:12]
    init = WorkerInit(
        snapshot=str(snapshot.path),
        module_name=f"isolhub_hubconf_{tag}",
        hub_dir=get_dir(),
        env=dict(os.environ),
        memory_bytes=memory_bytes,
        overlay=None if env is None else str(env.site),
        threads=threads,
    )
    if limits is None:
        limits = reply_limits(sandbox)
    own = str(env.site) if env is not None and env.kind == "own" else None
    if sandbox is None:
        return Worker.start(
            snapshot.label,
            init,
            start_method=start_method,
            limits=limits,
            own_overlay=own,
            lazy=lazy,
        )
    if start_method != "zygote":
        raise SandboxError("the sandbox is applied in a worker forked from the zygote; use it")
    # The confined worker keeps the zygote's secret-free environment and never sees the hub dir.
    init = dataclasses.replace(
        init,
        env=None,
        hub_dir=None,
        policy=sandbox,
        # The test knob simulating an older kernel reaches the worker as it is now, set or not
        # (the zygote's environment is the one it started with).
        env_overrides={PRETEND_MISSING_ENV: os.environ.get(PRETEND_MISSING_ENV, "")},
    )
    return Worker.start(
        snapshot.label,
        init,
        start_method=start_method,
        on_request=weights_broker(sandbox),
        limits=limits,
        own_overlay=own,
        lazy=lazy,
    )


def reply_limits(policy: Sandbox | None) -> ReplyLimits:
    """What one reply may make this process hold or print under `policy` (None: trusted)."""
    if policy is None:
        return ReplyLimits()
    size = policy.max_reply_bytes
    # Printing is no way around the file cap; a hostile worker's \r could overwrite a line.
    return ReplyLimits(
        frame_bytes=MAX_FRAME if size is None else min(size, MAX_FRAME),
        arena_bytes=size,
        elements=policy.max_reply_elements,
        output_bytes=policy.file_size_bytes,
        output_cr=False,
    )


def policy_for(sandbox: Any, mode: str) -> Sandbox | None:
    """The sandbox policy for a `sandbox=` argument, refusing combinations that defeat it.

    Raises:
        SandboxError: an unknown sandbox value, or `mode="module"` with a sandbox.
    """
    policy = sandbox_policy(sandbox)
    if policy is not None and mode == "module":
        raise SandboxError(
            "mode='module' cannot be sandboxed: it ships the repo's classes and functions into "
            "this process, where they would run unconfined; use mode='remote' (or "
            "load_state_dict) with a sandbox"
        )
    return policy


def environment_for(snap: Snapshot, o: HubOptions, policy: Sandbox | None) -> Env | None:
    """The `_env.environment.Env` that `o.env` asks for `snap` (None for `env=None` or no requirements).

    Installed by this process, before any worker starts; a sandboxed repo's from wheels only.

    Raises:
        UsageError: an unknown `env=` value, or `requirements=` without `env="auto"`.
        EnvError, OfflineError: as `_env.environment.prepare`.
    """
    if o.env is None:
        if o.requirements is not None:
            raise UsageError("requirements= needs env='auto' (it installs them)")
        return None
    if o.env != "auto":
        raise UsageError(f"env={o.env!r}: use env=None (the default) or env='auto'")
    from ._env import environment as _env
    from ._process.worker import zygote_packages

    return _env.prepare(
        snap,
        o.requirements,
        provided=zygote_packages(),
        wheels_only=policy is not None,
        verbose=o.verbose,
    )


def admitted_snapshot(repo_or_dir: Any, o: HubOptions, fn: str) -> Snapshot:
    """The snapshot of `repo_or_dir` once `_source.trust.admit` let `fn` (the public name) run it."""
    spec = parse_spec(repo_or_dir, o.source)
    _trust.admit(spec, o, fn)
    return snapshot_of(spec, o)


def snapshot_of(spec: RepoSpec, o: HubOptions) -> Snapshot:
    """`fetch_snapshot` with the options of `o`: the one place options become a fetch.

    Trust is the caller's to decide first (`_source.trust.admit`). The zygote starts meanwhile: a
    worker will be wanted next.
    """
    prestart_zygote()
    return fetch_snapshot(
        spec,
        force_reload=o.force_reload,
        verbose=o.verbose,
        skip_validation=o.skip_validation,
    )


def rng_handoff(seed: int | None, *, back: bool = True, state: Any = None) -> dict[str, Any]:
    """The request fields that start a worker from this process's random state (`_process.rng`).

    With `back`, the worker's end state is applied here when it answers, as if the repo had run
    in this process (torch.hub's behaviour). `state`: a state captured earlier, sent instead of
    the current one. A `seed` overrides: the worker is seeded and this process's state untouched.
    """
    if seed is not None:
        return {}
    return {"rng": _rng.capture() if state is None else state, "rng_back": back}


def run_list(github: Any, o: HubOptions) -> builtins.list[str]:
    """`list` with its options in one object (shared by the public API and the torch.hub patch)."""
    policy = policy_for(o.sandbox, "list")
    snap = admitted_snapshot(github, o, "list")
    env = environment_for(snap, o, policy)
    with start_worker(snap, sandbox=policy, env=env) as w:
        return list_entrypoints(w, watchdog(o.timeout, policy), rng_handoff(None))


def run_help(github: Any, model: Any, o: HubOptions) -> str | None:
    """`help` with its options in one object."""
    check_model_name(model)
    policy = policy_for(o.sandbox, "help")
    snap = admitted_snapshot(github, o, "help")
    env = environment_for(snap, o, policy)
    with start_worker(snap, sandbox=policy, env=env) as w:
        return entrypoint_doc(w, model, watchdog(o.timeout, policy), rng_handoff(None))


def list_entrypoints(
    worker: Worker,
    timeout: float | None = None,
    extra: dict[str, Any] | None = None,
    *,
    deadline: float | None = None,
) -> builtins.list[str]:
    """The worker's entrypoint names (what `list` returns), checked to be a list of str.

    `extra`: more fields of the request (`rng_handoff`). The answer carries no fds.

    Raises:
        ProtocolError: the worker answered something else (it is killed).
        and what `Worker.request` raises.
    """
    message = ListRequest(**(extra or {}))
    return builtins.list(
        worker.request(message, EntrypointsReply, timeout, deadline=deadline).names
    )


def entrypoint_doc(
    worker: Worker,
    entry: str,
    timeout: float | None = None,
    extra: dict[str, Any] | None = None,
    *,
    deadline: float | None = None,
) -> str | None:
    """The docstring of `entry` in the worker (what `help` returns), checked to be text.

    Raises:
        ProtocolError: the worker answered something else (it is killed).
        and what `Worker.request` raises.
    """
    message = HelpRequest(entry=entry, **(extra or {}))
    return worker.request(message, DocReply, timeout, deadline=deadline).doc


def run_load(
    repo_or_dir: Any, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], o: HubOptions
) -> Any:
    """`load` with the entrypoint's arguments and the hub's options kept apart."""
    check_model_name(model)
    policy = policy_for(o.sandbox, o.mode)
    timeout = watchdog(o.timeout, policy)
    snap = admitted_snapshot(repo_or_dir, o, "load")
    env = environment_for(snap, o, policy)
    if o.mode != "remote":
        # The result holds tensors: import torch here while the zygote imports its own.
        import torch  # noqa: F401

        _collect_in_background()
        w = start_worker(snap, sandbox=policy, env=env, lazy=True, threads=caller_threads())
        try:
            result = call(
                w, model, args, kwargs, result=o.mode, timeout=timeout, seed=o.seed, rng=True,
                last=True,
            )  # fmt: skip
        except BaseException:
            w.close()
            raise
        w.close(wait=False)  # its exit, reaping and clean-up happen off the caller's path
        return result
    w = start_worker(snap, sandbox=policy, env=env, lazy=True, threads=caller_threads())
    try:
        # The random state goes in with the entrypoint call and comes back with its result;
        # later calls on the handle draw from the worker's own generators.
        message = call_message(model, args, kwargs, "handle", o.seed, None, **rng_handoff(o.seed))
        reply = w.request(message, HandleReply, timeout)
    except ProtocolError:
        w.kill()
        raise
    except BaseException:
        w.close()
        raise
    return open_handle(w, reply.handle, timeout)


_collected = 0  # the pid of the process that ran `_collect_in_background` (0: none yet)


def _collect_in_background() -> None:
    """Once per process: a full garbage collection in a thread, while the worker builds.

    Importing torch leaves ~170,000 new objects behind, so the interpreter's first full
    collection falls due soon after, and it used to fall inside the first load's unpickling
    (88 ms of CPU and 140-410 ms of wall time in a fresh process here, against 2 ms for the
    same unpickling after it). Run now, it overlaps the zygote's start and the worker's
    build; it collects nothing the interpreter would not have collected then.
    """
    global _collected
    if _collected != os.getpid():
        _collected = os.getpid()
        threading.Thread(target=gc.collect, name="isolhub-gc", daemon=True).start()


def call(
    worker: Worker,
    entry: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    result: str = "module",
    timeout: float | None = None,
    seed: int | None = None,
    then: Any = None,
    last: bool = False,
    rng: bool = False,
    rng_state: Any = None,
    deadline: float | None = None,
) -> Any:
    """Call `entry` in a live worker and decode its result.

    `result` is `module` (by value), `state_dict` or `value` (restricted codec + tensors);
    `then(obj)`, if given, runs in the worker on the entrypoint's result first (closures and
    lambdas work: it travels by cloudpickle, from this trusted process to the worker).
    `last=True`: the worker exits right after replying, while this process decodes the reply
    (its exit then costs `close()` nothing). Unless `seed` is given, `rng=True` starts the
    worker from this process's random state and takes its end state back (`rng_handoff`);
    `rng_state` starts it from that captured state instead, and takes nothing back.
    `timeout` bounds the whole call, every read of every request in it; `deadline` (a
    `time.monotonic()` value) does instead, for a caller whose own deadline spans more.
    """
    expect = RESULT_REPLIES.get(result)
    if expect is None or expect is HandleReply:
        raise ProtocolError(f"unknown result kind {result!r}")
    handoff = (
        rng_handoff(seed, back=rng_state is None, state=rng_state)
        if rng or rng_state is not None
        else {}
    )
    # A module's storages are read out of the worker (`_transport.pull`), unless the kernel refused it.
    pull = result == "module" and not _pull.refused()
    message = call_message(entry, args, kwargs, result, seed, then, last=last, pull=pull, **handoff)
    if deadline is None and timeout is not None:
        deadline = time.monotonic() + timeout  # one for the call, however many requests
    reply = worker.request(message, expect, timeout, deadline=deadline)
    try:
        if pull and isinstance(reply, PickleReply) and reply.pull:
            return _pulled_module(worker, reply, timeout, deadline, last)
        assert isinstance(reply, PickleReply | ValueReply | StateDictReply)
        return decode_result(reply, limits=worker.limits)
    except ProtocolError:
        worker.kill()  # it sent garbage: nothing more it says can be trusted
        raise


def _pulled_module(
    worker: Worker,
    reply: PickleReply,
    timeout: float | None,
    deadline: float | None,
    last: bool,
) -> Any:
    """A module-mode result whose storages are read out of the (trusted) worker's memory."""
    try:
        arena = ArenaReader.of_storages(read_storages(worker.pid, reply.layout))
    except PullError:
        _pull.mark_refused()
        pushed = worker.request(PushRequest(), ArenaReply, timeout, deadline=deadline)
        arena = ArenaReader(pushed.fd, pushed.layout)
    # Read: it may exit now (or drop the pinned storages), while this process unpickles.
    worker.notify(CloseNote() if last else UnpinNote())
    return _byvalue.loads_with(reply.data, arena)


def watchdog(timeout: float | None, policy: Sandbox | None) -> float | None:
    """The parent's wall-clock limit: `timeout=`, else the sandbox's `wall_seconds`."""
    return timeout if timeout is not None or policy is None else policy.wall_seconds


def call_message(
    entry: str,
    args: Any,
    kwargs: Any,
    result: str,
    seed: int | None,
    then: Any,
    **fields: Any,
) -> CallRequest:
    """The request that calls `entry(*args, **kwargs)` in a worker and answers as `result`.

    `fields`: more of `CallRequest`'s (`last`, `pull`, those of `rng_handoff`).
    """
    return CallRequest(
        entry=entry, args=tuple(args), kwargs=dict(kwargs or {}), result=result, seed=seed,
        then=then, **fields,
    )  # fmt: skip


def decode_result(
    reply: PickleReply | ValueReply | StateDictReply, *, limits: ReplyLimits | None = None
) -> Any:
    """Rebuild a `call`'s result (its reply decoded: `_process.messages.decode_reply`) in this process;
    consumes its fd.

    Only a `module` request may be answered with a pickle (`Worker.request` refuses any other
    kind than the one asked for), so a worker cannot make the parent unpickle by lying about
    the kind. `limits` caps what the reply may make this process hold (`reply_limits`).

    Raises:
        ProtocolError: the result is malformed, or pulled when it was not asked to be.
    """
    # Each decoder takes the fd first, so a malformed field can never leave it open.
    try:
        if isinstance(reply, PickleReply):
            if reply.pull:
                raise ProtocolError("a pulled module result nobody asked for")
            return _byvalue.loads(reply.data, reply.fd, reply.layout)
        if isinstance(reply, StateDictReply):
            return decode_state_dict(reply.body, reply.fd, reply.layout, limits)
        return decode_value(reply.body, reply.fd, reply.layout, limits=limits)
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"malformed result from a worker: {e!r}") from None


def check_model_name(model: Any) -> None:
    """torch.hub's check (and message) that an entrypoint name is a string."""
    if not isinstance(model, str):
        raise UsageError("Invalid input: model should be a string of function name")
