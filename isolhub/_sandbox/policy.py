"""The strict sandbox: a frozen policy, a kernel probe, and `apply`, run inside a fresh worker.

`apply` confines the calling process for good, in this order, before untrusted code is imported:

==============  ====================================================================================
protection      what it does
==============  ====================================================================================
environment     keeps only `env_allow` names, minus anything that looks like a credential or proxy;
                HOME, TMPDIR, XDG_*, TORCH_HOME, ISOLHUB_HOME, HF_HOME → scratch; cwd → scratch;
                umask 077; the exec-time environment block behind /proc/self/environ is zeroed
fds             every fd but 0, 1, 2 and `keep_fds` is pointed at /dev/null (dup2), which drops the
                original file while keeping the number taken, so a stale Python object from the
                forked image that later closes "its" fd cannot close a file the hubconf opened
pdeathsig       PR_SET_PDEATHSIG(SIGKILL); seccomp later stops the hubconf from clearing it
rlimits         RLIMIT_AS, CPU (SIGXCPU; hard limit one second later: SIGKILL), FSIZE, NOFILE,
                CORE=0, soft = hard: they cannot be raised again once capabilities are gone
caps.memory     a memory cgroup of its own (`isolhub._sandbox.caps`): memfds, tmpfs and page cache count
caps.tasks      a pids cgroup (threads count, root too); else RLIMIT_NPROC in the userns (non-root)
userns          unshare(CLONE_NEWUSER | CLONE_NEWIPC), setgroups "deny", the own uid/gid mapped to
                itself. A single process may only map its own id, so no map changes the kernel uid
                that file permissions see; for root the map is 0 → 0 (needs CAP_SETFCAP, kernel
                ≥ 5.12) and root's power is removed by the capability drop, Landlock and seccomp,
                not by a cosmetic inner uid. RLIMIT_NPROC (`max_tasks`) is set after the unshare,
                so it counts only this sandbox's tasks
netns           CLONE_NEWNET in the same unshare: no interface but a down loopback; this also
                isolates abstract UNIX sockets. Root without a userns gets a bare netns
caps.scratch    unshare(CLONE_NEWNS), "/" made rprivate, a tmpfs of `scratch_bytes` on scratch,
                /sys/fs/cgroup hidden under an empty read-only tmpfs; cwd → the new scratch
capabilities    bounding and ambient sets cleared, effective/permitted/inheritable set to zero
no_new_privs    PR_SET_NO_NEW_PRIVS, before Landlock, so neither Landlock nor seccomp leans on the
                CAP_SYS_ADMIN a new user namespace lends
landlock        read: the interpreter (prefixes, stdlib, site-packages, isolhub itself, the
                directories of every loaded shared library, /etc/ld.so.cache), `read_paths`,
                /dev/{null,zero,random,urandom}, /proc/self, /proc/cpuinfo,
                /sys/devices/system/cpu; write: scratch and `write_paths`; execute: nothing, so
                execve() fails with EACCES even without seccomp
landlock.net    TCP bind and connect denied (ABI ≥ 4)
landlock.scope  no signals and no abstract UNIX socket connects outside the sandbox (ABI ≥ 6)
seccomp         see `isolhub._sandbox.seccomp`: socket() (any family), ptrace & co, mounts, namespaces,
                bpf, perf, io_uring, keys, kexec, modules, exec, chmod, fork, TIOCSTI → EPERM
==============  ====================================================================================

Why socket() is refused for AF_UNIX too: a pathname socket such as /var/run/docker.sock is
reached through the file system, Landlock (ABI ≤ 7) does not mediate connect() on it, the network
namespace does not isolate it, and a root worker passes its permission check. The control channel
is an already-connected socketpair, so the worker needs no new socket; socketpair() still works.

Why fork is refused (`allow_fork=False`): RLIMIT_NPROC is not enforced by the kernel for uid 0
(fork.c exempts INIT_USER), and a pids cgroup may be missing (`allow_missing`); refusing process
creation in seccomp bounds a fork bomb regardless. Threads (which torch needs) are not
processes and still start; a thread bomb is bounded by the pids cgroup (`max_tasks`).

**Fail closed**: every protection the policy asks for is applied or `apply` raises `SandboxError`
naming it, unless the name (or its prefix before the dot, e.g. "landlock") is in
`policy.allow_missing`, in which case the `AppliedReport` lists it as missing. After a
`SandboxError` the process may be partly confined and must exit.

Test knob: `ISOLHUB_SANDBOX_PRETEND_MISSING="landlock,userns"` makes `probe` and `apply` treat the
named protections as unavailable on this kernel. A policy that does not allow them to be missing
then refuses to run, so the knob cannot silently weaken a sandbox.

Example (`repo` is a folder with a hubconf.py; `apply`'s own example confines a child):
    >>> import isolhub as hub
    >>> policy = resolve_policy("strict")
    >>> policy.network, policy.allow_fork
    (False, False)
    >>> hub.load(repo, "net", source="local", sandbox="strict")
    Traceback (most recent call last):
    isolhub.SandboxError: mode='module' cannot be sandboxed: it ships the repo's classes and ...

Raises:
    SandboxError: from `apply`, naming the protection that could not be applied.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import functools
import os
import re
import resource
import signal
import site
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, final

from .._errors import SandboxError
from .._libc import (
    PR_CAP_AMBIENT,
    PR_CAPBSET_DROP,
    PR_GET_NO_NEW_PRIVS,
    PR_SET_NO_NEW_PRIVS,
    get_pdeathsig,
    libc,
    prctl,
    set_pdeathsig,
)
from . import caps as _caps
from . import landlock as _landlock
from . import seccomp as _seccomp

__all__ = [
    "AppliedReport",
    "DEFAULT_ENV_ALLOW",
    "DEFAULT_WEIGHT_HOSTS",
    "PRETEND_MISSING_ENV",
    "PROTECTIONS",
    "ProbeEntry",
    "Sandbox",
    "SandboxReport",
    "apply",
    "probe",
    "resolve_policy",
    "without_secrets",
]

PROTECTIONS = (
    "environment", "fds", "pdeathsig", "rlimits", "caps.memory", "caps.tasks", "userns", "netns",
    "caps.scratch", "capabilities", "no_new_privs", "landlock", "landlock.net", "landlock.scope",
    "seccomp",
)  # fmt: skip
# The caps a policy asks for by setting their limit (None: not requested).
_CAP_LIMITS = {
    "caps.memory": "memory_bytes",
    "caps.tasks": "max_tasks",
    "caps.scratch": "scratch_bytes",
}
_SCRATCH_INODES = 65536  # files and directories in the scratch tmpfs
PRETEND_MISSING_ENV = "ISOLHUB_SANDBOX_PRETEND_MISSING"

DEFAULT_ENV_ALLOW = (
    "PATH", "LANG", "LANGUAGE", "LC_*", "TERM", "TZ", "PYTHONHASHSEED", "PYTHONIOENCODING",
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "OMP_*", "KMP_*", "GOMP_*",
    "MKL_*", "OPENBLAS_*", "CUDA_VISIBLE_DEVICES", "TORCH_*", "PYTORCH_*",
)  # fmt: skip
# Removed even when `env_allow` matches (case-insensitive): a sandboxed worker never gets them.
_SECRET_ENV = (
    "*TOKEN*", "*SECRET*", "*_KEY", "*_KEY_*", "*PASSWORD*", "*PASSWD*", "*CREDENTIAL*", "*AUTH*",
    "AWS_*", "GOOGLE_*", "GCLOUD_*", "AZURE_*", "*PROXY*", "SSH_*", "GPG_*",
)  # fmt: skip
DEFAULT_WEIGHT_HOSTS = (
    "download.pytorch.org", "github.com", "objects.githubusercontent.com",
    "release-assets.githubusercontent.com", "huggingface.co",
)  # fmt: skip
_SCRATCH_ENV = (
    "HOME", "TMPDIR", "TMP", "TEMP", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
    "XDG_STATE_HOME", "TORCH_HOME", "ISOLHUB_HOME", "HF_HOME",
)  # fmt: skip
_SYSTEM_READ: tuple[str, ...] = (
    "/etc/ld.so.cache", "/dev/zero", "/dev/random", "/dev/urandom", "/proc/self",
)  # fmt: skip
_SYSTEM_READ += ("/proc/cpuinfo", "/sys/devices/system/cpu")  # torch cpuinfo, OpenMP, oneDNN

_CLONE_NEWNS = 0x20000
_CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWNET = 0x08000000, 0x10000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 1, 2, 4, 8, 0x4000, 0x40000
_CAP_AMBIENT_CLEAR_ALL = 4


@final
@dataclass(frozen=True)
class Sandbox:
    """The sandbox policy; `sandbox="strict"` means `Sandbox()`. A None limit is left unchanged.

    The defaults are meant to be safe without configuration: every protection and cap on, no
    network, no fork, writes only to a private scratch tmpfs.

    Caps that hold for a root worker too (each is fail-closed: `caps.*` in `allow_missing`):

    * `memory_bytes`: a memory cgroup (`caps.memory`) charging everything the worker makes
      resident, memfds and scratch files included; past it the kernel's OOM killer stops the
      worker (`WorkerCrashedError` saying so). `address_space_bytes` (RLIMIT_AS) is the early,
      friendly bound: an oversized allocation is a `MemoryError`; it must be None for CUDA
      workers (the driver reserves huge address ranges).
    * `max_tasks`: a pids cgroup (`caps.tasks`) counting the worker's threads and processes;
      where no pids cgroup can be made, RLIMIT_NPROC in the user namespace for a non-root
      worker (the kernel does not enforce it for uid 0).
    * `scratch_bytes`: the scratch dir is a tmpfs of that size (`caps.scratch`), mounted in the
      worker's own mount namespace; it vanishes with the worker.

    `file_size_bytes` (RLIMIT_FSIZE) also caps every memfd the worker grows, i.e. the tensor
    arena. `allow_fork=False` refuses process creation outright.

    Example:
        >>> s = Sandbox(memory_bytes=4 * 1024**3, read_paths=("/data",), allow_missing={"landlock"})
        >>> s.memory_bytes, s.read_paths, s.network, s.allow_fork
        (4294967296, ('/data',), False, False)

    Raises:
        ValueError: a negative limit or an unknown name in `allow_missing`.
    """

    memory_bytes: int | None = 8 * 1024**3  # memory cgroup: resident, memfds, tmpfs
    address_space_bytes: int | None = 16 * 1024**3  # RLIMIT_AS
    cpu_seconds: int | None = 600  # RLIMIT_CPU: SIGXCPU, then SIGKILL one second later
    file_size_bytes: int | None = 1024**3  # RLIMIT_FSIZE: EFBIG
    open_files: int | None = 256  # RLIMIT_NOFILE
    max_tasks: int | None = 1024  # pids cgroup (threads included)
    scratch_bytes: int | None = 2 * 1024**3  # size of the scratch tmpfs: ENOSPC past it
    allow_fork: bool = False  # False: no child processes; threads are fine
    network: bool = False  # True: no network namespace, no socket/TCP denial (tests, trusted)
    read_paths: tuple[str, ...] = ()  # extra readable paths
    write_paths: tuple[str, ...] = ()  # extra writable paths besides scratch
    allow_missing: frozenset[str] = frozenset()  # protections this kernel may lack
    env_allow: tuple[str, ...] = DEFAULT_ENV_ALLOW  # names or fnmatch patterns kept
    # Weights the confined code asks for are fetched by the parent, from these hosts only.
    weight_hosts: tuple[str, ...] = DEFAULT_WEIGHT_HOSTS
    weight_proxy: str | None = None  # the broker's only proxy (it reads none from the env)
    max_download_bytes: int | None = 8 * 1024**3
    wall_seconds: float | None = 600.0  # the parent's watchdog, per request, when no timeout=
    # What one reply may make the parent hold: its tensor arena and frame (bytes; a frame is
    # never over 1 GiB), and its tensors' elements as their shapes say (a stride-0 view counts
    # in full). The defaults fit any reply a worker within `memory_bytes` could make honestly.
    max_reply_bytes: int | None = 8 * 1024**3
    max_reply_elements: int | None = 1 << 33

    def __post_init__(self) -> None:
        for name in ("read_paths", "write_paths", "env_allow", "allow_missing", "weight_hosts"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, frozenset(value) if name == "allow_missing" else value)
        unknown = sorted(self.allow_missing - set(PROTECTIONS))
        if unknown:
            raise ValueError(f"allow_missing: unknown {unknown}; known: {list(PROTECTIONS)}")
        for name in (
            "memory_bytes",
            "address_space_bytes",
            "scratch_bytes",
            "cpu_seconds",
            "file_size_bytes",
            "open_files",
            "max_tasks",
            "max_download_bytes",
            "max_reply_bytes",
            "max_reply_elements",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"Sandbox.{name} must be an int >= 0 or None, not {value!r}")
        for name in _CAP_LIMITS.values():  # 0 would mean "no limit" to tmpfs: refuse it
            if getattr(self, name) == 0:
                raise ValueError(f"Sandbox.{name} must be > 0, or None for no cap")

    def requested(self) -> tuple[str, ...]:
        """The protections this policy asks for: all but the network ones when `network=True`
        and the caps whose limit is None."""
        skip = {"netns", "landlock.net"} if self.network else set()
        skip |= {cap for cap, field in _CAP_LIMITS.items() if getattr(self, field) is None}
        return tuple(p for p in PROTECTIONS if p not in skip)

    def may_miss(self, name: str) -> bool:
        """True when `name` may be unavailable: listed itself, or its prefix ("landlock")."""
        return name in self.allow_missing or name.split(".")[0] in self.allow_missing


def resolve_policy(sandbox: None | str | Sandbox) -> Sandbox | None:
    """Turn a `sandbox=` argument into a policy: None/"none" → None, "strict" → `Sandbox()`.

    Example:
        >>> resolve_policy("strict") == Sandbox()
        True

    Raises:
        ValueError: an unknown string.
        TypeError: anything but None, a string or a `Sandbox`.
    """
    if sandbox is None or isinstance(sandbox, Sandbox):
        return sandbox
    if not isinstance(sandbox, str):
        raise TypeError(f"sandbox must be None, a str or a Sandbox, not {type(sandbox).__name__}")
    word = sandbox.strip().lower()
    if word in {"none", "strict"}:
        return None if word == "none" else Sandbox()
    raise ValueError(f"sandbox={sandbox!r}: expected 'strict', 'none', None or a Sandbox(...)")


@final
@dataclass(frozen=True)
class ProbeEntry:
    """One line of a `SandboxReport`: whether this kernel can enforce `name`, and why."""

    name: str
    available: bool
    detail: str


@final
@dataclass(frozen=True)
class SandboxReport:
    """What this kernel can enforce, from `probe()`; pidfd and memfd_seals serve other parts.

    Example:
        >>> report = probe()
        >>> report["landlock"].available == (report.landlock_abi >= 1)
        True
    """

    entries: tuple[ProbeEntry, ...]
    landlock_abi: int
    kernel: str

    def __getitem__(self, name: str) -> ProbeEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def missing(self) -> tuple[str, ...]:
        """Sandbox protections this kernel cannot apply (what strict would refuse to run without)."""
        return tuple(e.name for e in self.entries if e.name in PROTECTIONS and not e.available)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"kernel", "landlock_abi", "protections": {name: {available, detail}}}."""
        entries = {e.name: {"available": e.available, "detail": e.detail} for e in self.entries}
        return {"kernel": self.kernel, "landlock_abi": self.landlock_abi, "protections": entries}

    def __str__(self) -> str:
        return self.describe()

    def describe(self, advice: bool = True) -> str:
        """The report as lines of text; `advice`: with the Python way to run without what is
        missing (the command line gives its own)."""
        lines = [f"isolhub sandbox: what this kernel can enforce ({self.kernel})"]
        for e in self.entries:
            support = "" if e.name in PROTECTIONS else " (support)"
            lines.append(f"  [{'yes' if e.available else ' no'}] {e.name:<15}{e.detail}{support}")
        if self.missing and advice:
            names = ", ".join(repr(m) for m in self.missing)
            lines.append("  sandbox='strict' fails closed here; to run without them anyway pass")
            lines.append(f"  Sandbox(allow_missing={{{names}}})")
        return "\n".join(lines)


