"""The Ray backend of `Hub(backend="ray")`: one Ray actor per repo@sha, anywhere in a cluster.

    driver (the Hub)                              a Ray node
    fetch the snapshot ─▶ tar.gz ─▶ ray.put ───▶  _RepoActor: install it under that node's
                                                  isolhub cache (checked extraction, atomic)
                                                  ─▶ start_worker (the actor's own zygote)
                                                  ─▶ call(entry, then=fn) in the worker
    decode_result ◀── reply + arena bytes, or a typed isolhub error ◀──┘

Ray refuses a local directory in a per-actor `runtime_env`, so the snapshot travels through the
object store instead: packed once per repo@sha by the driver (with the commit recorded in the
archive, as `git archive` does), fetched by the actor only when its node's cache lacks that
snapshot, and extracted by isolhub's checked tar extractor into the same cache layout a local
fetch uses. Inside the actor the repo runs in a forked isolhub worker, exactly as locally. The
actor is a relay: it neither imports the repo nor decodes its replies (it never even imports
torch); the reply frame and its tensor arena travel back as bytes and are decoded in the driver
by `isolhub._engine.decode_result` (the restricted codec for values), as for a local worker. `fn`
travels as bytes pickled by value in the driver and is unpickled only in the worker.

isolhub must be importable on every node (install it in the cluster's image, or ship it with
`runtime_env={"py_modules": [...]}` at `ray.init`). The node's hub dir is its own `get_dir()`
(set `ISOLHUB_HOME` through the job's `runtime_env` to choose it).

Example (needs a Ray cluster):
    >>> ray.init(address="auto")  # doctest: +SKIP
    >>> with hub.Hub(backend="ray", max_workers=16, timeout=600) as h:  # doctest: +SKIP
    ...     results = list(h.map(evaluate, specs, entrypoint="model"))
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .._cache.store import STAGING_PREFIX, install_snapshot, snapshot_path
from .._engine import call_message, decode_result, reply_limits, start_worker
from .._errors import (
    IsolhubError,
    ProtocolError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
)
from .._memfd import sealed_bytes
from .._process.messages import (
    RESULT_REPLIES,
    DocReply,
    EntrypointsReply,
    HelpRequest,
    ListRequest,
    PickleReply,
    Request,
    StateDictReply,
    ValueReply,
    close_fds,
    decode_reply,
)
from .._process.worker import Worker, shutdown_zygote
from .._source.archive import extract_tar
from .._source.snapshot import Snapshot
from .._spec import RepoSpec
from .._transport.codec import ReplyLimits
from .backend import Job, Outcome, PoolSettings, Shipped, is_infrastructure_failure

__all__ = ["RayBackend", "install_shipped_snapshot", "pack_snapshot", "require_ray"]

# The driver's watchdog allows this much beyond `timeout` for the actor's own start (a Ray
# worker process, the snapshot install, a zygote importing torch) before it kills the actor.
_ACTOR_GRACE = 120.0
_SKIP_DIRS = (".git", "__pycache__")


def require_ray() -> Any:
    """Import and return `ray`.

    Example (with the `ray` extra installed, as `scripts/test` does):
        >>> require_ray().__name__
        'ray'

    Raises:
        IsolhubError: Ray is not installed (`pip install 'isolhub[ray]'`).
    """
    try:
        import ray
    except ImportError as e:
        raise IsolhubError(
            f"backend='ray' needs Ray, which is not importable here ({e}); "
            "install it with: pip install 'isolhub[ray]'"
        ) from e
    return ray


def pack_snapshot(root: Path, commit: str | None) -> bytes:
    """A gzipped tar of the snapshot at `root`, recording `commit` as `git archive` does.

    `.git` and `__pycache__` folders are left out; symlinks stay symlinks.

    Raises:
        OSError: the snapshot cannot be read.

    Example (`git_repo`: a git repository with a tag v1):
        >>> import isolhub
        >>> snap = isolhub.fetch(f"git+file://{git_repo}@v1")
        >>> data = pack_snapshot(snap.path, snap.sha)
        >>> import io, tarfile
        >>> tarfile.open(fileobj=io.BytesIO(data)).getnames()
        ['hubconf.py']
    """
    buf = io.BytesIO()
    headers = {"comment": commit} if commit else {}
    with tarfile.open(
        fileobj=buf, mode="w:gz", compresslevel=1, format=tarfile.PAX_FORMAT, pax_headers=headers
    ) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(dirnames + filenames):
                path = os.path.join(dirpath, name)
                tf.add(path, arcname=os.path.relpath(path, root), recursive=False)
    return buf.getvalue()


def install_shipped_snapshot(spec: RepoSpec, key: str, commit: str | None, data: Any) -> Path:
    """Install a `pack_snapshot` archive as `snapshots/<key>` in this node's cache.

    `data` is the archive's bytes, or a callable returning them (called only when the
    snapshot is missing here). The archive is checked member by member before anything is
    written (and its recorded commit must be `commit`), then renamed into place atomically.

    Example (on a node: the driver packed it, `lambda: ray.get(ref)` would fetch it):
        >>> from pathlib import Path
        >>> from isolhub._spec import parse_spec
        >>> Path("snap").mkdir()
        >>> _ = Path("snap/hubconf.py").write_text("dependencies = []\\n")
        >>> sha = "3f2a" * 10
        >>> data = pack_snapshot(Path("snap"), sha)
        >>> path = install_shipped_snapshot(parse_spec("git+file:///srv/net.git"), sha, sha, data)
        >>> path.parent.name, path.name == sha, [p.name for p in path.iterdir()]
        ('snapshots', True, ['hubconf.py'])

    Raises:
        ArchiveError: the archive is malformed, hostile or for another commit.
        CacheError: this node's cache is not writable.
    """
    path = snapshot_path(spec, key)
    if path.is_dir():
        return path

    def populate(dest: Path) -> None:
        blob = data() if callable(data) else data
        fd, tmp = tempfile.mkstemp(
            prefix=f"{STAGING_PREFIX}{key[:12]}-{os.getpid()}-", dir=dest.parent
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            extract_tar(Path(tmp), dest, expected_commit=commit)
        finally:
            os.unlink(tmp)

    return install_snapshot(spec, key, populate)


class _RepoActor:
    """Runs inside a Ray worker process: serves one repo@sha through a forked isolhub worker."""

    def __init__(
        self,
        spec: RepoSpec,
        sha: str | None,
        key: str,
        archive: list[Any],
        start_method: str,
        memory_bytes: int | None,
        sandbox: Any = None,
    ) -> None:
        # `archive` is a one-item list so Ray passes the ObjectRef itself, fetched on demand.
        self._spec, self._sha, self._key, self._archive = spec, sha, key, archive
        self._start_method, self._memory_bytes = start_method, memory_bytes
        self._sandbox = sandbox
        self._snapshot: Snapshot | None = None
        self._worker: Worker | None = None

    def _materialise(self) -> Snapshot:
        if self._snapshot is None:
            import ray

            path = install_shipped_snapshot(
                self._spec, self._key, self._sha, lambda: ray.get(self._archive[0])
            )
            self._snapshot = Snapshot(self._spec, self._sha, path)
        return self._snapshot

    def run(self, job: Job, timeout: float | None) -> Outcome:
        """Relay `job` to this actor's worker (started, or restarted after a failure, here).

        The reply is not decoded here: `value` is `(reply, arena bytes or None)`, decoded by
        the driver, so this process never imports torch nor unpickles anything from the repo.
        """
        try:
            snap = self._materialise()
            if self._worker is None or self._worker.closed:
                self._worker = start_worker(
                    snap,
                    start_method=self._start_method,
                    memory_bytes=self._memory_bytes,
                    sandbox=self._sandbox,
                )
        except IsolhubError as e:
            return _failure(e, None)
        worker = self._worker
        try:
            reply, fds = worker.exchange(
                _message(job), timeout, max_fds=0 if job.op in ("list", "help") else 1
            )
        except IsolhubError as e:
            worker.close()  # as locally: a failed call never leaves its worker for the next
            return _failure(e, worker)
        try:
            arena = _read_arena(fds)
        except (IsolhubError, OSError) as e:
            worker.kill()
            error = e if isinstance(e, IsolhubError) else ProtocolError(f"unreadable arena: {e}")
            return _failure(error, worker)
        finally:
            for fd in fds:
                os.close(fd)
        return Outcome(ok=True, value=(reply, arena), reusable=True)

    def node(self) -> dict[str, Any]:
        """Where this actor runs: pid, hostname, the snapshot's path on this node."""
        import socket

        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "snapshot": str(self._snapshot.path) if self._snapshot else None,
            "worker_pid": self._worker.pid if self._worker and not self._worker.closed else None,
        }

    def close(self) -> None:
        """Stop the worker and this actor's zygote."""
        if self._worker is not None:
            self._worker.close()
        shutdown_zygote()


