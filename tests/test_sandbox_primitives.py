"""The kernel sandbox (`isolhub._sandbox.policy`) against a hostile hubconf, one action per test.

Invariant: after `apply`, each hostile action fails with the specific error the hubconf would see,
the parent stays alive and unsignalled, and nothing outside scratch changes. The same actions run
without `apply` succeed (`test_without_the_sandbox_*`), which is what the sandbox buys.

How: a module-scoped "zygote" (`sys.executable`, `import torch` first, as the real zygote does)
forks one fresh, single-threaded child per case; the child applies the policy with a tmp scratch
and a tmp snapshot, runs the case's code and reports JSON. Cases that need a kernel feature skip
with the reason (visible with -ra) when `probe()` says it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from isolhub._sandbox import seccomp as _seccomp
from isolhub._sandbox.policy import PRETEND_MISSING_ENV, PROTECTIONS, Sandbox, probe, resolve_policy

pytestmark = pytest.mark.sandbox

CANARY = {
    "GITHUB_TOKEN": "ghp_canary",
    "AWS_SECRET_ACCESS_KEY": "aws-canary",
    "AWS_ACCESS_KEY_ID": "AKIACANARY",
    "HF_TOKEN": "hf_canary",
    "OPENAI_API_KEY": "sk-canary",
    "DB_PASSWORD": "hunter2",
    "HTTPS_PROXY": "http://proxy.invalid:3128",
    "no_proxy": "localhost",
}
SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- canary"

ZYGOTE = r"""
import json, os, select, signal, sys, time
import torch  # the real zygote has torch imported before it forks workers
from isolhub._sandbox import caps as _caps
from isolhub._sandbox.policy import Sandbox, apply

sigterms = 0
def on_sigterm(signum, frame):
    global sigterms
    sigterms += 1
signal.signal(signal.SIGTERM, on_sigterm)
leak_fd = os.open(sys.executable, os.O_RDONLY)  # an fd a worker must not keep

def attempt(fn):
    try:
        return {"ok": fn()}
    except Exception as e:
        return {"error": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}

def child(req, w):
    os.dup2(2, 1)  # prints must not reach the protocol pipe
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    os.environ.update(req["env"])
    ns = {"os": os, "sys": sys, "signal": signal, "time": time, "torch": torch, "attempt": attempt,
          "scratch": req["scratch"], "snapshot": req["snapshot"], "args": req["args"],
          "leak_fd": leak_fd, "result": {}}
    report = None
    try:
        exec(req["pre"], ns)
        if req["policy"] is not None:
            policy = Sandbox(**req["policy"])
            report = apply(policy, scratch=req["scratch"], read_paths=[req["snapshot"]],
                           keep_fds=[w]).to_dict()
        exec(req["code"], ns)
    except BaseException as e:
        ns["result"]["raised"] = {"type": type(e).__name__, "message": str(e)}
    os.write(w, json.dumps({"result": ns["result"], "report": report}, default=repr).encode())
    os._exit(0)

print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    r, w = os.pipe()
    before, start = sigterms, time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(req, w)
    os.close(w)
    data, deadline = b"", start + req["timeout"]
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(r, 1 << 20) if ready else None
        if not chunk:
            break
        data += chunk
    if chunk is None:
        os.kill(pid, signal.SIGKILL)
    os.close(r)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    _caps.release(pid)  # the worker's cgroups, as the real parent does once it has reaped it
    reply = json.loads(data) if data else {"result": None, "report": None}
    reply.update(status=status, sigterms=sigterms - before, wall=time.monotonic() - start,
                 timed_out=chunk is None)
    print(json.dumps(reply), flush=True)
"""


@dataclass
class Outcome:
    result: dict[str, Any] | None
    report: dict[str, Any] | None
    status: int
    sigterms: int
    wall: float
    timed_out: bool


class Zygote:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log

    def run(
        self,
        code: str,
        dirs: dict[str, Path],
        policy: dict[str, Any] | None,
        *,
        args: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        pre: str = "",
        timeout: float = 60,
    ) -> Outcome:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {
            "code": code,
            "policy": policy,
            "scratch": str(dirs["scratch"]),
            "snapshot": str(dirs["snapshot"]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in (args or {}).items()},
            "env": env or {},
            "pre": pre,
            "timeout": timeout,
        }
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"zygote died; its stderr:\n{self.log.read_text()[-4000:]}"
        out = Outcome(**json.loads(line))
        assert self.proc.poll() is None, "the parent (zygote) must stay alive"
        return out


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Any:
    where = tmp_path_factory.mktemp("zygote")
    log = where / "stderr.txt"
    env = dict(os.environ) | CANARY  # a $ISOLHUB_SANDBOX_PRETEND_MISSING simulates an older kernel
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=where,
            text=True,
        )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", log.read_text()
    yield Zygote(proc, log)
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.fixture(scope="module")
def kernel() -> Any:
    return probe()


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """scratch (writable), snapshot (readable), and what must stay out of reach: home, cache."""
    made = {n: tmp_path / n for n in ("scratch", "snapshot", "home", "cache")}
    for path in made.values():
        path.mkdir()
    (made["snapshot"] / "snapmod.py").write_text("VALUE = 42\n")
    (made["home"] / ".ssh").mkdir()
    (made["home"] / ".ssh" / "id_rsa").write_text(SECRET)
    (made["cache"] / "weights.pt").write_bytes(b"\0" * 64)
    return made


def state(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Mode, size and content hash of everything under `roots`: proof nothing changed."""
    seen = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            seen[str(path)] = (st.st_mode, st.st_size, digest)
    return seen