@final
@dataclass(frozen=True)
class AppliedReport:
    """What `apply` did: (name, detail) applied, (name, reason) allowed-missing, paths, seconds."""

    applied: tuple[tuple[str, str], ...]
    missing: tuple[tuple[str, str], ...]
    not_requested: tuple[str, ...]
    readable: tuple[str, ...]
    writable: tuple[str, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (dicts, lists, str, float): fits the restricted reply codec."""
        return {
            "applied": dict(self.applied),
            "missing": dict(self.missing),
            "not_requested": list(self.not_requested),
            "readable": list(self.readable),
            "writable": list(self.writable),
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        lines = [f"sandbox applied in {self.seconds * 1000:.1f} ms"]
        lines += [f"  [applied] {name:<15}{detail}" for name, detail in self.applied]
        lines += [f"  [MISSING] {name:<15}{reason}" for name, reason in self.missing]
        lines += [f"  [off]     {name:<15}not requested" for name in self.not_requested]
        return "\n".join(lines)


def _pretended() -> dict[str, str]:
    names = {n.strip() for n in os.environ.get(PRETEND_MISSING_ENV, "").split(",")}
    why = f"pretended missing (${PRETEND_MISSING_ENV})"
    return {p: why for p in PROTECTIONS if p in names or p.split(".")[0] in names}


def _kernel_gaps(abi: int) -> dict[str, str]:
    """Protections known to be unavailable without trying: Landlock ABI, seccomp, the test knob."""
    gaps = {}
    for name, need in (("landlock", 1), ("landlock.net", 4), ("landlock.scope", 6)):
        if abi < need:
            gaps[name] = f"needs Landlock ABI {need}, kernel has {abi or 'none'}"
    seccomp_ok, detail = _seccomp.available()
    if not seccomp_ok:
        gaps["seccomp"] = detail
    return gaps | _pretended()


def probe() -> SandboxReport:
    """Report what this kernel can enforce: each protection → available and a detail.

    User and network namespaces are tried in a short-lived child interpreter, so probing changes
    nothing in the caller. Honours `$ISOLHUB_SANDBOX_PRETEND_MISSING`.

    Example:
        >>> print(probe())  # what `isolhub doctor` shows
        isolhub sandbox: what this kernel can enforce (Linux ...)
          [...] environment    os.environ, cwd, umask
        ...

    Raises:
        Nothing: a feature that cannot be checked is reported unavailable, with the reason.
    """
    abi = _landlock.abi_version()
    nnp = prctl(PR_GET_NO_NEW_PRIVS)
    root_note = " (NPROC is not enforced for uid 0)" if os.geteuid() == 0 else ""
    namespaces = _probe_namespaces()
    found = {
        "environment": (True, "os.environ, cwd, umask"),
        "fds": (os.path.isdir("/proc/self/fd"), "via /proc/self/fd"),
        "pdeathsig": (True, "PR_SET_PDEATHSIG(SIGKILL)"),
        "rlimits": (True, "AS, CPU, FSIZE, NOFILE, CORE, NPROC" + root_note),
        "caps.memory": _caps.probe("memory"),
        "caps.tasks": (False, "set below"),
        **namespaces,
        "capabilities": (True, "capset, PR_CAPBSET_DROP"),
        "no_new_privs": (nnp >= 0, "PR_SET_NO_NEW_PRIVS"),
        "landlock": (True, f"ABI {abi}"),
        "landlock.net": (True, "TCP bind/connect denied (ABI >= 4)"),
        "landlock.scope": (True, "signals, abstract UNIX sockets (ABI >= 6)"),
        "seccomp": _seccomp.available(),
        "pidfd": _probe_pidfd(),
        "memfd_seals": _probe_memfd_seals(),
    }
    found["caps.tasks"] = _probe_tasks(namespaces["userns"][0])
    for name, reason in _kernel_gaps(abi).items():
        found[name] = (False, reason)
    entries = tuple(ProbeEntry(name, ok, detail) for name, (ok, detail) in found.items())
    kernel = f"Linux {os.uname().release} {os.uname().machine}, euid {os.geteuid()}"
    return SandboxReport(entries=entries, landlock_abi=abi, kernel=kernel)


_NS_PROBE = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
err = lambda what: what + ": " + os.strerror(ctypes.get_errno())
out = {}
u, g = os.geteuid(), os.getegid()  # before unshare: inside, unmapped ids read as 65534
if libc.unshare(0x10000000) != 0:
    out["userns"] = err("unshare(CLONE_NEWUSER)")
else:
    for name, text in (("setgroups", "deny"), ("uid_map", f"{u} {u} 1"), ("gid_map", f"{g} {g} 1")):
        try:
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        except OSError as e:
            out["userns"] = f"writing /proc/self/{name}: {e.strerror}"
            break
if libc.unshare(0x40000000) != 0:
    out["netns"] = err("unshare(CLONE_NEWNET)")
if libc.unshare(0x20000) != 0:
    out["caps.scratch"] = err("unshare(CLONE_NEWNS)")
elif libc.mount(None, b"/", None, ctypes.c_ulong(0x44000), None) != 0:
    out["caps.scratch"] = err("mount --make-rprivate /")
elif libc.mount(b"isolhub-probe", os.fsencode(sys.argv[1]), b"tmpfs", ctypes.c_ulong(14), b"size=1m") != 0:
    out["caps.scratch"] = err("mount tmpfs")
print(json.dumps(out))
"""


def _probe_namespaces() -> dict[str, tuple[bool, str]]:
    import json
    import subprocess  # probe() only: keep it out of the zygote's imports
    import tempfile

    found = {
        "userns": "unshare(CLONE_NEWUSER), own id mapped",
        "netns": "unshare(CLONE_NEWNET)",
        "caps.scratch": "tmpfs in a mount namespace of the worker's own",
    }
    try:
        with tempfile.TemporaryDirectory(prefix="isolhub-probe-") as target:
            cmd = [sys.executable, "-I", "-S", "-c", _NS_PROBE, target]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        failed = json.loads(done.stdout) if done.returncode == 0 else None
        if not isinstance(failed, dict):
            raise ValueError(done.stderr.strip()[-300:] or f"exit {done.returncode}")
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        failed = dict.fromkeys(found, f"namespace probe failed: {e}")
    return {n: (n not in failed, str(failed.get(n, detail))) for n, detail in found.items()}


def _probe_tasks(userns: bool) -> tuple[bool, str]:
    ok, detail = _caps.probe("pids")
    if ok or os.geteuid() == 0:
        return ok, detail + ("" if ok else " (and RLIMIT_NPROC does not bind uid 0)")
    if userns:
        return True, f"RLIMIT_NPROC in the user namespace (no pids cgroup: {detail})"
    return False, f"{detail}; and no user namespace for RLIMIT_NPROC"


def _probe_pidfd() -> tuple[bool, str]:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError) as e:
        return False, f"pidfd_open: {e}"
    return True, "pidfd_open"


