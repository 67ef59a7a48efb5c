"""Frames on the parent⇄worker channel, and the restricted codec for what the worker says.

A frame is an 8-byte header (payload length, number of passed fds) followed by the payload; fds
travel as `SCM_RIGHTS` ancillary data on the header. Frames have a size cap.

The codec encodes None, bool, int, float, str, bytes, lists, tuples, dicts with str keys and,
through hooks, tensors. Decoding can build nothing else, so a hostile worker's reply can never
run code in the parent (unlike pickle).

Example:
    >>> decode(encode({"ok": True, "names": ["resnet18"]}))
    {'ok': True, 'names': ['resnet18']}
"""

from __future__ import annotations

import array
import os
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import ProtocolError

__all__ = [
    "ExtDecoder",
    "ExtEncoder",
    "MAX_FDS",
    "MAX_FRAME",
    "ReplyLimits",
    "Spinner",
    "decode",
    "encode",
    "recv_frame",
    "send_frame",
    "spin_poll",
]

MAX_FRAME = 1 << 30
MAX_FDS = 16
_HEADER = struct.Struct("!II")
_MAX_DEPTH = 64
_SMALL_FRAME = 64 << 10
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # the enum's own `&` is a Python call


@dataclass(frozen=True)
class ReplyLimits:
    """What a worker may make the parent hold or print.

    `frame_bytes`: the size of one frame (every worker; its header is only a claim, memory is
    committed as the bytes arrive). `arena_bytes` and `elements` (None: no cap): one reply's
    tensor arena, and its tensors' elements counted as their shapes say (a stride-0 view of one
    float counts in full); a sandbox policy sets them (`Sandbox.max_reply_*`).
    `output_bytes`: bytes of its output forwarded to the parent's stderr in all (None: no
    total; the rate cap holds regardless); a sandbox policy sets it to `file_size_bytes`.
    `output_cr`: carriage returns in that output are forwarded as they are (a trusted worker's
    progress bars), not escaped as every other control character is.
    """

    frame_bytes: int = MAX_FRAME
    arena_bytes: int | None = None
    elements: int | None = None
    output_bytes: int | None = None
    output_cr: bool = True


# Codec tags.
_NONE, _TRUE, _FALSE, _INT, _BIGINT, _FLOAT = b"N", b"T", b"F", b"i", b"I", b"f"
_STR, _BYTES, _LIST, _TUPLE, _DICT, _EXT = b"s", b"b", b"l", b"t", b"d", b"X"
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_F64 = struct.Struct("!d")


def send_frame(sock: socket.socket, payload: bytes, fds: Sequence[int] = ()) -> None:
    """Send one frame (and `fds`, which stay open on this side)."""
    if len(payload) > MAX_FRAME or len(fds) > MAX_FDS:
        raise ProtocolError(f"frame too large to send: {len(payload)} bytes, {len(fds)} fds")
    header = _HEADER.pack(len(payload), len(fds))
    # Header and payload in one system call: sent apart, the receiver wakes up twice per frame.
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([header, payload], anc)
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent < len(header) + len(payload):
        sock.sendall(memoryview(payload)[sent - len(header) :])


def recv_frame(
    sock: socket.socket, max_size: int = MAX_FRAME, deadline: float | None = None
) -> tuple[bytes, list[int]] | None:
    """Receive one frame: `(payload, fds)`, or None on a clean end of stream before a header.

    `deadline` (a `time.monotonic()` value) bounds the whole frame, however the peer spaces
    its bytes. Memory is committed as the payload arrives (the buffer at most doubles what has
    come), never on the header's word alone.

    Raises:
        ProtocolError: a truncated or oversize frame, or too many fds.
        TimeoutError: the frame was not complete by `deadline`.
    """
    header = bytearray()
    fds: list[int] = []
    try:
        while len(header) < _HEADER.size:
            _wait_budget(sock, deadline)
            data, anc, flags, _addr = sock.recvmsg(_HEADER.size - len(header), _ANC_SPACE)
            if anc:
                fds.extend(_fds_from(anc))
            if flags & _MSG_CTRUNC:
                raise ProtocolError("too many file descriptors in one frame")
            if not data:
                if header:
                    raise ProtocolError("channel closed in the middle of a frame header")
                return None
            header += data
        size, nfds = _HEADER.unpack(header)
        if size > max_size or nfds != len(fds):
            raise ProtocolError(
                f"bad frame header: {size} bytes (cap {max_size}), {nfds} fds announced, "
                f"{len(fds)} received"
            )
        _wait_budget(sock, deadline)
        # Most frames are small and arrive whole: one call and no copy.
        first = sock.recv(min(size, _SMALL_FRAME))
        if len(first) == size:
            done, fds = fds, []
            return first, done
        if not first and size:
            raise ProtocolError(f"channel closed after 0 of {size} frame bytes")
        payload = bytearray(first)
        got = len(payload)
        while got < size:
            if got == len(payload):
                payload += bytes(min(max(got, _SMALL_FRAME), size - got))
            _wait_budget(sock, deadline)
            n = sock.recv_into(memoryview(payload)[got:], len(payload) - got)
            if n == 0:
                raise ProtocolError(f"channel closed after {got} of {size} frame bytes")
            got += n
        done, fds = fds, []
        return bytes(payload), done
    finally:
        _close_all(fds)  # what was not handed over: a failed frame's fds
        if deadline is not None:
            sock.settimeout(None)


