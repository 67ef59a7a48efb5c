"""Plain values with tensors, in both directions, never through pickle on the way back.

What a worker returns (an evaluation's result, a remote call's output, a state dict) is encoded
with the restricted codec; tensors inside it go into one sealed arena and travel as one fd. An
object the codec cannot carry becomes a remote handle when the caller allows it, else an error.

Example:
    >>> body, fd, layout = encode_value({"acc": 0.9, "logits": torch.ones(2)})   # worker
    >>> decode_value(body, fd, layout)                                           # parent
    {'acc': 0.9, 'logits': tensor([1., 1.])}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._arena import ArenaReader, ArenaWriter
from ._errors import ProtocolError
from ._protocol import decode, encode


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

    def ext(value: Any) -> Any:
        if isinstance(value, tensor_type):
            value = value.detach()
            packed = arena.tensor_packed(value)
            return {"t": arena.tensor_meta(value)} if packed is None else packed
        if handle_for is not None:
            return {"h": handle_for(value)}
        raise ProtocolError(
            f"a {type(value).__qualname__} cannot cross back to the parent; return plain values "
            "(numbers, strings, lists, dicts with str keys) and tensors"
        )

    body = encode(obj, ext)
    fd, layout = arena.seal()
    return body, fd, layout


def decode_value(
    body: bytes,
    fd: int | None,
    layout: Any,
    handle_factory: Callable[[Any], Any] | None = None,
) -> Any:
    """Rebuild what `encode_value` produced; consumes `fd`.

    Raises:
        ProtocolError: the bytes, the arena or a tensor description is malformed.
    """
    if not isinstance(layout, (list, bytes)):
        raise ProtocolError("malformed arena layout")
    arena = ArenaReader(fd, layout)

    def ext(value: Any) -> Any:
        if type(value) is bytes:  # a tensor, packed (ArenaWriter.tensor_packed)
            return arena.tensor_packed(value)
        if isinstance(value, dict) and set(value) == {"t"}:
            return arena.tensor(value["t"])
        if isinstance(value, dict) and set(value) == {"h"} and handle_factory is not None:
            return handle_factory(value["h"])
        raise ProtocolError("unexpected extension value in a reply")

    return decode(body, ext)