def _probe_memfd_seals() -> tuple[bool, str]:
    from .._memfd import sealed_bytes

    try:
        os.close(sealed_bytes(b""))  # what an arena gets
    except (OSError, AttributeError) as e:
        return False, f"memfd_create / F_ADD_SEALS: {e}"
    return True, "memfd_create, F_SEAL_WRITE|GROW|SHRINK|SEAL"


def apply(
    policy: Sandbox, *, scratch: str, read_paths: Sequence[str], keep_fds: Sequence[int]
) -> AppliedReport:
    """Confine the calling process for good (see the module docstring) and report what was done.

    Must run in a freshly forked, single-threaded child, before untrusted code is imported.

    Args:
        policy: the `Sandbox` to enforce.
        scratch: an existing directory, the only writable place besides `policy.write_paths`.
        read_paths: extra readable paths for this worker, e.g. the repo snapshot.
        keep_fds: fds to keep besides 0, 1 and 2, e.g. the control socket.

    Example:
        Confinement lasts for the life of the process, so this is a child's (with every
        protection allowed missing and no caps, so that it runs on any kernel):

        >>> import os
        >>> lenient = Sandbox(memory_bytes=None, max_tasks=None, scratch_bytes=None,
        ...                   allow_missing=PROTECTIONS)
        >>> os.mkdir("scratch")
        >>> pid = os.fork()
        >>> if pid == 0:
        ...     try:
        ...         os.environ["GITHUB_TOKEN"] = "secret"
        ...         apply(lenient, scratch=os.path.abspath("scratch"), read_paths=[], keep_fds=[])
        ...         os._exit(0 if "GITHUB_TOKEN" not in os.environ else 1)
        ...     finally:
        ...         os._exit(2)
        >>> os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])     # 0: the token was gone
        0

    Raises:
        SandboxError: the process is not single-threaded, a path is missing, or a protection the
            policy asks for cannot be applied (the message names it; `missing` lists kernel gaps).
            The process may then be partly confined and must exit.
    """
    start = time.perf_counter()
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 0
    if threads != 1:
        raise SandboxError(f"apply needs a single-threaded process; this one has {threads} threads")
    requested = policy.requested()
    gaps = {n: r for n, r in _kernel_gaps(_landlock.abi_version()).items() if n in requested}
    refused = [n for n in requested if n in gaps and not policy.may_miss(n)]
    if refused:
        raise SandboxError(
            "sandbox protections unavailable on this kernel: "
            + "; ".join(f"{n} ({gaps[n]})" for n in refused)
            + f". To run without them pass Sandbox(allow_missing={set(refused)!r})",
            missing=refused,
        )
    scratch = os.path.realpath(scratch)
    if not os.path.isdir(scratch):
        raise SandboxError(f"scratch {scratch!r} is not a directory")
    readable, writable = _landlock_paths(policy, scratch, read_paths)
    applied: dict[str, str] = {}
    missing = dict(gaps)
    ppid = os.getppid()

    def fail(name: str, reason: str, cause: BaseException | None = None) -> None:
        if not policy.may_miss(name):
            raise SandboxError(f"sandbox protection {name!r} failed: {reason}") from cause
        missing[name] = reason

    def step(name: str, action: Callable[[], str], *, defer: bool = False) -> str | None:
        """Apply `name`; on failure raise or record it (or, with `defer`, return why)."""
        if name in requested and name not in gaps:
            try:
                applied[name] = action()
            except (OSError, SandboxError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                if defer:
                    return reason
                fail(name, reason, e)
        return None

    step("environment", lambda: _scrub_environment(policy, scratch))
    step("fds", lambda: _close_fds(keep_fds))
    step("pdeathsig", lambda: _set_pdeathsig(ppid))
    step("rlimits", lambda: _set_rlimits(policy))
    # cgroups are joined with the original credentials, before the user namespace.
    step("caps.memory", lambda: _caps.join("memory", policy.memory_bytes or 0))
    root = os.geteuid() == 0
    no_pids = step("caps.tasks", lambda: _caps.join("pids", policy.max_tasks or 0), defer=not root)
    if root:
        with contextlib.suppress(OSError):  # best effort: no supplementary group bits to match
            os.setgroups([])
    step("userns", lambda: _unshare_user(with_net="netns" in requested and "netns" not in gaps))
    if "userns" in applied and "netns" in requested and "netns" not in gaps:
        applied["netns"] = "new network namespace: loopback down, no interfaces"
    elif "userns" not in applied:
        step("netns", lambda: _unshare(_CLONE_NEWNET | _CLONE_NEWIPC, "without a userns (root)"))
    if "rlimits" in applied and policy.max_tasks is not None:
        # In the new user namespace NPROC counts (namespace, uid): this sandbox's tasks only.
        # Without one it would count every task of the uid, threads of other programs included.
        if "userns" in applied:
            applied["rlimits"] += f", NPROC {_lower_limit(resource.RLIMIT_NPROC, policy.max_tasks)}"
        else:
            applied["rlimits"] += ", NPROC not set (no user namespace)"
    if no_pids is not None:  # non-root: RLIMIT_NPROC in the user namespace does bind
        if "userns" in applied and policy.max_tasks is not None:
            n = _lower_limit(resource.RLIMIT_NPROC, policy.max_tasks)
            applied["caps.tasks"] = (
                f"RLIMIT_NPROC {n} in the user namespace (no pids cgroup: {no_pids})"
            )
        else:
            fail("caps.tasks", f"{no_pids}; and no user namespace for RLIMIT_NPROC")
    step("caps.scratch", lambda: _mount_scratch(scratch, policy.scratch_bytes or 0))
    step("capabilities", _drop_capabilities)
    step("no_new_privs", _set_no_new_privs)
    step("landlock", lambda: _apply_landlock(policy, gaps, applied, readable, writable))
    if "pdeathsig" in applied and get_pdeathsig() != signal.SIGKILL:
        raise SandboxError("sandbox protection 'pdeathsig' was cleared by a credential change")
    step("seccomp", lambda: _apply_seccomp(policy))  # last: it denies prctl(PDEATHSIG), unshare
    landlocked = "landlock" in applied
    return AppliedReport(
        applied=tuple((n, applied[n]) for n in PROTECTIONS if n in applied),
        missing=tuple((n, missing[n]) for n in PROTECTIONS if n in missing),
        not_requested=tuple(p for p in PROTECTIONS if p not in requested),
        readable=tuple(sorted(readable)) if landlocked else (),
        writable=tuple(sorted(writable)) if landlocked else (),
        seconds=time.perf_counter() - start,
    )


@functools.lru_cache(maxsize=8)
def _env_pattern(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)", re.IGNORECASE)


# Compiled at import, i.e. in the zygote, so forked workers do not pay for it in `apply`.
_env_pattern(_SECRET_ENV), _env_pattern(DEFAULT_ENV_ALLOW)


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less every variable that looks like a credential or a proxy setting.

    The zygote starts with this, so no token is ever in the memory image its workers inherit.
    """
    secret = _env_pattern(_SECRET_ENV)
    return {k: v for k, v in env.items() if not secret.match(k)}


def _scrub_environment(policy: Sandbox, scratch: str) -> str:
    secret, allow = _env_pattern(_SECRET_ENV), _env_pattern(policy.env_allow)
    drop = [n for n in os.environ if secret.match(n) or not allow.match(n)]
    for name in drop:
        del os.environ[name]  # unsetenv() too: C code (glibc, libcurl) sees the same
    kept = len(os.environ)
    for name in _SCRATCH_ENV:
        os.environ[name] = scratch
    _wipe_exec_environ()
    if "tempfile" in sys.modules:
        # gettempdir() caches /tmp; re-read TMPDIR
        sys.modules["tempfile"].tempdir = None  # type: ignore[attr-defined]
    os.chdir(scratch)
    os.umask(0o077)
    return f"removed {len(drop)} variables, kept {kept}; HOME, TMPDIR, caches, cwd → scratch"


def _wipe_exec_environ() -> None:
    """Zero the environment block the process image was exec'd with.

    /proc/self/environ (readable: /proc/self is) shows that block, and a forked worker inherits
    the zygote's copy, deleted variables included. setenv() first moves every kept variable to
    the heap, so nothing still points into the block.
    """
    with open("/proc/self/stat") as f:  # fields 50, 51: env_start, env_end (proc(5))
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[47]), int(fields[48])
    for name, value in list(os.environ.items()):
        os.environ[name] = value
    if 0 < start < end:
        ctypes.memset(start, 0, end - start)


def _close_fds(keep_fds: Sequence[int]) -> str:
    keep = {0, 1, 2, *map(int, keep_fds)}
    null = os.open("/dev/null", os.O_RDWR)
    while null <= 2:  # a closed 0/1/2 would let the hubconf's next open() become "stdout"
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    replaced = 0
    try:
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd in keep or fd == null:
                continue
            try:
                os.fstat(fd)
            except OSError:
                continue  # the directory fd listdir used, closed by now
            os.dup2(null, fd, inheritable=False)
            replaced += 1
    finally:
        os.close(null)
    return f"{replaced} fds replaced by /dev/null; kept {sorted(keep)}"


def _set_pdeathsig(ppid: int) -> str:
    try:
        set_pdeathsig(signal.SIGKILL)
    except OSError as e:
        raise SandboxError(str(e.strerror)) from None
    if os.getppid() != ppid:
        raise SandboxError("the parent exited before the worker was confined")
    return f"SIGKILL when parent {ppid} exits"


def _set_rlimits(policy: Sandbox) -> str:
    done = []
    for name, which, value, grace in (
        ("AS", resource.RLIMIT_AS, policy.address_space_bytes, 0),
        ("CPU", resource.RLIMIT_CPU, policy.cpu_seconds, 1),  # SIGXCPU; hard + 1 s: SIGKILL
        ("FSIZE", resource.RLIMIT_FSIZE, policy.file_size_bytes, 0),
        ("NOFILE", resource.RLIMIT_NOFILE, policy.open_files, 0),
        ("CORE", resource.RLIMIT_CORE, 0, 0),
    ):
        if value is not None:
            done.append(f"{name} {_lower_limit(which, value, grace)}")
    return ", ".join(done)


def _lower_limit(which: int, value: int, grace: int = 0) -> int:
    # Never raises a limit; the hard limit cannot be raised again once capabilities are gone.
    hard = resource.getrlimit(which)[1]
    new_hard = value + grace if hard == resource.RLIM_INFINITY else min(hard, value + grace)
    resource.setrlimit(which, (min(value, new_hard), new_hard))
    return min(value, new_hard)


def _unshare_user(*, with_net: bool) -> str:
    uid, gid = os.geteuid(), os.getegid()
    _unshare(_CLONE_NEWUSER | _CLONE_NEWIPC | (_CLONE_NEWNET if with_net else 0), "")
    # setgroups must be denied before an unprivileged gid_map; own ids only, identity mapped.
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return f"new user + IPC namespace; uid {uid} → {uid}, gid {gid} → {gid}; setgroups deny"


def _mount_scratch(scratch: str, size: int) -> str:
    """Scratch becomes a private tmpfs of `size` bytes, in a mount namespace of the worker's own.

    Also hides /sys/fs/cgroup under an empty read-only tmpfs, so the worker cannot reach the
    files that hold its own caps even where Landlock is missing.
    """
    _unshare(_CLONE_NEWNS, "")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing propagates back out
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    options = f"size={size},nr_inodes={_SCRATCH_INODES},mode=0700"
    _mount("isolhub-scratch", scratch, "tmpfs", flags, options)
    os.chdir(scratch)  # the old cwd is the directory underneath the mount
    hidden = ""
    if os.path.isdir("/sys/fs/cgroup"):
        try:
            _mount(
                "isolhub-none", "/sys/fs/cgroup", "tmpfs", flags | _MS_RDONLY, "size=4k,mode=0555"
            )
            hidden = "; /sys/fs/cgroup hidden"
        except OSError as e:
            hidden = f"; /sys/fs/cgroup not hidden ({e.strerror})"
    return f"tmpfs of {size / 1024**2:g} MiB, {_SCRATCH_INODES} inodes, own mount namespace{hidden}"


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    def arg(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    ctypes.set_errno(0)
    if libc.mount(arg(source), arg(target), arg(fstype), ctypes.c_ulong(flags), arg(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or '--make-rprivate'} on {target}: {os.strerror(err)}")


def _unshare(flags: int, detail: str) -> str:
    ctypes.set_errno(0)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({flags:#x}): {os.strerror(err)}")
    return f"new network namespace {detail}"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities() -> str:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63  # PR_CAPBSET_DROP of an unknown cap is EINVAL, which `all` reports as kept
    bounding = all(prctl(PR_CAPBSET_DROP, cap) == 0 for cap in range(last + 1))  # CAP_SETPCAP
    prctl(PR_CAP_AMBIENT, _CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capset(ctypes.byref(header), (_CapData * 2)()) != 0:
        raise SandboxError(f"capset: {os.strerror(ctypes.get_errno())}")
    check = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), check) != 0 or any(
        c.effective or c.permitted or c.inheritable for c in check
    ):
        raise SandboxError("capabilities still present after capset")
    kept = "bounding set cleared" if bounding else "bounding set kept (no CAP_SETPCAP)"
    return f"effective, permitted, inheritable, ambient empty; {kept}"


def _set_no_new_privs() -> str:
    if prctl(PR_SET_NO_NEW_PRIVS, 1) != 0 or prctl(PR_GET_NO_NEW_PRIVS) != 1:
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    return "set"


def _interpreter_paths() -> set[str]:
    """What Python and torch need to go on importing: prefixes, stdlib, site dirs, loaded libs."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths.add(os.path.dirname(os.__file__))  # the stdlib (lib-dynload comes from the maps below)
    paths |= set(site.getsitepackages())
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        paths.add(site.getusersitepackages())
    package = sys.modules["isolhub"].__file__ or ""  # isolhub itself (editable installs too)
    paths.add(os.path.dirname(os.path.abspath(package)))
    home = os.path.realpath(os.path.expanduser("~")) + os.sep
    with open("/proc/self/maps") as f:  # directories of every loaded shared object (libc, ...)
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
                directory = os.path.dirname(fields[5].rstrip("\n"))
                if not home.startswith(directory.rstrip("/") + "/"):  # never /, HOME or above
                    paths.add(directory)
    return {os.path.realpath(p) for p in paths if p and os.path.exists(p)}


def _outermost(paths: set[str]) -> set[str]:
    """Drop paths beneath another one: a Landlock rule covers the whole hierarchy."""
    ordered = sorted(paths)
    kept = [
        p
        for i, p in enumerate(ordered)
        if not any(p.startswith(q.rstrip("/") + "/") for q in ordered[:i])
    ]
    return set(kept)


def _landlock_paths(
    policy: Sandbox, scratch: str, read_paths: Sequence[str]
) -> tuple[set[str], set[str]]:
    readable = _interpreter_paths() | {p for p in _SYSTEM_READ if os.path.exists(p)}
    writable = {scratch}
    for kind, paths, into in (
        ("read", (*read_paths, *policy.read_paths), readable),
        ("write", policy.write_paths, writable),
    ):
        for path in paths:
            if not os.path.exists(path):
                raise SandboxError(f"{kind} path {path!r} does not exist")
            into.add(os.path.realpath(path))
    return _outermost(readable), _outermost(writable)


def _apply_landlock(
    policy: Sandbox, gaps: dict[str, str], applied: dict[str, str], read: set[str], write: set[str]
) -> str:
    abi = _landlock.abi_version()
    requested = policy.requested()
    deny_tcp = "landlock.net" in requested and "landlock.net" not in gaps
    scope = "landlock.scope" in requested and "landlock.scope" not in gaps
    rules = dict.fromkeys(read, _landlock.READ)
    rules |= {p: rules.get(p, 0) | _landlock.WRITE for p in write}
    rules["/dev/null"] = _landlock.FS_READ_FILE | _landlock.FS_WRITE_FILE
    _landlock.restrict_self(rules, abi=abi, deny_tcp=deny_tcp, scope=scope)
    if deny_tcp:
        applied["landlock.net"] = "TCP bind and connect denied"
    if scope:
        applied["landlock.scope"] = "no signals or abstract UNIX connects leave the sandbox"
    return f"ABI {abi}: {len(read)} read and {len(write)} write rules, nothing executable"


def _apply_seccomp(policy: Sandbox) -> str:
    arch = _seccomp.native_arch()
    program = _seccomp.build(
        arch=arch,
        deny_sockets=not policy.network,
        allow_fork=policy.allow_fork,
        own_pid=os.getpid(),
    )
    _seccomp.install(program)
    extra = ("" if policy.network else ", socket()") + ("" if policy.allow_fork else ", fork")
    return f"{len(program)} BPF instructions ({arch}): EPERM for the deny list{extra}"
