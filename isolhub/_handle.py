"""Remote handles: the object stays in its worker; calls, attribute reads and methods go there.

The parent never unpickles what the worker sends: replies come through the restricted codec
(plain values and tensors); any other object in a reply becomes another handle. Arguments go
the other way by cloudpickle (the parent is trusted), tensors out-of-band through the arena.

Example:
    >>> m = hub.load("someone/unvetted:main", "net", mode="remote")
    >>> y = m(x)                  # forward runs in the worker
    >>> m.eval(); sd = m.state_dict()
    >>> m.close()                 # or: with hub.load(..., mode="remote") as m: ...
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import Any

from ._byvalue import dumps
from ._errors import HandleClosedError, ProtocolError
from ._process import Worker
from ._values import decode_state_dict, decode_value


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

    def invoke(self, handle_id: int, action: str, *args: Any, name: str = "", **kwargs: Any) -> Any:
        if self.worker.closed:
            raise HandleClosedError(
                f"the worker for {self.worker.label} is gone; load the model again"
            )
        data, fd, layout = dumps((args, kwargs))
        release, self.to_release = self.to_release, []
        message = {
            "op": "invoke",
            "id": handle_id,
            "action": action,
            "name": name,
            "payload": data,
            "layout": layout,
            "release": release,
        }
        try:
            reply, fds = self.worker.request(message, self.timeout, [] if fd is None else [fd])
        finally:
            if fd is not None:
                os.close(fd)
        if len(fds) > 1:
            for f in fds:
                os.close(f)
            raise ProtocolError("a reply came with more than one fd")
        try:
            fd = fds[0] if fds else None
            if reply.get("kind") == "state_dict":
                return decode_state_dict(reply["body"], fd, reply["layout"])
            value = decode_value(reply["body"], fd, reply["layout"], self.proxy)
        except (KeyError, TypeError, ValueError, ProtocolError) as e:
            self.worker.kill()  # it sent garbage: nothing more it says can be trusted
            raise ProtocolError(f"bad reply from the worker for {self.worker.label}: {e}") from e
        return value

    def proxy(self, info: Any) -> RemoteObject:
        if not isinstance(info, dict) or type(info.get("id")) is not int:
            raise ProtocolError("malformed handle in a reply")
        existing = self.proxies.get(info["id"])
        if existing is not None:
            return existing
        cls = RemoteModule if info.get("module") else RemoteObject
        obj = cls(self, info)
        self.proxies[info["id"]] = obj
        weakref.finalize(obj, self.queue_release, info["id"])
        return obj

    def queue_release(self, handle_id: int) -> None:
        """Called when the proxy of `handle_id` is gone: the worker may drop the object."""
        self.to_release.append(handle_id)


class RemoteObject:
    """A proxy for an object living in a worker; attribute reads and calls run there."""

    __slots__ = ("_session", "_info", "__weakref__")

    def __init__(self, session: _Session, info: dict[str, Any]) -> None:
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_info", info)

    @property
    def remote_type(self) -> str:
        """The qualified type name of the object in the worker."""
        return str(self._info.get("type"))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._session.invoke(self._info["id"], "getattr", name=name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._session.invoke(self._info["id"], "setattr", value, name=name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._session.invoke(self._info["id"], "call", *args, **kwargs)

    def __repr__(self) -> str:
        return f"<remote {self.remote_type} in worker pid {self._session.worker.pid}: {self._info.get('repr', '')[:200]}>"


class RemoteModule(RemoteObject):
    """A proxy for an `nn.Module` (or any object) returned by `load(..., mode="remote")`.

    `state_dict()` comes through shared memory; `close()` (or leaving a `with` block) stops the
    worker; a worker's death closes the handle (`HandleClosedError` on the next use).
    """

    __slots__ = ()

    def state_dict(self) -> OrderedDict[str, Any]:
        """The module's state dict, tensors through the arena, no pickle."""
        return self._session.invoke(self._info["id"], "state_dict")

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


def open_handle(worker: Worker, info: dict[str, Any], timeout: float | None) -> RemoteModule:
    """The top-level handle for an object the worker keeps (from a `call` with result=handle)."""
    session = _Session(worker, timeout)
    handle = session.proxy(dict(info, module=True))
    assert isinstance(handle, RemoteModule)
    return handle