def strict(kernel: Any, *needs: str, **overrides: Any) -> dict[str, Any]:
    """The strict policy as JSON, skipping the test when this kernel lacks a protection it needs;
    other missing protections are allowed, so the rest of the suite still runs on older kernels."""
    for name in needs:
        if not kernel[name].available:
            pytest.skip(f"kernel lacks {name}: {kernel[name].detail}")
    allow = sorted(set(kernel.missing) | set(overrides.pop("allow_missing", ())))
    return {"allow_missing": allow, **overrides}


def error_of(outcome: Outcome, key: str) -> tuple[str, int | None]:
    assert outcome.result is not None, outcome
    got = outcome.result[key]
    assert "error" in got, f"{key} got through: {got}"
    return got["error"], got["errno"]


# The hostile actions, as the hubconf would write them.
READ_SECRET = """
result["read"] = attempt(lambda: open(args["secret"]).read())
result["via_proc_root"] = attempt(lambda: open("/proc/self/root" + args["secret"]).read())
result["via_cwd"] = attempt(lambda: open(os.path.relpath(args["secret"])).read())
"""
READ_ENV = """
import tempfile
names = ("GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "OPENAI_API_KEY",
         "DB_PASSWORD", "HTTPS_PROXY", "no_proxy", "HOME", "TMPDIR", "TORCH_HOME", "ISOLHUB_HOME")
result["env"] = {k: os.environ.get(k) for k in names}
result["tempdir"] = tempfile.gettempdir()
result["cwd"] = os.getcwd()
with open("/proc/self/environ", "rb") as f:  # the block the process image was exec'd with
    result["proc_environ"] = f.read().decode("latin-1")
"""
TCP_CONNECT = """
import socket
def go():
    with socket.create_connection(("127.0.0.1", args["port"]), timeout=2) as s:
        s.sendall(b"exfiltrated")
    return "connected"
result["connect"] = attempt(go)
"""
UDP_SEND = """
import socket
def go():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return s.sendto(b"exfiltrated", ("127.0.0.1", args["port"]))
result["send"] = attempt(go)
"""
DNS_LOOKUP = """
import socket
result["localhost"] = attempt(lambda: socket.getaddrinfo("localhost", 80)[0][4][0])
result["name"] = attempt(lambda: socket.getaddrinfo("pypi.org", 443)[0][4][0])
"""
UNIX_CONNECT = """
import socket
def go():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(args["address"])
        s.sendall(b"exfiltrated")
    return "connected"
result["connect"] = attempt(go)
"""
WRITE_OUTSIDE = """
snap = os.path.join(snapshot, "snapmod.py")
result["cache_new_file"] = attempt(lambda: open(os.path.join(args["cache"], "evil.py"), "w").write("x"))
result["cache_overwrite"] = attempt(lambda: open(os.path.join(args["cache"], "weights.pt"), "wb").write(b"x"))
result["snapshot_append"] = attempt(lambda: open(snap, "a").write("import evil"))
result["snapshot_truncate"] = attempt(lambda: os.truncate(snap, 0))
result["snapshot_rename"] = attempt(lambda: os.rename(snap, snap + ".bak"))
result["snapshot_unlink"] = attempt(lambda: os.unlink(snap))
result["snapshot_chmod"] = attempt(lambda: os.chmod(snap, 0o777))
result["snapshot_xattr"] = attempt(lambda: os.setxattr(snap, "user.evil", b"1"))
result["snapshot_symlink"] = attempt(lambda: os.symlink("/etc/passwd", os.path.join(snapshot, "l")))
result["scratch_write"] = attempt(lambda: open(os.path.join(scratch, "ok.txt"), "w").write("fine"))
"""
KILL_PARENT = 'result["kill"] = attempt(lambda: os.kill(os.getppid(), signal.SIGTERM))'
PTRACE_PARENT = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def go():  # PTRACE_SEIZE attaches without stopping; the kernel detaches when we exit
    if libc.ptrace(ctypes.c_long(0x4206), ctypes.c_long(os.getppid()), None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "attached"
result["ptrace"] = attempt(go)
"""
READ_PARENT_MEM = """
def go():
    ppid = os.getppid()
    fd = os.open(f"/proc/{ppid}/mem", os.O_RDONLY)
    try:
        with open(f"/proc/{ppid}/maps") as f:
            start = next(int(line.split("-")[0], 16) for line in f if line.split()[1][0] == "r")
        return len(os.pread(fd, 16, start))
    finally:
        os.close(fd)
result["mem"] = attempt(go)
"""
EXEC_SHELL = 'result["exec"] = attempt(lambda: os.execv("/bin/sh", ["sh", "-c", "exit 42"]))'
FORK_BOMB = """
children = []
def bomb():
    for _ in range(args["forks"]):
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    return len(children)
result["fork"] = attempt(bomb)
result["forked"] = len(children)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""
MEMORY_BOMB = 'result["alloc"] = attempt(lambda: len(bytearray(args["bytes"])))'
CPU_SPIN = """
start = time.process_time()
while time.process_time() - start < args["seconds"]:
    pass
result["spun"] = time.process_time() - start
"""
HUGE_FILE = """
path = os.path.join(scratch, "huge.bin")
def go():
    with open(path, "wb", buffering=0) as f:
        for _ in range(args["bytes"] // 65536):
            f.write(b"x" * 65536)
    return "written"
result["write"] = attempt(go)
result["size"] = os.path.getsize(path)
"""
SELF_STATE = """
import ctypes, resource
libc = ctypes.CDLL(None, use_errno=True)
with open("/proc/self/status") as f:
    result["status"] = dict(line.rstrip("\\n").split(":\\t", 1) for line in f if ":\\t" in line)
out = ctypes.c_int(-1)
libc.prctl(2, ctypes.byref(out), 0, 0, 0)  # PR_GET_PDEATHSIG
result["pdeathsig"] = out.value
def clear_pdeathsig():
    if libc.prctl(1, ctypes.c_ulong(0), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG 0
        raise OSError(ctypes.get_errno(), "prctl")
result["clear_pdeathsig"] = attempt(clear_pdeathsig)
inf = resource.RLIM_INFINITY
result["raise_as"] = attempt(lambda: resource.setrlimit(resource.RLIMIT_AS, (inf, inf)))
def unshare_user():
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare")
    return "unshared"
result["unshare"] = attempt(unshare_user)
result["leak_fd"] = os.readlink(f"/proc/self/fd/{leak_fd}")
result["stdin"] = os.readlink("/proc/self/fd/0")
"""
TORCH_WORKS = """
import threading, tempfile
assert "decimal" not in sys.modules and "email.mime.text" not in sys.modules
import decimal, email.mime.text  # stdlib imported for the first time inside the sandbox
a = torch.randn(256, 256)
result["matmul"] = list((a @ a.T).shape)
with torch.no_grad():
    result["linear"] = list(torch.nn.Linear(64, 32)(torch.randn(8, 64)).shape)
result["conv"] = list(torch.nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 8, 8)).shape)
sys.path.insert(0, snapshot)
import snapmod
result["snapmod"] = snapmod.VALUE
box = []
t = threading.Thread(target=lambda: box.append(torch.ones(3).sum().item()))
t.start(); t.join()
result["thread"] = box
with tempfile.NamedTemporaryFile() as f:
    result["tempfile"] = f.name
torch.save({"w": torch.ones(2)}, os.path.join(scratch, "w.pt"))
result["load"] = torch.load(os.path.join(scratch, "w.pt"))["w"].tolist()
os.makedirs(os.path.join(scratch, "a", "b"))
os.rename(os.path.join(scratch, "w.pt"), os.path.join(scratch, "a", "b", "w.pt"))  # REFER
result["renamed"] = os.path.exists(os.path.join(scratch, "a", "b", "w.pt"))
"""


@pytest.fixture
def tcp_listener() -> Any:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        s.setblocking(False)
        yield s


def accepted(listener: socket.socket) -> bool:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.fixture
def udp_listener() -> Any:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        yield s


def received(listener: socket.socket) -> bool:
    try:
        return bool(listener.recv(100))
    except BlockingIOError:
        return False


@pytest.fixture
def abstract_listener() -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(f"\0isolhub-test-{uuid.uuid4().hex}")
        s.listen()
        s.setblocking(False)
        yield s


def address_of(listener: socket.socket) -> str:
    name = listener.getsockname()  # bytes for an abstract name
    return name.decode("latin-1") if isinstance(name, bytes) else name


@pytest.fixture
def path_listener(tmp_path: Path) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(tmp_path / "docker.sock"))  # stands in for /var/run/docker.sock
        s.listen()
        s.setblocking(False)
        yield s


