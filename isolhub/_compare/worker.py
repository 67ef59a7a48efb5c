"""The worker's half of `compare`: `summarise` an entrypoint's result as plain values and tensors.

`compare` passes `partial(summarise, inputs=..., seed=..., remote=..., snapshot=...)` as the
`then=` of its call. It is pickled by reference, so the worker imports this module (which
imports only `_process.rng` of isolhub, and torch only when it runs) and calls it on the entrypoint's
result. The answer holds only what the restricted codec and the tensor arena carry back:

    {"t0": monotonic time at the start, "result_type": "Net",
     "entrypoints": {name: {"kind", "signature", "doc", "source"}} or None,
     "parts": [{"path", "type", "parameters", "training", "forward_s" or "forward_error"}],
     "tensors": {state-dict key: CPU tensor}, "outputs": {name: CPU tensor},
     "values": {name: None | bool | int | float | str}, "uncompared": {name: reason}}

The parent checks that shape (`_process.messages.CompareSummary`) before it trusts it: repo code
ran beside `summarise` and may have tampered with it.

For many batches `compare` keeps a `CompareSession` in the worker instead (`open_session`, the
`then=` of a call whose result stays there as a handle) and sends it one batch at a time:

    session("summary")     the dict above, without outputs
    session("step", *xs)   {"forward_s": {part: s}, "errors": {part: message},
                            "outputs": {name: tensor}, "values": {...}, "uncompared": {...},
                            "layers": [{"name", "type", "shape", "dtype", "mean", "std", "min",
                                        "max"}], "activations": {layer name: tensor}}

With `layers=True`, forward hooks on every submodule record its output while the batch runs:
summary statistics for every layer, and the output tensor itself (cloned, since a later in-place
op may overwrite it) while the batch's kept tensors stay within `layer_bytes`. Only that state
of the current batch is held: memory stays bounded however many batches come.

Example:
    >>> import torch
    >>> summarise(torch.nn.Linear(2, 3), (torch.ones(1, 2),), seed=0)["outputs"].keys()
    dict_keys(['output'])
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Any

from .._process.rng import seed_all

__all__ = ["CompareSession", "clean_doc", "one_line", "open_session", "summarise"]

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
        >>> import torch
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


def open_session(
    obj: Any,
    *,
    seed: int | None = None,
    remote: bool = False,
    snapshot: str | None = None,
    layers: bool = False,
    layer_bytes: int = 0,
) -> CompareSession:
    """The `then=` of compare's call: keep the result in a `CompareSession` (runs in the worker)."""
    return CompareSession(obj, seed, remote, snapshot, layers, layer_bytes)


class CompareSession:
    """An entrypoint's result kept in its worker, stepped one batch at a time (see the module).

    Callable, so the parent reaches it in one round trip per batch through its handle.
    """

    def __init__(
        self,
        obj: Any,
        seed: int | None,
        remote: bool,
        snapshot: str | None,
        layers: bool,
        layer_bytes: int,
    ) -> None:
        self.summary = summarise(obj, (), seed, remote=remote, snapshot=snapshot)
        self.parts = _module_parts(obj)
        self.seed, self.layers, self.layer_bytes = seed, layers, int(layer_bytes)

    def __call__(self, op: str, *args: Any) -> dict[str, Any]:
        if op == "summary":
            return self.summary
        if op == "step":
            return self.step(args)
        raise ValueError(f"unknown compare session operation {op!r}")

    def step(self, inputs: tuple[Any, ...]) -> dict[str, Any]:
        """Run every module part on one batch; see the module docstring for the answer."""
        import torch

        out: dict[str, Any] = {
            "forward_s": {},
            "errors": {},
            "outputs": {},
            "values": {},
            "uncompared": {},
            "layers": [],
            "activations": {},
        }
        budget = [self.layer_bytes]
        for path, m in self.parts:
            prefix = f"{path}." if path else ""
            hooks = []
            if self.layers and isinstance(m, torch.nn.Module):
                hooks = _hook_layers(m, prefix, out, budget)
            if self.seed is not None:
                seed_all(self.seed)
            began = time.monotonic()
            try:
                with torch.no_grad():
                    y = m(*inputs)
                out["forward_s"][path] = time.monotonic() - began
                _keep(y, f"{prefix}output", out["outputs"], out, 0)
            except Exception as e:  # noqa: BLE001 - repo code: record it, go on
                out["errors"][path] = one_line(e)
            finally:
                for h in hooks:
                    h.remove()
        return out


