"""Untrusted hubconf code runs confined: the hostile suite, through the real worker path.

Every case is a hubconf entrypoint that tries one hostile thing and reports what it saw. Under
`sandbox="strict"` each attempt must fail in the specific way the sandbox causes, the parent must
stay healthy, and nothing outside the worker's scratch dir may change. The same entrypoints run
unsandboxed show what the sandbox buys (those that are safe to let through here).
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._engine import call, start_worker
from isolhub._sandbox.policy import probe

from github_server import FakeGitHub
from hubrepos import make_repo, spec_of
from weights_server import WeightsServer

pytestmark = pytest.mark.sandbox

_REPORT = probe()
_MISSING = [n for n in _REPORT.missing if n in hub.Sandbox().requested()]
if _MISSING:
    pytestmark = [
        pytest.mark.sandbox,
        pytest.mark.skip(reason=f"this kernel lacks sandbox protections: {', '.join(_MISSING)}"),
    ]

HUBCONF = r"""
import errno, os, socket, threading

def _outcome(fn):
    try:
        return {"ok": True, "value": fn()}
    except OSError as e:
        return {"ok": False, "error": type(e).__name__, "errno": errno.errorcode.get(e.errno, str(e.errno))}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__, "errno": None}

def _read(path, mode="r", n=-1):
    with open(path, mode) as f:
        return f.read(n)

def read_secret(path):
    return _outcome(lambda: _read(path))

