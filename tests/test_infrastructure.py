"""One of each piece of infrastructure: the libc handle, and what every caller of it shares."""

from __future__ import annotations

import ast
import fcntl
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch

import isolhub as hub
from isolhub import _libc, _memfd
from isolhub._cache import store as _cache
from isolhub._compare.worker import summarise
from isolhub._errors import describe_exit, signal_name
from isolhub._process import rng as _rng
from isolhub._process.messages import WorkerInit
from isolhub._sandbox.policy import Sandbox
from isolhub._source import git as _git
from isolhub._transport import arena as _arena

from hubrepos import make_repo, spec_of

PACKAGE = Path(hub.__file__).parent


def _calls(attr: str) -> dict[str, int]:
    """How many calls of `<something>.attr(...)` each isolhub module makes (code, not strings)."""
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        n = sum(
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == attr
            for node in ast.walk(tree)
        )
        if n:
            found[path.relative_to(PACKAGE).as_posix()] = n
    return found


@pytest.mark.slow
def test_the_c_library_is_loaded_once_and_prctl_is_called_only_through_libc() -> None:
    assert _calls("CDLL") == {"_libc.py": 1}
    # prctl is variadic: plain Python ints would go through as C int, not unsigned long.
    assert set(_calls("prctl")) == {"_libc.py"}


def test_set_pdeathsig_reads_back_as_sigkill_in_a_child() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            _libc.set_pdeathsig(signal.SIGKILL)
            os._exit(0 if _libc.get_pdeathsig() == signal.SIGKILL else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


_PDEATHSIG_HUBCONF = """
import ctypes

def pdeathsig():
    out = ctypes.c_int(-1)
    zero = ctypes.c_ulong(0)
    ctypes.CDLL(None).prctl(ctypes.c_int(2), ctypes.byref(out), zero, zero, zero)
    return out.value
"""


def test_an_unsandboxed_worker_is_set_to_get_sigkill_when_its_zygote_dies(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"hubconf.py": _PDEATHSIG_HUBCONF})
    assert hub.load(spec_of(repo), "pdeathsig", trust_repo=True) == signal.SIGKILL


_CONFINED_SET_UP = """
import pickle, sys
from isolhub._process import zygote
zygote._preload()
before = {n for n in sys.modules if n.startswith("isolhub")}
from isolhub._process.messages import WorkerInit
init = WorkerInit.decode(pickle.loads(sys.stdin.buffer.read()))  # as `runtime.serve` reads it
from isolhub._sandbox import policy  # what its set-up imports (`runtime._WorkerState`)
from isolhub._weights import download
print(sorted({n for n in sys.modules if n.startswith("isolhub")} - before), init.policy.network)
"""


@pytest.mark.slow
def test_a_confined_workers_init_and_set_up_import_nothing_the_zygote_left_out() -> None:
    # A worker imports what its zygote did not, on every sandboxed load's path (5-13 ms here
    # for the policy, Landlock and seccomp code, which the folder move dropped from the preload).
    init = WorkerInit(snapshot="/s", module_name="isolhub_hubconf_0", policy=Sandbox())
    out = subprocess.run(
        [sys.executable, "-c", _CONFINED_SET_UP],
        input=cloudpickle.dumps(init.to_wire()),
        capture_output=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)),
    ).stdout
    assert out.decode().split() == ["[]", "False"]


@pytest.mark.slow
def test_arenas_are_made_and_sealed_in_one_place() -> None:
    assert _calls("memfd_create") == {"_memfd.py": 1}
    assert _calls("fcntl") == {"_memfd.py": 2}  # F_ADD_SEALS, F_GET_SEALS