# --- with the sandbox -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_secret_file_outside_the_read_paths_is_unreadable(zygote, kernel, dirs):
    before = state(dirs["home"])
    out = zygote.run(
        READ_SECRET, dirs, strict(kernel, "landlock"), args={"secret": dirs["home"] / ".ssh/id_rsa"}
    )
    assert error_of(out, "read") == ("PermissionError", 13)  # EACCES from Landlock
    assert error_of(out, "via_proc_root") == ("PermissionError", 13)  # magic links do not help
    assert error_of(out, "via_cwd") == ("PermissionError", 13)
    assert state(dirs["home"]) == before


def test_tokens_credentials_and_proxies_are_gone_from_the_environment(zygote, kernel, dirs):
    out = zygote.run(READ_ENV, dirs, strict(kernel))
    env = out.result["env"]
    assert {k: env[k] for k in CANARY} == dict.fromkeys(CANARY)
    scratch = str(dirs["scratch"])
    assert {env[k] for k in ("HOME", "TMPDIR", "TORCH_HOME", "ISOLHUB_HOME")} == {scratch}
    assert out.result["tempdir"] == scratch and out.result["cwd"] == scratch
    assert not [v for v in CANARY.values() if v in out.result["proc_environ"]]


def test_tcp_connect_to_a_local_listener_is_refused(zygote, kernel, dirs, tcp_listener):
    out = zygote.run(
        TCP_CONNECT,
        dirs,
        strict(kernel, "seccomp", "netns"),
        args={"port": tcp_listener.getsockname()[1]},
    )
    assert error_of(out, "connect") == ("PermissionError", 1)  # seccomp: socket() → EPERM
    assert not accepted(tcp_listener)


