"""Caps that hold for a root worker too: memory, tasks, scratch, and a dropped handle's worker.

Each attack runs as hubconf code through the real worker path. Confined, it stops at the cap;
its twin runs the same attack with only that cap missing (pretended, and allowed to be) and
shows it gets through: RLIMIT_AS does not count memfds, RLIMIT_NPROC does not bind root, a
per-file size limit does not bound a directory. Memory stays modest: caps of 256 MiB against
attacks of 512 MiB.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
from pathlib import Path

import pytest

import isolhub as hub
from isolhub._cli.main import main as cli_main
from isolhub._engine import call, policy_for, start_worker
from isolhub._sandbox import caps as _caps
from isolhub._sandbox.policy import PRETEND_MISSING_ENV, probe

from hubrepos import make_repo, spec_of
from procs import scratch_dirs, zombie_pids

pytestmark = pytest.mark.sandbox

_REPORT = probe()
_MISSING = [n for n in _REPORT.missing if n in hub.Sandbox().requested()]
if _MISSING:
    pytestmark = [
        pytest.mark.sandbox,
        pytest.mark.skip(reason=f"this kernel lacks sandbox protections: {', '.join(_MISSING)}"),
    ]

MiB = 1024**2

HUBCONF = r"""
import errno, os, resource, threading

def hoard_memfds(mib, lower_as):
    if lower_as:  # an address-space cap 256 MiB above what is mapped now
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 256 * 2**20, vm + 256 * 2**20))
    fds, chunk = [], b"x" * 2**20
    for i in range(mib // 64):
        fd = os.memfd_create(f"hoard{i}")
        for _ in range(64):
            os.write(fd, chunk)
        fds.append(fd)
    held = sum(os.fstat(fd).st_size for fd in fds) // 2**20
    return {"held_mib": held, "as_limit": resource.getrlimit(resource.RLIMIT_AS)[0]}

def thread_bomb(n):
    stop, started = threading.Event(), 0
    try:
        for _ in range(n):
            threading.Thread(target=stop.wait, daemon=True).start()
            started += 1
        error = None
    except RuntimeError as e:
        error = str(e)
    stop.set()
    return {"started": started, "error": error}

def fill_scratch(files, mib):
    written, error = 0, None
    try:
        for i in range(files):
            with open(f"fill{i}.bin", "wb") as f:
                for _ in range(mib):
                    f.write(b"\0" * 2**20)
            written += 1
    except OSError as e:
        error = errno.errorcode.get(e.errno)
    return {"written": written, "error": error}

def net():
    import torch
    return torch.nn.Linear(4, 2)
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("caps") / "repo", {"hubconf.py": HUBCONF})


def run_case(repo: Path, entry: str, *args: object, **policy: object) -> object:
    sandbox = policy_for(hub.Sandbox(**policy) if policy else "strict", "value")
    with start_worker(hub.fetch(spec_of(repo)), sandbox=sandbox) as w:
        return call(w, entry, args, result="value", timeout=120)


def pretend_missing(monkeypatch: pytest.MonkeyPatch, cap: str) -> dict[str, object]:
    """Simulate a machine without `cap`; the policy allows it, so the worker runs without it."""
    monkeypatch.setenv(PRETEND_MISSING_ENV, cap)
    return {"allow_missing": {cap, *_REPORT.missing}}


# --- memory: memfds are resident memory, whatever RLIMIT_AS says ---------------------------


def test_hoarding_memfds_stops_at_the_memory_cap(repo: Path) -> None:
    with pytest.raises(hub.WorkerCrashedError, match=r"memory cap \(256 MiB\).*OOM-killed"):
        run_case(repo, "hoard_memfds", 512, False, memory_bytes=256 * MiB)


