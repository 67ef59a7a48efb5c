"""Remote handles: the object stays in its worker; calls, attribute reads and methods go there.

The parent never unpickles what the worker sends: replies come through the restricted codec
(plain values and tensors); any other object in a reply becomes another handle. Arguments go
the other way by cloudpickle (the parent is trusted), tensors out-of-band through the arena.

A handle behaves like the object where Python's protocols allow: a missing attribute is an
`AttributeError` (so `hasattr` and `getattr(h, name, default)` work), `len`, indexing, `in`,
iteration, `dir`, `repr` and `str` are the object's own (items that cannot cross become handles
too, one proxy per remote object), and a method returning the object (`.eval()`, `.to()`) returns
this same handle. A handle can be passed back as an argument to calls on handles of its worker.

Example (`repo` is a folder whose hubconf's `net` builds `torch.nn.Linear(4, 2)`):
    >>> import torch
    >>> import isolhub as hub
    >>> m = hub.load(repo, "net", source="local", mode="remote")
    >>> m(torch.ones(1, 4)).shape       # forward runs in the worker; the tensor comes back
    torch.Size([1, 2])
    >>> m.out_features, sorted(m.state_dict())
    (2, ['bias', 'weight'])
    >>> m.close()                       # or: with hub.load(..., mode="remote") as m: ...
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from ._errors import HandleClosedError, IsolhubError, ProtocolError
from ._escape import escape_controls
from ._process.messages import (
    HandleInfo,
    InvokeRequest,
    IterationBatch,
    RaisedReply,
    StateDictReply,
    ValueReply,
)
from ._process.runtime import REPR_LIMIT, kept_object
from ._process.worker import Worker
from ._transport.byvalue import dumps
from ._transport.values import bounded_text, decode_state_dict, decode_value

__all__ = ["RemoteModule", "RemoteObject", "open_handle"]

_MAX_BATCH = 256  # items an iteration asks for at once (it starts at 1 and doubles)
_sending = threading.local()  # the session whose request is being pickled (`__reduce__`)


class _Session:
    """What all handles of one worker share: the worker, and the ids waiting to be released.

    A proxy that is garbage-collected queues its id; the next request carries the queue, and the
    worker drops its reference to the object. (No lock: the queue is filled from finalizers,
    which may run while this thread is inside `invoke`; list append and the swap are atomic.)
    """

    def __init__(self, worker: Worker, timeout: float | None) -> None:
        self.worker = worker
        self.timeout = timeout
        self.to_release: list[int] = []
        self.proxies: weakref.WeakValueDictionary[int, RemoteObject] = weakref.WeakValueDictionary()
        # Items of remote iterators fetched ahead, and the size of the next fetch, by handle id.
        self.ahead: dict[int, tuple[deque[Any], int]] = {}

    def invoke(self, handle_id: int, action: str, *args: Any, name: str = "", **kwargs: Any) -> Any:
        if self.worker.closed:
            raise HandleClosedError(
                f"the worker for {self.worker.label} is gone; load the model again"
            )
        _sending.session = self
        try:
            data, fd, layout = dumps((args, kwargs))
        finally:
            _sending.session = None
        release, self.to_release = self.to_release, []
        message = InvokeRequest(
            id=handle_id, action=action, name=name, payload=data, layout=layout,
            release=tuple(release),
        )  # fmt: skip
        try:
            reply = self.worker.request(
                message,
                (ValueReply, StateDictReply, RaisedReply),
                self.timeout,
                [] if fd is None else [fd],
            )
        finally:
            if fd is not None:
                os.close(fd)
        if isinstance(reply, RaisedReply):
            raise reply.to_exception(self.worker.label)
        try:
            if isinstance(reply, StateDictReply):
                return decode_state_dict(reply.body, reply.fd, reply.layout, self.worker.limits)
            assert isinstance(reply, ValueReply)
            return decode_value(reply.body, reply.fd, reply.layout, self.proxy, self.worker.limits)
        except (KeyError, TypeError, ValueError, ProtocolError) as e:
            self.worker.kill()  # it sent garbage: nothing more it says can be trusted
            raise ProtocolError(f"bad reply from the worker for {self.worker.label}: {e}") from e

    def proxy(self, raw: Any) -> RemoteObject:
        """The proxy for the handle `raw` a reply describes (one per remote object)."""
        return self.proxy_of(HandleInfo.decode(raw))

    def proxy_of(self, info: HandleInfo) -> RemoteObject:
        existing = self.proxies.get(info.id)
        if existing is not None:
            return existing
        cls = RemoteModule if info.module else RemoteObject
        obj = cls(self, info)
        self.proxies[info.id] = obj
        weakref.finalize(obj, self.queue_release, info.id)
        return obj

    def queue_release(self, handle_id: int) -> None:
        """Called when the proxy of `handle_id` is gone: the worker may drop the object."""
        self.ahead.pop(handle_id, None)
        self.to_release.append(handle_id)

    def next_item(self, handle_id: int) -> Any:
        """The next item of the remote iterator `handle_id`, fetched in growing batches.

        A batch is taken from the worker's iterator at once: a generator runs ahead of the
        caller by at most one batch (1, 2, 4, ... up to 256 items).
        """
        ahead, batch = self.ahead.get(handle_id) or (deque(), 1)
        if not ahead:
            try:
                got = IterationBatch.decode(self.invoke(handle_id, "next", batch), batch)
            except ProtocolError as e:
                self.worker.kill()
                raise ProtocolError(
                    f"bad iteration reply from the worker for {self.worker.label}: {e}"
                ) from None
            ahead.extend(got.items)
            if not ahead:
                self.ahead.pop(handle_id, None)
                raise StopIteration
            batch = min(2 * batch, _MAX_BATCH)
        self.ahead[handle_id] = (ahead, batch)
        return ahead.popleft()

    def expect(self, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
        """`value` if it is a `kind`; else the worker lied: kill it and raise."""
        if not isinstance(value, kind) or (kind is int and type(value) is bool):
            self.worker.kill()
            raise ProtocolError(f"the worker for {self.worker.label} answered {what} wrongly")
        return value


class RemoteObject:
    """A proxy for an object living in a worker; attribute reads, calls and protocols run there."""

    __slots__ = ("_session", "_info", "__weakref__")

    def __init__(self, session: _Session, info: HandleInfo) -> None:
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_info", info)

    @property
    def remote_type(self) -> str:
        """The qualified type name of the object in the worker."""
        return self._info.type

    def _invoke(self, action: str, *args: Any, **kwargs: Any) -> Any:
        return self._session.invoke(self._info.id, action, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if (name.startswith("__") and name.endswith("__")) or name in RemoteObject.__slots__:
            raise AttributeError(name)
        return self._invoke("getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._invoke("setattr", value, name=name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("call", *args, **kwargs)

    def __dir__(self) -> list[str]:
        names = self._session.expect(self._invoke("dir"), list, "dir()")
        own = [n for n in dir(type(self)) if not n.startswith("_")]
        return sorted({*(n for n in names if type(n) is str), *own})

    def __len__(self) -> int:
        n = self._session.expect(self._invoke("len"), int, "len()")
        return n if n >= 0 else self._session.expect(n, (), "len()")

    def __bool__(self) -> bool:
        return self._session.expect(self._invoke("bool"), bool, "bool()")

    def __getitem__(self, key: Any) -> Any:
        return self._invoke("getitem", key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._invoke("setitem", key, value)

    def __delitem__(self, key: Any) -> None:
        self._invoke("delitem", key)

    def __contains__(self, item: Any) -> bool:
        return self._session.expect(self._invoke("contains", item), bool, "`in`")

    def __iter__(self) -> Iterator[Any]:
        iterator = self._session.expect(self._invoke("iter"), RemoteObject, "iter()")
        return _iterate(iterator)

    def __next__(self) -> Any:
        return self._session.next_item(self._info.id)

    def __repr__(self) -> str:
        try:
            text = self._session.expect(self._invoke("repr"), str, "repr()")
        except IsolhubError as e:  # a repr must not raise: say what is known
            why = "gone" if self._session.worker.closed else f"repr failed: {type(e).__name__}"
            return f"<remote {self.remote_type} (the worker for {self._session.worker.label} is {why})>"
        return escape_controls(bounded_text(text, REPR_LIMIT + 200))  # printed: escaped

    def __str__(self) -> str:
        try:
            text = self._session.expect(self._invoke("str"), str, "str()")
        except IsolhubError:
            return repr(self)
        return escape_controls(bounded_text(text, REPR_LIMIT + 200))  # printed: escaped

    def __reduce__(self) -> tuple[Any, ...]:
        # Only as an argument to a call on a handle of the same worker, which finds the object.
        if getattr(_sending, "session", None) is not self._session:
            raise TypeError(
                f"a remote handle ({self.remote_type}) can be passed only to calls on handles of "
                "its own worker, not to another worker or pickled; pass a state_dict() instead"
            )
        return (kept_object, (self._info.id,))


def _iterate(iterator: RemoteObject) -> Iterator[Any]:
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        yield item


class RemoteModule(RemoteObject):
    """A proxy for an `nn.Module` (or any object) returned by `load(..., mode="remote")`.

    `state_dict()` comes through shared memory; `close()` (or leaving a `with` block) stops the
    worker; a worker's death closes the handle (`HandleClosedError` on the next use).
    """

    __slots__ = ()

    def state_dict(self, *args: Any, **kwargs: Any) -> OrderedDict[str, Any]:
        """The module's state dict (`prefix=`, `keep_vars=` as torch's), tensors through the arena."""
        return self._invoke("state_dict", *args, **kwargs)

    def close(self) -> None:
        """Stop the worker; every handle from it is closed."""
        self._session.worker.close()

    @property
    def closed(self) -> bool:
        """Whether the worker behind this handle is gone."""
        return self._session.worker.closed

    def __enter__(self) -> RemoteModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_handle(worker: Worker, info: HandleInfo, timeout: float | None) -> RemoteModule:
    """The top-level handle for an object the worker keeps (from a `call` with result=handle)."""
    session = _Session(worker, timeout)
    handle = session.proxy_of(dataclasses.replace(info, module=True))
    assert isinstance(handle, RemoteModule)
    return handle
