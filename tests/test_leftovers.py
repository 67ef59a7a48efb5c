"""Nothing outlives a killed process for long: the zygote dies with its parent, a dead zygote is
replaced, and temp folders left by a killed process are swept by the next run and `cache prune`.

Faults are real: kill -9 of real parents, zygotes and git processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

import isolhub as hub
from isolhub._cache.store import host_tag
from isolhub._process import worker as _process

from hubrepos import make_repo, net_files, spec_of

REPO_ROOT = Path(__file__).resolve().parent.parent


def _wait_for(predicate, what: str, limit: float = 120.0) -> None:  # noqa: ANN001
    """Poll until `predicate()`; the limit only stops a broken test from hanging."""
    end = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _zygote_of(parent: int) -> int | None:
    for pid in _children_of(parent):
        try:
            if b"isolhub._process.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _parent(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """A real parent process running `code` with this checkout first on its path."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill(parent: subprocess.Popen[str]) -> None:
    """kill -9 the parent, reap it and close its pipes."""
    parent.kill()
    parent.communicate()


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A TMPDIR of this test's own, here and in the processes it starts."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    return tmp


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO_ROOT), *(p for p in [extra.pop("PYTHONPATH", "")] if p)])
    return dict(os.environ, PYTHONPATH=path, **extra)


def test_the_zygote_dies_with_its_parent_even_while_it_is_still_importing_torch(
    tmp_path: Path,
) -> None:
    # A torch whose import never ends: without the parent-death signal set before importing
    # torch, this zygote would outlive its parent by the length of the import, here forever.
    fake = tmp_path / "faketorch"
    fake.mkdir()
    mark = tmp_path / "importing"
    (fake / "torch.py").write_text(
        f"import time\nopen({str(mark)!r}, 'w').close()\ntime.sleep(3600)\n"
    )
    parent = _parent(
        """
        import threading, time
        from isolhub._process.worker import _Zygote
        threading.Thread(target=_Zygote.get, daemon=True).start()
        time.sleep(3600)
        """,
        _env(PYTHONPATH=str(fake)),
    )
    try:
        _wait_for(mark.exists, "the zygote to start importing torch")
        zygote = _zygote_of(parent.pid)
        assert zygote is not None
    finally:
        _kill(parent)
    _wait_for(lambda: not _alive(zygote), "the zygote to die with its parent")


@pytest.mark.slow
def test_a_parent_killed_with_a_live_worker_takes_zygote_and_worker_and_its_scratch_is_swept(
    tmp_path: Path, private_tmp: Path, hub_home: Path
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    spec = spec_of(repo, "v1")
    parent = _parent(
        f"""
        import os, sys, time
        import isolhub
        h = isolhub.Hub()
        model = h.load({spec!r}, "net")
        print(os.getpid(), flush=True)
        time.sleep(3600)
        """,
        _env(),
    )
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), parent.stderr.read()
        zygote = _zygote_of(parent.pid)
        assert zygote is not None
        workers = _children_of(zygote)
        assert workers
        scratch = [p for p in os.listdir(private_tmp) if p.startswith("isolhub-worker-")]
        assert scratch and all(f"-{host_tag()}-{parent.pid}-" in p for p in scratch)
    finally:
        _kill(parent)
    _wait_for(lambda: not _alive(zygote), "the zygote to die with its parent")
    _wait_for(lambda: not any(_alive(w) for w in workers), "the workers to die with the zygote")
    assert all((private_tmp / p).is_dir() for p in scratch)  # nobody was left to remove them

    assert type(hub.load(spec, "net")).version == "v1"  # the next run sweeps them
    assert [p for p in os.listdir(private_tmp) if p in scratch] == []


