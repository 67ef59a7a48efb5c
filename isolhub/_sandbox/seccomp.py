"""A seccomp-BPF deny list, assembled by hand and installed through ctypes.

Why raw BPF rather than libseccomp: the filter is one short, linear program (about 70
instructions for two architectures) that can be read top to bottom; it needs no shared library
that slim containers and wheels may lack, and nothing extra is mapped into the worker before it
is confined. What libseccomp would add (syscall names → numbers, multiplexed socketcall on
32-bit) is covered by the two tables below, which `tests/test_sandbox_primitives.py` checks
against the kernel headers when they are installed.

Every denial returns an errno (EPERM, or ENOSYS for clone3) instead of killing, so hubconf code
sees a clean `PermissionError`. Kernel ABI: Documentation/userspace-api/seccomp_filter.rst,
include/uapi/linux/seccomp.h, include/uapi/linux/filter.h.

Example (in a child, since a filter lasts for the life of the process):
    >>> import socket
    >>> from isolhub._libc import PR_SET_NO_NEW_PRIVS, prctl
    >>> pid = os.fork()
    >>> if pid == 0:
    ...     try:
    ...         prctl(PR_SET_NO_NEW_PRIVS, 1)
    ...         install(build(arch=native_arch(), deny_sockets=True, allow_fork=False,
    ...                       own_pid=os.getpid()))
    ...         socket.socket()
    ...         os._exit(1)
    ...     except PermissionError:
    ...         os._exit(0)
    ...     finally:
    ...         os._exit(2)
    >>> os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])     # 0: socket() was refused
    0

Raises:
    SandboxError: `native_arch` on an architecture without a table; `install` when the kernel
        refuses the filter (no_new_privs must be set first).
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Any

from .._errors import SandboxError
from .._libc import PR_GET_SECCOMP, PR_SET_PDEATHSIG, PR_SET_SECCOMP, prctl

__all__ = [
    "AUDIT_ARCH",
    "CLONE_NEW_ANY",
    "CLONE_THREAD",
    "DENIED",
    "SYSCALLS",
    "available",
    "build",
    "install",
    "native_arch",
]

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}  # include/uapi/linux/audit.h

# arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (aarch64).
# Numbers ≥ 424 are shared by every architecture. Absent: the syscall does not exist there.
_COMMON = {
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "process_madvise": 440,
    "mount_setattr": 442, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "fchmodat2": 452, "setxattrat": 463, "removexattrat": 466,
    "open_tree_attr": 467,
}  # fmt: skip
SYSCALLS = {
    "x86_64": _COMMON | {
        "ioctl": 16, "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
        "chmod": 90, "fchmod": 91, "ptrace": 101, "pivot_root": 155, "prctl": 157,
        "chroot": 161, "mount": 165, "umount2": 166, "init_module": 175, "delete_module": 176,
        "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
        "fchmodat": 268, "unshare": 272, "perf_event_open": 298, "prlimit64": 302,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
        "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323,
        "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
        "lremovexattr": 198, "fremovexattr": 199,
    },
    "aarch64": _COMMON | {
        "ioctl": 29, "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "fchmod": 52,
        "fchmodat": 53, "unshare": 97, "kexec_load": 104, "init_module": 105,
        "delete_module": 106, "ptrace": 117, "prctl": 167, "socket": 198, "add_key": 217,
        "request_key": 218, "keyctl": 219, "clone": 220, "execve": 221, "perf_event_open": 241,
        "prlimit64": 261, "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "finit_module": 273,
        "bpf": 280, "execveat": 281, "userfaultfd": 282, "kexec_file_load": 294,
        "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15,
        "fremovexattr": 16,
    },
}  # fmt: skip

# Denied outright. Grouped by why: reaching other processes; mounts and namespaces (nothing to
# set up after apply); kernel attack surface no model needs; exec (Landlock denies it too); chmod
# and xattr writes, which Landlock does not mediate and which the worker's uid could use on files
# it owns outside the sandbox (a read-only snapshot, the cache; shutil.copy2 tolerates the xattr
# EPERM); file handles (the "shocker" escape). utime() stays allowed: Path.touch needs it.
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "process_madvise", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "open_tree_attr", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module",
    "execve", "execveat", "chmod", "fchmod", "fchmodat", "fchmodat2",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "setxattrat", "removexattrat", "name_to_handle_at", "open_by_handle_at",
)  # fmt: skip

CLONE_THREAD = 0x00010000
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME (linux/sched.h)
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
CLONE_NEW_ANY |= 0x40000000 | 0x00000080
TIOCSTI, TIOCLINUX = 0x5412, 0x541C  # terminal input injection (asm-generic/ioctls.h)
EPERM, ENOSYS = 1, 38

_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_LD_ABS, _JEQ, _JGE, _JSET, _RET = (
    0x20,
    0x15,
    0x35,
    0x45,
    0x06,
)  # BPF_LD|W|ABS, BPF_JMP|K…, BPF_RET|K
_OFF_NR, _OFF_ARCH = 0, 4  # struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6]


def _arg_lo(i: int) -> int:
    return 16 + 8 * i  # low 32 bits of args[i] on little-endian x86_64 and aarch64


def native_arch() -> str:
    """Return "x86_64" or "aarch64" for this 64-bit process.

    Raises:
        SandboxError: any other architecture, or a 32-bit interpreter.
    """
    machine = os.uname().machine
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)
    if machine not in SYSCALLS or struct.calcsize("P") != 8:
        raise SandboxError(
            f"seccomp: no syscall table for {machine} ({struct.calcsize('P') * 8}-bit)"
        )
    return machine


def build(
    *, arch: str, deny_sockets: bool, allow_fork: bool, own_pid: int
) -> list[tuple[int, int, int, int]]:
    """Assemble the filter as (code, jt, jf, k) instructions.

    Args:
        arch: from `native_arch()`.
        deny_sockets: socket() fails for every family (existing sockets, socketpair keep working).
        allow_fork: if False, clone() without CLONE_THREAD (fork, vfork, posix_spawn) fails;
            threads still start. clone3() always gets ENOSYS (its flags sit behind a pointer the
            filter cannot read) and glibc ≥ 2.34 falls back to clone().
        own_pid: prlimit64() may only name 0 or this pid: other processes of the same uid
            (the parent) keep their limits.

    Raises:
        SandboxError: a jump does not fit in 8 bits (a bug here, never at run time).
    """
    nr = SYSCALLS[arch]
    prog: list[tuple[int, object, object, int]] = [
        (_LD_ABS, 0, 0, _OFF_ARCH),
        (_JEQ, 0, "deny", AUDIT_ARCH[arch]),  # foreign ABI (i386 int 0x80, arm32): numbers differ
        (_LD_ABS, 0, 0, _OFF_NR),
    ]
    if arch == "x86_64":
        prog.append((_JGE, "deny", 0, 0x40000000))  # x32 ABI: same arch tag, other numbers
    denied = list(DENIED) + (["socket"] if deny_sockets else [])
    if not allow_fork and arch == "x86_64":
        denied += ["fork", "vfork"]
    prog += [(_JEQ, "deny", 0, nr[name]) for name in denied if name in nr]  # chmod: x86 only
    prog.append((_JEQ, "nosys", 0, nr["clone3"]))

    def block(syscall_nr: int, arg: int, body: list[tuple[int, object, object, int]]) -> None:
        # "if nr == syscall_nr: A = args[arg]; body" where body always ends in a jump. Skipping
        # the block leaves A == nr, so blocks can follow each other.
        prog.append((_JEQ, 0, len(body) + 1, syscall_nr))
        prog.append((_LD_ABS, 0, 0, _arg_lo(arg)))
        prog.extend(body)

    block(nr["clone"], 0, [
        (_JSET, "deny", 0, CLONE_NEW_ANY),
        (_JSET, "allow", "allow" if allow_fork else "deny", CLONE_THREAD),
    ])  # fmt: skip
    block(nr["ioctl"], 1, [(_JEQ, "deny", 0, TIOCSTI), (_JEQ, "deny", "allow", TIOCLINUX)])
    block(nr["prctl"], 0, [(_JEQ, "deny", "allow", PR_SET_PDEATHSIG)])  # stay tied to the parent
    block(nr["prlimit64"], 0, [(_JEQ, "allow", 0, 0), (_JEQ, "allow", "deny", own_pid)])
    labels = {"allow": len(prog), "deny": len(prog) + 1, "nosys": len(prog) + 2}
    prog += [
        (_RET, 0, 0, _RET_ALLOW),
        (_RET, 0, 0, _RET_ERRNO | EPERM),
        (_RET, 0, 0, _RET_ERRNO | ENOSYS),
    ]

    out = []
    for pc, (code, jt, jf, k) in enumerate(prog):
        jumps: list[Any] = [labels[j] - pc - 1 if isinstance(j, str) else j for j in (jt, jf)]
        if not all(isinstance(j, int) and 0 <= j <= 255 for j in jumps):
            raise SandboxError(f"seccomp: jump out of range at instruction {pc}")
        out.append((code, int(jumps[0]), int(jumps[1]), k & 0xFFFFFFFF))
    return out


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


_SECCOMP_MODE_FILTER = 2


def available() -> tuple[bool, str]:
    """Whether this kernel and interpreter can take the filter; with a one-line reason.

    Example:
        >>> ok, why = available()
        >>> ok == why.startswith("filter mode"), why.endswith(native_arch()) or not ok
        (True, True)
    """
    try:
        arch = native_arch()
    except SandboxError as e:
        return False, str(e)
    mode = prctl(PR_GET_SECCOMP)
    if mode < 0:
        return False, f"prctl(PR_GET_SECCOMP): {os.strerror(ctypes.get_errno())}"
    return True, f"filter mode, {arch}" + (" (a filter is already installed)" if mode else "")


def install(program: list[tuple[int, int, int, int]]) -> None:
    """Attach `program` to the calling thread (and its future threads and children).

    Raises:
        SandboxError: the kernel refused it (EACCES without no_new_privs, EINVAL on a bad filter).
    """
    insns = (_SockFilter * len(program))(*[_SockFilter(*insn) for insn in program])
    fprog = _SockFprog(len(program), insns)
    if prctl(PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog)) != 0:
        raise SandboxError(
            f"seccomp: prctl(PR_SET_SECCOMP) failed: {os.strerror(ctypes.get_errno())}"
        )