def _module_parts(obj: Any) -> list[tuple[str, Any]]:
    """The module-like parts of a result, as `summarise` names them."""
    if _is_module_like(obj):
        return [("", obj)]
    if isinstance(obj, (tuple, list)):
        return [(f"[{i}]", item) for i, item in enumerate(obj) if _is_module_like(item)]
    return []


def _hook_layers(m: Any, prefix: str, out: dict[str, Any], budget: list[int]) -> list[Any]:
    """Forward hooks on every submodule of `m` that record its output into `out`."""
    calls: dict[str, int] = {}

    def record(name: str, module: Any, output: Any) -> None:
        t = _first_tensor(output, 0)
        if t is None:
            return
        calls[name] = calls.get(name, 0) + 1
        key = f"{prefix}{name}" + (f"#{calls[name]}" if calls[name] > 1 else "")
        row: dict[str, Any] = {
            "name": key,
            "type": _type_name(module),
            "shape": [int(d) for d in t.shape],
            "dtype": str(t.dtype).removeprefix("torch."),
        }
        row.update(_stats(t))
        out["layers"].append(row)
        size = t.numel() * t.element_size()
        if size <= budget[0]:
            try:
                kept = _crossable(t)
                out["activations"][key] = kept.clone() if kept.data_ptr() == t.data_ptr() else kept
                budget[0] -= size
            except (TypeError, RuntimeError):
                pass  # summary statistics only

    hooks = []
    for name, sub in m.named_modules():
        if name:  # the root's output is the model's output, compared already
            hooks.append(sub.register_forward_hook(lambda mod, _i, o, n=name: record(n, mod, o)))
    return hooks


def _first_tensor(value: Any, depth: int) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if depth < _MAX_NESTING:
        items = value.values() if isinstance(value, dict) else value
        if isinstance(value, (tuple, list, dict)):
            for item in items:
                t = _first_tensor(item, depth + 1)
                if t is not None:
                    return t
    return None


def _stats(t: Any) -> dict[str, float | None]:
    """Mean, standard deviation, min and max of a tensor, in float64 (None where undefined)."""
    import torch

    none: dict[str, float | None] = {"mean": None, "std": None, "min": None, "max": None}
    try:
        x = t.detach()
        if x.is_quantized:
            x = x.dequantize()
        if x.is_complex():
            x = x.abs()
        x = x.to(torch.float64)
        if not x.numel():
            return none
        return {
            "mean": float(x.mean()),
            "std": float(x.std(unbiased=False)),
            "min": float(x.min()),
            "max": float(x.max()),
        }
    except (TypeError, RuntimeError):
        return none


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
        out["uncompared"][path or "result"] = f"state_dict() raised {one_line(e)}"
    if not remote and isinstance(m, torch.nn.Module):
        part["parameters"] = sum(p.numel() for p in m.parameters())
        part["training"] = m.training
        m.eval()
    if inputs:
        if seed is not None:
            seed_all(seed)
        began = time.monotonic()
        try:
            with torch.no_grad():
                y = m(*inputs)
            part["forward_s"] = time.monotonic() - began
            _keep(y, f"{prefix}output", out["outputs"], out, 0)
        except Exception as e:  # noqa: BLE001 - repo code: record it, describe the rest
            part["forward_error"] = one_line(e)
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


def _describe_entrypoints(snapshot: str) -> dict[str, dict[str, Any]] | None:
    """Kind, signature and docstring of each public callable of the snapshot's hubconf."""
    path = os.path.join(snapshot, "hubconf.py")
    real = os.path.realpath(path)
    module = next(
        (
            m
            for m in list(sys.modules.values())
            if isinstance(getattr(m, "__file__", None), str)
            and (m.__file__ == path or os.path.realpath(str(m.__file__)) == real)
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
        out[name] = {"kind": kind, "signature": sig, "doc": clean_doc(doc), "source": _source(fn)}
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


def one_line(e: Any) -> str:
    text = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def clean_doc(doc: Any) -> str | None:
    return inspect.cleandoc(doc) if isinstance(doc, str) else None
