"""Plain values with tensors, in both directions, never through pickle on the way back.

What a worker returns (an evaluation's result, a remote call's output, a state dict) is encoded
with the restricted codec; tensors inside it go into one sealed arena and travel as one fd. An
object the codec cannot carry becomes a remote handle when the caller allows it, else an error.

Example:
    >>> import torch
    >>> body, fd, layout = encode_value({"acc": 0.9, "logits": torch.ones(2)})   # worker
    >>> decode_value(body, fd, layout)                                           # parent
    {'acc': 0.9, 'logits': tensor([1., 1.])}
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from .._errors import ProtocolError
from .arena import ArenaReader, ArenaWriter
from .codec import ReplyLimits, decode, encode

__all__ = ["bounded_text", "decode_state_dict", "decode_value", "encode_state_dict", "encode_value"]


def encode_value(
    obj: Any, handle_for: Callable[[Any], dict[str, Any]] | None = None
) -> tuple[bytes, int | None, Any]:
    """Encode `obj`: `(codec bytes, arena fd or None, arena layout)`.

    Objects other than plain values and tensors become `handle_for(obj)` when given.

    Raises:
        ProtocolError: `obj` holds something that cannot cross and no handle is allowed.
    """
    import torch

    arena = ArenaWriter()

    tensor_type = torch.Tensor

    parameter_type = torch.nn.Parameter

    def ext(value: Any) -> Any:
        if isinstance(value, tensor_type):
            grad = value.requires_grad if isinstance(value, parameter_type) else None
            value = value.detach()
            packed = arena.tensor_packed(value)
            data = {"t": arena.tensor_meta(value)} if packed is None else packed
            # A parameter stays one, with its requires_grad (what counting trainable ones reads).
            return data if grad is None else {"p": data, "g": grad}
        if handle_for is not None:
            return {"h": handle_for(value)}
        raise ProtocolError(
            f"a {type(value).__qualname__} cannot cross back to the parent; return plain values "
            "(numbers, strings, lists, dicts with str keys) and tensors"
        )

    body = encode(obj, ext)
    fd, layout = arena.seal()
    return body, fd, layout


def encode_state_dict(items: Iterable[tuple[Any, Any]]) -> tuple[bytes, int | None, Any]:
    """Encode a state dict's `(name, value)` pairs for `decode_state_dict`.

    When every value is a tensor the packing can describe (the usual case), the names travel
    as one list and the tensor descriptions as one bytes run: no codec step per tensor on
    either side, which is most of the cost of a state dict of many small tensors. Otherwise
    the pairs go as `[[name, value], ...]` through `encode_value`.
    """
    import torch

    pairs = [(str(k), v) for k, v in items]
    arena = ArenaWriter()
    descriptions = []
    tensor = torch.Tensor
    for _, value in pairs:
        packed = None
        if isinstance(value, tensor):
            # Detached, as everywhere else a tensor crosses (keep_vars=True gives Parameters).
            packed = arena.tensor_packed(value.detach() if value.requires_grad else value)
        if packed is None:
            return encode_value([[k, v] for k, v in pairs])
        descriptions.append(packed)
    body = encode({"names": [k for k, _ in pairs], "tensors": b"".join(descriptions)})
    fd, layout = arena.seal()
    return body, fd, layout


def decode_state_dict(
    body: bytes, fd: int | None, layout: Any, limits: ReplyLimits | None = None
) -> OrderedDict[str, Any]:
    """Rebuild what `encode_state_dict` produced; consumes `fd`.

    Raises:
        ProtocolError: the reply is not a well-formed state dict, or is over `limits`.
    """
    arena = _reader(fd, layout, limits)
    value = decode(body, _ext(arena, None))
    if type(value) is dict and value.keys() == {"names", "tensors"}:
        names, run = value["names"], value["tensors"]
        if type(names) is not list or not all(type(k) is str for k in names):
            raise ProtocolError("malformed state dict names in a reply")
        tensors = arena.tensors_packed(run)
        if len(tensors) != len(names):
            raise ProtocolError(f"{len(names)} names for {len(tensors)} tensors in a state dict")
        return OrderedDict(zip(names, tensors, strict=True))
    if type(value) is not list or not all(
        type(i) is list and len(i) == 2 and type(i[0]) is str for i in value
    ):
        raise ProtocolError("malformed state dict in a reply")
    return OrderedDict((k, v) for k, v in value)


def decode_value(
    body: bytes,
    fd: int | None,
    layout: Any,
    handle_factory: Callable[[Any], Any] | None = None,
    limits: ReplyLimits | None = None,
) -> Any:
    """Rebuild what `encode_value` produced; consumes `fd`.

    Raises:
        ProtocolError: the bytes, the arena or a tensor description is malformed, or the
            reply is over `limits` (its arena's bytes, its tensors' elements).
    """
    arena = _reader(fd, layout, limits)
    return decode(body, _ext(arena, handle_factory))


def _reader(fd: int | None, layout: Any, limits: ReplyLimits | None) -> ArenaReader:
    if not isinstance(layout, (list, bytes)):
        if fd is not None:
            os.close(fd)
        raise ProtocolError("malformed arena layout")
    if limits is None:
        return ArenaReader(fd, layout)
    return ArenaReader(fd, layout, limits.arena_bytes, limits.elements)


def _ext(arena: ArenaReader, handle_factory: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    def tensor(value: Any) -> Any:
        if type(value) is bytes:  # a tensor, packed (ArenaWriter.tensor_packed)
            return arena.tensor_packed(value)
        if isinstance(value, dict) and set(value) == {"t"}:
            return arena.tensor(value["t"])
        return None

    def ext(value: Any) -> Any:
        t = tensor(value)
        if t is not None:
            return t
        if isinstance(value, dict) and set(value) == {"p", "g"} and type(value["g"]) is bool:
            t = tensor(value["p"])
            if t is not None:
                import torch

                return torch.nn.Parameter(t, requires_grad=value["g"])
        if isinstance(value, dict) and set(value) == {"h"} and handle_factory is not None:
            return handle_factory(value["h"])
        raise ProtocolError("unexpected extension value in a reply")

    return ext


def bounded_text(text: str, limit: int) -> str:
    """`text`, or its first whole lines within `limit` characters and a line saying what is left.

    A cut never falls inside a line (a long single line is cut at a space or comma), so what is
    shown can be read as it is.
    """
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    if cut <= 0:
        cut = max(text.rfind(" ", 0, limit), text.rfind(",", 0, limit) + 1)
    if cut <= 0:
        cut = limit
    rest = text[cut:].lstrip("\n")
    lines = rest.count("\n") + 1
    return (
        f"{text[:cut]}\n... ({lines} more lines, {len(rest)} more characters, "
        f"not shown: the text is bounded at {limit} characters)"
    )