def test_a_sealed_memfd_refuses_writes_growth_and_shrinking() -> None:
    fd = _memfd.sealed_bytes(b"x" * 4096)
    try:
        assert _memfd.is_sealed(fd)
        assert os.pread(fd, 4096, 0) == b"x" * 4096
        for attempt in (
            lambda: os.pwrite(fd, b"y", 0),
            lambda: os.ftruncate(fd, 8192),
            lambda: os.ftruncate(fd, 0),
        ):
            with pytest.raises(PermissionError):
                attempt()
    finally:
        os.close(fd)


def test_a_worker_arena_and_a_relayed_one_carry_the_same_seals() -> None:
    writer = _arena.ArenaWriter()
    meta = writer.tensor_meta(torch.arange(100_000, dtype=torch.float32))
    fd, layout = writer.seal()
    assert fd is not None
    try:
        ours = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        data = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    relayed = _memfd.sealed_bytes(data)  # what the Ray driver builds from a relayed reply
    assert fcntl.fcntl(relayed, fcntl.F_GET_SEALS) == ours
    t = _arena.ArenaReader(relayed, layout).tensor(meta)
    assert torch.equal(t, torch.arange(100_000, dtype=torch.float32))


def test_a_git_killed_by_a_signal_is_named_as_a_worker_would_be() -> None:
    # A real git whose alias shell sends git itself SIGSEGV; it used to read "signal 11".
    with pytest.raises(hub.FetchError) as info:
        _git._git("-c", "alias.boom=!kill -SEGV $PPID", "boom")
    assert f"({describe_exit(-signal.SIGSEGV)})" in str(info.value)
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV (-11)"
    assert signal_name(-signal.SIGKILL) == "SIGKILL" and signal_name(0) is None


@pytest.mark.slow
def test_signals_are_named_in_one_place() -> None:
    assert _calls("Signals") == {"_errors.py": 1}


class _NumpyNoise(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        return x + float(np.random.rand()) + float(torch.rand(1)) + random.random()


def test_a_compare_seed_seeds_numpy_as_a_load_seed_does() -> None:
    # compare's worker reseeded torch and random only; a forward drawing from numpy differed.
    pytest.importorskip("numpy")
    x = (torch.zeros(1),)
    outputs = [summarise(_NumpyNoise(), x, seed=7)["outputs"]["output"] for _ in range(2)]
    _rng.seed_all(7)
    expected = _NumpyNoise()(x[0])
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], expected)


@pytest.mark.slow
def test_seeding_is_done_in_one_place() -> None:
    assert set(_calls("manual_seed")) <= {
        "_process/rng.py",
        "_cli/diff.py",
    }  # diff: its input generator
    assert _calls("seed") == {
        "_process/rng.py": 3
    }  # random.seed, numpy seeded, numpy reseeded fresh


_HOLD_LOCK = """
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_cache_lock_held_elsewhere_is_waited_for_boundedly_and_named_as_a_download_lock_is(
    hub_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The snapshot lock used to give up in silence where the download lock warned.
    path = hub_home / ".locks" / "some-snapshot.lock"
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        ran = []
        with caplog.at_level(logging.WARNING), _cache.lock("some-snapshot", timeout=0.2):
            ran.append(True)
        assert ran == [True]
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert str(path) in warning and f"rm {path}" in warning
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_an_unwritable_lock_folder_runs_the_body_unlocked(hub_home: Path) -> None:
    hub_home.mkdir(parents=True, exist_ok=True)
    (hub_home / ".locks").write_text("a file where the lock folder should be\n")
    ran = []
    with _cache.lock("x", timeout=1):
        ran.append(True)
    assert ran == [True]


@pytest.mark.slow
def test_file_locks_are_taken_in_one_place() -> None:
    assert _calls("FileLock") == {"_locks.py": 1}


@pytest.mark.slow
def test_temp_names_tag_this_host_in_one_way() -> None:
    # Downloads and the cache's temp folders both judge "is its process alive" by this tag.
    assert _calls("gethostname") == {
        "_cache/store.py": 1,
        "_pool/ray_backend.py": 1,
    }  # Ray: the node it names
