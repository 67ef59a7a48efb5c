"""The C library, loaded once, with the prototypes of every call isolhub makes into it.

One handle (`libc`, errno kept) serves the zygote, the sandbox, seccomp, Landlock, the arena and
the pull transport. A function called through ctypes without `argtypes` gets plain Python ints as
C `int`; `prctl(2)` and `syscall(2)` are variadic and read their arguments as full registers
(`unsigned long`), so they are only called here, through `prctl`, or with `ctypes.c_long` values.

Example:
    >>> prctl(PR_GET_NO_NEW_PRIVS) in (0, 1)
    True
    >>> get_pdeathsig()  # the zygote's children call set_pdeathsig(signal.SIGKILL)
    0
"""

from __future__ import annotations

import ctypes
import os
import signal

__all__ = [
    "PR_CAPBSET_DROP",
    "PR_CAP_AMBIENT",
    "PR_GET_NO_NEW_PRIVS",
    "PR_GET_PDEATHSIG",
    "PR_GET_SECCOMP",
    "PR_SET_NO_NEW_PRIVS",
    "PR_SET_NAME",
    "PR_SET_PDEATHSIG",
    "PR_SET_SECCOMP",
    "Iovec",
    "get_pdeathsig",
    "libc",
    "prctl",
    "set_pdeathsig",
    "set_thread_name",
]

# prctl options (linux/prctl.h).
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG = 1, 2
PR_SET_NAME = 15
PR_GET_SECCOMP, PR_SET_SECCOMP = 21, 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS, PR_GET_NO_NEW_PRIVS = 38, 39
PR_CAP_AMBIENT = 47


class Iovec(ctypes.Structure):
    """`struct iovec`, for `process_vm_readv`."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]
libc.syscall.restype = ctypes.c_long


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    """`prctl(option, arg2, arg3, 0, 0)` with every argument full width; errno is cleared first.

    Returns what the kernel returned (-1 on failure, with `ctypes.get_errno()` set).
    """
    ctypes.set_errno(0)
    return int(
        libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        )
    )


def set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent (thread) exits.

    Raises:
        OSError: the kernel refused (a seccomp filter denies it once a sandbox is in place).
    """
    if prctl(PR_SET_PDEATHSIG, int(sig)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def get_pdeathsig() -> int:
    """The signal this process gets when its parent exits; 0 for none."""
    out = ctypes.c_int(-1)
    zero = ctypes.c_ulong(0)
    libc.prctl(ctypes.c_int(PR_GET_PDEATHSIG), ctypes.byref(out), zero, zero, zero)
    return out.value


_NAMES: dict[bytes, ctypes.Array[ctypes.c_char]] = {}  # kept alive: the kernel copies, but once


def set_thread_name(name: bytes) -> None:
    """Name the calling thread (`/proc/self/task/TID/comm`; the kernel keeps 15 bytes).

    One `prctl` (the buffer of each name is made once); a refusal is ignored.

    Example:
        >>> import pathlib, threading
        >>> def named():
        ...     set_thread_name(b"isolhub:doc")
        ...     comm = pathlib.Path(f"/proc/self/task/{threading.get_native_id()}/comm")
        ...     print(comm.read_text().strip())
        >>> t = threading.Thread(target=named); t.start(); t.join()
        isolhub:doc
    """
    buf = _NAMES.get(name)
    if buf is None:
        buf = _NAMES[name] = ctypes.create_string_buffer(name[:15])
    prctl(PR_SET_NAME, ctypes.addressof(buf))
