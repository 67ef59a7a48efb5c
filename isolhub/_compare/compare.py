"""Two refs of one repo side by side: entrypoints, weights and outputs, in one report.

    spec A ─► fetch ─► worker A ─► entry(*args_a, **kwargs_a) ─► CompareSession ─┐ plain values
    spec B ─► fetch ─► worker B ─► entry(*args_b, **kwargs_b) ─► CompareSession ─┘ and tensors
                                              (one thread per side, both at once)   cross back
    each batch ─► session("step", *batch) on both at once ─► Stream (folded, then dropped)
                 ─► diff in this process ─► CompareReport: summary() / to_json() / to_html()

The entrypoint's result stays in its worker inside a `CompareSession` (`_compare.worker`, the
`then=` of the call, kept as a handle): it describes the state dict and the hubconf's
entrypoints (`inspect`), then runs one batch per request, with forward hooks on every submodule
when `layers=True`. Only the restricted codec and the tensor arena carry its answers back, so
nothing from the repo is unpickled here in either mode, and the repo's classes never enter this
process. This module starts the two sides, feeds them the batches and diffs them
(`_compare.stream` folds the batches, `_compare.code` diffs the snapshot trees); the report
types are in `_compare.report`.

* `mode="module"` treats the result as the module it is: `parameters()` are counted, its class
  is named, and it is switched to `eval()` before the forward.
* `mode="remote"` uses only what a remote proxy (`load(mode="remote")`) offers: `__call__` and
  `state_dict()`. The module runs as the entrypoint returned it (no `eval()`), and the parameter
  count is every value in the state dict. `summarise(proxy, remote=True)` works unchanged on
  such a proxy in this process. Layer hooks run in the worker in both modes (on whatever
  `nn.Module` the entrypoint returned), so `layers=True` works in remote mode and confined.

Example (`git_repo` is a hub repository whose `net` is a linear layer of 2 outputs at tag v1, 3
at v2):
    >>> import torch
    >>> rep = compare(f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v2", "net",
    ...               inputs=torch.randn(2, 4), seed=0)
    >>> rep.equivalent
    False
    >>> for line in rep.differences:   # `print(rep.summary())` shows them with the measurements
    ...     print(line)
    entrypoint net: signature changed
    parameter weight: reshaped 2x4 → 3x4
    parameter bias: reshaped 2 → 3
    output output: reshaped 2x2 → 2x3
"""

from __future__ import annotations

import difflib
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .._errors import (
    EntrypointError,
    IsolhubError,
    MissingDependenciesError,
    ProtocolError,
    RemoteError,
    UsageError,
)
from .._process.messages import CompareStep, CompareSummary, HandleReply
from .._types import CompareMode, EnvArg, SandboxArg, Source, TrustRepo
from .._usage import check_choice, check_count, check_timeout, check_tolerance
from .code import diff_trees
from .report import CompareReport, EntrypointDiff, FileChange, SideInfo, TensorDiff, ValueDiff
from .stream import Latency, Stream, describe_batch, difference, iter_batches
from .worker import clean_doc, one_line, open_session

MODES = ("module", "remote")
# Tensor statuses that are not differences; every other status (changed, reshaped...) is one.
EQUAL_STATUSES = ("same", "close")
# A renamed parameter keeps its values: the two refs compute the same thing (the report says a
# state dict saved at one needs its keys mapped for the other, but that is no difference).
PARAMETER_EQUAL = (*EQUAL_STATUSES, "renamed")


# ----------------------------------------------------------------------------- compare