def _wait_budget(sock: socket.socket, deadline: float | None) -> None:
    """Give the next read what is left of `deadline` (TimeoutError once it has passed)."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the frame did not arrive in time")
        sock.settimeout(left)


def spin_poll(
    poll: Callable[[int], list[tuple[int, int]]], seconds: float
) -> list[tuple[int, int]]:
    """Poll without sleeping for up to `seconds`: the events, or [] when nothing came.

    A reply that comes within the spin costs no wake-up of this process, which on a virtual
    machine costs more than a short remote call (`_config.spin_seconds` says how long).
    """
    if seconds <= 0:
        return []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        events = poll(0)
        if events:
            return events
        os.sched_yield()  # the other side may need this core to answer (a busy machine)
    return []


# A `sched_yield` that took this long ran another process on this core: the core is contended.
_PREEMPTED = 50e-6


class Spinner:
    """`spin_poll` that stops spinning while spinning does not pay (adaptive spinning).

    When the other side is not running (the machine is busy, or it is computing), each spin is
    a wasted core: after a spin that found nothing, the next 1, 2, 4 … 64 waits sleep at once;
    a spin that finds the answer spins again next time. On a contended core each yield hands
    the core to another process for a time slice, so a spin stops at the first yield that took
    longer than `_PREEMPTED` (50 µs; an uncontended one takes about 1 µs) and backs off the
    same way, whatever it found: sleeping in `poll`, this side is woken when the answer comes.

    Example:
        >>> Spinner(0.0002)(lambda timeout: [(3, 1)])
        [(3, 1)]
    """

    def __init__(self, seconds: float, yield_: Callable[[], None] = os.sched_yield) -> None:
        self.seconds = seconds
        self._yield = yield_
        self._skip = 0
        self._backoff = 0

    def __call__(self, poll: Callable[[int], list[tuple[int, int]]]) -> list[tuple[int, int]]:
        if self.seconds <= 0:
            return []
        if self._skip:
            self._skip -= 1
            return []
        events, contended = self._spin(poll)
        if events and not contended:
            self._backoff = 0
        else:
            self._backoff = min(64, max(1, 2 * self._backoff))
            self._skip = self._backoff
        return events

    def _spin(
        self, poll: Callable[[int], list[tuple[int, int]]]
    ) -> tuple[list[tuple[int, int]], bool]:
        """`spin_poll`, stopped by a preempted yield: (the events, whether it was)."""
        clock = time.perf_counter
        end = clock() + self.seconds
        while True:
            events = poll(0)
            if events:
                return events, False
            before = clock()
            if before >= end:
                return [], False
            self._yield()  # the other side may need this core to answer
            if clock() - before > _PREEMPTED:
                return poll(0), True


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def _close_all(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


ExtEncoder = Callable[[Any], Any]
ExtDecoder = Callable[[Any], Any]


def encode(obj: Any, ext: ExtEncoder | None = None) -> bytes:
    """Encode `obj`; values of other types go through `ext(obj)`, which returns a plain value.

    Raises:
        ProtocolError: `obj` holds a value of a type the codec cannot carry.
    """
    out = bytearray()
    _encode(obj, out, ext, 0)
    return bytes(out)


# Tag and length (or tag and number) packed in one call: the codec runs once per value, and
# the per-call overhead is what a state dict of 500 tensors or a remote call pays for.
_PACK_TAG_U32 = struct.Struct("!cI").pack
_PACK_TAG_I64 = struct.Struct("!cq").pack
_PACK_TAG_F64 = struct.Struct("!cd").pack
_BYTES_TYPES = (bytes, bytearray, memoryview)


def _encode(obj: Any, out: bytearray, ext: ExtEncoder | None, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ProtocolError("value nested too deeply to encode")
    t = type(obj)
    if t is str:
        data = obj.encode("utf-8", "surrogatepass")
        out += _PACK_TAG_U32(_STR, len(data))
        out += data
    elif t is int:
        if -(1 << 63) <= obj < (1 << 63):
            out += _PACK_TAG_I64(_INT, obj)
        else:
            data = str(obj).encode()
            out += _PACK_TAG_U32(_BIGINT, len(data))
            out += data
    elif t is dict:
        out += _PACK_TAG_U32(_DICT, len(obj))
        for key, value in obj.items():
            if type(key) is not str:
                raise ProtocolError(
                    f"dict key {key!r} is not a str; the codec carries str keys only"
                )
            data = key.encode("utf-8", "surrogatepass")
            out += _PACK_TAG_U32(_STR, len(data))
            out += data
            _encode(value, out, ext, depth + 1)
    elif t is list or t is tuple:
        out += _PACK_TAG_U32(_LIST if t is list else _TUPLE, len(obj))
        for item in obj:
            _encode(item, out, ext, depth + 1)
    elif t is float:
        out += _PACK_TAG_F64(_FLOAT, obj)
    elif obj is None:
        out += _NONE
    elif obj is True:
        out += _TRUE
    elif obj is False:
        out += _FALSE
    elif t in _BYTES_TYPES:
        data = bytes(obj)
        out += _PACK_TAG_U32(_BYTES, len(data))
        out += data
    elif ext is not None:
        out += _EXT
        _encode(ext(obj), out, None, depth + 1)
    else:
        raise ProtocolError(f"cannot encode a value of type {type(obj).__qualname__}")


def decode(data: bytes, ext: ExtDecoder | None = None, *, max_items: int = 10_000_000) -> Any:
    """Decode what `encode` produced; extension values are rebuilt by `ext(plain_value)`.

    Raises:
        ProtocolError: the bytes are malformed, truncated, too deep or too large.
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytearray, memoryview)):  # bytes(2**40) would allocate it
            raise ProtocolError(f"expected encoded bytes, got a {type(data).__name__}")
        data = bytes(data)
    reader = _Reader(data, ext, max_items)
    value = reader.value(0)
    if reader.pos != len(data):
        raise ProtocolError(f"{len(data) - reader.pos} trailing bytes after the encoded value")
    return value


