"""Whole objects (modules, tuples of model and helpers) shipped by value, storages out-of-band.

Trusted code only: the parent unpickles what the worker sends. Every Python module loaded from the
snapshot is pickled **by value** (cloudpickle), so the parent gets working classes and functions
without the repo's names (`model`, `utils`) ever entering its `sys.modules`; tensor storages are
diverted through the arena (`persistent_id`), so no tensor byte goes through pickle. TorchScript
modules travel as `torch.jit.save` bytes, TorchScript functions as their Python function (scripted
again in the parent), and modules (`torch.ops`, `torch.backends.cudnn`) by import name.

In the parent, each load's classes and functions live in modules of their own, under a private
name (`isolhub._snap_<sha>_<n>.model.net`): pickle, `torch.save`, `inspect` and TorchScript find
them there, in this process (`_Namespace`).

Example:
    >>> import torch
    >>> data, fd, layout = dumps(torch.nn.Linear(2, 1))     # in the worker
    >>> loads(data, fd, layout).weight.shape                # in the parent (closes fd)
    torch.Size([1, 2])
"""

from __future__ import annotations

import functools
import importlib
import io
import itertools
import marshal
import os
import pickle
import re
import sys
import threading
import types
import weakref
from collections import ChainMap
from typing import Any

import cloudpickle

from .._errors import IsolhubError, TransportError
from .arena import ArenaReader, ArenaWriter
from .pull import pin

__all__ = [
    "dumps",
    "dumps_pinned",
    "loads",
    "loads_with",
    "mark_loaded_modules",
    "prime_module_paths",
    "register_snapshot_modules",
    "unshippable",
]

# The worker's snapshot modules: name -> (name inside a load's namespace, file); and its tag.
_SNAPSHOT_MODULES: dict[str, tuple[str, str]] = {}
_SNAPSHOT_TAG = "local"


def register_snapshot_modules(root: str) -> list[str]:
    """Register every loaded module whose file lies under `root` to be pickled by value."""
    global _SNAPSHOT_TAG
    root = os.path.realpath(root)
    _SNAPSHOT_TAG = re.sub(r"\W", "_", os.path.basename(root))[:12] or "local"
    hubconf = os.path.join(root, "hubconf.py")
    root += os.sep
    names = []
    for name, module in _modules_since_mark():
        path = getattr(module, "__file__", None)
        if path and _realpath(path).startswith(root):
            cloudpickle.register_pickle_by_value(module)
            inner = "hubconf" if _realpath(path) == hubconf else name
            _SNAPSHOT_MODULES[name] = (inner, path)
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
        if not os.path.isabs(path):  # depends on the working directory: never remembered
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.islink(path):
            real = os.path.realpath(path)
        else:  # one lstat for the file; its folder (a package's, shared) is resolved once
            real = os.path.join(_realpath(folder), name)
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
        if type(obj) is types.FunctionType or isinstance(obj, type):
            return _in_namespace(obj, super().reducer_override(obj))
        if isinstance(obj, types.ModuleType):
            # torch.ops, torch.classes, torch.backends.cudnn: ModuleType subclasses, which
            # cloudpickle would pickle as objects. Any importable module goes by name.
            name = getattr(obj, "__name__", None)
            if (
                isinstance(name, str)
                and name not in _SNAPSHOT_MODULES
                and sys.modules.get(name) is obj
            ):
                return importlib.import_module, (name,)
            return super().reducer_override(obj)
        torch = sys.modules.get("torch")
        if torch is not None:
            if isinstance(obj, torch.jit.ScriptModule):
                buf = io.BytesIO()
                torch.jit.save(obj, buf)
                return _load_script_module, (buf.getvalue(),)
            if isinstance(obj, torch.jit.ScriptFunction):
                return _script_function_reduce(obj)
        return super().reducer_override(obj)


def _script_function_reduce(fn: Any) -> tuple[Any, tuple[Any, ...]]:
    """A `torch.jit.script`ed function as its Python function, scripted again on arrival.

    TorchScript functions do not pickle; the function they were compiled from does (by value
    where it is the repo's, with its file and line numbers, which `torch.jit.script` reads).
    """
    original = getattr(fn, "_torchdynamo_inline", None)
    if not isinstance(original, types.FunctionType):
        raise pickle.PicklingError(
            f"the TorchScript function {fn.qualified_name} was not compiled from a Python "
            "function, so there is none to ship"
        )
    module = sys.modules.get(original.__module__)
    name = original.__qualname__
    if (
        original.__module__ not in _SNAPSHOT_MODULES
        and module is not None
        and getattr(module, name, None) is fn
    ):  # an importable module's: by name, so it arrives as that same function
        return getattr, (module, name)
    return _script, (original,)


def _script(fn: Any) -> Any:
    import torch

    return torch.jit.script(fn)


def _in_namespace(obj: Any, reduced: Any) -> Any:
    """cloudpickle's by-value reduction of a snapshot class or function, which also puts it in
    its load's namespace in the parent (`_snapshot_setstate`)."""
    where = _SNAPSHOT_MODULES.get(getattr(obj, "__module__", None))  # type: ignore[arg-type]
    if where is None or type(reduced) is not tuple or len(reduced) != 6:
        return reduced
    setter = functools.partial(_snapshot_setstate, reduced[5], _SNAPSHOT_TAG, *where)
    return (*reduced[:5], setter)


def _snapshot_setstate(setter: Any, tag: str, module: str, file: str, obj: Any, state: Any) -> Any:
    result = setter(obj, state)
    namespace = getattr(_LOADING, "namespace", None)
    if namespace is not None:
        namespace.add(obj, tag, module, file)
    return result


