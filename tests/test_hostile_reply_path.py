"""The parent side of the reply path holds against a worker that lies about time, memory or fds.

Each hubconf here is hostile code talking straight to its worker's channel (as in
`test_hostile_replies`): it trickles a reply, announces a frame it never sends, describes tensors
far larger than their storage, or sends fds with a reply that takes none. Where it shows
something, an unconfined twin runs the same code and shows the attack is real.
"""

from __future__ import annotations

import os
import socket
import struct
import textwrap
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from test_hostile_replies import PRELUDE

import isolhub as hub
from isolhub._engine import start_worker
from isolhub._process.messages import ListRequest
from isolhub._process.worker import _Zygote
from isolhub._source.snapshot import fetch_snapshot
from isolhub._spec import parse_spec
from isolhub._transport.codec import MAX_FRAME, recv_frame

from hubrepos import CHANNEL, make_repo, spec_of
from procs import open_fds

HOSTILE = """
import torch
import torch.nn as nn

PAD = "x" * 350  # the frame is about 400 bytes: a trickle takes 400 * delay seconds


def _trickle(path, delay):
    sock = channel()
    msg = encode({"ok": True, "kind": "value", "body": encode(PAD), "layout": []})
    frame = struct.pack("!II", len(msg), 0) + msg
    for i in range(len(frame)):
        sock.send(frame[i : i + 1])
        if path:  # replaced whole, so a kill between two bytes never leaves it empty
            with open(path + ".tmp", "w") as f:
                f.write(f"{i + 1} {len(frame)}")
            os.replace(path + ".tmp", path)
        time.sleep(delay)
    time.sleep(30)


def trickle(path=None, delay=0.1):
    _trickle(path, delay)


class Trickler(nn.Module):
    def trickle(self, path=None, delay=0.1):
        _trickle(path, delay)


def trickler():
    return Trickler()


def announce_a_gib():
    sock = channel()
    sock.sendall(struct.pack("!II", (1 << 30) - 1, 0) + b"s" * 1024)
    time.sleep(30)


def expanded():
    return {"w": torch.zeros(1).expand(2**50)}


def big(n):
    return {"w": torch.ones(n)}


class GradLiar(nn.Module):
    def lie(self):
        meta = {"s": 0, "dtype": "int64", "shape": [0], "stride": [1], "offset": 0, "grad": True}
        body = encode(X(), lambda v: {"t": meta})
        send_raw(encode({"ok": True, "kind": "value", "body": body, "layout": [[0, 0]]}))


def grad_liar():
    return GradLiar()
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("hostile")
    body = textwrap.dedent(PRELUDE).replace("MARKER", repr(str(root / "pwned")))
    return spec_of(make_repo(root / "repo", {"hubconf.py": body + textwrap.dedent(HOSTILE)}))


def _sent(path: Path) -> tuple[int, int]:
    sent, total = path.read_text().split()
    return int(sent), int(total)


# ----------------------------------------------------------------------------- one deadline


@pytest.mark.slow
def test_a_trickled_reply_completes_without_a_deadline(hostile: str, tmp_path: Path) -> None:
    """The twin: the trickle is a valid reply, so only the deadline can stop it."""
    log = tmp_path / "sent"
    with hub.Hub(max_workers=1) as h:
        [r] = h.map(None, [hostile], "trickle", kwargs={"path": str(log), "delay": 0.01})
    assert r.ok and r.value == "x" * 350
    sent, total = _sent(log)
    assert sent == total


@pytest.mark.slow
@pytest.mark.parametrize("where", ["load_state_dict", "load_remote", "remote_call", "pool"])
def test_a_trickled_reply_cannot_outrun_the_deadline(
    hostile: str, tmp_path: Path, where: str
) -> None:
    log = tmp_path / "sent"
    kwargs = {"path": str(log)}
    timeout = 8.0  # the trickle takes 40 s; the load before it well under 8 s
    with pytest.raises(hub.WorkerTimeoutError):
        if where == "load_state_dict":
            hub.load_state_dict(hostile, "trickle", timeout=timeout, **kwargs)
        elif where == "load_remote":
            hub.load(hostile, "trickle", mode="remote", timeout=timeout, **kwargs)
        elif where == "remote_call":
            with hub.load(hostile, "trickler", mode="remote", timeout=timeout) as m:
                m.trickle(str(log))
        else:
            with hub.Hub(max_workers=1, timeout=timeout) as h:
                [r] = h.map(None, [hostile], "trickle", kwargs=kwargs)
            raise r.error  # type: ignore[misc]
    sent, total = _sent(log)
    assert sent < total  # cut by the call's one deadline, not waited out byte by byte


@pytest.mark.slow
def test_a_trickled_reply_cannot_outrun_a_sandboxed_call(hostile: str) -> None:
    with pytest.raises(hub.WorkerTimeoutError):
        hub.load(hostile, "trickle", mode="remote", sandbox=hub.Sandbox(wall_seconds=8.0))


@pytest.mark.slow
def test_a_trickled_reply_cannot_outrun_compare(hostile: str) -> None:
    report = hub.compare(hostile, hostile, "trickle", timeout=8.0, sandbox="strict")
    for side in (report.a, report.b):
        assert side.error is not None and side.error.startswith("WorkerTimeoutError")


def test_a_frame_that_stops_midway_is_cut_at_the_deadline_too() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(struct.pack("!II", 100, 0) + b"x" * 10)
        with pytest.raises(TimeoutError):
            recv_frame(a, deadline=time.monotonic() + 0.2)


# ----------------------------------------------------------------------------- memory


def test_a_header_claiming_a_gib_commits_no_memory_before_the_bytes() -> None:
    claim = (1 << 30) - 1
    assert claim <= MAX_FRAME  # under the cap: only committing as bytes arrive protects
    a, b = socket.socketpair()
    with a, b:
        b.sendall(struct.pack("!II", claim, 0) + b"x" * 1024)
        b.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            with pytest.raises(hub.ProtocolError, match="after 1024 of"):
                recv_frame(a)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.slow
def test_a_worker_announcing_a_gib_costs_the_parent_nothing(hostile: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(hub.WorkerTimeoutError):
            hub.load(hostile, "announce_a_gib", mode="remote", timeout=3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_an_expanded_tensor_is_what_an_unconfined_state_dict_returns(hostile: str) -> None:
    """The twin: a real, legal tensor of 2**50 elements on 4 bytes."""
    sd = hub.load_state_dict(hostile, "expanded")
    assert sd["w"].numel() == 2**50 and sd["w"].stride() == (0,)


def test_a_sandboxed_reply_over_the_element_cap_is_refused(hostile: str) -> None:
    with pytest.raises(hub.ProtocolError, match="max_reply_elements"):
        hub.load_state_dict(hostile, "expanded", sandbox="strict")
    with pytest.raises(hub.ProtocolError, match="max_reply_elements"):
        hub.load_state_dict(hostile, "big", 100, sandbox=hub.Sandbox(max_reply_elements=99))
    assert hub.load_state_dict(hostile, "big", 99, sandbox=hub.Sandbox(max_reply_elements=99))


def test_compare_of_a_sandboxed_expanded_tensor_is_refused_not_diffed(hostile: str) -> None:
    report = hub.compare(hostile, hostile, "expanded", sandbox="strict")
    assert report.a.error is not None and report.a.error.startswith("ProtocolError")


@pytest.mark.slow
def test_a_sandboxed_reply_over_the_byte_cap_is_refused(hostile: str) -> None:
    policy = hub.Sandbox(max_reply_bytes=1 << 20)
    with pytest.raises(hub.ProtocolError, match="max_reply_bytes"):
        hub.load_state_dict(hostile, "big", 1 << 20, sandbox=policy)  # a 4 MiB arena
    with hub.Hub(max_workers=1, sandbox=policy) as h:
        [r] = h.map(lambda sd: "x" * (2 << 20), [hostile], "big", args=(1,))
    assert isinstance(r.error, hub.ProtocolError)  # a 2 MiB frame
    assert hub.load_state_dict(hostile, "big", 1000, sandbox=policy)["w"].numel() == 1000


def test_a_tensor_the_parent_cannot_build_is_a_protocol_error_that_kills_the_worker(
    hostile: str,
) -> None:
    with hub.load(hostile, "grad_liar", mode="remote", timeout=30) as m:
        with pytest.raises(hub.ProtocolError, match="cannot require grad"):
            m.lie()
        assert m.closed


# ----------------------------------------------------------------------------- fds

FD_FLOOD = """
import array, os, socket, struct, time
from isolhub._transport.codec import encode

