"""Whole objects (modules, tuples of model and helpers) shipped by value, storages out-of-band.

Trusted code only: the parent unpickles what the worker sends. Every Python module loaded from the
snapshot is pickled **by value** (cloudpickle), so the parent gets working classes and functions
without the repo ever entering its `sys.modules`; tensor storages are diverted through the arena
(`persistent_id`), so no tensor byte goes through pickle. TorchScript modules travel as
`torch.jit.save` bytes.

Example:
    >>> data, fd, layout = dumps(model, snapshot_dir)      # in the worker
    >>> loads(data, fd, layout)                              # in the parent
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from typing import Any

import cloudpickle

from ._arena import ArenaReader, ArenaWriter


def register_snapshot_modules(root: str) -> list[str]:
    """Register every loaded module whose file lies under `root` to be pickled by value."""
    root = os.path.realpath(root) + os.sep
    names = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and os.path.realpath(path).startswith(root):
            cloudpickle.register_pickle_by_value(module)
            names.append(name)
    return names


def _load_script_module(data: bytes) -> Any:
    import torch

    return torch.jit.load(io.BytesIO(data), map_location="cpu")


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, arena: ArenaWriter) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._arena = arena

    def persistent_id(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, torch.storage.TypedStorage):
            return ("typed", self._arena.storage_index(obj._untyped_storage), str(obj.dtype))
        if isinstance(obj, torch.UntypedStorage):
            return ("untyped", self._arena.storage_index(obj))
        return None

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.jit.ScriptModule):
            buf = io.BytesIO()
            torch.jit.save(obj, buf)
            return _load_script_module, (buf.getvalue(),)
        return super().reducer_override(obj)


def dumps(obj: Any) -> tuple[bytes, int | None, list[list[int]]]:
    """Pickle `obj` with storages out-of-band: `(pickle bytes, arena fd, arena layout)`."""
    buf = io.BytesIO()
    arena = ArenaWriter()
    _Pickler(buf, arena).dump(obj)
    fd, layout = arena.seal()
    return buf.getvalue(), fd, layout


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arena: ArenaReader) -> None:
        super().__init__(file)
        self._arena = arena

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if pid[0] == "typed":
            dtype = getattr(torch, pid[2].removeprefix("torch."))
            storage = self._arena.storage(pid[1])
            return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        return self._arena.storage(pid[1])


def loads(data: bytes, fd: int | None, layout: list[list[int]]) -> Any:
    """Rebuild what `dumps` produced; the arena fd is consumed (closed)."""
    return _Unpickler(io.BytesIO(data), ArenaReader(fd, layout)).load()