@pytest.mark.parametrize(
    ("pretend", "expected", "layer"),
    [
        ("", ("PermissionError", 1), "seccomp refuses socket()"),
        ("seccomp", ("PermissionError", 13), "Landlock refuses connect() (ABI >= 4)"),
        ("seccomp,landlock", ("OSError", 101), "the empty network namespace: ENETUNREACH"),
    ],
)
def test_each_network_layer_alone_still_stops_tcp(
    zygote, kernel, dirs, tcp_listener, pretend, expected, layer
):
    off = set(pretend.split(",")) - {""}
    needs = [n for n in ("seccomp", "landlock.net", "netns") if n.split(".")[0] not in off]
    policy = strict(kernel, *needs, allow_missing=off)
    env = {PRETEND_MISSING_ENV: pretend}
    out = zygote.run(
        TCP_CONNECT, dirs, policy, args={"port": tcp_listener.getsockname()[1]}, env=env
    )
    assert error_of(out, "connect") == expected, layer
    assert not accepted(tcp_listener)


def test_udp_send_is_refused(zygote, kernel, dirs, udp_listener):
    out = zygote.run(
        UDP_SEND, dirs, strict(kernel, "seccomp"), args={"port": udp_listener.getsockname()[1]}
    )
    assert error_of(out, "send") == ("PermissionError", 1)
    assert not received(udp_listener)


def test_dns_lookups_fail_with_a_resolver_error(zygote, kernel, dirs):
    out = zygote.run(DNS_LOOKUP, dirs, strict(kernel, "seccomp", "landlock"))
    # /etc/hosts is unreadable and the resolver's UDP socket is refused: EAI_AGAIN (-3).
    assert error_of(out, "localhost") == ("gaierror", socket.EAI_AGAIN)
    assert error_of(out, "name") == ("gaierror", socket.EAI_AGAIN)


def test_abstract_unix_socket_connect_is_refused(zygote, kernel, dirs, abstract_listener):
    out = zygote.run(
        UNIX_CONNECT,
        dirs,
        strict(kernel, "seccomp"),
        args={"address": address_of(abstract_listener)},
    )
    assert error_of(out, "connect") == ("PermissionError", 1)  # seccomp: no new sockets
    assert not accepted(abstract_listener)


def test_abstract_unix_socket_is_scoped_by_landlock_even_with_network_allowed(
    zygote, kernel, dirs, abstract_listener
):
    policy = strict(kernel, "landlock.scope", network=True)
    out = zygote.run(UNIX_CONNECT, dirs, policy, args={"address": address_of(abstract_listener)})
    assert error_of(out, "connect") == ("PermissionError", 1)  # LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
    assert not accepted(abstract_listener)


