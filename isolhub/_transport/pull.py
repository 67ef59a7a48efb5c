"""Storages read straight out of a trusted worker's memory, into huge-page-backed fresh memory.

For module mode only (the parent already trusts that worker: it unpickles what it sends). The
worker pins the storages it pickled and sends their addresses; the parent reads them with
`process_vm_readv` into one anonymous mapping advised for transparent huge pages. On this
project's virtual machines a fresh 4 KiB page costs about as much to fault in as 2 MiB cost to
zero, so this is ~2× faster than writing into a memfd (shared memory gets no huge pages here)
and mapping that. Where the kernel refuses (`ptrace` restrictions, no such syscall), `PullError`
says so and the caller asks the worker for the usual sealed arena instead.

Example (this process plays both sides: it reads its own memory):
    >>> import os, torch
    >>> layout, pinned = pin([torch.arange(3.0).untyped_storage()])   # the worker keeps `pinned`
    >>> [storage] = read_storages(os.getpid(), layout)                 # the parent, given the pid
    >>> torch.tensor([]).set_(storage, 0, (3,), (1,))
    tensor([0., 1., 2.])
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from typing import Any

from .._errors import ProtocolError
from .._libc import Iovec, libc
from .arena import buffer_at, map_raw

__all__ = ["PullError", "mark_refused", "pin", "read_storages", "refused"]

_ALIGN = 64
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
# Below this, plain pages. Huge pages read 256 MiB in half the time of 4 KiB ones here, but a
# kernel that must compact memory to find them (THP defrag "madvise") stalls their faults: a
# ResNet-18's 45 MiB took 16-170 ms of kernel time in the parent, against a steady 31-38 ms in
# plain pages (docs/performance.md, sixth round).
_HUGE_FROM = 128 << 20
_IOV_MAX = 1024
_CHUNK = 1 << 30  # per iovec; one call moves at most 2 GiB - 4 KiB in all (`_readv` loops)
_PAIR = struct.Struct("<QQ")
_MAX_TOTAL = 1 << 44


class PullError(OSError):
    """The kernel would not let this process read the worker's memory."""


_refused = False


def refused() -> bool:
    """Whether the kernel refused `read_storages` in this process already (then, for the rest of
    its life, module results come through the worker's sealed arena without trying again)."""
    return _refused


def mark_refused() -> None:
    """Remember that the kernel refused `read_storages` here (see `refused`)."""
    global _refused
    _refused = True


def pin(storages: list[Any]) -> tuple[bytes, list[Any]]:
    """The packed `(address, nbytes)` of each CPU storage, and what must stay alive meanwhile."""
    pinned = [st if st.device.type == "cpu" else st.cpu() for st in storages]
    return b"".join(_PAIR.pack(st.data_ptr(), st.nbytes()) for st in pinned), pinned


def read_storages(pid: int, layout: Any) -> list[Any]:
    """Copy the storages `pin` described out of process `pid`: new private `UntypedStorage`s.

    Raises:
        PullError: the kernel refuses to let this process read `pid`'s memory.
        ProtocolError: the layout is malformed, or names memory the worker does not have.
    """
    import torch

    if type(layout) is not bytes or len(layout) % _PAIR.size:
        raise ProtocolError("malformed storage addresses in a reply")
    pairs = list(_PAIR.iter_unpack(layout))
    offsets, total = [], 0
    for _, nbytes in pairs:
        offsets.append(total)
        total += -(-nbytes // _ALIGN) * _ALIGN
    if total > _MAX_TOTAL:
        raise ProtocolError(f"a reply claims {total} bytes of storages")
    buf = _huge_buffer(max(total, 1))
    base = ctypes.addressof(buf)
    local: list[tuple[int, int]] = []
    remote: list[tuple[int, int]] = []
    for (address, nbytes), offset in zip(pairs, offsets, strict=True):
        for start in range(0, nbytes, _CHUNK):
            n = min(_CHUNK, nbytes - start)
            local.append((base + offset + start, n))
            remote.append((address + start, n))
    for i in range(0, len(local), _IOV_MAX):
        _readv(pid, local[i : i + _IOV_MAX], remote[i : i + _IOV_MAX])
    frombuffer, uint8 = torch.frombuffer, torch.uint8
    return [
        frombuffer(buf, dtype=uint8, count=nbytes, offset=offset).untyped_storage()
        if nbytes
        else torch.UntypedStorage(0)
        for (_, nbytes), offset in zip(pairs, offsets, strict=True)
    ]


def _readv(pid: int, local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> None:
    """Read `remote` into `local` (pairs of equal sizes), on through short reads.

    One call moves at most 2 GiB - 4 KiB (the kernel's MAX_RW_COUNT), however many pairs it
    is given; a call that moves nothing is an error, as is any failure.
    """
    while local:
        n = len(local)
        # ctypes builds each structure from its (base, length) tuple; typeshed does not say so.
        liov = (Iovec * n)(*local)  # type: ignore[misc]
        riov = (Iovec * n)(*remote)  # type: ignore[misc]
        want = sum(size for _, size in local)
        got = libc.process_vm_readv(pid, liov, n, riov, n, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err in (1, 38):  # EPERM (ptrace restrictions), ENOSYS
                raise PullError(err, f"cannot read the worker's memory: {os.strerror(err)}")
            raise ProtocolError(f"cannot read the storages the worker named: {os.strerror(err)}")
        if got == 0 or got > want:
            raise ProtocolError(f"read {got} of the {want} storage bytes the worker named")
        local, remote = _after(local, got), _after(remote, got)


def _after(pairs: list[tuple[int, int]], done: int) -> list[tuple[int, int]]:
    """What is left of `(address, size)` pairs once their first `done` bytes are read."""
    for i, (address, size) in enumerate(pairs):
        if done < size:
            return [(address + done, size - done), *pairs[i + 1 :]]
        done -= size
    return []


def _huge_buffer(size: int) -> ctypes.Array[ctypes.c_char]:
    """Fresh private anonymous memory of `size` bytes, 2 MiB-aligned and, from `_HUGE_FROM`
    bytes, advised for huge pages; unmapped when the last storage on it is gone."""
    span = size + _HUGE
    try:
        raw = map_raw(span, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as e:
        raise ProtocolError(
            f"cannot allocate {size} bytes for the worker's storages: {e.strerror}"
        ) from None
    start = (raw + _HUGE - 1) & ~(_HUGE - 1)
    if size >= _HUGE_FROM:
        libc.madvise(start, size, _MADV_HUGEPAGE)  # advice: where refused, plain pages
    return buffer_at(start, size, mapping=(raw, span))
