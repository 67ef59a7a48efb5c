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
import marshal
import os
import pickle
import sys
import types
from collections import ChainMap
from typing import Any

import cloudpickle

from ._arena import ArenaReader, ArenaWriter
from ._pull import pin


def register_snapshot_modules(root: str) -> list[str]:
    """Register every loaded module whose file lies under `root` to be pickled by value."""
    root = os.path.realpath(root) + os.sep
    names = []
    for name, module in _modules_since_mark():
        path = getattr(module, "__file__", None)
        if path and _realpath(path).startswith(root):
            cloudpickle.register_pickle_by_value(module)
            names.append(name)
    return names


# Where sys.modules stood when the worker started: (its length, newest name, newest module).
_MARK: tuple[int, str, Any] | None = None


def mark_loaded_modules() -> None:
    """Remember what is loaded now; `register_snapshot_modules` then looks only at newer ones.

    A worker inherits ~1,100 modules from the zygote. Reading each module object writes its
    reference count, which copies the page holding it (~8 ms of copy-on-write faults per
    module-mode load); the repo's modules are all imported after this mark.
    """
    global _MARK
    name = next(reversed(sys.modules))
    _MARK = (len(sys.modules), name, sys.modules[name])


def _modules_since_mark() -> list[tuple[str, Any]]:
    """The modules loaded since `mark_loaded_modules` (newest first), or all of them.

    `sys.modules` keeps insertion order, so newer modules sit after the mark. Anything else
    (the marked module gone or replaced, an older module removed) means all of them.
    """
    if _MARK is None:
        return list(sys.modules.items())
    count, mark_name, mark_module = _MARK
    newer: list[tuple[str, Any]] = []
    try:
        for name in reversed(sys.modules):
            if name == mark_name:
                if sys.modules[name] is mark_module and len(newer) == len(sys.modules) - count:
                    return newer
                break
            newer.append((name, sys.modules[name]))
    except (RuntimeError, KeyError):  # a thread of the repo's importing meanwhile
        pass
    return list(sys.modules.items())


# os.path.realpath of every module file costs ~25 ms with torch loaded (an lstat per path
# component, in Python), on each module-mode call. Absolute paths are resolved once and
# remembered; the zygote resolves those of everything it preloads, so workers inherit them.
_REALPATHS: dict[str, str] = {}


def _realpath(path: str) -> str:
    real = _REALPATHS.get(path)
    if real is None:
        real = os.path.realpath(path)
        if os.path.isabs(path):  # a relative one depends on the working directory
            _REALPATHS[path] = real
    return real


def prime_module_paths() -> None:
    """Resolve the file of every module loaded now (the zygote calls this before forking)."""
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            _realpath(path)


def _load_script_module(data: bytes) -> Any:
    import torch

    return torch.jit.load(io.BytesIO(data), map_location="cpu")


_STORAGE_TYPES: tuple[type, ...] = ()


def _storage_types() -> tuple[type, ...]:
    global _STORAGE_TYPES
    if not _STORAGE_TYPES:
        import torch

        _STORAGE_TYPES = (torch.storage.TypedStorage, torch.UntypedStorage, torch.Tensor)
    return _STORAGE_TYPES


def _code_reduce(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    """A code object as `marshal` bytes (what a .pyc holds): file, line numbers and all.

    cloudpickle >= 3.1 replaces every by-value code object's `co_filename` with
    `"<dynamic-code>"`, which loses tracebacks' source lines, `inspect.getsource` and
    `torch.jit.script`. Parent and worker run one interpreter, so marshal's format matches.
    """
    try:
        return marshal.loads, (marshal.dumps(code),)
    except ValueError:  # a constant marshal cannot hold (code built by hand): cloudpickle's way
        make, args = cloudpickle.cloudpickle._code_reduce(code)
        return _code_in_file, (make, args, code.co_filename)


def _code_in_file(make: Any, args: tuple[Any, ...], filename: str) -> types.CodeType:
    return make(*args).replace(co_filename=filename)


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)

    def __init__(self, file: io.BytesIO, arena: ArenaWriter) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._arena = arena
        self._types = _storage_types()

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled: most are neither storages nor tensors.
        typed, untyped, tensor = self._types
        cls = type(obj)
        if cls is tensor:
            packed = _plain_tensor_packed(self._arena, obj)
            return None if packed is None else ("tensor", packed)
        if cls is untyped:
            return ("untyped", self._arena.storage_index(obj))
        if not isinstance(obj, (typed, untyped)):
            return None
        if isinstance(obj, typed):
            storage: Any = obj
            return (
                "typed",
                self._arena.storage_index(storage._untyped_storage),
                str(storage.dtype),
            )
        return ("untyped", self._arena.storage_index(obj))

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.jit.ScriptModule):
            buf = io.BytesIO()
            torch.jit.save(obj, buf)
            return _load_script_module, (buf.getvalue(),)
        return super().reducer_override(obj)


def dumps(obj: Any) -> tuple[bytes, int | None, Any]:
    """Pickle `obj` with storages out-of-band: `(pickle bytes, arena fd, arena layout)`."""
    data, arena = _pickled(obj)
    fd, layout = arena.seal()
    return data, fd, layout


def dumps_pinned(obj: Any) -> tuple[bytes, bytes, list[Any]]:
    """Pickle `obj`, its storages left in place: `(pickle bytes, their addresses, pinned)`.

    The parent reads them out of this process (`loads_pulled`); keep `pinned` until it has.
    """
    data, arena = _pickled(obj)
    addresses, pinned = pin(arena.storages)
    return data, addresses, pinned


def _pickled(obj: Any) -> tuple[bytes, ArenaWriter]:
    buf = io.BytesIO()
    arena = ArenaWriter()
    _Pickler(buf, arena).dump(obj)
    return buf.getvalue(), arena


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arena: ArenaReader) -> None:
        super().__init__(file)
        self._arena = arena

    def persistent_load(self, pid: Any) -> Any:
        import torch

        if pid[0] == "tensor":
            return self._arena.tensor_packed(pid[1])
        if pid[0] == "typed":
            dtype = getattr(torch, pid[2].removeprefix("torch."))
            storage = self._arena.storage(pid[1])
            return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        return self._arena.storage(pid[1])


def _plain_tensor_packed(arena: ArenaWriter, t: Any) -> bytes | None:
    """The packed arena description of a plain CPU tensor, or None where torch's own reduction
    must run.

    Equivalent to torch's `Tensor.__reduce_ex__` for a plain tensor (no Python attributes,
    hooks or dispatch metadata; dense, CPU, not quantized or nested), and much cheaper: the
    tensor is rebuilt on its arena storage directly instead of through a TypedStorage.
    """
    import torch

    if (
        t.__dict__
        or not t.is_cpu
        or t.layout != torch.strided
        or t.is_quantized
        or t.is_nested
        or t._backward_hooks
        or torch._C._get_tensor_metadata(t)  # type: ignore[attr-defined]
    ):
        return None
    return arena.tensor_packed(t)


def loads(data: bytes, fd: int | None, layout: Any) -> Any:
    """Rebuild what `dumps` produced; the arena fd is consumed (closed)."""
    return loads_with(data, ArenaReader(fd, layout))


def loads_with(data: bytes, arena: ArenaReader) -> Any:
    """Rebuild a pickle whose storages `arena` holds (`loads`, or storages read by `_pull`)."""
    return _Unpickler(io.BytesIO(data), arena).load()
