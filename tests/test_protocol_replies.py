"""Every reply a worker sends is a frozen dataclass of `_process.messages`, decoded in one place.

`decode(raw, fds)` checks each field's type and the number of fds; a reply of the wrong shape
is a `ProtocolError` and its fds are closed, whether it comes from a decoded raw dict or from
a real worker (which is then killed). Each class round-trips through the codec.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import isolhub
from isolhub._compare.worker import open_session
from isolhub._engine import start_worker
from isolhub._process import messages as _messages
from isolhub._process.messages import (
    RESULT_REPLIES,
    ArenaReply,
    BrokerAnswer,
    BrokerRequest,
    CallRequest,
    ComparePart,
    CompareStep,
    CompareSummary,
    DocReply,
    Effects,
    EntrypointsReply,
    Forked,
    ForkRequest,
    HandleInfo,
    HandleReply,
    IterationBatch,
    ListRequest,
    PickleReply,
    Preloaded,
    PreloadRequest,
    Provided,
    ProvidedRequest,
    RaisedReply,
    Reply,
    StateDictReply,
    ValueReply,
    Waited,
    WaitRequest,
    WorkerInit,
    ZygoteHello,
    ZygoteRequest,
    decode_reply,
    zygote_refusal,
    zygote_request,
)
from isolhub._source.snapshot import fetch_snapshot
from isolhub._spec import parse_spec
from isolhub._transport.codec import decode, encode
from isolhub._transport.values import decode_value, encode_value

from hubrepos import CHANNEL, make_repo, spec_of
from procs import open_fds

HANDLE = HandleInfo(3, "torch.nn.Linear", True, True)
WARNING = {
    "category": ["UserWarning"],
    "message": "m",
    "filename": "f.py",
    "lineno": 1,
    "module": "m",
}

# One of each reply class, as a worker would send it (fds: how many go with it).
REPLIES: list[tuple[Reply, int]] = [
    (EntrypointsReply(("net", "Net")), 0),
    (DocReply("Makes a net."), 0),
    (DocReply(None), 0),
    (PickleReply(b"pickle", b"\0" * 16), 1),
    (PickleReply(b"pickle", [[0, 8]]), 0),
    (PickleReply(b"pickle", b"\0" * 16, pull=True), 0),
    (ArenaReply(b"\0" * 16), 1),
    (ValueReply(b"body", []), 0),
    (ValueReply(b"body", b"\0" * 16), 1),
    (StateDictReply(b"body", b"\0" * 16), 1),
    (HandleReply(HANDLE), 0),
    (RaisedReply("KeyError", "dict", "", (), "builtins.KeyError", "'w'", "Traceback..."), 0),
    (RaisedReply("AttributeError", "Net", "featurs", ("features",), "T", "no", "tb"), 0),
]


def _reply_classes() -> set[type]:
    return {
        c
        for c in vars(_messages).values()
        if isinstance(c, type) and issubclass(c, Reply) and c is not Reply
    }


def test_every_reply_class_is_exercised() -> None:
    assert {type(r) for r, _ in REPLIES} == _reply_classes()
    assert set(RESULT_REPLIES.values()) <= _reply_classes()


@pytest.fixture
def pipe_fds() -> Iterator[Callable[[int], list[int]]]:
    """`make(n)`: n open fds (ends of pipes); whatever the test leaves open is closed after."""
    made: list[int] = []

    def make(n: int) -> list[int]:
        for _ in range(n):
            made.extend(os.pipe())
        return made[-2 * n :: 2] if n else []

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _wire(message: Any) -> Any:
    """`message` as the worker sends it and the parent's codec rebuilds it."""
    return decode(encode(message.to_wire()))


@pytest.mark.parametrize(("reply", "n_fds"), REPLIES, ids=lambda r: type(r).__name__)
def test_every_reply_round_trips_through_the_codec_with_its_fds(
    reply: Reply, n_fds: int, pipe_fds: Callable[[int], list[int]]
) -> None:
    fds = pipe_fds(n_fds)
    fd = fds[0] if fds else None
    assert type(reply).decode(_wire(reply), fds) == _with_fd(reply, fd)
    assert decode_reply(_wire(reply), [], (type(reply),)) == reply