def test_a_pathname_unix_socket_like_docker_sock_is_unreachable(
    zygote, kernel, dirs, path_listener
):
    out = zygote.run(
        UNIX_CONNECT, dirs, strict(kernel, "seccomp"), args={"address": address_of(path_listener)}
    )
    assert error_of(out, "connect") == ("PermissionError", 1)  # Landlock cannot stop this one
    assert not accepted(path_listener)


def test_writes_outside_scratch_fail_and_change_nothing(zygote, kernel, dirs):
    before = state(dirs["cache"], dirs["snapshot"], dirs["home"])
    out = zygote.run(
        WRITE_OUTSIDE, dirs, strict(kernel, "landlock", "seccomp"), args={"cache": dirs["cache"]}
    )
    for key in ("cache_new_file", "cache_overwrite", "snapshot_append", "snapshot_truncate"):
        assert error_of(out, key) == ("PermissionError", 13), key  # Landlock
    for key in ("snapshot_rename", "snapshot_unlink", "snapshot_symlink"):
        assert error_of(out, key) == ("PermissionError", 13), key
    assert error_of(out, "snapshot_chmod") == ("PermissionError", 1)  # seccomp (Landlock can't)
    assert error_of(out, "snapshot_xattr") == ("PermissionError", 1)
    assert out.result["scratch_write"] == {"ok": 4}
    assert state(dirs["cache"], dirs["snapshot"], dirs["home"]) == before


def test_killing_the_parent_is_refused_and_the_parent_lives(zygote, kernel, dirs):
    out = zygote.run(KILL_PARENT, dirs, strict(kernel, "landlock.scope"))
    assert error_of(out, "kill") == ("PermissionError", 1)  # LANDLOCK_SCOPE_SIGNAL
    assert out.sigterms == 0


def test_ptrace_of_the_parent_is_refused(zygote, kernel, dirs):
    out = zygote.run(PTRACE_PARENT, dirs, strict(kernel, "seccomp"))
    assert error_of(out, "ptrace") == ("PermissionError", 1)


def test_reading_the_parents_memory_is_refused(zygote, kernel, dirs):
    out = zygote.run(READ_PARENT_MEM, dirs, strict(kernel, "landlock"))
    assert error_of(out, "mem") == ("PermissionError", 13)


def test_exec_of_a_shell_is_refused(zygote, kernel, dirs):
    out = zygote.run(EXEC_SHELL, dirs, strict(kernel, "seccomp"))
    assert error_of(out, "exec") == ("PermissionError", 1) and out.status == 0


def test_without_seccomp_landlock_alone_still_refuses_exec(zygote, kernel, dirs):
    policy = strict(kernel, "landlock", allow_missing=["seccomp"])
    out = zygote.run(EXEC_SHELL, dirs, policy, env={PRETEND_MISSING_ENV: "seccomp"})
    assert error_of(out, "exec") == ("PermissionError", 13) and out.status == 0


def test_a_fork_bomb_stops_at_the_first_fork(zygote, kernel, dirs):
    out = zygote.run(FORK_BOMB, dirs, strict(kernel, "seccomp"), args={"forks": 50})
    assert error_of(out, "fork") == ("PermissionError", 1)
    assert out.result["forked"] == 0 and not out.timed_out


def test_with_fork_allowed_max_tasks_bounds_a_fork_bomb(zygote, kernel, dirs):
    # A pids cgroup binds root too; RLIMIT_NPROC (the fallback for non-root) would not.
    policy = strict(kernel, "caps.tasks", allow_fork=True, max_tasks=8)
    out = zygote.run(FORK_BOMB, dirs, policy, args={"forks": 50})
    assert error_of(out, "fork") == ("BlockingIOError", 11) and out.result["forked"] < 8


CAPS_STATE = """
with open("/proc/self/cgroup") as f:
    result["cgroups"] = f.read()
st = os.statvfs(scratch)
result["scratch_bytes"] = st.f_blocks * st.f_frsize
result["cwd_is_scratch"] = os.stat(".").st_dev == os.stat(scratch).st_dev
result["sys_fs_cgroup"] = attempt(lambda: os.listdir("/sys/fs/cgroup"))
"""


def test_the_caps_are_cgroups_and_a_scratch_tmpfs_of_the_workers_own(zygote, kernel, dirs):
    needs = ("caps.memory", "caps.tasks", "caps.scratch")
    policy = strict(kernel, *needs, memory_bytes=256 * 1024**2, scratch_bytes=32 * 1024**2)
    out = zygote.run(CAPS_STATE, dirs, policy)
    applied = out.report["applied"]
    assert "256 MiB" in applied["caps.memory"] and "cgroup v" in applied["caps.memory"]
    assert "pids.max" in applied["caps.tasks"] or "RLIMIT_NPROC" in applied["caps.tasks"]
    assert "tmpfs of 32 MiB" in applied["caps.scratch"]
    assert "/isolhub-" in out.result["cgroups"]
    assert out.result["scratch_bytes"] == 32 * 1024**2 and out.result["cwd_is_scratch"]
    assert out.result["sys_fs_cgroup"].get("ok", []) == []  # hidden, or unreadable (Landlock)
    assert not any(p.name != "." for p in dirs["scratch"].iterdir())  # nothing on the real disk


