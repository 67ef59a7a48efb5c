"""Tensor storages moved between processes through one sealed memfd.

The worker copies every storage (deduplicated, so tied weights stay tied) into one memfd, seals it
against writing, growing and shrinking, and passes the single fd with `SCM_RIGHTS`. The parent
checks the seals, maps it `MAP_PRIVATE` (its writes stay private, and the worker can no longer
change or truncate what the parent sees) and builds tensors on the mapping with no copy.

Example (worker side, then parent side):
    >>> import torch
    >>> writer = ArenaWriter()
    >>> meta = writer.tensor_meta(torch.ones(3))
    >>> fd, layout = writer.seal()
    >>> ArenaReader(fd, layout).tensor(meta)
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import ctypes
import itertools
import math
import mmap
import os
import struct
import weakref
from typing import Any

from .._errors import ProtocolError
from .._libc import libc
from .._memfd import is_sealed, pwrite_all, pwrite_from, sealed

__all__ = ["ArenaReader", "ArenaWriter", "buffer_at", "map_raw"]

_ALIGN = 64
# A transfer this small travels inline (no memfd); storages up to _GATHER_MAX are gathered into
# writes of about _RUN_MAX bytes instead of one pwrite each.
_INLINE_MAX = 256 << 10
_GATHER_MAX = 64 << 10
_RUN_MAX = 4 << 20
_DTYPES = (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex64 complex128 "
    "uint16 uint32 uint64 float8_e4m3fn float8_e5m2"
).split()


_DTYPE_NAMES: dict[Any, str] = {}
# Packed tensor description: storage index, dtype (index in _DTYPES), ndim, requires_grad,
# storage offset, then ndim sizes and ndim strides; all unsigned, so none can be negative.
_PACKED_HEAD = struct.Struct("<IBB?Q")
_PACKED_HEAD_SIZE = _PACKED_HEAD.size
_LAYOUT_PAIR = struct.Struct("<QQ")
_MAX_PACKED_DIMS = 64
_INT64_LIMIT = 1 << 63
# As many [offset, nbytes] pairs as the codec's item cap lets a list layout hold.
_MAX_LAYOUT_ENTRIES = 10_000_000 // 3
_DTYPE_CODES: dict[Any, int] = {}
_SEQUENCES = (list, tuple)
_DTYPE_INFO: dict[str, tuple[Any, int]] = {}  # name -> (torch dtype, item size)


def _torch() -> Any:
    import torch

    return torch


def _empty(*args: Any, **kwargs: Any) -> Any:
    """`torch.empty`, bound on first use (the worker's zygote imports this module early)."""
    global _empty
    _empty = _torch().empty
    return _empty(*args, **kwargs)


_CODE_INFO: list[tuple[Any, int] | None] = []


def _code_info(code: int) -> tuple[Any, int] | None:
    """`(dtype, item size)` for a packed dtype code, None for an unknown one."""
    if not _CODE_INFO:
        _CODE_INFO.extend(
            _dtype_info(name) if hasattr(_torch(), name) else None for name in _DTYPES
        )
    return _CODE_INFO[code] if code < len(_CODE_INFO) else None


def _init_dtype_codes() -> None:
    torch = _torch()
    for code, name in enumerate(_DTYPES):
        dtype = getattr(torch, name, None)
        if dtype is not None:
            _DTYPE_CODES[dtype] = code


def _dtype_name(dtype: Any) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def _dtype_info(name: str) -> tuple[Any, int] | None:
    info = _DTYPE_INFO.get(name)
    if info is None and name in _DTYPES:
        torch = _torch()
        dtype = getattr(torch, name)
        info = _DTYPE_INFO[name] = (dtype, torch.empty(0, dtype=dtype).element_size())
    return info


class ArenaWriter:
    """Collects storages in the worker and writes them into one sealed memfd.

    Small transfers (`_INLINE_MAX` bytes in all) skip the memfd: their bytes travel inline in
    the layout, which saves the memfd's system calls on each small remote call.
    """

    def __init__(self) -> None:
        self._index: dict[tuple[str, int, int], int] = {}
        self._storages: list[Any] = []

    @property
    def storages(self) -> list[Any]:
        """The storages collected so far, in index order."""
        return self._storages

    def storage_index(self, storage: Any) -> int:
        """The arena index of an `UntypedStorage`, adding it on first sight."""
        if storage.device.type != "cpu":
            storage = storage.cpu()
        return self._cpu_storage_index(storage)

    def _cpu_storage_index(self, storage: Any) -> int:
        nbytes = storage.nbytes()
        # Empty storages share data_ptr 0; keep each one apart.
        key = ("cpu", storage.data_ptr(), nbytes) if nbytes else ("", id(storage), 0)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self._storages)
            self._storages.append(storage)
        return idx

    def tensor_meta(self, t: Any) -> dict[str, Any]:
        """Plain-value description of a dense tensor whose storage goes into the arena."""
        torch = _torch()
        if t.layout != torch.strided:
            raise TypeError(f"cannot transport a tensor with layout {t.layout}")
        if not t.is_cpu:
            t = t.cpu()
        return {
            "s": self.storage_index(t.untyped_storage()),
            "dtype": _dtype_name(t.dtype),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset(),
            "grad": t.requires_grad,
        }

    def tensor_packed(self, t: Any) -> bytes | None:
        """`tensor_meta` packed into bytes (`ArenaReader.tensor_packed` reads it), or None.

        About four times cheaper to encode and decode than the dict for the many small
        tensors of a state dict. None for what the packing cannot hold (a dtype it does not
        know, more than 64 dimensions); `tensor_meta` carries those.
        """
        torch = _torch()
        if t.layout != torch.strided:
            raise TypeError(f"cannot transport a tensor with layout {t.layout}")
        if not t.is_cpu:
            t = t.cpu()
        if not _DTYPE_CODES:
            _init_dtype_codes()
        code = _DTYPE_CODES.get(t.dtype)
        ndim = t.dim()
        if code is None or ndim > _MAX_PACKED_DIMS:
            return None
        index = self._cpu_storage_index(t.untyped_storage())  # t is on the CPU
        return _packer(ndim).pack(
            index, code, ndim, t.requires_grad, t.storage_offset(), *t.shape, *t.stride()
        )

    def seal(self) -> tuple[int | None, Any]:
        """Write the storages into a new sealed memfd: `(fd or None, layout)`.

        With a memfd the layout is `[offset, nbytes]` pairs packed into bytes (decoding 500
        two-item lists costs more than the rest of a state dict's metadata); for a small
        transfer with no memfd it is a list of each storage's bytes (`[0, 0]` for empty ones).
        """
        layout: list[Any] = []
        size = 0
        for st in self._storages:
            nbytes = st.nbytes()
            layout.append([size, nbytes])
            size += -(-nbytes // _ALIGN) * _ALIGN
        if size == 0:
            return None, layout
        if size <= _INLINE_MAX:
            return None, [
                ctypes.string_at(st.data_ptr(), n) if n else item
                for st, item in zip(self._storages, layout, strict=True)
                for n in (item[1],)
            ]
        storages = self._storages
        fd = sealed(size, lambda fd: _write_storages(fd, storages, layout))
        return fd, struct.pack(f"<{2 * len(layout)}Q", *itertools.chain.from_iterable(layout))


def _write_storages(fd: int, storages: list[Any], layout: list[list[int]]) -> None:
    """Copy each storage to its offset; runs of small ones are gathered into one write."""
    run = bytearray()
    run_start = 0
    for st, (offset, nbytes) in zip(storages, layout, strict=True):
        if nbytes == 0:
            continue
        if nbytes > _GATHER_MAX:
            if run:
                pwrite_all(fd, run, run_start)
                run = bytearray()
            pwrite_from(fd, st.data_ptr(), nbytes, offset)
            continue
        if not run:
            run_start = offset
        elif run_start + len(run) < offset:
            run += bytes(offset - run_start - len(run))  # the alignment gap (zeros already)
        run += ctypes.string_at(st.data_ptr(), nbytes)
        if len(run) >= _RUN_MAX:
            pwrite_all(fd, run, run_start)
            run = bytearray()
    if run:
        pwrite_all(fd, run, run_start)


_MAP_FAILED = ctypes.c_void_p(-1).value


def map_raw(length: int, flags: int, fd: int = -1) -> int:
    """The address of a new read-write mapping (`mmap(2)` itself; raises `OSError`).

    Python's `mmap` keeps a duplicate of the fd open for the mapping's life; a raw mapping
    does not, so a transfer leaves the parent's fd count unchanged.
    """
    addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(addr)


def buffer_at(
    addr: int, size: int, mapping: tuple[int, int] | None = None
) -> ctypes.Array[ctypes.c_char]:
    """`size` bytes at `addr` as a buffer; `mapping` (address, length; default the buffer's own
    bytes) is unmapped when the buffer, and so the last tensor on it, is gone."""
    buf = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(buf, libc.munmap, *(mapping or (addr, size)))
    return buf


def _map_private(fd: int, size: int) -> ctypes.Array[ctypes.c_char]:
    """Map `fd` copy-on-write; unmapped when the last tensor on it is gone."""
    return buffer_at(map_raw(size, mmap.MAP_PRIVATE, fd), size)


class ArenaReader:
    """Maps a sealed arena in the parent and builds tensors on it (no copy).

    Everything the worker claims (seals, offsets, sizes, dtypes, strides) is checked first:
    a hostile worker gets a `ProtocolError`, never a crash or a view of other memory. Inline
    entries (bytes, for small transfers) are copied into private writable buffers.
    """

    def __init__(
        self,
        fd: int | None,
        layout: Any,
        max_bytes: int | None = None,
        max_elements: int | None = None,
    ) -> None:
        torch = _torch()
        self._storages: list[Any] = []
        # Tensor elements the rest of this reply may describe (None: no cap).
        self._elements_left = max_elements
        if fd is None:
            if type(layout) is bytes:
                layout = _unpack_layout(layout)
            for item in layout:
                if type(item) is bytes:
                    self._storages.append(_inline_storage(torch, item))
                elif isinstance(item, list) and len(item) == 2 and item[1] == 0:
                    self._storages.append(torch.UntypedStorage(0))
                elif isinstance(item, list) and len(item) == 2 and item[1]:
                    raise ProtocolError("arena layout names bytes but no arena fd was passed")
                else:
                    raise ProtocolError("malformed arena layout")
            return
        try:
            if not is_sealed(fd):
                raise ProtocolError("the worker's arena is not sealed; refusing to map it")
            size = os.fstat(fd).st_size
            if max_bytes is not None and size > max_bytes:
                raise ProtocolError(
                    f"the worker's arena is {size} bytes, over the {max_bytes}-byte cap on a "
                    "reply (Sandbox.max_reply_bytes)"
                )
            mm = _map_private(fd, size)
        except OSError as e:
            raise ProtocolError(f"cannot map the worker's arena: {e}") from e
        finally:
            os.close(fd)
        frombuffer, uint8, storages = torch.frombuffer, torch.uint8, self._storages
        if type(layout) is bytes:
            # Packed pairs (ArenaWriter.seal): unsigned ints already, only the bounds to check.
            for offset, nbytes in _iter_layout(layout):
                if offset + nbytes > size:
                    raise ProtocolError(
                        f"arena entry [{offset}, {nbytes}] lies outside the {size}-byte arena"
                    )
                if nbytes:
                    storages.append(
                        frombuffer(mm, dtype=uint8, count=nbytes, offset=offset).untyped_storage()
                    )
                else:
                    storages.append(torch.UntypedStorage(0))
            return
        for item in layout:
            if type(item) is bytes:
                storages.append(_inline_storage(torch, item))
                continue
            if not (
                isinstance(item, list)
                and len(item) == 2
                and type(item[0]) is int
                and type(item[1]) is int
            ):
                raise ProtocolError("malformed arena layout")
            offset, nbytes = item
            if offset < 0 or nbytes < 0 or offset + nbytes > size:
                raise ProtocolError(
                    f"arena entry [{offset}, {nbytes}] lies outside the {size}-byte arena"
                )
            if nbytes == 0:
                storages.append(torch.UntypedStorage(0))
            else:
                view = frombuffer(mm, dtype=uint8, count=nbytes, offset=offset)
                storages.append(view.untyped_storage())

    @classmethod
    def of_storages(cls, storages: list[Any]) -> ArenaReader:
        """A reader over storages already in this process (`_transport.pull.read_storages`)."""
        reader = cls(None, [])
        reader._storages = storages
        return reader

    def storage(self, index: Any) -> Any:
        """The `UntypedStorage` at `index`."""
        if type(index) is not int or not 0 <= index < len(self._storages):
            raise ProtocolError(f"no arena storage {index!r}")
        return self._storages[index]

    def tensor(self, meta: Any) -> Any:
        """Rebuild the tensor `ArenaWriter.tensor_meta` described."""
        try:
            dtype_name, shape, stride = meta["dtype"], meta["shape"], meta["stride"]
            offset, grad = meta["offset"], meta["grad"]
            storage = self.storage(meta["s"])
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"malformed tensor description: {e}") from None
        info = _dtype_info(dtype_name) if type(dtype_name) is str else None
        if info is None:
            raise ProtocolError(f"unsupported tensor dtype {dtype_name!r}")
        dtype, itemsize = info
        if (
            type(offset) is not int
            or type(shape) not in _SEQUENCES
            or type(stride) not in _SEQUENCES
            or len(shape) != len(stride)
            or offset < 0
            or not all(type(v) is int for v in shape)
            or not all(type(v) is int for v in stride)
        ):
            raise ProtocolError("malformed tensor shape, stride or offset")
        extent = offset + 1
        for n, s in zip(shape, stride, strict=True):
            if n < 0 or s < 0:
                raise ProtocolError("negative tensor shape or stride")
            extent += (n - 1) * s
        if 0 not in shape and extent * itemsize > storage.nbytes():
            raise ProtocolError("tensor description reaches past its storage")
        return self._build(dtype, storage, offset, shape, stride, grad)

    def _build(
        self, dtype: Any, storage: Any, offset: int, shape: Any, stride: Any, grad: Any
    ) -> Any:
        """The tensor a checked description names; what torch refuses is a `ProtocolError`."""
        if self._elements_left is not None:
            self._elements_left -= math.prod(shape)
            if self._elements_left < 0:
                raise ProtocolError(
                    "the reply describes more tensor elements than the cap on one reply "
                    "(Sandbox.max_reply_elements); a stride-0 view counts at its full size"
                )
        if grad and not (dtype.is_floating_point or dtype.is_complex):
            raise ProtocolError(f"a {dtype} tensor cannot require grad")
        try:
            t = _empty(0, dtype=dtype).set_(storage, offset, shape, stride)
            if grad:
                t.requires_grad_(True)
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"malformed tensor description: {e}") from None
        return t

    def tensor_packed(self, data: Any) -> Any:
        """Rebuild the tensor `ArenaWriter.tensor_packed` described (checked as `tensor`)."""
        if type(data) is not bytes or len(data) < _PACKED_HEAD_SIZE:
            raise ProtocolError("malformed tensor description")
        ndim = data[5]
        if ndim > _MAX_PACKED_DIMS or len(data) != _PACKED_HEAD_SIZE + 16 * ndim:
            raise ProtocolError("malformed tensor description")
        index, code, _, grad, offset, *dims = (_PACKERS.get(ndim) or _packer(ndim)).unpack(data)
        info = _code_info(code)
        if info is None:
            raise ProtocolError(f"unsupported tensor dtype code {code}")
        dtype, itemsize = info
        if offset >= _INT64_LIMIT or (dims and max(dims) >= _INT64_LIMIT):
            raise ProtocolError("tensor size, stride or offset out of range")
        shape, stride = dims[:ndim], dims[ndim:]
        storages = self._storages
        if index >= len(storages):
            raise ProtocolError(f"no arena storage {index!r}")
        storage = storages[index]
        if 0 not in shape:
            extent = offset + 1
            for n, s in zip(shape, stride, strict=True):
                extent += (n - 1) * s
            if extent * itemsize > storage.nbytes():
                raise ProtocolError("tensor description reaches past its storage")
        return self._build(dtype, storage, offset, shape, stride, grad)

    def tensors_packed(self, run: Any) -> list[Any]:
        """The tensors of a run of `tensor_packed` descriptions laid end to end."""
        if type(run) is not bytes:
            raise ProtocolError("malformed tensor descriptions")
        out, pos, end, one = [], 0, len(run), self.tensor_packed
        while pos < end:
            if pos + _PACKED_HEAD_SIZE > end:
                raise ProtocolError("truncated tensor description")
            stop = pos + _PACKED_HEAD_SIZE + 16 * run[pos + 5]
            out.append(one(run[pos:stop]))  # a short last slice fails its length check
            pos = stop
        return out


_PACKERS: dict[int, struct.Struct] = {}


def _packer(ndim: int) -> struct.Struct:
    packer = _PACKERS.get(ndim)
    if packer is None:
        packer = _PACKERS[ndim] = struct.Struct(f"{_PACKED_HEAD.format}{2 * ndim}Q")
    return packer


def _iter_layout(data: bytes) -> Any:
    """`(offset, nbytes)` pairs from a packed layout (`ArenaWriter.seal`)."""
    if len(data) % 16 or len(data) // 16 > _MAX_LAYOUT_ENTRIES:
        raise ProtocolError("malformed arena layout")
    return _LAYOUT_PAIR.iter_unpack(data)


def _unpack_layout(data: bytes) -> list[list[int]]:
    """`[offset, nbytes]` lists from a packed layout, as a list layout holds them."""
    return [[offset, nbytes] for offset, nbytes in _iter_layout(data)]


def _inline_storage(torch: Any, data: bytes) -> Any:
    if not data:
        return torch.UntypedStorage(0)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()