def _with_fd(reply: Any, fd: int | None) -> Any:
    return dataclasses.replace(reply, fd=fd) if "fd" in reply.__dataclass_fields__ else reply


# One of each other message that round-trips through the codec.
OTHER_MESSAGES: list[Any] = [
    Effects([], 0),
    Effects([WARNING], 2, {"random": [3, [1, 2], None]}, ("numpy",)),
    IterationBatch((1, "two", None), True),
    HANDLE,
    ZygoteHello(True, 42),
    ZygoteHello(False, unsafe="grpc"),
    ZygoteHello(False, error="ImportError: no torch"),
    Forked(42),
    Waited(-9),
    Preloaded(("numpy",), None),
    Provided({"torch": "2.5.0"}),
    BrokerRequest("https://h.example/w.pt", "ab12"),
    BrokerRequest("https://h.example/w.pt"),
    BrokerAnswer(error="host 'evil.example' is not in its weight_hosts"),
]
# Decoded from what a real session or worker makes, in tests of their own here
# (`test_a_compare_*`, `test_an_init_*`) and in test_protocol_messages.py (`Hello`, `ErrorRecord`).
DECODED_ELSEWHERE = {CompareStep, CompareSummary, ComparePart, WorkerInit, _messages.Hello}
DECODED_ELSEWHERE |= {_messages.ErrorRecord}


def test_every_message_class_is_exercised() -> None:
    decoded = {
        c
        for c in vars(_messages).values()
        if isinstance(c, type) and c.__module__ == _messages.__name__ and hasattr(c, "decode")
    }
    exercised = {type(m) for m in OTHER_MESSAGES} | DECODED_ELSEWHERE | _reply_classes()
    assert decoded == exercised | {Reply}