def test_a_memory_bomb_raises_memoryerror(zygote, kernel, dirs):
    policy = strict(kernel, address_space_bytes=1024**3)
    out = zygote.run(MEMORY_BOMB, dirs, policy, args={"bytes": 1024**3})
    assert error_of(out, "alloc") == ("MemoryError", None)


@pytest.mark.slow
def test_a_cpu_spin_is_killed_at_the_cpu_limit(zygote, kernel, dirs):
    out = zygote.run(CPU_SPIN, dirs, strict(kernel, cpu_seconds=1), args={"seconds": 30})
    assert out.result is None and out.status in (-signal.SIGXCPU, -signal.SIGKILL)
    assert not out.timed_out  # killed by its CPU limit, not by the harness's deadline


def test_a_huge_file_stops_at_the_file_size_limit(zygote, kernel, dirs):
    policy = strict(kernel, file_size_bytes=1024**2)
    out = zygote.run(HUGE_FILE, dirs, policy, args={"bytes": 4 * 1024**2})
    assert error_of(out, "write") == ("OSError", 27)  # EFBIG; Python ignores SIGXFSZ
    assert out.result["size"] == 1024**2


def test_torch_and_imports_from_the_read_paths_still_work(zygote, kernel, dirs):
    out = zygote.run(TORCH_WORKS, dirs, strict(kernel))
    assert "raised" not in out.result, out.result
    assert out.result["matmul"] == [256, 256] and out.result["linear"] == [8, 32]
    assert out.result["conv"] == [1, 4, 6, 6] and out.result["snapmod"] == 42
    assert out.result["thread"] == [3.0] and out.result["load"] == [1.0, 1.0]
    assert out.result["tempfile"].startswith(str(dirs["scratch"]) + "/")
    assert out.result["renamed"] is True


def test_the_worker_holds_no_privileges_and_cannot_loosen_its_limits(zygote, kernel, dirs):
    out = zygote.run(SELF_STATE, dirs, strict(kernel, "seccomp", "no_new_privs", "capabilities"))
    status = out.result["status"]
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert out.result["pdeathsig"] == signal.SIGKILL
    assert error_of(out, "clear_pdeathsig") == ("PermissionError", 1)  # seccomp
    assert error_of(out, "raise_as")[0] == "ValueError"  # "not allowed to raise maximum limit"
    assert error_of(out, "unshare") == ("PermissionError", 1)


def test_inherited_fds_are_replaced_by_dev_null_except_the_kept_ones(zygote, kernel, dirs):
    out = zygote.run(SELF_STATE, dirs, strict(kernel), pre="os.close(0)")
    assert out.result["leak_fd"] == "/dev/null"  # an fd the zygote held is gone
    assert out.result["stdin"] == "/dev/null"  # a closed 0/1/2 is filled, never left free
    kept = out.report["applied"]["fds"]
    assert "kept [0, 1, 2," in kept


# --- fail closed ----------------------------------------------------------------------------


def test_a_missing_required_protection_fails_closed_naming_it(zygote, kernel, dirs):
    policy = {"allow_missing": [m for m in kernel.missing if not m.startswith("landlock")]}
    out = zygote.run(
        READ_SECRET,
        dirs,
        policy,
        env={PRETEND_MISSING_ENV: "landlock"},
        args={"secret": dirs["home"] / ".ssh/id_rsa"},
    )
    assert out.result["raised"]["type"] == "SandboxError"
    message = out.result["raised"]["message"]
    assert "landlock (pretended missing" in message and "Sandbox(allow_missing=" in message
    assert "read" not in out.result  # nothing ran unconfined


def test_an_allowed_missing_protection_is_reported_not_applied(zygote, kernel, dirs):
    policy = strict(kernel, allow_missing=["landlock"])
    out = zygote.run(
        READ_SECRET,
        dirs,
        policy,
        env={PRETEND_MISSING_ENV: "landlock"},
        args={"secret": dirs["home"] / ".ssh/id_rsa"},
    )
    assert {"landlock", "landlock.net", "landlock.scope"} <= set(out.report["missing"])
    assert not {"landlock", "landlock.net", "landlock.scope"} & set(out.report["applied"])
    assert out.result["read"] == {"ok": SECRET}  # the honest flip side of allowing it