def compare(
    spec_a: str,
    spec_b: str,
    entrypoint: str,
    *args: Any,
    args_a: Any = None,
    args_b: Any = None,
    kwargs_a: dict[str, Any] | None = None,
    kwargs_b: dict[str, Any] | None = None,
    inputs: Any = None,
    seed: int | None = None,
    layers: bool = False,
    layer_bytes: int = 64 << 20,
    mode: CompareMode = "module",
    atol: float = 1e-6,
    rtol: float = 1e-5,
    source: Source = "github",
    trust_repo: TrustRepo = "check",
    force_reload: bool = False,
    verbose: bool = True,
    timeout: float | None = None,
    sandbox: SandboxArg = None,
    env: EnvArg = None,
    **kwargs: Any,
) -> CompareReport:
    """Load `entrypoint(*args, **kwargs)` at two refs, each in its own worker, and compare them.

    `args_a`/`args_b` replace `args` on one side; `kwargs_a`/`kwargs_b` are merged over `kwargs`
    on one side (for refs whose entrypoint signatures differ).

    Both sides run at once. `inputs` is fed to each returned module: a tensor or a tuple of
    forward arguments (one batch), an iterable of batches, or the path of a file saved with
    `torch.save` (see `_compare.stream.iter_batches`); batches go through both workers one at a
    time and are folded into running aggregates (`rep.metrics`), so memory stays bounded.
    `layers=True` records every submodule's output in both workers (summary statistics always,
    the tensors themselves up to `layer_bytes` per side and batch) and aligns them
    (`rep.layers`, `rep.first_divergence`). `seed` seeds each worker the same way before the
    entrypoint and again before each batch's forward, so identical code gives identical random weights. Without `seed`, both sides
    start from the same state: this process's random state at the call (torch's CPU generator,
    `random`, numpy's), as `load` would use it; identical code then draws identical weights too
    (the report's notes say so), unless it reseeds itself from the OS; this process's
    generators are left as they were. Tuples and non-module results
    are compared on what can be compared; the report says what could not. `timeout` bounds each
    worker's call (it is killed past it); `sandbox` ("strict" or a `Sandbox`) confines both
    workers, and untrusted repos then need no trust prompt; `env="auto"` gives each side the
    environment its requirements ask for (the notes name them); the other arguments are as for
    `load`.

    A side that fails (bad ref, entrypoint raised, worker died) does not raise: the report holds
    its error (`error_a`/`error_b`) and still describes the other side.

    Example (`git_repo`: a hub repository whose `net` is a linear layer, wider at v2 than v1):
        >>> import torch
        >>> from isolhub import compare
        >>> rep = compare(f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v2", "net",
        ...               pretrained=False, inputs=torch.randn(2, 4), seed=0)
        >>> rep.equivalent, [p.name for p in rep.parameters if p.status == "reshaped"]
        (False, ['weight', 'bias'])
        >>> compare(f"git+file://{git_repo}@v1", f"git+file://{git_repo}@v1", "net",
        ...         width=3, inputs=torch.randn(2, 4), seed=0).equivalent
        True

    Raises:
        SpecError: a malformed spec or bad `inputs`.
        UsageError: an unknown `mode`, a negative tolerance, a bad `timeout` or `layer_bytes`,
            per-side arguments of the wrong type.
    """
    from .. import _engine
    from .._options import HubOptions
    from .._process import rng as _rng
    from .._source import trust as _trust
    from .._spec import parse_spec

    if not isinstance(entrypoint, str):
        raise UsageError("Invalid input: entrypoint should be a string of function name")
    check_choice(mode, "mode", MODES)
    check_tolerance(atol, "atol")
    check_tolerance(rtol, "rtol")
    check_timeout(timeout)
    calls = [_side_call(args, kwargs, args_a, kwargs_a), _side_call(args, kwargs, args_b, kwargs_b)]
    check_count(layer_bytes, "layer_bytes", minimum=0, none=False)
    _engine.policy_for(sandbox, "value")
    if env is not None:
        check_choice(env, "env", ("auto",))
    # compare has no skip_validation: it never made torch.hub's ref check, and still does not.
    o = HubOptions(
        source=source,
        trust_repo=trust_repo,
        force_reload=force_reload,
        verbose=verbose,
        skip_validation=True,
        mode=mode,
        timeout=timeout,
        seed=seed,
        sandbox=sandbox,
        env=env,
    )
    batches = iter_batches(inputs) if inputs is not None else iter(())
    first = next(batches, None)
    shown = describe_batch(first) if first is not None else ()
    specs = [parse_spec(spec_a, source), parse_spec(spec_b, source)]
    sides = [_Side(str(spec)) for spec in (spec_a, spec_b)]
    # Trust is asked here, one side after the other, before either side's thread starts.
    for side, spec in zip(sides, specs, strict=True):
        try:
            _trust.admit(spec, o, "compare")
        except IsolhubError as e:
            side.error = e
    start = None if seed is not None else _rng.capture()  # one state, the same for both sides
    job = _Job(entrypoint, o, start, layers, layer_bytes)
    stream = Stream(atol, rtol, partial(diff_tensors, atol=atol, rtol=rtol, renames=False))
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="isolhub-compare") as pool:
            pending = [
                pool.submit(_open_side, side, spec, job, call)
                for side, spec, call in zip(sides, specs, calls, strict=True)
                if side.error is None
            ]
            for future in pending:
                future.result()
            if first is not None:
                batches = itertools.chain([first], batches)
                del first  # the stream holds one batch at a time, this one included
                _run_batches(pool, sides, batches, stream, o.timeout)
        for side in sides:
            side.peak_memory = _peak_memory(side.worker)
    finally:
        for side in sides:
            if side.worker is not None:
                side.worker.close()
    notes = []
    if not shown:
        notes.append("no inputs given: outputs were not compared")
    elif stream.batches > 1:
        notes.append(f"outputs compared over {stream.batches} batches; inputs shows the first")
    for label, side in (("A", sides[0]), ("B", sides[1])):
        if side.env is not None:
            notes.append(f"{label} ran in {side.env}")
    if mode == "remote":
        notes.append("remote mode: modules ran as the entrypoint returned them (no eval())")
    if seed is None:
        notes.append(
            "no seed given: both sides started from the same random state (the caller's), so "
            "random draws match where the code is the same; pass a seed to choose it"
        )
    if layers and stream.batches and not stream.layers.rows:
        notes.append("layers: no submodule outputs were recorded (not an nn.Module?)")
    code: tuple[Any, ...] = ()
    if sides[0].path is not None and sides[1].path is not None:
        code = diff_trees(sides[0].path, sides[1].path)
    return build_report(
        sides[0],
        sides[1],
        code=code,
        stream=stream,
        entrypoint=entrypoint,
        mode=mode,
        atol=atol,
        rtol=rtol,
        seed=seed,
        args=tuple(_short_repr(a) for a in args),
        kwargs=tuple((k, _short_repr(v)) for k, v in kwargs.items()),
        args_a=None if args_a is None else tuple(_short_repr(a) for a in calls[0][0]),
        args_b=None if args_b is None else tuple(_short_repr(a) for a in calls[1][0]),
        kwargs_a=tuple((k, _short_repr(v)) for k, v in (kwargs_a or {}).items()),
        kwargs_b=tuple((k, _short_repr(v)) for k, v in (kwargs_b or {}).items()),
        inputs=shown,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class _Job:
    """What each side does (the same on both; the entrypoint's arguments are per side).

    How it is fetched and run is the call's one `HubOptions`; the rest is compare's own.
    """

    entry: str
    options: Any  # HubOptions
    rng_state: Any = None  # unseeded: the caller's random state, where both sides start
    layers: bool = False
    layer_bytes: int = 0


@dataclass
class _Side:
    """One side while it is being described (mutable; one thread at a time)."""

    spec: str
    sha: str | None = None
    path: str | None = None  # the snapshot tree, for the code diff
    error: BaseException | None = None
    summary: CompareSummary | None = None  # a new record after each batch (`after_step`)
    entrypoints: dict[str, dict[str, Any]] | None = None
    start_s: float | None = None
    load_s: float | None = None
    worker: Any = None
    session: Any = None  # the worker's CompareSession, through its handle
    latency: Latency = field(default_factory=Latency)
    peak_memory: int | None = None
    env: str | None = None  # the environment it ran in (`Env.describe()`), with env="auto"


def _side_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], own_args: Any, own_kwargs: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One side's `(args, kwargs)`: its own args instead of the shared ones, its kwargs over."""
    if own_args is not None and not isinstance(own_args, (tuple, list)):
        raise UsageError(f"args_a/args_b must be a tuple or list, not {type(own_args).__name__}")
    if own_kwargs is not None and not (
        isinstance(own_kwargs, dict) and all(isinstance(k, str) for k in own_kwargs)
    ):
        raise UsageError("kwargs_a/kwargs_b must be a dict with string keys")
    return tuple(args if own_args is None else own_args), {**kwargs, **(own_kwargs or {})}