@pytest.mark.parametrize("message", OTHER_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_other_message_round_trips_through_the_codec(message: Any) -> None:
    wire = _wire(message)
    if isinstance(message, IterationBatch):
        assert IterationBatch.decode(wire, 256) == message
    elif isinstance(message, BrokerAnswer):
        assert BrokerAnswer.decode(wire, []) == message
    else:
        assert type(message).decode(wire) == message


def test_a_download_answer_round_trips_with_its_fd(pipe_fds: Callable[[int], list[int]]) -> None:
    (fd,) = pipe_fds(1)
    answer = BrokerAnswer(name="w.pt", fd=fd)
    assert BrokerAnswer.decode(_wire(answer), [fd]) == answer


def test_an_init_round_trips_as_the_parent_pickles_it() -> None:
    init = WorkerInit(
        snapshot="/snap",
        module_name="isolhub_hubconf_abc",
        scratch="/tmp/w",
        hub_dir="/hub",
        env={"HOME": "/h"},
        env_overrides={"X": "1"},
        memory_bytes=1 << 30,
        overlay="/site",
        policy=isolhub.Sandbox(weight_hosts=("h.example",)),
        spin=0.25,
        threads=2,
    )
    assert WorkerInit.decode(pickle.loads(pickle.dumps(init.to_wire()))) == init
    assert WorkerInit.same_protocol(init.to_wire())


@pytest.mark.parametrize("threads", [None, 1, 4096])
def test_an_init_takes_no_thread_count_or_one_from_1_to_4096(threads: int | None) -> None:
    init = WorkerInit(snapshot="/snap", module_name="m", scratch="/tmp/w", threads=threads)
    assert WorkerInit.decode(init.to_wire()).threads == threads


# -- hostile: a decoded raw dict of the wrong shape ----------------------------------------------

OK_HANDLE = {"id": 1, "type": "T", "module": True, "callable": True}
RECORD = {"kind": "remote", "type": "builtins.KeyError", "message": "'w'", "traceback": "tb"}
RAISED = dict(RECORD, missing=[], builtin="KeyError", target="dict", name="", suggestions=[])
PAIR = b"\0" * 16

# (reply class, raw reply, fds sent with it): each wrong in one way.
HOSTILE: list[tuple[type[Reply], Any, int]] = [
    (EntrypointsReply, {"ok": True, "value": "net"}, 0),  # wrong field type
    (EntrypointsReply, {"ok": True, "value": ["net", 1]}, 0),
    (EntrypointsReply, {"ok": True}, 0),  # missing field
    (EntrypointsReply, {"ok": True, "value": [], "more": 1}, 0),  # unknown field
    (EntrypointsReply, {"ok": True, "value": ["net"]}, 1),  # an fd where none goes
    (EntrypointsReply, ["net"], 0),  # not a message
    (DocReply, {"ok": True, "value": 3}, 0),
    (DocReply, {"ok": "yes", "value": None}, 0),
    (DocReply, {"ok": True, "value": None}, 16),
    (PickleReply, {"ok": True, "kind": "pickle", "data": "text", "layout": PAIR}, 1),
    (PickleReply, {"ok": True, "kind": "pickle", "data": b"p", "layout": 7}, 1),
    (PickleReply, {"ok": True, "kind": "pickle", "data": b"p"}, 1),
    (PickleReply, {"ok": True, "kind": "pickle", "data": b"p", "layout": PAIR, "pull": 1}, 0),
    (PickleReply, {"ok": True, "kind": "pickle", "data": b"p", "layout": PAIR, "pull": True}, 1),
    (PickleReply, {"ok": True, "kind": "pickle", "data": b"p", "layout": [], "pull": True}, 0),
    (PickleReply, {"ok": True, "kind": "pickle", "data": b"p", "layout": PAIR}, 2),
    (ArenaReply, {"ok": True, "kind": "arena", "layout": "pairs"}, 1),
    (ArenaReply, {"ok": True, "kind": "arena"}, 1),
    (ArenaReply, {"ok": True, "kind": "arena", "layout": PAIR}, 2),
    (ValueReply, {"ok": True, "kind": "value", "body": "42", "layout": []}, 0),
    (ValueReply, {"ok": True, "kind": "value", "layout": []}, 1),
    (ValueReply, {"ok": True, "kind": "value", "body": b"", "layout": [], "pad": "x"}, 0),
    (ValueReply, {"ok": True, "kind": "value", "body": b"", "layout": PAIR}, 2),
    (ValueReply, {"ok": True, "body": b"", "layout": []}, 0),  # no kind
    (StateDictReply, {"ok": True, "kind": "state_dict", "body": None, "layout": PAIR}, 1),
    (StateDictReply, {"ok": True, "kind": "state_dict", "body": b"", "layout": PAIR}, 2),
    (HandleReply, {"ok": True, "kind": "handle", "handle": dict(OK_HANDLE, id="1")}, 0),
    (HandleReply, {"ok": True, "kind": "handle", "handle": dict(OK_HANDLE, module=1)}, 0),
    (HandleReply, {"ok": True, "kind": "handle", "handle": {"id": 1}}, 0),
    (HandleReply, {"ok": True, "kind": "handle", "handle": OK_HANDLE}, 1),
    (RaisedReply, {"ok": True, "kind": "raised", "error": dict(RAISED, builtin="SystemExit")}, 0),
    (RaisedReply, {"ok": True, "kind": "raised", "error": dict(RAISED, suggestions="x")}, 0),
    (RaisedReply, {"ok": True, "kind": "raised", "error": dict(RAISED, message=3)}, 0),
    (RaisedReply, {"ok": True, "kind": "raised", "error": RECORD}, 0),
    (RaisedReply, {"ok": True, "kind": "raised", "error": RAISED}, 1),
]


@pytest.mark.parametrize(("cls", "raw", "n_fds"), HOSTILE)
def test_a_reply_of_the_wrong_shape_is_a_protocol_error_that_closes_its_fds(
    cls: type[Reply], raw: Any, n_fds: int, pipe_fds: Callable[[int], list[int]]
) -> None:
    fds = pipe_fds(n_fds)
    with pytest.raises(isolhub.ProtocolError):
        cls.decode(raw, fds)
    assert not any(_is_open(fd) for fd in fds)
    fds = pipe_fds(n_fds)
    with pytest.raises(isolhub.ProtocolError):
        decode_reply(raw, fds, (cls,))
    assert not any(_is_open(fd) for fd in fds)


def test_a_reply_of_another_kind_than_asked_is_refused_so_no_value_is_unpickled(
    pipe_fds: Callable[[int], list[int]],
) -> None:
    fds = pipe_fds(1)
    raw = {"ok": True, "kind": "pickle", "data": b"p", "layout": PAIR}
    with pytest.raises(isolhub.ProtocolError, match="'value' was asked for"):
        decode_reply(raw, fds, (ValueReply,))
    assert not _is_open(fds[0])


def _step(**changes: Any) -> dict[str, Any]:
    step = {
        "forward_s": {"": 0.5},
        "errors": {},
        "outputs": {"output": torch.ones(2)},
        "values": {"n": 3},
        "uncompared": {},
        "layers": [{"name": "fc", "type": "Linear", "dtype": "float32", "shape": [2], "mean": 1.0}],
        "activations": {},
    }
    step.update(changes)
    return {k: v for k, v in step.items() if v is not None}


@pytest.mark.parametrize(
    ("decode_it", "value"),
    [
        (lambda v: Effects.decode(v), {"colour": "red"}),
        (lambda v: Effects.decode(v), {"imported": ["os.path"]}),
        (lambda v: Effects.decode(v), {"warnings": [{"message": "m"}], "warnings_dropped": 0}),
        (lambda v: Effects.decode(v), ["rng"]),
        (lambda v: IterationBatch.decode(v, 1), {"items": [1, 2], "more": True}),
        (lambda v: IterationBatch.decode(v, 4), {"items": [1], "more": 1}),
        (lambda v: IterationBatch.decode(v, 4), {"items": [1]}),
        (lambda v: IterationBatch.decode(v, 4), {"items": "abc", "more": False}),
        (lambda v: HandleInfo.decode(v), dict(OK_HANDLE, type=["T"])),
        (lambda v: CompareStep.decode(v), _step(forward_s={"": -1.0})),
        (lambda v: CompareStep.decode(v), _step(errors={"": 3})),
        (lambda v: CompareStep.decode(v), _step(outputs={"output": [1.0]})),
        (lambda v: CompareStep.decode(v), _step(layers=[{"name": "fc"}])),
        (lambda v: CompareStep.decode(v), _step(layers=None)),
        (lambda v: CompareStep.decode(v), _step(extra={})),
        (lambda v: ZygoteHello.decode(v), {"ready": True}),
        (lambda v: ZygoteHello.decode(v), {"ready": False, "unsafe": 3}),
        (lambda v: Forked.decode(v), {"pid": "42"}),
        (lambda v: Waited.decode(v), {}),
        (lambda v: Preloaded.decode(v), {"preloaded": "numpy", "unsafe": None}),
        (lambda v: Provided.decode(v), {"provided": ["torch"]}),
    ],
)
def test_a_message_in_a_reply_of_the_wrong_shape_is_a_protocol_error(
    decode_it: Callable[[Any], Any], value: Any
) -> None:
    with pytest.raises(isolhub.ProtocolError):
        decode_it(value)


BROKER = {"url": "https://h.example/w.pt", "hash_prefix": None}


@pytest.mark.parametrize(
    ("raw", "n_fds"),
    [
        ({"broker": dict(BROKER, url=7)}, 0),
        ({"broker": dict(BROKER, url=b"https://h.example/w.pt")}, 0),
        ({"broker": dict(BROKER, url="https://h.example/" + "a" * (1 << 17))}, 0),  # huge
        ({"broker": dict(BROKER, hash_prefix=12)}, 0),
        ({"broker": dict(BROKER, hash_prefix="a" * 65)}, 0),
        ({"broker": {"url": BROKER["url"]}}, 0),  # missing field
        ({"broker": dict(BROKER, dest="/etc/passwd")}, 0),  # unknown field
        ({"broker": BROKER, "ok": True}, 0),
        ({"broker": [BROKER["url"]]}, 0),
        ({"broker": BROKER}, 1),  # an fd where none goes
        ("https://h.example/w.pt", 0),
    ],
)
def test_a_download_request_of_the_wrong_shape_is_a_protocol_error_that_closes_its_fds(
    raw: Any, n_fds: int, pipe_fds: Callable[[int], list[int]]
) -> None:
    fds = pipe_fds(n_fds)
    with pytest.raises(isolhub.ProtocolError):
        BrokerRequest.decode(raw, fds)
    assert not any(_is_open(fd) for fd in fds)


@pytest.mark.parametrize(
    ("raw", "n_fds"),
    [
        ({"ok": True, "name": "w.pt"}, 0),  # a file without its fd
        ({"ok": True, "name": "w.pt"}, 2),
        ({"ok": True, "name": 3}, 1),
        ({"ok": True}, 1),
        ({"ok": False, "error": "no"}, 1),  # a refusal with an fd
        ({"ok": False, "error": None}, 0),
        ({"ok": False, "error": "no", "name": "w.pt"}, 0),
        ({"ok": "yes", "name": "w.pt"}, 1),
        (["w.pt"], 1),
    ],
)
def test_a_download_answer_of_the_wrong_shape_is_a_protocol_error_that_closes_its_fds(
    raw: Any, n_fds: int, pipe_fds: Callable[[int], list[int]]
) -> None:
    fds = pipe_fds(n_fds)
    with pytest.raises(isolhub.ProtocolError):
        BrokerAnswer.decode(raw, fds)
    assert not any(_is_open(fd) for fd in fds)


INIT = WorkerInit(snapshot="/snap", module_name="m", scratch="/tmp/w").to_wire()


@pytest.mark.parametrize(
    "raw",
    [
        {k: v for k, v in INIT.items() if k != "snapshot"},  # missing field
        {k: v for k, v in INIT.items() if k != "protocol"},
        dict(INIT, shell="/bin/sh"),  # unknown field
        dict(INIT, snapshot=b"/snap"),
        dict(INIT, module_name=None),
        dict(INIT, hub_dir=3),
        dict(INIT, env={"HOME": 1}),
        dict(INIT, env=[("HOME", "/h")]),
        dict(INIT, env_overrides={1: "x"}),
        dict(INIT, memory_bytes="1G"),
        dict(INIT, memory_bytes=True),
        dict(INIT, memory_bytes=-1),
        dict(INIT, spin="fast"),
        dict(INIT, threads="2"),
        dict(INIT, threads=True),
        dict(INIT, threads=0),
        dict(INIT, threads=-1),
        dict(INIT, threads=10**6),
        dict(INIT, threads=2.0),
        dict(INIT, policy={"weight_hosts": ["h.example"]}),  # not a policy
        dict(INIT, protocol="3"),
        ["/snap"],
    ],
)
def test_an_init_of_the_wrong_shape_is_a_protocol_error(raw: Any) -> None:
    with pytest.raises(isolhub.ProtocolError):
        WorkerInit.decode(raw)


@pytest.mark.slow
def test_a_worker_given_an_init_of_another_protocol_says_only_its_hello() -> None:
    import socket
    import subprocess
    import sys

    from isolhub._transport.codec import recv_frame, send_frame

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent:
        proc = subprocess.Popen(
            [sys.executable, "-m", "isolhub._process.runtime", str(child.fileno())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
        )
        child.close()
        # An older parent's init: no version, nothing the worker could set itself up from.
        send_frame(parent, pickle.dumps({"snapshot": "/nowhere", "protocol": 1}))
        frame = recv_frame(parent)
        assert frame is not None and frame[1] == []
        # Its hello, not a set-up failure: the parent compares the versions and refuses it.
        assert _messages.Hello.decode(decode(frame[0]), "net@v1").pid == proc.pid
    assert proc.wait(timeout=60) == 0  # it exits once the parent hangs up


def _summary(**changes: Any) -> dict[str, Any]:
    summary = {
        "t0": 12.5,
        "result_type": "Net",
        "entrypoints": {"net": {"kind": "function", "signature": "()", "doc": None}},
        "parts": [{"path": "", "type": "Net", "parameters": 3, "training": True}],
        "tensors": {"w": torch.ones(3)},
        "outputs": {},
        "values": {"n": 3},
        "uncompared": {},
    }
    summary.update(changes)
    return {k: v for k, v in summary.items() if v is not ...}


PART = {"path": "", "type": "Net", "parameters": 3}


@pytest.mark.parametrize(
    "raw",
    [
        _summary(t0="12.5"),
        _summary(t0=...),  # missing field
        _summary(extra={}),  # unknown field
        _summary(result_type=None),
        _summary(entrypoints=["net"]),
        _summary(entrypoints={"net": {"doc": 3}}),
        _summary(entrypoints={"net": {"doc": None, "run": "rm -rf /"}}),
        _summary(parts={"": PART}),
        _summary(parts=[{"type": "Net"}]),  # a part without its path
        _summary(parts=[dict(PART, path=0)]),
        _summary(parts=[dict(PART, parameters="3")]),
        _summary(parts=[dict(PART, parameters=-1)]),
        _summary(parts=[dict(PART, training=1)]),
        _summary(parts=[dict(PART, forward_s=-1.0)]),
        _summary(parts=[dict(PART, forward_error=["boom"])]),
        _summary(parts=[dict(PART, hook="x")]),
        _summary(tensors={"w": [1.0]}),
        _summary(tensors={1: torch.ones(1)}),
        _summary(outputs={"output": 1.0}),
        _summary(values={"n": [3]}),
        _summary(uncompared={"x": 3}),
        ["summary"],
    ],
)
def test_a_compare_summary_of_the_wrong_shape_is_a_protocol_error(raw: Any) -> None:
    with pytest.raises(isolhub.ProtocolError, match="compare summary"):
        CompareSummary.decode(raw)


def test_a_compare_summary_as_the_session_makes_it_is_decoded_and_steps_make_new_ones() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    session = open_session(net, seed=0, layers=False, layer_bytes=0)
    summary = CompareSummary.decode(session("summary"))
    assert summary.result_type == "Sequential" and set(summary.tensors) == {"0.weight", "0.bias"}
    assert summary.parts == (ComparePart("", "Sequential", 9, True),)
    step = CompareStep(
        {}, {"": "boom"}, {}, {"n": 1}, {"y": "a str"}, [], {}
    )  # fmt: skip
    after = summary.after_step(step, first=True)
    assert after.parts[0].forward_error == "boom" and after.values == {"n": 1}
    assert after.uncompared == {"y": "a str"}
    assert summary.parts[0].forward_error is None and summary.values == {}  # unchanged
    later = after.after_step(
        dataclasses.replace(step, errors={"": "later"}, values={"n": 2}), first=False
    )
    assert later.parts[0].forward_error == "boom" and later.values == {"n": 1}  # the first's


def test_a_compare_step_as_the_session_makes_it_is_decoded() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    session = open_session(net, seed=0, layers=True, layer_bytes=1 << 20)
    step = CompareStep.decode(decode_value(*encode_value(session("step", torch.ones(1, 2)))))
    assert set(step.outputs) == {"output"} and step.layers and not step.errors


def test_effects_with_fds_are_refused_and_the_fds_closed(
    pipe_fds: Callable[[int], list[int]],
) -> None:
    fds = pipe_fds(2)
    with pytest.raises(isolhub.ProtocolError, match="fds"):
        Effects.decode({}, fds)
    assert not any(_is_open(fd) for fd in fds)


# -- hostile: a real worker sends the wrong shape ------------------------------------------------

LIAR = (
    CHANNEL
    + """
import array, os, socket, struct, time
import torch
from isolhub._transport.codec import encode


def lie(message, n_fds=0, then_sleep=True):
    sock = channel()
    payload = encode(message)
    fds = [os.memfd_create("lie") for _ in range(n_fds)]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([struct.pack("!II", len(payload), len(fds)), payload], anc)
    if then_sleep:
        time.sleep(30)


if os.environ.get("LIAR_LIST"):  # at import: the answer to list
    lie({"ok": True, "value": [1, 2]})


def body_not_bytes():
    lie({"ok": True, "kind": "value", "body": "42", "layout": []})


def missing_layout():
    lie({"ok": True, "kind": "value", "body": encode(42)})


def state_dict_with_two_fds():
    lie({"ok": True, "kind": "state_dict", "body": encode([]), "layout": []}, n_fds=2)


def pickle_for_a_value():
    lie({"ok": True, "kind": "pickle", "data": b"cos\\nsystem\\n", "layout": []})


def bad_effects():
    lie({"effects": {"colour": "red"}}, then_sleep=False)
    return 42


def effects_with_an_fd():
    lie({"effects": {}}, n_fds=1, then_sleep=False)
    return 42


def handle_with_a_text_id():
    lie({"ok": True, "kind": "handle", "handle": {"id": "1", "type": "T", "module": True,
                                                  "callable": True}})


class Liar(torch.nn.Module):
    def unknown_builtin(self):
        record = {"kind": "remote", "type": "T", "message": "m", "traceback": "", "missing": [],
                  "builtin": "SystemExit", "target": "T", "name": "", "suggestions": []}
        lie({"ok": True, "kind": "raised", "error": record})

    def numbers(self):
        return LyingIterator()


class LyingIterator:
    def __iter__(self):
        return self

    def __next__(self):  # more items than the first batch asks for (one)
        lie({"ok": True, "kind": "value", "body": encode({"items": [1, 2, 3], "more": True}),
             "layout": []})


def liar():
    return Liar()
"""
)


@pytest.fixture(scope="module")
def liar(tmp_path_factory: pytest.TempPathFactory) -> str:
    return spec_of(make_repo(tmp_path_factory.mktemp("liar") / "repo", {"hubconf.py": LIAR}))


def _open_fds() -> set[str]:
    return open_fds()


@pytest.mark.parametrize(
    ("entry", "result"),
    [
        ("body_not_bytes", "value"),
        ("missing_layout", "value"),
        ("state_dict_with_two_fds", "state_dict"),
        ("pickle_for_a_value", "value"),
        ("bad_effects", "value"),
        ("effects_with_an_fd", "value"),
    ],
)
def test_a_worker_replying_to_a_call_with_the_wrong_shape_is_killed(
    liar: str, entry: str, result: str
) -> None:
    from isolhub._engine import call

    snap = fetch_snapshot(parse_spec(liar, "github"), verbose=False)
    with start_worker(snap) as w:
        before = _open_fds()
        with pytest.raises(isolhub.ProtocolError):
            call(w, entry, result=result, timeout=60)
        assert w.closed and w.returncode is not None and w.returncode < 0  # killed
        assert _open_fds() <= before  # the fds it sent are closed


def test_a_worker_answering_list_with_numbers_is_a_protocol_error(
    liar: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIAR_LIST", "1")
    with pytest.raises(isolhub.ProtocolError, match="list"):
        isolhub.list(liar, trust_repo=True, verbose=False, timeout=60)


def test_a_worker_sending_a_handle_of_the_wrong_shape_is_a_protocol_error(liar: str) -> None:
    with pytest.raises(isolhub.ProtocolError, match="handle"):
        isolhub.load(liar, "handle_with_a_text_id", mode="remote", trust_repo=True, timeout=60)


def test_a_handle_refusing_with_an_unknown_error_type_is_a_protocol_error(liar: str) -> None:
    with isolhub.load(liar, "liar", mode="remote", trust_repo=True, timeout=60) as m:
        with pytest.raises(isolhub.ProtocolError, match="unknown type"):
            m.unknown_builtin()
        assert m.closed


def test_an_iteration_batch_larger_than_asked_is_a_protocol_error(liar: str) -> None:
    with isolhub.load(liar, "liar", mode="remote", trust_repo=True, timeout=60) as m:
        with pytest.raises(isolhub.ProtocolError, match="iteration"):
            list(m.numbers())
        assert m.closed


def test_a_request_is_a_frozen_dataclass_the_worker_dispatches_on(liar: str) -> None:
    snap = fetch_snapshot(parse_spec(liar, "github"), verbose=False)
    with start_worker(snap) as w:
        names = w.request(ListRequest(), EntrypointsReply, timeout=60).names
        assert "liar" in names
        with pytest.raises(dataclasses.FrozenInstanceError):
            CallRequest(entry="liar").entry = "other"  # type: ignore[misc]


# -- the zygote's requests -----------------------------------------------------------------------

# One of each request the zygote serves, with the fds that go with it.
ZYGOTE_REQUESTS: list[tuple[ZygoteRequest, int]] = [
    (ForkRequest(), 2),
    (WaitRequest(42), 0),
    (PreloadRequest(("numpy", "scipy")), 0),
    (PreloadRequest(()), 0),
    (ProvidedRequest(), 0),
]


def test_every_zygote_request_class_is_exercised() -> None:
    classes = {
        c
        for c in vars(_messages).values()
        if isinstance(c, type) and issubclass(c, ZygoteRequest) and c is not ZygoteRequest
    }
    assert {type(r) for r, _ in ZYGOTE_REQUESTS} == classes


@pytest.mark.parametrize(("request_", "n_fds"), ZYGOTE_REQUESTS, ids=lambda r: type(r).__name__)
def test_every_zygote_request_round_trips_through_the_codec(
    request_: ZygoteRequest, n_fds: int
) -> None:
    assert zygote_request(_wire(request_), n_fds) == request_


@pytest.mark.parametrize(
    ("raw", "n_fds"),
    [
        ({"op": "fork"}, 0),  # a fork without its channel and output
        ({"op": "fork"}, 3),
        ({"op": "fork", "pid": 1}, 2),
        ({"op": "wait", "pid": "42"}, 0),
        ({"op": "wait", "pid": True}, 0),
        ({"op": "wait"}, 0),
        ({"op": "wait", "pid": 42}, 1),
        ({"op": "preload", "names": "numpy"}, 0),
        ({"op": "preload", "names": [1]}, 0),
        ({"op": "preload"}, 0),
        ({"op": "provided", "all": True}, 0),
        ({"op": "exec", "argv": ["sh"]}, 0),
        ({"op": ["fork"]}, 2),
        ({"pid": 42}, 0),
        (["fork"], 2),
        (None, 0),
    ],
)
def test_a_zygote_request_of_another_shape_is_none_the_zygote_serves(raw: Any, n_fds: int) -> None:
    with pytest.raises(isolhub.ProtocolError):
        zygote_request(raw, n_fds)


def test_the_zygote_refuses_a_request_it_does_not_serve_and_keeps_serving() -> None:
    from isolhub._process import worker as _worker
    from isolhub._transport.codec import recv_frame, send_frame

    z = _worker._Zygote.get()
    for raw in ({"op": "exec", "argv": ["sh"]}, {"op": "fork"}, {"op": "wait", "pid": 1}):
        with z.lock:
            send_frame(z.control, encode(raw))
            frame = recv_frame(z.control)
        assert frame is not None and frame[1] == []
        assert zygote_refusal(decode(frame[0]))
    assert "torch" in z.provided_packages()  # asked once it refused, it still answers