def test_apply_refuses_a_multi_threaded_process(zygote, kernel, dirs):
    pre = "import threading; threading.Thread(target=time.sleep, args=(2,), daemon=True).start()"
    out = zygote.run("", dirs, strict(kernel), pre=pre)
    assert out.result["raised"]["type"] == "SandboxError"
    assert "single-threaded" in out.result["raised"]["message"]


# --- without the sandbox: what gets through -------------------------------------------------


def _yama_blocks_parent_ptrace() -> str:
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        return ""
    return f"Yama ptrace_scope={scope} already blocks it" if scope != "0" else ""


UNSANDBOXED = {
    "secret_file": (READ_SECRET, lambda o, d, s: o.result["read"] == {"ok": SECRET}),
    "env_tokens": (
        READ_ENV,
        lambda o, d, s: (
            "ghp_canary" in (o.result["env"]["GITHUB_TOKEN"] + o.result["proc_environ"])
        ),
    ),
    "tcp_connect": (
        TCP_CONNECT,
        lambda o, d, s: o.result["connect"] == {"ok": "connected"} and accepted(s["tcp"]),
    ),
    "udp_send": (UDP_SEND, lambda o, d, s: o.result["send"] == {"ok": 11} and received(s["udp"])),
    "dns_localhost": (DNS_LOOKUP, lambda o, d, s: "ok" in o.result["localhost"]),
    "abstract_unix": (UNIX_CONNECT, lambda o, d, s: o.result["connect"] == {"ok": "connected"}),
    "pathname_unix": (UNIX_CONNECT, lambda o, d, s: o.result["connect"] == {"ok": "connected"}),
    "write_outside": (WRITE_OUTSIDE, lambda o, d, s: (d["cache"] / "evil.py").exists()),
    "kill_parent": (
        KILL_PARENT,
        lambda o, d, s: o.result["kill"] == {"ok": None} and o.sigterms == 1,
    ),
    "ptrace_parent": (PTRACE_PARENT, lambda o, d, s: o.result["ptrace"] == {"ok": "attached"}),
    "parent_mem": (READ_PARENT_MEM, lambda o, d, s: o.result["mem"] == {"ok": 16}),
    "exec_shell": (EXEC_SHELL, lambda o, d, s: o.status == 42),
    "fork_bomb": (FORK_BOMB, lambda o, d, s: o.result["forked"] == 20),
    "memory_bomb": (MEMORY_BOMB, lambda o, d, s: o.result["alloc"] == {"ok": 1024**3}),
    "cpu_spin": (CPU_SPIN, lambda o, d, s: o.status == 0 and o.result["spun"] >= 1.2),
    "huge_file": (HUGE_FILE, lambda o, d, s: o.result["size"] == 4 * 1024**2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(UNSANDBOXED))
def test_without_the_sandbox_the_hostile_action_gets_through(
    zygote, dirs, tcp_listener, udp_listener, abstract_listener, path_listener, case
):
    if case in ("ptrace_parent", "parent_mem") and _yama_blocks_parent_ptrace():
        pytest.skip(_yama_blocks_parent_ptrace())
    code, got_through = UNSANDBOXED[case]
    address = address_of(path_listener if case == "pathname_unix" else abstract_listener)
    args = {
        "secret": dirs["home"] / ".ssh/id_rsa",
        "cache": dirs["cache"],
        "port": (tcp_listener if case == "tcp_connect" else udp_listener).getsockname()[1],
        "address": address,
        "forks": 20,
        "bytes": 1024**3 if case == "memory_bomb" else 4 * 1024**2,
        "seconds": 1.2,
    }
    out = zygote.run(code, dirs, None, args=args)
    listeners = {"tcp": tcp_listener, "udp": udp_listener}
    assert got_through(out, dirs, listeners), out


# --- policy objects, probe, and the BPF program (no child needed) ---------------------------


def test_resolve_policy_maps_the_user_argument():
    assert resolve_policy(None) is None and resolve_policy("none") is None
    assert resolve_policy("strict") == Sandbox()
    custom = Sandbox(cpu_seconds=5)
    assert resolve_policy(custom) is custom
    with pytest.raises(ValueError, match="expected 'strict'"):
        resolve_policy("paranoid")
    with pytest.raises(TypeError):
        resolve_policy(1)  # type: ignore[arg-type]


def test_a_policy_rejects_unknown_protection_names_and_negative_limits():
    with pytest.raises(ValueError, match="landlok"):
        Sandbox(allow_missing={"landlok"})
    with pytest.raises(ValueError, match="memory_bytes"):
        Sandbox(memory_bytes=-1)
    assert Sandbox(allow_missing=["landlock"]).may_miss("landlock.scope")
    assert "netns" not in Sandbox(network=True).requested()


def test_probe_reports_every_protection_and_honours_the_pretend_knob(monkeypatch):
    report = probe()
    assert set(PROTECTIONS) <= {e.name for e in report.entries}
    assert json.loads(json.dumps(report.to_dict()))["protections"]["landlock"]["available"] in (
        True,
        False,
    )
    assert "landlock" in str(report)
    monkeypatch.setenv(PRETEND_MISSING_ENV, "landlock,userns")
    pretend = probe()
    assert {"landlock", "landlock.net", "landlock.scope", "userns"} <= set(pretend.missing)
    assert "allow_missing" in str(pretend)


def _header_numbers(path: Path, pattern: str) -> dict[str, int]:
    import re

    text = path.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(pattern, text)}


