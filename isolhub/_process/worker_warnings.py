"""Warnings raised in a worker, recorded there and re-issued in the caller, through its filters.

torch.hub runs the repo in the caller, so the caller's `warnings` filters (`-W error`,
`catch_warnings(record=True)`, pytest's) see the repo's warnings. In a worker, `install` lets
every warning through the worker's own filters (the repo's filters still apply there) and records
it instead of printing it; each reply carries the records (`take`), and the parent re-issues them
with `warnings.warn_explicit` (`reissue`): category, message, filename, line and module as raised.

What a worker sends is hostile: `checked` accepts plain strings and ints within bounds, and a
category is found only among the classes this process already has (`builtins` and modules already
imported, read without `getattr`, never importing). A category the caller lacks (a repo's own
`class ArchWarning(DeprecationWarning)`) becomes a same-named subclass of its nearest ancestor the
caller has (else `UserWarning`), one class per name, so filters on the ancestor apply.

    record: {"category": ["pkg.mod.ArchWarning", "builtins.DeprecationWarning", ...],
             "message": str, "filename": str, "lineno": int, "module": str}

Example (`catch_warnings` puts this process's warning filters back afterwards):
    >>> with warnings.catch_warnings():
    ...     install()                   # in the worker, once
    ...     warnings.warn("old", FutureWarning)
    ...     records, dropped = take()
    >>> [(r["category"][0], r["message"]) for r in records], dropped
    ([('builtins.FutureWarning', 'old')], 0)
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from .._errors import ProtocolError
from .._escape import escape_controls

__all__ = ["MAX_MESSAGE", "MAX_WARNINGS", "checked", "install", "reissue", "take"]

MAX_WARNINGS = 50  # distinct warnings carried per reply; the rest are counted
MAX_MESSAGE = 8192  # characters of a message
_MAX_NAME = 512
_MAX_PATH = 4096
_MAX_MRO = 16
_HUBCONF_PREFIX = "isolhub_hubconf_"

_records: list[dict[str, Any]] = []
_seen: set[tuple[Any, ...]] = set()
_dropped = 0
_modules_by_file: dict[str, str] = {}


# -- in the worker ----------------------------------------------------------------------------


def install() -> None:
    """Record, instead of printing, every warning this process raises from now on."""
    warnings.resetwarnings()  # the caller's filters decide; the repo may still add its own here
    warnings.simplefilter("always")
    warnings.showwarning = _record


def take() -> tuple[list[dict[str, Any]], int]:
    """The warnings recorded since the last call, and how many more were dropped."""
    global _records, _dropped
    out, dropped = _records, _dropped
    _records, _dropped = [], 0
    _seen.clear()
    return out, dropped


def _record(
    message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    global _dropped
    text = str(message)
    key = (category, text, filename, lineno)
    if key in _seen:
        return  # the same warning from the same line again: the caller's filters see it once
    _seen.add(key)
    if len(_records) >= MAX_WARNINGS:
        _dropped += 1
        return
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    names = [_name(c) for c in category.__mro__ if issubclass(c, Warning)][:_MAX_MRO]
    _records.append(
        {
            "category": [n[:_MAX_NAME] for n in names],
            "message": text,
            "filename": str(filename)[:_MAX_PATH],
            "lineno": int(lineno) if 0 <= int(lineno) < 1 << 31 else 0,
            "module": _module_of(str(filename))[:_MAX_NAME],
        }
    )


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_of(filename: str) -> str:
    """The name of the module `filename` is the file of (`hubconf` for the worker's hubconf)."""
    name = _modules_by_file.get(filename)
    if name is None:
        for mod_name, mod in list(sys.modules.items()):
            path = getattr(mod, "__file__", None)
            if isinstance(path, str):
                _modules_by_file.setdefault(path, mod_name)
        name = _modules_by_file.get(filename, "")
    return "hubconf" if name.startswith(_HUBCONF_PREFIX) else name


# -- in the parent ----------------------------------------------------------------------------


def checked(records: Any, dropped: Any) -> tuple[list[dict[str, Any]], int]:
    """`records` and `dropped` as a worker sent them, refused unless well-formed and bounded.

    Raises:
        ProtocolError: anything else than at most `MAX_WARNINGS` records of bounded strings
            and ints, and a count.
    """
    if not isinstance(records, list) or len(records) > MAX_WARNINGS:
        raise ProtocolError("malformed warnings from a worker: not a list of at most 50")
    if type(dropped) is not int or not 0 <= dropped < 1 << 62:
        raise ProtocolError("malformed warnings from a worker: a bad count")
    for r in records:
        ok = (
            isinstance(r, dict)
            and set(r) == {"category", "message", "filename", "lineno", "module"}
            and _strings(r["category"], _MAX_MRO, _MAX_NAME)
            and len(r["category"]) >= 1
            and type(r["message"]) is str
            and len(r["message"]) <= MAX_MESSAGE
            and type(r["filename"]) is str
            and len(r["filename"]) <= _MAX_PATH
            and type(r["lineno"]) is int
            and 0 <= r["lineno"] < 1 << 31
            and type(r["module"]) is str
            and len(r["module"]) <= _MAX_NAME
        )
        if not ok:
            raise ProtocolError("malformed warning record from a worker")
    # Their text is printed by the warnings machinery: escaped first (`_escape`).
    return [_escaped(r) for r in records], dropped


def _escaped(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: escape_controls(v)
        if type(v) is str
        else [escape_controls(c, keep_lines=False) for c in v]
        if type(v) is list
        else v
        for k, v in record.items()
    }


def reissue(records: list[dict[str, Any]], dropped: int, label: str) -> None:
    """Issue checked `records` here, through this process's filters (which may raise)."""
    for r in records:
        message = _instance(r["category"], r["message"])
        module = r["module"] or None
        try:
            warnings.warn_explicit(
                message, type(message), r["filename"], r["lineno"], module, _registry(module)
            )
        except Exception as e:
            if not isinstance(message, ResourceWarning):
                raise
            # In one process this warning comes from a finalizer, where an error filter's
            # exception is "ignored" through sys.unraisablehook rather than raised: do the same.
            hook_args = _Unraisable(e, f"Exception ignored in a worker of {label}")
            sys.unraisablehook(hook_args)  # type: ignore[arg-type]  # the same fields
    if dropped:
        warnings.warn(
            f"isolhub: the worker for {label} raised {dropped} more warnings, not re-issued "
            f"(at most {MAX_WARNINGS} distinct ones a call)",
            UserWarning,
            stacklevel=2,
        )


class _Unraisable:
    """What `sys.unraisablehook` is given (the fields of `sys.UnraisableHookArgs`)."""

    def __init__(self, exc: BaseException, err_msg: str) -> None:
        self.exc_type = type(exc)
        self.exc_value = exc
        self.exc_traceback = exc.__traceback__
        self.err_msg = err_msg
        self.object = None


def _strings(value: Any, count: int, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= count
        and all(type(v) is str and len(v) <= length for v in value)
    )


_stand_ins: dict[tuple[str, type], type] = {}
_registries: dict[str, dict[Any, Any]] = {}


def _instance(names: list[str], text: str) -> Warning:
    """The warning to issue: its own class if this process has it, else a stand-in."""
    for i, name in enumerate(names):
        cls = _lookup(name)
        if cls is None:
            continue
        if i:
            cls = _stand_in(names[0], cls)
        try:
            return cls(text)
        except Exception:  # noqa: BLE001 - a class with another constructor: its stand-in
            break
    return _stand_in(names[0], UserWarning)(text)


def _lookup(dotted: str) -> type | None:
    """The Warning subclass `dotted` names among modules already imported, or None."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is None:
            continue
        try:
            obj: Any = vars(module).get(parts[cut])  # no module __getattr__: nothing imported
            for part in parts[cut + 1 :]:
                obj = vars(obj).get(part) if isinstance(obj, type) else None
        except TypeError:
            return None
        return obj if isinstance(obj, type) and issubclass(obj, Warning) else None
    return None


def _stand_in(dotted: str, base: type) -> type:
    """One subclass of `base` per warning class name the caller does not have."""
    key = (dotted, base)
    cls = _stand_ins.get(key)
    if cls is None:
        module, _, name = dotted.rpartition(".")
        cls = type(name or "Warning", (base,), {"__module__": module or "builtins"})
        if len(_stand_ins) < 256:
            _stand_ins[key] = cls
    return cls


def _registry(module: str | None) -> dict[Any, Any] | None:
    """The `__warningregistry__` stand-in for `module`, so "default" shows a warning once.

    torch.hub imports hubconf afresh for every call, so its registry is new each time.
    """
    if module is None or module == "hubconf":
        return None
    registry = _registries.get(module)
    if registry is None:
        registry = {}
        if len(_registries) < 1024:
            _registries[module] = registry
    return registry