def _open_side(
    side: _Side, spec: Any, job: _Job, call: tuple[tuple[Any, ...], dict[str, Any]]
) -> None:
    """Fetch, start the worker, call the entrypoint and keep its result there as a session."""
    from .. import _engine
    from .._handle import open_handle

    o = job.options
    began = time.monotonic()
    timeout = o.watchdog
    try:
        snap = _engine.snapshot_of(spec, o)  # admitted by compare() already
        side.sha, side.path = snap.sha, str(snap.path)
        env = _engine.environment_for(snap, o, o.policy)
        side.env = None if env is None else env.describe()
        threads = _engine.caller_threads(2)  # both sides run at once
        side.worker = worker = _engine.start_worker(
            snap, sandbox=o.policy, env=env, threads=threads
        )
        side.start_s = time.monotonic() - began
        then = partial(
            open_session, seed=o.seed, remote=o.mode == "remote", snapshot=str(snap.path),
            layers=job.layers, layer_bytes=job.layer_bytes,
        )  # fmt: skip
        message = _engine.call_message(
            job.entry, call[0], call[1], "handle", o.seed, then,
            **_engine.rng_handoff(o.seed, back=False, state=job.rng_state),
        )  # fmt: skip
        sent = time.monotonic()
        # One deadline for the opening request and its list/help fallback together.
        deadline = None if timeout is None else sent + timeout
        try:
            reply = worker.request(message, HandleReply, timeout, deadline=deadline)
        except (RemoteError, EntrypointError, MissingDependenciesError) as e:
            side.error = e
            side.entrypoints = _entrypoints_by_help(worker, deadline)
            return
        session = open_handle(worker, reply.handle, timeout)
        try:
            summary = CompareSummary.decode(session("summary"))
        except ProtocolError:
            worker.kill()  # it sent garbage: nothing more it says can be trusted
            raise
        # CLOCK_MONOTONIC is system-wide on Linux: the worker's clock is this one.
        side.load_s = max(0.0, summary.t0 - sent)
        side.summary = summary
        side.entrypoints = summary.entrypoints
        side.session = session
    except IsolhubError as e:
        side.error = e