@pytest.mark.slow
def test_without_the_memory_cap_memfds_outgrow_the_address_space_cap(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allow = pretend_missing(monkeypatch, "caps.memory")
    got = run_case(repo, "hoard_memfds", 512, True, memory_bytes=256 * MiB, **allow)
    assert got["held_mib"] == 512 and got["as_limit"] > 0  # 512 MiB held under a tighter AS


# --- tasks: threads count, for root too -----------------------------------------------------


def test_a_thread_bomb_stops_at_max_tasks(repo: Path) -> None:
    got = run_case(repo, "thread_bomb", 200, max_tasks=64)
    assert got["started"] < 64 and "can't start new thread" in got["error"]


def test_without_the_task_cap_a_root_thread_bomb_passes_max_tasks(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("RLIMIT_NPROC binds a non-root worker: the finding is about uid 0")
    allow = pretend_missing(monkeypatch, "caps.tasks")
    got = run_case(repo, "thread_bomb", 200, max_tasks=64, **allow)
    assert got == {"started": 200, "error": None}


# --- scratch: a total, not only a per-file size ---------------------------------------------


def test_many_scratch_files_stop_at_the_scratch_cap(repo: Path) -> None:
    got = run_case(repo, "fill_scratch", 16, 8, scratch_bytes=64 * MiB, file_size_bytes=8 * MiB)
    assert got["error"] == "ENOSPC" and got["written"] <= 8


def test_without_the_scratch_cap_many_files_pass_the_file_size_cap(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    allow = pretend_missing(monkeypatch, "caps.scratch")
    policy = {"scratch_bytes": 64 * MiB, "file_size_bytes": 8 * MiB, **allow}
    assert run_case(repo, "fill_scratch", 16, 8, **policy) == {"written": 16, "error": None}


# --- fail closed, and saying so ---------------------------------------------------------------


@pytest.mark.parametrize("cap", ["caps.memory", "caps.tasks", "caps.scratch"])
def test_a_cap_that_cannot_be_applied_fails_closed_naming_it(
    repo: Path, monkeypatch: pytest.MonkeyPatch, cap: str
) -> None:
    monkeypatch.setenv(PRETEND_MISSING_ENV, cap)
    with pytest.raises(hub.SandboxError, match=re.escape(cap)) as info:
        run_case(repo, "thread_bomb", 1)
    assert "allow_missing" in str(info.value)


def test_a_zygote_started_while_a_cap_was_pretended_missing_does_not_keep_pretending(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from isolhub._process.worker import shutdown_zygote

    shutdown_zygote()
    monkeypatch.setenv(PRETEND_MISSING_ENV, "caps.memory")
    with pytest.raises(hub.SandboxError, match=re.escape("caps.memory")):
        run_case(repo, "thread_bomb", 1)  # this zygote starts with the knob in its environment
    monkeypatch.delenv(PRETEND_MISSING_ENV)
    assert run_case(repo, "thread_bomb", 1) == {"started": 1, "error": None}  # as the machine is


def test_a_cap_left_unset_is_not_requested() -> None:
    policy = hub.Sandbox(memory_bytes=None, max_tasks=None, scratch_bytes=None)
    assert not {"caps.memory", "caps.tasks", "caps.scratch"} & set(policy.requested())
    assert {"caps.memory", "caps.tasks", "caps.scratch"} <= set(hub.Sandbox().requested())
    with pytest.raises(ValueError, match="scratch_bytes must be > 0"):
        hub.Sandbox(scratch_bytes=0)  # tmpfs would read size=0 as "no limit"


def test_doctor_and_sandbox_report_say_which_caps_are_enforced(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = hub.sandbox_report()
    for cap in ("caps.memory", "caps.tasks", "caps.scratch"):
        assert report[cap].available, report[cap].detail
    assert "cgroup v" in report["caps.memory"].detail
    assert cli_main(["doctor", "--json"]) == 0
    protections = json.loads(capsys.readouterr().out)["protections"]
    assert protections["caps.memory"] == report.to_dict()["protections"]["caps.memory"]
    assert protections["caps.scratch"]["available"] is True


def test_doctor_fails_when_a_cap_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PRETEND_MISSING_ENV, "caps.memory")
    assert cli_main(["doctor"]) == 1
    assert "caps.memory" in capsys.readouterr().out


# --- a handle dropped without close() ---------------------------------------------------------


def _wait_until(check: object, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        gc.collect()
        time.sleep(0.05)
    return False


def _cgroup_dirs(pid: int) -> list[str]:
    places = [_caps.locate(c) for c in _caps.CONTROLLERS]
    return [
        os.path.join(p.own, _caps.name_for(pid))
        for p in places
        if not isinstance(p, str) and os.path.isdir(os.path.join(p.own, _caps.name_for(pid)))
    ]


@pytest.mark.parametrize("sandbox", [None, "strict"])
def test_a_dropped_handle_kills_reaps_and_cleans_up_its_worker(
    repo: Path, sandbox: str | None
) -> None:
    m = hub.load(spec_of(repo), "net", mode="remote", sandbox=sandbox)
    pid = object.__getattribute__(m, "_session").worker.pid  # repr(m) is the remote object's
    scratch = os.readlink(f"/proc/{pid}/cwd")  # the worker runs in its scratch dir
    # The twin: while the handle lives, so do the worker, its scratch and (confined) its cgroups.
    assert os.path.basename(scratch) in scratch_dirs()
    assert len(_cgroup_dirs(pid)) == 2 or not sandbox  # unconfined: entered ahead, no limits
    del m
    gc.collect()
    assert _wait_until(lambda: not os.path.exists(f"/proc/{pid}")), "worker still there"
    assert pid not in zombie_pids()
    assert _wait_until(lambda: not os.path.exists(scratch)), "scratch left behind"
    assert _wait_until(lambda: not _cgroup_dirs(pid)), "cgroups left behind"


@pytest.mark.parametrize("sandbox", [None, "strict"])
def test_a_closed_worker_leaves_no_cgroups_behind(repo: Path, sandbox: str | None) -> None:
    policy = policy_for(sandbox, "value")
    w = start_worker(hub.fetch(spec_of(repo)), sandbox=policy)
    pid = w.pid
    assert len(_cgroup_dirs(pid)) == 2 or not sandbox
    w.close()  # its cgroups are removed off the caller's path (the kernel lets go slowly)
    assert _wait_until(lambda: not _cgroup_dirs(pid)), "cgroups left behind"
