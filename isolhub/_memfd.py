"""Sealed memfds: the one writer of the files tensor storages travel in, and their seals.

A worker's arena (`_transport.arena`) and a Ray driver's copy of a relayed arena (`_pool.ray_backend`) are both made
here, so both carry the same seals, and the parent's check (`is_sealed`) is the same for both:
once sealed, nobody (the writer included) can change, grow or shrink what the reader maps.

Example:
    >>> fd = sealed_bytes(b"weights")
    >>> is_sealed(fd), os.pread(fd, 7, 0)
    (True, b'weights')
    >>> os.close(fd)
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Callable

__all__ = ["SEALS", "is_sealed", "pwrite_all", "pwrite_from", "sealed", "sealed_bytes"]

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_NAME = "isolhub-arena"
_WRITE_MAX = 1 << 30  # per write call: Linux moves at most 2 GiB - 4 KiB in one


def sealed(size: int, fill: Callable[[int], None]) -> int:
    """A new memfd of `size` bytes, written by `fill(fd)` (with `pwrite_all`/`pwrite_from`),
    then sealed with `SEALS`. The fd is closed if anything fails, `fill` included."""
    fd = os.memfd_create(_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fill(fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sealed_bytes(data: bytes | bytearray | memoryview) -> int:
    """A new sealed memfd holding exactly `data`."""
    return sealed(len(data), lambda fd: pwrite_all(fd, data, 0))


def is_sealed(fd: int) -> bool:
    """Whether `fd` carries every seal in `SEALS` (raises `OSError` for a file with no seals)."""
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data` at `offset`, on through short writes."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done : done + _WRITE_MAX], offset + done)


def pwrite_from(fd: int, address: int, nbytes: int, offset: int) -> None:
    """Write the `nbytes` bytes of memory at `address` (a storage's data) at `offset`."""
    if nbytes:
        pwrite_all(fd, memoryview((ctypes.c_char * nbytes).from_address(address)), offset)