def _run_batches(
    pool: ThreadPoolExecutor,
    sides: list[_Side],
    batches: Iterator[tuple[Any, ...]],
    stream: Stream,
    timeout: float | None,
) -> None:
    """Each batch through every live side at once, folded into `stream` before the next."""
    for index, batch in enumerate(batches):
        live = [s for s in sides if s.session is not None]
        if not live:
            return
        answers = list(pool.map(partial(_step, batch=batch), live))
        replies = {id(side): r for side, r in zip(live, answers, strict=True)}
        del batch, answers
        for side in live:
            reply = replies[id(side)]
            if reply is not None:
                _note_step(side, reply, first=index == 0)
        ra, rb = (replies.get(id(s)) for s in sides)
        if ra is not None and rb is not None:
            stream.add(ra, rb)
        del replies, ra, rb


def _step(side: _Side, batch: tuple[Any, ...]) -> CompareStep | None:
    """One batch through one side's session: its checked reply, or None once it failed."""
    try:
        return CompareStep.decode(side.session("step", *batch))
    except IsolhubError as e:
        if isinstance(e, ProtocolError):
            side.worker.kill()  # it sent garbage: nothing more it says can be trusted
        side.error, side.session = e, None
        return None


def _note_step(side: _Side, step: CompareStep, *, first: bool) -> None:
    """What one batch tells about its side: latency, forward errors, the first batch's values."""
    assert side.summary is not None
    side.summary = side.summary.after_step(step, first=first)
    if not step.errors and step.forward_s:
        side.latency.add(sum(step.forward_s.values()))