@pytest.mark.slow
def test_a_git_fetch_killed_with_its_parent_leaves_a_folder_that_cache_prune_removes(
    tmp_path: Path, private_tmp: Path, hub_home: Path
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mark = tmp_path / "fetching"
    real_git = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True)
    (bin_dir / "git").write_text(
        "#!/bin/sh\n"
        f'case "$*" in *" fetch "*) echo $$ > {mark}; exec sleep 3600;; esac\n'
        f'exec {real_git.stdout.strip()} "$@"\n'
    )
    (bin_dir / "git").chmod(0o755)
    parent = _parent(
        f"import isolhub; isolhub.fetch({spec_of(repo, 'v1')!r})",
        _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"),
    )
    try:
        _wait_for(lambda: mark.exists() and mark.read_text().strip(), "git fetch to start")
    finally:
        _kill(parent)
        os.kill(int(mark.read_text()), signal.SIGKILL)
    left = [p for p in os.listdir(private_tmp) if p.startswith("isolhub-git-")]
    assert len(left) == 1 and f"-{host_tag()}-{parent.pid}-" in left[0]

    out = subprocess.run(
        [sys.executable, "-m", "isolhub", "cache", "prune", "--json"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    removed = json.loads(out.stdout)["removed"]
    assert [r["id"] for r in removed if r["kind"] == "temp folder"] == [str(private_tmp / left[0])]
    assert os.listdir(private_tmp) == []


def test_a_live_processes_temp_folder_is_never_swept(private_tmp: Path) -> None:
    from isolhub._cache.store import sweep_temp_dirs, temp_dir

    mine = temp_dir("worker")
    foreign = private_tmp / f"isolhub-worker-{host_tag()}-1-abcdefgh"  # pid 1 lives
    foreign.mkdir()
    other_host = private_tmp / "isolhub-worker-00000000-999999999-abcdefgh"
    other_host.mkdir()
    assert sweep_temp_dirs() == []
    assert Path(mine).is_dir() and foreign.is_dir() and other_host.is_dir()


@pytest.fixture
def net_spec(tmp_path: Path) -> str:
    files = net_files("v1", width=3)
    files["hubconf.py"] = textwrap.dedent(files["hubconf.py"]) + textwrap.dedent(
        """

        def slow(mark):
            import time
            open(mark, "w").close()
            time.sleep(600)
        """
    )
    return spec_of(make_repo(tmp_path / "r", files, tag="v1"), "v1")


def _zygote_pid() -> int:
    z = _process._Zygote._instance
    assert z is not None and z.proc.poll() is None
    return z.proc.pid


@pytest.mark.slow
def test_a_zygote_killed_while_idle_is_replaced_by_the_next_call_20_times(net_spec: str) -> None:
    assert type(hub.load(net_spec, "net")).version == "v1"
    seen = set()
    for _ in range(20):
        pid = _zygote_pid()
        seen.add(pid)
        os.kill(pid, signal.SIGKILL)
        assert type(hub.load(net_spec, "net")).version == "v1"
    assert len(seen) == 20


@pytest.mark.slow
def test_a_worker_whose_zygote_dies_mid_call_says_the_zygote_died(
    net_spec: str, tmp_path: Path
) -> None:
    hub.load(net_spec, "net")
    zygote = _zygote_pid()
    mark = tmp_path / "in-call"

    def kill_when_called() -> None:
        _wait_for(mark.exists, "the call to start")
        os.kill(zygote, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_called)
    killer.start()
    try:
        with pytest.raises(hub.WorkerCrashedError) as info:
            hub.load(net_spec, "slow", mark=str(mark))
    finally:
        killer.join()
    message = str(info.value)
    assert f"the isolhub zygote (pid {zygote}) died (killed by SIGKILL" in message
    assert "unknown exit status" not in message
    assert type(hub.load(net_spec, "net")).version == "v1"


@pytest.mark.slow
def test_a_zygote_started_from_a_thread_that_ends_outlives_that_thread(net_spec: str) -> None:
    _process.shutdown_zygote()
    t = threading.Thread(target=hub.load, args=(net_spec, "net"))
    t.start()
    t.join()
    pid = _zygote_pid()
    assert type(hub.load(net_spec, "net")).version == "v1"
    assert _zygote_pid() == pid


@pytest.mark.slow
def test_a_parent_that_loads_and_exits_leaves_its_stderr_clean_and_no_zygote(
    tmp_path: Path,
) -> None:
    # The first run learns `yaml` (an installed package the hubconf imports) and asks the zygote
    # to preload it; the second starts a zygote that preloads it. Either parent exits at once.
    hubconf = "import yaml\nimport torch.nn as nn\n\ndef net():\n    return nn.Linear(2, 2)\n"
    repo = make_repo(tmp_path / "yamlish", {"hubconf.py": hubconf})
    code = f"""
        import isolhub
        from isolhub._process.worker import _Zygote
        isolhub.load({str(repo)!r}, 'net', source='local')
        print(_Zygote.get().proc.pid)
    """
    for _ in range(2):
        parent = _parent(code, _env())
        out, err = parent.communicate(timeout=120)
        assert parent.returncode == 0 and err == "", err
        assert not Path(f"/proc/{int(out)}").exists()  # waited for, so reaped