@pytest.mark.parametrize(
    ("arch", "header", "pattern"),
    [
        (
            "x86_64",
            "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
            r"#define __NR_(\w+)\s+(\d+)\b",
        ),
        ("aarch64", "/usr/include/asm-generic/unistd.h", r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b"),
    ],
)
def test_syscall_tables_match_the_kernel_headers(arch, header, pattern):
    if not Path(header).exists():
        pytest.skip(f"{header} not installed")
    known = _header_numbers(Path(header), pattern)
    table = _seccomp.SYSCALLS[arch]
    checked = {name: nr for name, nr in table.items() if name in known}
    assert checked == {name: known[name] for name in checked}
    # Names newer than these headers (fchmodat2: 6.6, setxattrat: 6.13, open_tree_attr: 6.15)
    # must be ≥ 424,
    # where every architecture shares one number.
    assert all(nr >= 424 for name, nr in table.items() if name not in known)


def _run_bpf(
    program: list[tuple[int, int, int, int]], arch: int, nr: int, args: tuple[int, ...] = ()
) -> int:
    """A minimal classic-BPF interpreter for the instructions `_sandbox.seccomp` emits."""
    data = [nr, arch, 0, 0] + [
        word for a in (*args, 0, 0, 0, 0, 0, 0)[:6] for word in (a & 0xFFFFFFFF, a >> 32)
    ]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            acc = data[k // 4]
        elif code == 0x06:
            return k
        else:
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        pc += 1


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_seccomp_program_decides_as_documented(arch):
    nr = _seccomp.SYSCALLS[arch]
    tag = _seccomp.AUDIT_ARCH[arch]
    allow, eperm, enosys = 0x7FFF0000, 0x00050001, 0x00050026
    prog = _seccomp.build(arch=arch, deny_sockets=True, allow_fork=False, own_pid=4242)
    assert _run_bpf(prog, tag, nr["socket"], (1,)) == eperm  # even AF_UNIX
    assert _run_bpf(prog, tag, nr["ptrace"]) == eperm
    assert _run_bpf(prog, tag, nr["clone3"]) == enosys
    assert _run_bpf(prog, tag, nr["clone"], (0x00010000 | 0x00000100,)) == allow  # a thread
    assert _run_bpf(prog, tag, nr["clone"], (0x11,)) == eperm  # fork: SIGCHLD, no CLONE_THREAD
    assert _run_bpf(prog, tag, nr["clone"], (0x00010000 | 0x10000000,)) == eperm  # CLONE_NEWUSER
    assert _run_bpf(prog, tag, nr["ioctl"], (0, 0x5412)) == eperm  # TIOCSTI
    assert _run_bpf(prog, tag, nr["ioctl"], (0, 0x5401)) == allow  # TCGETS
    assert _run_bpf(prog, tag, nr["prctl"], (1, 0)) == eperm  # PR_SET_PDEATHSIG
    assert _run_bpf(prog, tag, nr["prlimit64"], (0,)) == allow
    assert _run_bpf(prog, tag, nr["prlimit64"], (4242,)) == allow
    assert _run_bpf(prog, tag, nr["prlimit64"], (1,)) == eperm  # another process
    assert _run_bpf(prog, tag, 0, ()) == allow  # read / io_setup
    assert _run_bpf(prog, 0x40000003, nr["ptrace"]) == eperm  # a foreign ABI (i386)
    if arch == "x86_64":
        assert _run_bpf(prog, tag, 0x40000000 | 1) == eperm  # x32
        assert _run_bpf(prog, tag, nr["fork"]) == eperm
    lenient = _seccomp.build(arch=arch, deny_sockets=False, allow_fork=True, own_pid=1)
    assert _run_bpf(lenient, tag, nr["socket"], (2,)) == allow
    assert _run_bpf(lenient, tag, nr["clone"], (0x11,)) == allow