def _peak_memory(worker: Any) -> int | None:
    """The worker's peak resident set (VmHWM), read from /proc here, not taken on its word."""
    if worker is None or worker.closed:
        return None
    try:
        with open(f"/proc/{int(worker.pid)}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _entrypoints_by_help(worker: Any, deadline: float | None) -> dict[str, dict[str, Any]] | None:
    """Names and docstrings through the worker's list/help, after the entrypoint itself raised."""
    from .._engine import entrypoint_doc, list_entrypoints

    try:
        names = list_entrypoints(worker, deadline=deadline)
    except IsolhubError:
        return None
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            doc = entrypoint_doc(worker, name, deadline=deadline)
        except IsolhubError:
            if worker.closed:
                break  # timed out, died or lied: the rest would not come either
            doc = None
        out[name] = {"kind": None, "signature": None, "doc": clean_doc(doc)}
    return out


# ----------------------------------------------------------------------------- diffing


def build_report(
    side_a: _Side, side_b: _Side, *, stream: Stream | None = None, **meta: Any
) -> CompareReport:
    """Diff two described sides (and the batches `stream` folded) into a report (no workers)."""
    atol, rtol = meta["atol"], meta["rtol"]
    sa, sb = side_a.summary, side_b.summary
    differences: list[str] = []
    entrypoints = diff_entrypoints(side_a.entrypoints, side_b.entrypoints)
    for e in entrypoints:
        if e.status in ("added", "removed") or "signature" in e.changes:
            what = "signature changed" if e.status == "changed" else e.status
            differences.append(f"entrypoint {e.name}: {what}")
    parameters: tuple[TensorDiff, ...] = ()
    outputs: tuple[TensorDiff, ...] = ()
    values: tuple[ValueDiff, ...] = ()
    uncompared: list[str] = []
    if sa is not None and sb is not None:
        parameters = diff_tensors(sa.tensors, sb.tensors, atol, rtol, renames=True)
        outputs = diff_tensors(sa.outputs, sb.outputs, atol, rtol, renames=False)
        if stream is not None and stream.batches:
            outputs = stream.output_rows()
        values = diff_values(sa.values, sb.values, atol, rtol)
        for kind, rows, equal in (
            ("parameter", parameters, PARAMETER_EQUAL),
            ("output", outputs, EQUAL_STATUSES),
        ):
            differences.extend(
                f"{kind} {_describe_tensor_diff(r)}" for r in rows if r.status not in equal
            )
        differences.extend(
            f"value {v.name}: {v.status}" for v in values if v.status not in EQUAL_STATUSES
        )
        if sa.result_type != sb.result_type:
            differences.append(f"result type: {sa.result_type} → {sb.result_type}")
        ua, ub = sa.uncompared, sb.uncompared
        for name in sorted(set(ua) | set(ub)):
            ra, rb = ua.get(name), ub.get(name)
            uncompared.append(f"{name}: {ra if ra == rb else f'A: {ra}; B: {rb}'}")
            if ra != rb:
                differences.append(f"{name}: not comparable (A: {ra}; B: {rb})")
        fa, fb = ({p.path: p.forward_error for p in s.parts if p.forward_error} for s in (sa, sb))
        for path in sorted(set(fa) | set(fb)):
            where = f"forward of {path}" if path else "forward"
            if fa.get(path) == fb.get(path):
                uncompared.append(f"{path or 'output'}: {where} raised on both: {fa[path]}")
            else:
                differences.append(f"{where} raised (A: {fa.get(path)}; B: {fb.get(path)})")
    return CompareReport(
        spec_a=side_a.spec,
        spec_b=side_b.spec,
        a=_side_info(side_a),
        b=_side_info(side_b),
        entrypoints=entrypoints,
        parameters=parameters,
        outputs=outputs,
        values=values,
        uncompared=tuple(uncompared),
        differences=tuple(differences),
        batches=stream.batches if stream is not None else 0,
        metrics=stream.metrics() if stream is not None else (),
        layers=stream.layers.rows_out() if stream is not None else (),
        **meta,
    )


def _side_info(side: _Side) -> SideInfo:
    s = side.summary
    error = detail = None
    if side.error is not None:
        detail = str(side.error)
        error = f"{type(side.error).__name__}: {one_line(detail)}"
    if s is None:
        return SideInfo(side.spec, side.sha, error, detail, start_s=side.start_s)
    tensors = s.tensors
    params = [p.parameters for p in s.parts]
    if params and all(isinstance(p, int) for p in params):
        count = sum(p for p in params if p is not None)
    else:
        count = sum(t.numel() for t in _unique(tensors.values()))
    forward_errors = [
        (f"{p.path}: " if p.path else "") + str(p.forward_error) for p in s.parts if p.forward_error
    ]
    return SideInfo(
        spec=side.spec,
        sha=side.sha,
        error=error,
        error_detail=detail,
        result_type=s.result_type,
        parameters=count,
        tensors=len(tensors),
        bytes=sum(t.numel() * t.element_size() for t in _unique(tensors.values())),
        start_s=side.start_s,
        load_s=side.load_s,
        forward_error="; ".join(forward_errors) or None,
        peak_memory=side.peak_memory,
        **side.latency.summary(),
    )


def _unique(tensors: Any) -> Iterator[Any]:
    """Each distinct tensor once (tied weights are one tensor under two names)."""
    seen = set()
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key not in seen:
            seen.add(key)
            yield t


def diff_entrypoints(
    a: dict[str, dict[str, Any]] | None, b: dict[str, dict[str, Any]] | None
) -> tuple[EntrypointDiff, ...]:
    """Entrypoints added, removed, or with a changed signature or docstring (None: unknown)."""
    if a is None or b is None:
        return ()
    rows = []
    for name in sorted(set(a) | set(b)):
        ea, eb = a.get(name) or {}, b.get(name) or {}
        changes = []
        if name not in a or name not in b:
            status = "added" if name not in a else "removed"
        else:
            sig_a, sig_b = ea.get("signature"), eb.get("signature")
            if sig_a is not None and sig_b is not None and sig_a != sig_b:
                changes.append("signature")
            if ea.get("doc") != eb.get("doc"):
                changes.append("docstring")
            src_a, src_b = ea.get("source"), eb.get("source")
            if src_a is not None and src_b is not None and src_a != src_b:
                changes.append("source")
            status = "changed" if changes else "same"
        rows.append(
            EntrypointDiff(
                name,
                status,
                tuple(changes),
                ea.get("signature"),
                eb.get("signature"),
                ea.get("doc"),
                eb.get("doc"),
            )  # fmt: skip
        )
    return tuple(rows)


def diff_tensors(
    a: dict[str, Any], b: dict[str, Any], atol: float, rtol: float, *, renames: bool
) -> tuple[TensorDiff, ...]:
    """Per-name comparison of two tensor dicts, in A's order then B's additions.

    With `renames`, a tensor only in A and one only in B with the same dtype, shape and values
    are one rename; see `find_renames`.
    """
    rows: dict[str, TensorDiff] = {}
    for name in [*a, *(k for k in b if k not in a)]:
        ta, tb = a.get(name), b.get(name)
        meta = {**_meta(ta, "_a"), **_meta(tb, "_b")}
        if ta is None or tb is None:
            rows[name] = TensorDiff(name, "added" if ta is None else "removed", **meta)
        elif ta.shape != tb.shape:
            rows[name] = TensorDiff(name, "reshaped", **meta)
        else:
            max_abs, rel, close = tensor_difference(ta, tb, atol, rtol)
            if ta.dtype != tb.dtype:
                status = "retyped"
            else:
                status = "same" if max_abs == 0 else "close" if close else "changed"
            rows[name] = TensorDiff(name, status, max_abs=max_abs, rel=rel, allclose=close, **meta)
    if renames:
        only_a = {k: a[k] for k in a if k not in b}
        for old, new in find_renames(only_a, {k: b[k] for k in b if k not in a}):
            meta = {**_meta(a[old], "_a"), **_meta(b[new], "_b")}
            rows[old] = TensorDiff(old, "renamed", new, max_abs=0.0, rel=0.0, allclose=True, **meta)
            del rows[new]
    return tuple(rows.values())


def _meta(t: Any, suffix: str) -> dict[str, Any]:
    if t is None:
        return {}
    return {f"shape{suffix}": tuple(t.shape), f"dtype{suffix}": str(t.dtype).removeprefix("torch.")}


def tensor_difference(a: Any, b: Any, atol: float, rtol: float) -> tuple[float, float, bool]:
    """`(max |a-b|, max |a-b| / max(|a|,|b|), allclose)` of two same-shape tensors.

    NaNs in the same place count as equal, as do equal infinities; a NaN on one side only is an
    infinite difference. Works in float64 (complex128), a few million elements at a time.
    """
    return difference(a, b, atol, rtol)[:3]


def find_renames(removed: dict[str, Any], added: dict[str, Any]) -> list[tuple[str, str]]:
    """Pairs `(old, new)` of tensors with equal dtype, shape and values, one to one.

    Among several equal candidates the most similar name wins. Constant tensors (all zeros,
    say) only pair up when a sibling was renamed the same way (`fc.bias` → `head.bias` after
    `fc.weight` → `head.weight`), so a removed layer and an added one are not a rename.
    """
    import torch

    def fingerprint(t: Any) -> tuple[Any, ...]:
        wide = t.detach().to(torch.complex128 if t.is_complex() else torch.float64)
        return (tuple(t.shape), t.dtype, complex(wide.sum()) if t.numel() else 0)

    def constant(t: Any) -> bool:
        return t.numel() <= 1 or bool((t == t.reshape(-1)[0]).all())

    prints = {k: fingerprint(t) for k, t in added.items()}
    pairs: list[tuple[str, str]] = []

    def match(old: str, candidates: list[str]) -> None:
        taken = {new for _, new in pairs}
        t, fp = removed[old], fingerprint(removed[old])
        same = [n for n in candidates if n not in taken and prints[n] == fp]
        same = [n for n in same if torch.equal(added[n], t)]
        if same:
            pairs.append((old, max(same, key=lambda n: _similarity(old, n))))

    constants = {k for k, t in removed.items() if constant(t)}
    for old in sorted(set(removed) - constants):
        match(old, sorted(added))
    prefix_map = {}
    for old, new in pairs:
        (pa, _, leaf_a), (pb, _, leaf_b) = old.rpartition("."), new.rpartition(".")
        if leaf_a == leaf_b:
            prefix_map[pa] = pb
    for old in sorted(constants):
        pa, dot, leaf = old.rpartition(".")
        if pa in prefix_map and f"{prefix_map[pa]}{dot}{leaf}" in added:
            match(old, [f"{prefix_map[pa]}{dot}{leaf}"])
    return pairs


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def diff_values(
    a: dict[str, Any], b: dict[str, Any], atol: float, rtol: float
) -> tuple[ValueDiff, ...]:
    """Plain values by name: same, close (numbers within atol + rtol*|b|), changed, added, removed."""
    rows = []
    for name in [*a, *(k for k in b if k not in a)]:
        if name not in a or name not in b:
            status = "added" if name not in a else "removed"
        elif type(a[name]) is type(b[name]) and a[name] == b[name]:
            status = "same"
        elif (
            type(a[name]) in (int, float)
            and type(b[name]) in (int, float)
            and abs(a[name] - b[name]) <= atol + rtol * abs(b[name])
        ):
            status = "close"
        else:
            status = "changed"
        ra = _short_repr(a[name]) if name in a else None
        rb = _short_repr(b[name]) if name in b else None
        rows.append(ValueDiff(name, status, ra, rb))
    return tuple(rows)


# ----------------------------------------------------------------------------- helpers


def _describe_tensor_diff(r: TensorDiff) -> str:
    if r.status == "renamed":
        return f"{r.name}: renamed to {r.name_b}"
    if r.status == "reshaped":
        return f"{r.name}: reshaped {shape_text(r.shape_a)} → {shape_text(r.shape_b)}"
    if r.status == "retyped":
        return f"{r.name}: retyped {r.dtype_a} → {r.dtype_b}"
    if r.status in ("added", "removed"):
        return f"{r.name}: {r.status}"
    return f"{r.name}: max|a-b| {r.max_abs:.3g} (rel {r.rel:.3g}) beyond tolerance"


def shape_text(shape: tuple[int, ...] | None) -> str:
    """`2x3x32x32`, `scalar` for (), `-` for None."""
    if shape is None:
        return "-"
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "CompareReport",
    "EntrypointDiff",
    "FileChange",
    "SideInfo",
    "TensorDiff",
    "ValueDiff",
    "compare",
]
