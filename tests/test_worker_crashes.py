"""Every way a worker can fail becomes a typed error, fast, and the next load still works."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest

import isolhub as hub

from hubrepos import make_repo, spec_of
from procs import child_pids, open_fds, scratch_dirs, zombie_pids

CRASHES = {
    "raises": ("raise KeyError('boom in hubconf')", hub.RemoteError, "KeyError"),
    "sys_exit": ("raise SystemExit(3)", hub.WorkerCrashedError, "exit code 3"),
    "os_exit": ("import os; os._exit(7)", hub.WorkerCrashedError, "exit code 7"),
    "segfault": ("import ctypes; ctypes.string_at(0)", hub.WorkerCrashedError, "SIGSEGV"),
    "sigkill": (
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        hub.WorkerCrashedError,
        "SIGKILL",
    ),
    "abort": ("import os; os.abort()", hub.WorkerCrashedError, "SIGABRT"),
}


@pytest.fixture
def crash_repo(tmp_path: Path) -> Path:
    lines = ["import sys", "def ok():", "    return 'fine'", ""]
    for name, (body, _, _) in CRASHES.items():
        lines += [f"def {name}():", "    print('about to fail', file=sys.stderr, flush=True)"]
        lines += [f"    {body}", ""]
    lines += ["def hang():", "    import time", "    time.sleep(600)", ""]
    return make_repo(tmp_path / "crashy", {"hubconf.py": "\n".join(lines)})


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CRASHES))
def test_a_failing_entrypoint_is_a_typed_error_and_the_next_load_works(
    crash_repo: Path, kind: str
) -> None:
    _, error, pattern = CRASHES[kind]
    with pytest.raises(error, match=pattern) as info:
        hub.load(spec_of(crash_repo), kind, timeout=60)  # a death never noticed fails here
    assert isinstance(info.value, hub.WorkerError)
    if error is hub.WorkerCrashedError:
        assert "about to fail" in info.value.output_tail
        assert str(crash_repo) in str(info.value)
    assert hub.load(spec_of(crash_repo), "ok") == "fine"


def test_a_remote_error_carries_type_message_and_traceback(crash_repo: Path) -> None:
    with pytest.raises(hub.RemoteError) as info:
        hub.load(spec_of(crash_repo), "raises")
    e = info.value
    assert e.remote_type == "builtins.KeyError"
    assert "boom in hubconf" in e.remote_message
    assert "hubconf.py" in e.remote_traceback and "in raises" in e.remote_traceback


@pytest.mark.slow
def test_a_hang_past_the_timeout_is_killed_and_reported(crash_repo: Path) -> None:
    with pytest.raises(hub.WorkerTimeoutError, match="did not answer within 1 s"):
        hub.load(spec_of(crash_repo), "hang", timeout=1.0)
    assert hub.load(spec_of(crash_repo), "ok") == "fine"


@pytest.mark.slow
def test_a_crash_leaves_no_zombie_no_fd_and_no_scratch_dir(
    crash_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # scratch dirs of this test only
    hub.load(spec_of(crash_repo), "ok")  # warm the zygote
    fds_before = open_fds()
    children_before = child_pids()
    scratch_before = scratch_dirs()
    for kind in ("segfault", "os_exit", "raises"):
        with pytest.raises(hub.WorkerError):
            hub.load(spec_of(crash_repo), kind)
    with pytest.raises(hub.WorkerTimeoutError):
        hub.load(spec_of(crash_repo), "hang", timeout=0.5)
    assert open_fds() == fds_before
    assert child_pids() == children_before
    assert scratch_dirs() == scratch_before == set()
    assert zombie_pids() == []


def _children_of(pid: int) -> set[int]:
    out = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(p))
    return out


def test_the_next_worker_is_forked_ahead_and_a_dead_spare_is_replaced(crash_repo: Path) -> None:
    import signal

    from isolhub._process import worker as _process

    assert hub.load(spec_of(crash_repo), "ok") == "fine"
    _process.settle()  # the load's worker reaped, so the zygote's one child is the spare
    zygote = _process._Zygote.get().proc.pid
    deadline = time.monotonic() + 10
    while not (spares := _children_of(zygote)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(spares) == 1  # forked ahead, waiting for the next worker's fds
    (spare,) = spares
    os.kill(spare, signal.SIGKILL)  # as the OOM killer might, between two loads
    while spare in _children_of(zygote) and time.monotonic() < deadline:
        time.sleep(0.01)  # dead (a zombie) before the next load asks for it
    assert hub.load(spec_of(crash_repo), "ok") == "fine"
    assert spare not in _children_of(zygote) and zombie_pids() == []


def test_all_a_loads_worker_printed_is_forwarded_before_load_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker is reaped after `load` returns; what it printed must not arrive after that,
    # even when this process's stderr is slow to take it.
    class SlowStderr(io.StringIO):
        def write(self, text: str) -> int:
            time.sleep(0.05)
            return super().write(text)

    hubconf = (
        "def chatty():\n"
        "    for i in range(3000):\n"
        "        print('line', i, 'x' * 80)\n"  # ~270 KiB: more than a pipe holds
        "    print('the last line', flush=True)\n"
        "    return 'done'\n"
    )
    repo = make_repo(tmp_path / "chatty", {"hubconf.py": hubconf})
    for _ in range(2):
        monkeypatch.setattr(sys, "stderr", SlowStderr())
        assert hub.load(spec_of(repo), "chatty") == "done"
        err = sys.stderr.getvalue()
        assert err.count("the last line") == 1 and "line 2999 " in err