_U32_FROM = _U32.unpack_from
_I64_FROM = _I64.unpack_from
_F64_FROM = _F64.unpack_from
# Tags as the ints that indexing bytes gives.
_T_NONE, _T_TRUE, _T_FALSE, _T_INT, _T_BIGINT, _T_FLOAT = b"NTFiIf"
_T_STR, _T_BYTES, _T_LIST, _T_TUPLE, _T_DICT, _T_EXT = b"sbltdX"


def _truncated() -> ProtocolError:
    return ProtocolError("truncated value in a reply frame")


class _Reader:
    """A recursive-descent decoder over one bytes object (bounds checked at every step)."""

    __slots__ = ("data", "end", "pos", "ext", "items_left")

    def __init__(self, data: bytes, ext: ExtDecoder | None, max_items: int) -> None:
        self.data = data
        self.end = len(data)
        self.pos = 0
        self.ext = ext
        self.items_left = max_items

    def count(self) -> int:
        pos = self.pos
        if pos + 4 > self.end:
            raise _truncated()
        (n,) = _U32_FROM(self.data, pos)
        self.pos = pos + 4
        self.items_left -= n
        if self.items_left < 0:
            raise ProtocolError("too many items in a reply frame")
        return n

    def blob(self) -> bytes:
        data, pos = self.data, self.pos
        if pos + 4 > self.end:
            raise _truncated()
        (n,) = _U32_FROM(data, pos)
        start = pos + 4
        stop = start + n
        if stop > self.end:
            raise _truncated()
        self.pos = stop
        return data[start:stop]

    def text(self) -> str:
        try:
            return self.blob().decode("utf-8", "surrogatepass")
        except ValueError as e:
            raise ProtocolError(f"malformed text in a reply frame: {e}") from None

    def value(self, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ProtocolError("value nested too deeply in a reply frame")
        data, pos = self.data, self.pos
        if pos >= self.end:
            raise _truncated()
        tag = data[pos]
        self.pos = pos + 1
        if tag == _T_STR:
            return self.text()
        if tag == _T_INT:
            if pos + 9 > self.end:
                raise _truncated()
            self.pos = pos + 9
            return _I64_FROM(data, pos + 1)[0]
        if tag == _T_DICT:
            out: dict[str, Any] = {}
            value = self.value
            for _ in range(self.count()):
                if depth < _MAX_DEPTH and self.pos < self.end and data[self.pos] == _T_STR:
                    self.pos += 1
                    key = self.text()
                else:
                    key = value(depth + 1)
                    if type(key) is not str:
                        raise ProtocolError("a dict key in a reply frame is not a str")
                out[key] = value(depth + 1)
            return out
        if tag in (_T_LIST, _T_TUPLE):
            value = self.value
            items = [value(depth + 1) for _ in range(self.count())]
            return items if tag == _T_LIST else tuple(items)
        if tag == _T_NONE:
            return None
        if tag == _T_TRUE:
            return True
        if tag == _T_FALSE:
            return False
        if tag == _T_FLOAT:
            if pos + 9 > self.end:
                raise _truncated()
            self.pos = pos + 9
            return _F64_FROM(data, pos + 1)[0]
        if tag == _T_BYTES:
            return self.blob()
        if tag == _T_BIGINT:
            text = self.text()
            try:
                return int(text)
            except ValueError as e:
                raise ProtocolError(f"malformed text in a reply frame: {e}") from None
        if tag == _T_EXT and self.ext is not None:
            return self.ext(self.value(depth + 1))
        raise ProtocolError(f"unknown tag {bytes([tag])!r} in a reply frame")