def _message(job: Job) -> Request:
    """The worker request for `job`: the messages `isolhub._engine.call/list_entrypoints/entrypoint_doc` send."""
    if job.op == "list":
        return ListRequest()
    if job.op == "help":
        return HelpRequest(entry=job.entry or "")
    then = None if job.then is None else Shipped(job.then)
    return call_message(job.entry or "", job.args, job.kwargs, job.result, job.seed, then)


def _failure(e: IsolhubError, worker: Worker | None) -> Outcome:
    tail = getattr(e, "output_tail", None) or (worker.output_tail() if worker else "")
    code = getattr(e, "returncode", None)
    if worker is not None and worker.closed and worker.returncode is not None:
        code = worker.returncode
    return Outcome(
        ok=False,
        error=e,
        returncode=code,
        stderr_tail=tail,
        reusable=True,  # the actor lives on and starts a fresh worker when asked
        infrastructure=is_infrastructure_failure(e),
    )


def _read_arena(fds: list[int]) -> bytes | None:
    if not fds:
        return None
    if len(fds) > 1:
        raise ProtocolError(f"a reply came with {len(fds)} fds; expected at most one")
    size = os.fstat(fds[0]).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fds[0], min(size - offset, 1 << 30), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _decode(
    job: Job, reply: dict[str, Any], arena: bytes | None, limits: ReplyLimits | None = None
) -> Any:
    """Decode a relayed reply here in the driver, as `isolhub._engine` does for a local worker.

    Raises:
        ProtocolError: the reply is malformed, or not of the kind `job` asks for.
    """
    if job.op == "list":
        return list(EntrypointsReply.decode(reply).names)
    if job.op == "help":
        return DocReply.decode(reply).doc
    fds = [] if arena is None else [sealed_bytes(arena)]  # as a worker would have passed it
    expect = RESULT_REPLIES.get(job.result)
    if expect not in (PickleReply, ValueReply, StateDictReply):
        close_fds(fds)
        raise ProtocolError(f"unknown result kind {job.result!r}")
    decoded = decode_reply(reply, fds, (expect,))
    assert isinstance(decoded, PickleReply | ValueReply | StateDictReply)
    return decode_result(decoded, limits=limits)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _ActorSlot:
    def __init__(self, actor: Any, label: str) -> None:
        self.actor, self.label = actor, label


