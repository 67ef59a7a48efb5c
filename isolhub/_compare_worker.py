"""The worker's half of `compare`: `summarise` an entrypoint's result as plain values and tensors.

`compare` passes `partial(summarise, inputs=..., seed=..., remote=..., snapshot=...)` as the
`then=` of its call. It is pickled by reference, so the worker imports this module (which
imports nothing else of isolhub, and torch only when it runs) and calls it on the entrypoint's
result. The answer holds only what the restricted codec and the tensor arena carry back:

    {"t0": monotonic time at the start, "result_type": "Net",
     "entrypoints": {name: {"kind", "signature", "doc", "source"}} or None,
     "parts": [{"path", "type", "parameters", "training", "forward_s" or "forward_error"}],
     "tensors": {state-dict key: CPU tensor}, "outputs": {name: CPU tensor},
     "values": {name: None | bool | int | float | str}, "uncompared": {name: reason}}

The parent checks that shape (`_compare._check_summary`) before it trusts it: repo code ran
beside `summarise` and may have tampered with it.

Example:
    >>> summarise(torch.nn.Linear(2, 3), (torch.ones(1, 2),), seed=0)["outputs"].keys()
    dict_keys(['output'])
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Any

_MAX_NESTING = 3


def summarise(
    obj: Any,
    inputs: tuple[Any, ...] = (),
    seed: int | None = None,
    *,
    remote: bool = False,
    snapshot: str | None = None,
) -> dict[str, Any]:
    """Describe an entrypoint's result as plain values and tensors (runs in the worker).

    Module-like parts (callable, with `state_dict()`) give their state dict and their outputs on
    `inputs`; tensors, dicts of tensors and plain values are kept; anything else is listed under
    `uncompared` with a reason. With `remote=True` only `__call__` and `state_dict()` are used,
    so a remote proxy can be summarised in the parent the same way.

    Example:
        >>> summarise(torch.nn.Linear(2, 3), (torch.ones(1, 2),), seed=0)["outputs"].keys()
        dict_keys(['output'])

    Raises:
        Nothing of its own: a failing forward or state_dict() is recorded, not raised.
    """
    out: dict[str, Any] = {
        "t0": time.monotonic(),
        "result_type": _type_name(obj),
        "entrypoints": _describe_entrypoints(snapshot) if snapshot else None,
        "parts": [],
        "tensors": {},
        "outputs": {},
        "values": {},
        "uncompared": {},
    }
    if _is_module_like(obj):
        _summarise_module(obj, "", inputs, seed, remote, out)
    elif isinstance(obj, (tuple, list)):
        out["result_type"] = f"{type(obj).__name__}[{', '.join(_type_name(o) for o in obj)}]"
        for i, item in enumerate(obj):
            if _is_module_like(item):
                _summarise_module(item, f"[{i}]", inputs, seed, remote, out)
            else:
                _keep(item, f"[{i}]", out["tensors"], out, 1)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _keep(value, str(key), out["tensors"], out, _MAX_NESTING - 1)
    else:
        _keep(obj, "result", out["tensors"], out, _MAX_NESTING)
    return out


def _is_module_like(obj: Any) -> bool:
    return callable(obj) and callable(getattr(obj, "state_dict", None))


def _summarise_module(
    m: Any, path: str, inputs: tuple[Any, ...], seed: int | None, remote: bool, out: dict[str, Any]
) -> None:
    import torch

    prefix = f"{path}." if path else ""
    part: dict[str, Any] = {"path": path, "type": _type_name(m), "parameters": None}
    try:
        for key, value in m.state_dict().items():
            _keep(value, f"{prefix}{key}", out["tensors"], out, _MAX_NESTING)
    except Exception as e:  # noqa: BLE001 - repo code: record it, describe the rest
        out["uncompared"][path or "result"] = f"state_dict() raised {_one_line(e)}"
    if not remote and isinstance(m, torch.nn.Module):
        part["parameters"] = sum(p.numel() for p in m.parameters())
        part["training"] = m.training
        m.eval()
    if inputs:
        if seed is not None:
            _reseed(seed)
        began = time.monotonic()
        try:
            with torch.no_grad():
                y = m(*inputs)
            part["forward_s"] = time.monotonic() - began
            _keep(y, f"{prefix}output", out["outputs"], out, 0)
        except Exception as e:  # noqa: BLE001 - repo code: record it, describe the rest
            part["forward_error"] = _one_line(e)
    out["parts"].append(part)


def _keep(value: Any, name: str, tensors: dict[str, Any], out: dict[str, Any], depth: int) -> None:
    """File `value` where it can cross: tensors, plain values, or a reason it could not."""
    import torch

    if isinstance(value, torch.Tensor):
        try:
            tensors[name] = _crossable(value)
        except (TypeError, RuntimeError) as e:
            out["uncompared"][name] = f"a {value.dtype} tensor that cannot be read ({e})"
    elif value is None or type(value) in (bool, int, float, str):
        out["values"][name] = value
    elif isinstance(value, dict) and depth < _MAX_NESTING:
        for key, item in value.items():
            _keep(item, f"{name}[{key!r}]", tensors, out, depth + 1)
    elif isinstance(value, (tuple, list)) and depth < _MAX_NESTING:
        for i, item in enumerate(value):
            _keep(item, f"{name}[{i}]", tensors, out, depth + 1)
    else:
        kind = "callable, " if callable(value) else ""
        out["uncompared"][name] = f"a {_type_name(value)} ({kind}not a module, tensor or value)"


def _crossable(t: Any) -> Any:
    import torch

    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    return t.cpu()


def _reseed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _describe_entrypoints(snapshot: str) -> dict[str, dict[str, Any]] | None:
    """Kind, signature and docstring of each public callable of the snapshot's hubconf."""
    path = os.path.join(snapshot, "hubconf.py")
    real = os.path.realpath(path)
    module = next(
        (
            m
            for m in list(sys.modules.values())
            if isinstance(getattr(m, "__file__", None), str)
            and (m.__file__ == path or os.path.realpath(m.__file__) == real)
        ),
        None,
    )
    if module is None:
        return None
    out: dict[str, dict[str, Any]] = {}
    for name in dir(module):
        fn = getattr(module, name, None)
        if name.startswith("_") or not callable(fn):
            continue
        try:
            sig: str | None = str(inspect.signature(fn))
        except (TypeError, ValueError):
            sig = None
        kind = "class" if isinstance(fn, type) else "function" if inspect.isroutine(fn) else None
        doc = fn.__doc__ if isinstance(getattr(fn, "__doc__", None), str) else None
        out[name] = {"kind": kind, "signature": sig, "doc": _clean_doc(doc), "source": _source(fn)}
    return out


def _source(fn: Any) -> str | None:
    """A fingerprint of the entrypoint's own code (None where inspect cannot read it).

    Its syntax tree without the docstring, so a docstring, comment or layout change alone
    (reported as "docstring" or not at all) is not a source change.
    """
    import ast
    import hashlib
    import textwrap

    try:
        text = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(text)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        text = ast.unparse(tree)
    except (SyntaxError, ValueError, RecursionError):
        pass  # fingerprint the text as it is
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _type_name(obj: Any) -> str:
    return type(obj).__qualname__


def _one_line(e: Any) -> str:
    text = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def _clean_doc(doc: Any) -> str | None:
    return inspect.cleandoc(doc) if isinstance(doc, str) else None
