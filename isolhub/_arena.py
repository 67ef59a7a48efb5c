"""Tensor storages moved between processes through one sealed memfd.

The worker copies every storage (deduplicated, so tied weights stay tied) into one memfd, seals it
against writing, growing and shrinking, and passes the single fd with `SCM_RIGHTS`. The parent
checks the seals, maps it `MAP_PRIVATE` (its writes stay private, and the worker can no longer
change or truncate what the parent sees) and builds tensors on the mapping with no copy.

Example (worker side, then parent side):
    >>> writer = ArenaWriter()
    >>> meta = writer.tensor_meta(torch.ones(3))
    >>> fd, layout = writer.seal()
    >>> ArenaReader(fd, layout).tensor(meta)
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import weakref
from typing import Any

from ._errors import ProtocolError

_ALIGN = 64
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_DTYPES = (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128 "
    "uint16 uint32 uint64 float8_e4m3fn float8_e5m2"
).split()


def _torch() -> Any:
    import torch

    return torch


class ArenaWriter:
    """Collects storages in the worker and writes them into one sealed memfd."""

    def __init__(self) -> None:
        self._index: dict[tuple[str, int, int], int] = {}
        self._storages: list[Any] = []

    def storage_index(self, storage: Any) -> int:
        """The arena index of an `UntypedStorage`, adding it on first sight."""
        if storage.device.type != "cpu":
            storage = storage.cpu()
        nbytes = storage.nbytes()
        # Empty storages share data_ptr 0; keep each one apart.
        key = (str(storage.device), storage.data_ptr(), nbytes) if nbytes else ("", id(storage), 0)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self._storages)
            self._storages.append(storage)
        return idx

    def tensor_meta(self, t: Any) -> dict[str, Any]:
        """Plain-value description of a dense tensor whose storage goes into the arena."""
        torch = _torch()
        if t.is_sparse or t.layout != torch.strided:
            raise TypeError(f"cannot transport a tensor with layout {t.layout}")
        if t.device.type != "cpu":
            t = t.cpu()
        return {
            "s": self.storage_index(t.untyped_storage()),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset(),
            "grad": bool(t.requires_grad),
        }

    def seal(self) -> tuple[int | None, list[list[int]]]:
        """Write the storages into a new sealed memfd: `(fd or None, [[offset, nbytes], ...])`."""
        layout: list[list[int]] = []
        size = 0
        for st in self._storages:
            layout.append([size, st.nbytes()])
            size += -(-st.nbytes() // _ALIGN) * _ALIGN
        if size == 0:
            return None, layout
        fd = os.memfd_create("isolhub-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            for st, (offset, nbytes) in zip(self._storages, layout, strict=True):
                _pwrite_all(fd, st.data_ptr(), nbytes, offset)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd, layout


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_private(fd: int, size: int) -> ctypes.Array[ctypes.c_char]:
    """Map `fd` copy-on-write; unmapped when the last tensor on it is gone.

    Python's `mmap` keeps a duplicate of the fd open for the mapping's life; a raw mapping
    does not, so a transfer leaves the parent's fd count unchanged.
    """
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    buf = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(buf, _libc.munmap, addr, size)
    return buf


def _pwrite_all(fd: int, address: int, nbytes: int, offset: int) -> None:
    if nbytes == 0:
        return
    view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
    done = 0
    while done < nbytes:
        done += os.pwrite(fd, view[done : done + (1 << 30)], offset + done)


class ArenaReader:
    """Maps a sealed arena in the parent and builds tensors on it (no copy).

    Everything the worker claims (seals, offsets, sizes, dtypes, strides) is checked first:
    a hostile worker gets a `ProtocolError`, never a crash or a view of other memory.
    """

    def __init__(self, fd: int | None, layout: list[list[int]]) -> None:
        torch = _torch()
        self._storages: list[Any] = []
        if fd is None:
            if any(n for _, n in layout):
                raise ProtocolError("arena layout names bytes but no arena fd was passed")
            self._storages = [torch.UntypedStorage(0) for _ in layout]
            return
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & _SEALS != _SEALS:
                raise ProtocolError("the worker's arena is not sealed; refusing to map it")
            size = os.fstat(fd).st_size
            mm = _map_private(fd, size)
        except OSError as e:
            raise ProtocolError(f"cannot map the worker's arena: {e}") from e
        finally:
            os.close(fd)
        for item in layout:
            if not (
                isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item)
            ):
                raise ProtocolError("malformed arena layout")
            offset, nbytes = item
            if offset < 0 or nbytes < 0 or offset + nbytes > size:
                raise ProtocolError(
                    f"arena entry [{offset}, {nbytes}] lies outside the {size}-byte arena"
                )
            if nbytes == 0:
                self._storages.append(torch.UntypedStorage(0))
            else:
                view = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
                self._storages.append(view.untyped_storage())

    def storage(self, index: Any) -> Any:
        """The `UntypedStorage` at `index`."""
        if type(index) is not int or not 0 <= index < len(self._storages):
            raise ProtocolError(f"no arena storage {index!r}")
        return self._storages[index]

    def tensor(self, meta: Any) -> Any:
        """Rebuild the tensor `ArenaWriter.tensor_meta` described."""
        torch = _torch()
        try:
            dtype_name, shape, stride = meta["dtype"], meta["shape"], meta["stride"]
            offset, grad = meta["offset"], meta["grad"]
            storage = self.storage(meta["s"])
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"malformed tensor description: {e}") from None
        if dtype_name not in _DTYPES:
            raise ProtocolError(f"unsupported tensor dtype {dtype_name!r}")
        dtype = getattr(torch, dtype_name)
        ints = [offset, *shape, *stride]
        if not all(type(v) is int for v in ints) or len(shape) != len(stride) or offset < 0:
            raise ProtocolError("malformed tensor shape, stride or offset")
        if any(v < 0 for v in shape + stride):
            raise ProtocolError("negative tensor shape or stride")
        itemsize = torch.empty(0, dtype=dtype).element_size()
        extent = (
            0
            if 0 in shape
            else offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
        )
        if extent * itemsize > storage.nbytes():
            raise ProtocolError("tensor description reaches past its storage")
        t = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
        if grad:
            t.requires_grad_(True)
        return t