class RayBackend:
    """`Hub`'s executors as Ray actors: `start` one per repo@sha, `run` jobs on it, `kill` it.

    Example (made by `Hub(backend="ray")`; it starts or joins a Ray cluster):
        >>> backend = RayBackend(settings)  # doctest: +SKIP

    Raises:
        IsolhubError: Ray is not installed or `ray.init` failed.
    """

    def __init__(self, settings: PoolSettings) -> None:
        ray = self._ray = require_ray()
        self._settings = settings
        self._owns_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=settings.ray_address)
            except Exception as e:  # noqa: BLE001 - Ray raises many kinds here
                raise IsolhubError(f"could not start or reach Ray: {e}") from e
            self._owns_ray = True
        options = {"max_restarts": 0, "max_task_retries": 0}
        options.update(settings.ray_actor_options or {})
        self._actor_class = ray.remote(_RepoActor).options(**options)
        self._lock = threading.Lock()
        self._archives: dict[str, tuple[str, Any]] = {}

    def default_workers(self) -> int:
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def _archive(self, snap: Snapshot) -> tuple[str, Any]:
        """The archive of `snap` in the object store (put once per snapshot per Hub)."""
        with self._lock:
            hit = self._archives.get(str(snap.path))
        if hit is not None:
            return hit
        data = pack_snapshot(snap.path, snap.sha)
        key = snap.sha or hashlib.sha256(data).hexdigest()[:40]
        entry = (key, self._ray.put(data))
        with self._lock:
            return self._archives.setdefault(str(snap.path), entry)

    def environment(self, snapshot: Snapshot) -> None:
        """No per-repo environments on Ray yet: `Hub` refuses `env=` with this backend."""
        return None

    def start(self, snapshot: Snapshot) -> _ActorSlot:
        key, ref = self._archive(snapshot)
        s = self._settings
        actor = self._actor_class.remote(
            snapshot.spec, snapshot.sha, key, [ref], s.start_method, s.memory_bytes, s.policy
        )
        return _ActorSlot(actor, snapshot.label)

    def run(self, executor: _ActorSlot, job: Job, timeout: float | None) -> Outcome:
        ray = self._ray
        from ray.exceptions import RayError, RayTaskError

        ref = executor.actor.run.remote(job, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout + _ACTOR_GRACE
        while True:
            wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            ready, _ = ray.wait([ref], timeout=wait)
            if ready:
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.kill(executor)
                return Outcome(
                    ok=False,
                    error=WorkerTimeoutError(
                        f"the Ray actor for {executor.label} did not answer within "
                        f"{timeout:g} s (+{_ACTOR_GRACE:g} s to start) and was killed",
                        spec=executor.label,
                    ),
                )
        try:
            outcome: Outcome = ray.get(ref)
            if outcome.ok:
                reply, arena = outcome.value
                outcome.value = _decode(job, reply, arena, reply_limits(self._settings.policy))
        except IsolhubError as e:  # a malformed reply: the actor's worker misbehaved
            self.kill(executor)
            return Outcome(ok=False, error=e)
        except RayTaskError as e:  # the actor's own code raised: a bug, not the machine
            self.kill(executor)
            error = WorkerError(
                f"the Ray actor for {executor.label} failed: {_first_line(e)}", spec=executor.label
            )
            return Outcome(ok=False, error=error)
        except RayError as e:  # the actor, its node or the object store went away
            error = WorkerCrashedError(
                f"the Ray actor for {executor.label} died: {type(e).__name__}: {_first_line(e)}",
                spec=executor.label,
                returncode=None,
                output_tail="",
                infrastructure=True,
            )
            return Outcome(ok=False, error=error, infrastructure=True)
        return outcome

    def kill(self, executor: _ActorSlot) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(executor.actor, no_restart=True)

    def close(self, executor: _ActorSlot) -> None:
        # Queued, not awaited: the actor stops its worker and zygote, then exits.
        with contextlib.suppress(Exception):
            executor.actor.close.remote()
            executor.actor.__ray_terminate__.remote()

    def shutdown(self) -> None:
        with self._lock:
            self._archives.clear()
        if self._owns_ray:
            self._ray.shutdown()