def _flood():
    for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                sock = socket.socket(fileno=os.dup(fd))
                break
        except OSError:
            pass
    fds = []
    for _ in range(16):
        fd = os.memfd_create("flood")
        os.ftruncate(fd, 32 << 20)
        fds.append(fd)
    msg = encode({"ok": True, "value": ["net"]})
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([struct.pack("!II", len(msg), len(fds)), msg], anc)
    time.sleep(30)

_flood()  # at import: every request (list, help, call) gets this reply

def net():
    return 1
"""


# compare asks list and help only after the entrypoint raised: this one answers its own call
# with an error, then (queued behind it) the next request with 16 fds.
FLOOD_AFTER_ERROR = (
    CHANNEL
    + """
import array, os, socket, struct, time
from isolhub._transport.codec import encode

def _frame(sock, msg, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([struct.pack("!II", len(msg), len(fds)), msg], anc)

def net():
    sock = channel()
    error = {"kind": "remote", "type": "builtins.ValueError", "message": "no", "traceback": ""}
    _frame(sock, encode({"ok": False, "error": error}))
    fds = []
    for _ in range(16):
        fd = os.memfd_create("flood")
        os.ftruncate(fd, 32 << 20)
        fds.append(fd)
    _frame(sock, encode({"ok": True, "value": ["net"]}), fds)
    time.sleep(30)
"""
)


def _open_fds() -> set[str]:
    return open_fds()


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> str:
    return spec_of(make_repo(tmp_path_factory.mktemp("flood") / "repo", {"hubconf.py": FD_FLOOD}))


@pytest.mark.slow
def test_fds_sent_with_a_reply_do_arrive(flood: str) -> None:
    """The twin: a caller that takes fds gets all 16 (what a list reply used to drop)."""
    snap = fetch_snapshot(parse_spec(flood, "github"), verbose=False)
    _Zygote.get()
    before = _open_fds()
    with start_worker(snap) as w:
        _, fds = w.exchange(ListRequest(), 30, max_fds=16)
    try:
        assert len(fds) == 16 and _open_fds() - before >= {str(fd) for fd in fds}
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["list", "help", "hub_list", "hub_help", "compare"])
def test_fds_sent_with_a_reply_that_takes_none_are_closed(
    flood: str, what: str, tmp_path: Path
) -> None:
    _Zygote.get()  # started once per process: its socket is not the reply's
    before = _open_fds()
    if what == "compare":
        repo = make_repo(tmp_path / "repo", {"hubconf.py": FLOOD_AFTER_ERROR})
        spec = spec_of(repo)
        report = hub.compare(spec, spec, "net", trust_repo=True, verbose=False, timeout=60)
        assert report.a.error is not None and report.a.error.startswith("RemoteError")
    else:
        with pytest.raises(hub.ProtocolError, match="16 fds"):
            if what == "list":
                hub.list(flood, trust_repo=True, verbose=False)
            elif what == "help":
                hub.help(flood, "net", trust_repo=True, verbose=False)
            else:
                with hub.Hub(max_workers=1, trust_repo=True) as h:
                    h.list(flood) if what == "hub_list" else h.help(flood, "net")
    threading.Event().wait(0.1)  # let the output reader of the killed worker close its pipe
    assert _open_fds() <= before


def test_a_body_that_is_not_bytes_is_refused_not_allocated() -> None:
    from isolhub._transport.codec import decode

    with pytest.raises(hub.ProtocolError, match="got a int"):
        decode(2**40)  # type: ignore[arg-type]  # bytes(2**40) would allocate a TiB


@pytest.mark.parametrize("field", ["max_reply_bytes", "max_reply_elements"])
def test_the_reply_caps_are_checked_like_every_other_cap(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        hub.Sandbox(**{field: -1})
    assert getattr(hub.Sandbox(), field) is not None  # safe without configuration