_LOADING = threading.local()  # the `_Namespace` of the pickle being loaded in this thread
_LOAD_NUMBERS = itertools.count(1)


class _Namespace:
    """The private modules of one load: `isolhub._snap_<tag>_<n>.<module>`.

    Each holds its classes and functions weakly (a module `__getattr__`), so a model dropped by
    the caller is freed; what stays in `sys.modules` is an empty module object per repo module.
    cloudpickle (a call's arguments, to a worker) ships them by value, as the worker did.
    """

    def __init__(self) -> None:
        self._prefixes: dict[str, str] = {}

    def add(self, obj: Any, tag: str, module: str, file: str) -> None:
        prefix = self._prefixes.get(tag)
        if prefix is None:
            prefix = self._prefixes[tag] = f"isolhub._snap_{tag}_{next(_LOAD_NUMBERS)}"
            root = sys.modules[prefix] = _shell(prefix)
            root.__path__ = []
            # Sent to a worker (an argument), they travel by value again: no worker has them.
            cloudpickle.register_pickle_by_value(root)
        name = f"{prefix}.{module}"
        objects = _namespace_module(name, file)
        obj.__module__ = name
        qualname = getattr(obj, "__qualname__", "")
        if qualname.isidentifier():  # top level: methods and nested classes hang off theirs
            objects[qualname] = obj


def _namespace_module(name: str, file: str) -> weakref.WeakValueDictionary[str, Any]:
    """The objects of the namespace module `name`, made (with its parents) on first use."""
    module = sys.modules.get(name)
    if module is None:
        module = _shell(name)
        parent = name.rpartition(".")[0]
        while parent != "isolhub" and parent not in sys.modules:
            sys.modules[parent] = _shell(parent)
            sys.modules[parent].__path__ = []
            parent = parent.rpartition(".")[0]
        sys.modules[name] = module
    module.__file__ = file
    return module.__dict__["__isolhub_objects__"]


def _shell(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "A module-mode load's repo module (isolhub).")
    objects: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    def __getattr__(attr: str) -> Any:
        try:
            return objects[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    def __dir__() -> list[str]:
        return sorted({*module.__dict__, *objects})

    module.__dict__.update(__getattr__=__getattr__, __dir__=__dir__, __isolhub_objects__=objects)
    return module


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


def unshippable(obj: Any, entry: str, error: Exception) -> TransportError:
    """The error for a module-mode result that failed to pickle: what, where, and what to do.

    The culprit is found by pickling the parts of `obj` one by one (on failure only), down to
    the smallest part that still fails: `the result.inner.guard (a lock)`.
    """
    path, culprit, cause = _culprit(obj, error)
    what = f"{type(culprit).__module__}.{type(culprit).__qualname__}".removeprefix("builtins.")
    return TransportError(
        f"isolhub could not ship the result of {entry!r} back by value (mode='module'): "
        f"the result{path} is a {what} that cannot be pickled ({type(cause).__name__}: {cause}). "
        "Load its weights with mode='state_dict' (isolhub.load_state_dict), or keep the object "
        "in the worker with mode='remote'.",
        entry=entry,
        path=path,
        cause=f"{type(cause).__name__}: {cause}",
    )


_CULPRIT_DEPTH = 64


def _culprit(obj: Any, error: Exception) -> tuple[str, Any, Exception]:
    """`(attribute path, object, its error)` for the deepest part of `obj` that fails to pickle."""
    path, seen = "", {id(obj)}
    for _ in range(_CULPRIT_DEPTH):
        for label, child in _parts(obj):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_error = _pickle_error(child)
            if child_error is not None:
                path, obj, error = path + label, child, child_error
                break
        else:
            break
    return path, obj, error


def _pickle_error(obj: Any) -> Exception | None:
    try:
        _pickled(obj)
    except Exception as e:  # noqa: BLE001 - what its own reduction raises is the finding
        return e
    return None


def _parts(obj: Any) -> list[tuple[str, Any]]:
    """What pickling `obj` pickles in turn, each with the path that reaches it."""
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, types.FunctionType):
        names = _code_names(obj.__code__)
        found = [
            (f".__globals__[{n!r}]", obj.__globals__[n]) for n in names if n in obj.__globals__
        ]
        cells = zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False)
        return found + [(f" (closure variable {n!r})", _cell(c)) for n, c in cells]
    attrs = getattr(obj, "__dict__", None)
    if not isinstance(attrs, (dict, types.MappingProxyType)):
        return []
    parts = []
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):  # `.fc`, not `._modules['fc']`
        for key in ("_modules", "_parameters", "_buffers"):
            parts += [(f".{k}", v) for k, v in (attrs.get(key) or {}).items()]
    return parts + [(f".{k}", v) for k, v in attrs.items()]


def _code_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names += _code_names(const)
    return names


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


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
    """Rebuild a pickle whose storages `arena` holds (`loads`, or storages read by `_transport.pull`).

    What the repo's code raises while it is rebuilt here (a `__reduce__` that returns a failing
    callable, `sys.exit` included) is a `TransportError` naming the stage, its cause chained:
    a load never exits this process nor raises an error of the repo's own type here.
    """
    outer = getattr(_LOADING, "namespace", None)
    _LOADING.namespace = _Namespace()
    try:
        return _Unpickler(io.BytesIO(data), arena).load()
    except (IsolhubError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as e:
        raise TransportError(
            f"unpickling failed in this process: {type(e).__name__}: {e} (raised by code that "
            "came with the pickle: mode='module' runs the repo's code in the process that loads "
            "it; mode='remote' keeps it in its worker)"
        ) from e
    finally:
        _LOADING.namespace = outer
