"""Landlock, the unprivileged file-system / TCP / IPC-scope LSM, through ctypes.

A Landlock *ruleset* names the access rights it handles; after `landlock_restrict_self` every
handled right is denied except where a rule grants it beneath a path. Rules stack: a process
can only ever narrow its domain, and the domain is inherited by threads and children.

Kernel ABI (include/uapi/linux/landlock.h, Documentation/userspace-api/landlock.rst):

=====  ======  ===========================================================================
ABI    Linux   adds
=====  ======  ===========================================================================
1      5.13    file-system rights (execute, read, write, make/remove entries)
2      5.19    LANDLOCK_ACCESS_FS_REFER (rename/link across directories)
3      6.2     LANDLOCK_ACCESS_FS_TRUNCATE
4      6.7     LANDLOCK_ACCESS_NET_BIND_TCP / CONNECT_TCP
5      6.10    LANDLOCK_ACCESS_FS_IOCTL_DEV
6      6.12    scopes: LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET, LANDLOCK_SCOPE_SIGNAL
7      6.15    audit logging flags (unused here)
=====  ======  ===========================================================================

What Landlock does *not* mediate (so other layers must): chmod/chown/utime/xattrs, stat and path
walks, connect() to pathname UNIX sockets, mmap(PROT_EXEC) of a readable file.

Example (in a child, since a Landlock domain lasts for the life of the process; ABI >= 1):
    >>> import os
    >>> pid = os.fork()
    >>> if pid == 0:                          # the child confines itself, then reads /tmp
    ...     try:
    ...         restrict_self({"/usr": READ}, abi=abi_version(), deny_tcp=True, scope=True)
    ...         os.listdir("/tmp")
    ...         os._exit(1)
    ...     except PermissionError:
    ...         os._exit(0)
    ...     finally:
    ...         os._exit(2)
    >>> os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])    # 0: /tmp was out of its reach
    0

Raises:
    SandboxError: from `restrict_self` when the kernel refuses a step; the message names it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Mapping

from .._errors import SandboxError
from .._libc import libc

__all__ = [
    "FS_EXECUTE",
    "FS_IOCTL_DEV",
    "FS_MAKE_BLOCK",
    "FS_MAKE_CHAR",
    "FS_MAKE_DIR",
    "FS_MAKE_FIFO",
    "FS_MAKE_REG",
    "FS_MAKE_SOCK",
    "FS_MAKE_SYM",
    "FS_READ_DIR",
    "FS_READ_FILE",
    "FS_REFER",
    "FS_REMOVE_DIR",
    "FS_REMOVE_FILE",
    "FS_TRUNCATE",
    "FS_WRITE_FILE",
    "NET_BIND_TCP",
    "NET_CONNECT_TCP",
    "READ",
    "SCOPE_ABSTRACT_UNIX_SOCKET",
    "SCOPE_SIGNAL",
    "WRITE",
    "abi_version",
    "handled_fs",
    "restrict_self",
]

# These three syscalls were added after the tables were unified, so the numbers are the same on
# every architecture (include/uapi/asm-generic/unistd.h, arch/x86/entry/syscalls/syscall_64.tbl).
_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH = 1

# File-system rights (landlock.h), bit i introduced by the ABI noted.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12  # last ABI 1 right
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

READ = FS_READ_FILE | FS_READ_DIR
# Everything but EXECUTE, device ioctls and device nodes: no path is ever executable, so execve()
# fails with EACCES even before seccomp, and mknod of devices needs CAP_MKNOD anyway.
WRITE = READ | (
    FS_WRITE_FILE
    | FS_REMOVE_DIR
    | FS_REMOVE_FILE
    | FS_MAKE_DIR
    | FS_MAKE_REG
    | FS_MAKE_SOCK
    | FS_MAKE_FIFO
    | FS_MAKE_SYM
    | FS_REFER
    | FS_TRUNCATE
)
# The only rights a rule on a non-directory may carry (else EINVAL).
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr; the kernel accepts a larger struct whose extra fields are 0,
    # so the full v6 layout is passed on every ABI with unknown fields left at zero.
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_syscall = libc.syscall


def abi_version() -> int:
    """Return the Landlock ABI version of the running kernel, 0 when Landlock is unavailable.

    Example:
        >>> abi_version() >= 1
        True
    """
    version = _syscall(
        ctypes.c_long(_SYS_CREATE_RULESET),
        None,
        ctypes.c_long(0),
        ctypes.c_long(_CREATE_RULESET_VERSION),
    )
    # ENOSYS: not built in; EOPNOTSUPP: built in but disabled at boot (lsm=).
    return max(int(version), 0)


def handled_fs(abi: int) -> int:
    """The file-system rights ABI `abi` knows, all of which a ruleset should handle."""
    if abi >= 5:
        return (FS_IOCTL_DEV << 1) - 1
    if abi >= 3:
        return (FS_TRUNCATE << 1) - 1
    if abi >= 2:
        return (FS_REFER << 1) - 1
    return (FS_MAKE_SYM << 1) - 1 if abi >= 1 else 0


def restrict_self(rules: Mapping[str, int], *, abi: int, deny_tcp: bool, scope: bool) -> int:
    """Confine the calling thread (and its future threads/children) to `rules`; return rule count.

    Args:
        rules: path → rights granted beneath it (`READ`, `WRITE`, or FS_* bits); masked to what
            `abi` handles and, for non-directories, to the rights a file rule may carry.
        abi: from `abi_version()`; decides which rights are handled.
        deny_tcp: handle TCP bind/connect with no port rule, i.e. deny all (ABI ≥ 4).
        scope: forbid signals and abstract UNIX socket connects leaving the domain (ABI ≥ 6).

    Raises:
        SandboxError: a path cannot be opened, or a Landlock call fails. The caller must have set
            no_new_privs (or hold CAP_SYS_ADMIN in its user namespace) first.
    """
    if abi < 1:
        raise SandboxError("landlock: not supported by this kernel")
    if deny_tcp and abi < 4:
        raise SandboxError(f"landlock.net: needs Landlock ABI 4, kernel has {abi}")
    if scope and abi < 6:
        raise SandboxError(f"landlock.scope: needs Landlock ABI 6, kernel has {abi}")
    handled = handled_fs(abi)
    attr = _RulesetAttr(
        handled_access_fs=handled,
        handled_access_net=(NET_BIND_TCP | NET_CONNECT_TCP) if deny_tcp else 0,
        scoped=(SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if scope else 0,
    )
    ruleset = _call("landlock", _SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    try:
        for path, rights in rules.items():
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                raise SandboxError(f"landlock: cannot open {path!r}: {e.strerror}") from e
            try:
                allowed = rights & handled
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    allowed &= _FILE_RIGHTS
                rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
                _call("landlock", _SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
            finally:
                os.close(fd)
        _call("landlock", _SYS_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return len(rules)


def _call(name: str, nr: int, *args: object) -> int:
    # Plain ints go through as C long: syscall(2) reads every argument as a full register.
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    result = int(_syscall(ctypes.c_long(nr), *cargs))
    if result < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{name}: syscall {nr} failed: {errno.errorcode.get(err, err)}")
    return result