def env_secrets():
    return {k: os.environ.get(k) for k in ("GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "HOME")}

def proc_environ():
    return _read("/proc/self/environ", "rb").count(b"sekrit")

def tcp_connect(port):
    return _outcome(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close())

def udp_send(port):
    def send():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", ("127.0.0.1", port))
    return _outcome(send)

def dns_lookup():
    return _outcome(lambda: socket.getaddrinfo("localhost", 80))

def abstract_unix(name):
    def connect():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect("\0" + name)
    return _outcome(connect)

def write_file(path):
    def write():
        with open(path, "w") as f:
            f.write("tampered")
    return _outcome(write)

def write_scratch():
    def write():
        with open("scratch-file.txt", "w") as f:
            f.write("fine")
    return _outcome(write)

def signal_process(pid):
    return _outcome(lambda: os.kill(pid, 0))

def read_parent_mem(pid):
    return _outcome(lambda: _read(f"/proc/{pid}/mem", "rb", 1))

def ptrace_parent(pid):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def attach():
        if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
    return _outcome(attach)

def exec_shell():
    import subprocess
    return _outcome(lambda: subprocess.run(["/bin/sh", "-c", "true"], check=True).returncode)

def fork_bomb():
    pids = []
    def bomb():
        for _ in range(50):
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            pids.append(pid)
        return len(pids)
    try:
        return _outcome(bomb)
    finally:
        for pid in pids:
            os.waitpid(pid, 0)

def memory_bomb():
    return _outcome(lambda: len(bytearray(6 * 1024**3)))

def cpu_spin():
    while True:
        pass

def huge_file():
    def write():
        with open("big.bin", "wb") as f:
            for _ in range(64):
                f.write(b"\0" * (1 << 20))
    return _outcome(write)

def thread_then_connect(port):
    box = {}
    def run():
        box["r"] = tcp_connect(port)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return box["r"]

def weights(url):
    import torch.hub
    sd = torch.hub.load_state_dict_from_url(url, progress=False)
    return {k: v for k, v in sd.items()}

def net():
    import torch
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(tmp_path_factory.mktemp("hostile") / "repo", {"hubconf.py": HUBCONF})


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    yield srv
    srv.close()


def run_case(
    repo: Path, entry: str, *args: object, sandbox: object = "strict", **policy: object
) -> object:
    sb = hub.Sandbox(**policy) if policy else sandbox
    snap = hub.fetch(spec_of(repo))
    from isolhub._engine import policy_for

    with start_worker(snap, sandbox=policy_for(sb, "value")) as w:
        return call(w, entry, args, result="value", timeout=60)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_a_secret_file_outside_the_allow_list_cannot_be_read(repo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "home" / ".netrc"
    secret.parent.mkdir()
    secret.write_text("password hunter2")
    assert run_case(repo, "read_secret", str(secret)) == {
        "ok": False,
        "error": "PermissionError",
        "errno": "EACCES",
    }
    assert run_case(repo, "read_secret", str(secret), sandbox=None)["ok"] is True


def test_tokens_and_credentials_are_not_in_the_environment(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "sekrit")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit")
    env = run_case(repo, "env_secrets")
    assert env["GITHUB_TOKEN"] is None and env["AWS_SECRET_ACCESS_KEY"] is None
    assert env["HOME"] and "isolhub-worker-" in env["HOME"]
    assert run_case(repo, "proc_environ") == 0
    assert run_case(repo, "env_secrets", sandbox=None)["GITHUB_TOKEN"] == "sekrit"


def test_no_network_tcp_udp_or_dns(repo: Path, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert run_case(repo, "tcp_connect", port)["errno"] == "EPERM"
    assert run_case(repo, "udp_send", port)["errno"] == "EPERM"
    assert run_case(repo, "dns_lookup")["ok"] is False
    assert run_case(repo, "tcp_connect", port, sandbox=None)["ok"] is True
    assert run_case(repo, "udp_send", port, sandbox=None)["ok"] is True


def test_a_thread_the_hubconf_starts_is_confined_too(repo: Path, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert run_case(repo, "thread_then_connect", port)["errno"] == "EPERM"


def test_abstract_unix_sockets_are_out_of_reach(repo: Path) -> None:
    name = f"isolhub-test-{os.getpid()}"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0" + name)
    srv.listen()
    try:
        assert run_case(repo, "abstract_unix", name)["errno"] == "EPERM"
        assert run_case(repo, "abstract_unix", name, sandbox=None)["ok"] is True
    finally:
        srv.close()


def test_nothing_outside_scratch_can_be_written(repo: Path, hub_home: Path, tmp_path: Path) -> None:
    other = make_repo(tmp_path / "other", {"hubconf.py": "def x():\n    return 1\n"})
    other_snap = hub.fetch(spec_of(other)).path
    hub.fetch(spec_of(repo))
    before = tree_digest(hub_home)
    targets = [hub_home / "planted.txt", other_snap / "hubconf.py", tmp_path / "outside.txt"]
    for target in targets:
        assert run_case(repo, "write_file", str(target))["errno"] == "EACCES", target
    assert run_case(repo, "write_scratch")["ok"] is True
    assert tree_digest(hub_home) == before
    assert not (tmp_path / "outside.txt").exists()
    assert hub.load(spec_of(other), "x") == 1


def test_the_parent_and_the_zygote_cannot_be_signalled_traced_or_read(repo: Path) -> None:
    me = os.getpid()
    for entry in ("signal_process", "ptrace_parent"):
        assert run_case(repo, entry, me)["errno"] == "EPERM", entry
    assert run_case(repo, "read_parent_mem", me)["errno"] == "EACCES"
    assert run_case(repo, "signal_process", me, sandbox=None)["ok"] is True


def test_exec_and_fork_are_refused(repo: Path) -> None:
    assert run_case(repo, "exec_shell")["error"] == "PermissionError"
    assert run_case(repo, "fork_bomb")["errno"] == "EPERM"
    assert run_case(repo, "exec_shell", sandbox=None)["ok"] is True


def test_a_memory_bomb_hits_the_address_space_cap(repo: Path) -> None:
    assert run_case(repo, "memory_bomb", address_space_bytes=2 * 1024**3)["error"] == "MemoryError"


def test_a_huge_file_hits_the_file_size_cap(repo: Path) -> None:
    assert run_case(repo, "huge_file", file_size_bytes=1 << 20)["errno"] == "EFBIG"


@pytest.mark.slow
def test_a_cpu_spin_is_killed_by_the_cpu_limit(repo: Path) -> None:
    with pytest.raises(hub.WorkerCrashedError, match="SIGXCPU|SIGKILL"):
        run_case(repo, "cpu_spin", cpu_seconds=1)


@pytest.mark.slow
def test_the_wall_clock_watchdog_kills_what_overruns(repo: Path) -> None:
    with pytest.raises(hub.WorkerTimeoutError):
        hub.load(spec_of(repo), "cpu_spin", mode="remote", sandbox=hub.Sandbox(wall_seconds=1.0))


def test_a_remote_model_works_confined_and_matches_the_unconfined_one(repo: Path) -> None:
    plain = hub.load(spec_of(repo), "net")
    with hub.load(spec_of(repo), "net", mode="remote", sandbox="strict") as m:
        x = torch.randn(3, 4)
        assert torch.equal(m(x), plain(x))
        sd = m.state_dict()
    assert torch.equal(sd["weight"], plain.weight)
    sd2 = hub.load_state_dict(spec_of(repo), "net", sandbox="strict")
    assert torch.equal(sd2["bias"], plain.bias)


def test_module_mode_with_a_sandbox_is_refused(repo: Path) -> None:
    with pytest.raises(hub.SandboxError, match="mode='module' cannot be sandboxed"):
        hub.load(spec_of(repo), "net", sandbox="strict")
    with pytest.raises(hub.SandboxError, match="sandbox="):
        hub.load(spec_of(repo), "net", mode="remote", sandbox="bogus")


def test_weights_come_through_the_parent_from_allowed_hosts_only(
    repo: Path, hub_home: Path
) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf)
    with WeightsServer() as server:
        url = server.add("/w.pt", body=buf.getvalue())
        allowed = run_case(repo, "weights", url, weight_hosts=("127.0.0.1",))
        assert torch.equal(allowed["w"], torch.arange(6.0))
        # In the broker's own store, never where trusted code loads checkpoints from.
        assert [p.name for p in (hub_home / "broker").glob("*/w.pt")] == ["w.pt"]
        assert not (hub_home / "checkpoints" / "w.pt").exists()
        with pytest.raises(hub.RemoteError, match="not in its weight_hosts"):
            run_case(repo, "weights", url.replace("w.pt", "x.pt"))


def test_an_untrusted_repo_loads_without_a_prompt_when_confined(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with FakeGitHub() as gh:
        gh.add_repo("someone", "unvetted", repo)
        monkeypatch.setenv("ISOLHUB_GITHUB_API", gh.url)
        with pytest.raises(hub.UntrustedRepoError):
            hub.load("someone/unvetted", "net", mode="remote")
        with hub.load("someone/unvetted", "net", mode="remote", sandbox="strict") as m:
            assert m(torch.ones(1, 4)).shape == (1, 2)


def test_a_missing_protection_fails_closed_unless_allowed(
    repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ISOLHUB_SANDBOX_PRETEND_MISSING", "landlock")
    with pytest.raises(hub.SandboxError, match="landlock"):
        run_case(repo, "write_scratch")
    secret = tmp_path / "secret"
    secret.write_text("x")
    result = run_case(repo, "read_secret", str(secret), allow_missing={"landlock"})
    assert result["ok"] is True  # the honest flip side of allowing it to be missing


def test_the_parent_stays_healthy_after_the_whole_suite(repo: Path) -> None:
    assert threading.active_count() < 50
    assert hub.load(spec_of(repo), "net")(torch.ones(1, 4)).shape == (1, 2)
