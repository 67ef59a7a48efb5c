"""The messages a worker sends: one table of error kinds, a versioned handshake, checked shapes."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import pytest

import isolhub
from isolhub import _errors
from isolhub._engine import start_worker
from isolhub._process.messages import (
    CALLER_ERRORS,
    ERROR_KINDS,
    PROTOCOL_VERSION,
    CallRequest,
    EntrypointsReply,
    ErrorRecord,
    ListRequest,
    ValueReply,
    error_record,
    kind_of,
)
from isolhub._source.snapshot import Snapshot, fetch_snapshot
from isolhub._spec import parse_spec
from isolhub._transport.codec import decode, encode

from hubrepos import CHANNEL, make_repo, spec_of

ERROR_CLASSES = [
    cls
    for _, cls in inspect.getmembers(_errors, inspect.isclass)
    if issubclass(cls, BaseException) and cls.__module__ == _errors.__name__
]


def _over_the_wire(e: BaseException) -> BaseException:
    """`e` as raised in a worker, recorded, sent through the codec and raised in the parent."""
    try:
        raise e
    except BaseException as raised:
        wire = encode(error_record(raised))
    return ErrorRecord.decode(decode(wire)).to_exception("net@v1", 42)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_isolhub_error_raised_in_a_worker_comes_back_as_its_table_class(cls: type) -> None:
    e = cls("it broke", missing=["numpy"])
    back = _over_the_wire(e)
    # The nearest class of the table among its own classes is what the parent raises.
    # The nearest class of the table among its own classes is what the parent raises; any
    # other error (and the worker's own protocol checks) reads as the hubconf's: RemoteError.
    table = {c for c, _ in ERROR_KINDS.values()}
    expected = next((c for c in cls.__mro__ if c in table), _errors.RemoteError)
    if issubclass(cls, _errors.ProtocolError):
        expected = _errors.RemoteError
    assert type(back) is expected
    assert "it broke" in str(back)
    assert back.spec == "net@v1"
    if expected is _errors.RemoteError:
        assert back.remote_type == f"{cls.__module__}.{cls.__qualname__}"
    if expected in (_errors.MissingDependenciesError, _errors.SandboxError):
        assert back.missing == ["numpy"]


def test_each_kind_of_the_table_round_trips_to_its_own_class() -> None:
    for kind, (cls, _) in ERROR_KINDS.items():
        assert kind_of(cls("x")) == kind
        assert type(_over_the_wire(cls("x"))) is cls


def test_an_error_not_isolhubs_is_a_remote_error_with_its_type() -> None:
    back = _over_the_wire(KeyError("w"))
    assert type(back) is isolhub.RemoteError
    assert back.remote_type == "builtins.KeyError"
    assert "KeyError: 'w'" in str(back)


def test_each_caller_error_is_the_builtin_error_too() -> None:
    for builtin, cls in CALLER_ERRORS.items():
        assert issubclass(cls, builtin) and issubclass(cls, isolhub.RemoteOperationError)
    assert set(CALLER_ERRORS.values()) == set(isolhub.RemoteOperationError.__subclasses__())


@pytest.mark.parametrize(
    "record",
    [
        "boom",
        {"kind": "remote", "type": 1, "message": "m", "traceback": ""},
        {"kind": "nonsense", "type": "T", "message": "m", "traceback": ""},
        {"kind": "remote", "type": "T", "message": "m"},
        {"kind": "remote", "type": "T", "message": "m", "traceback": "", "extra": 1},
        {"kind": "sandbox", "type": "T", "message": "m", "traceback": "", "missing": "seccomp"},
        {"kind": "sandbox", "type": "T", "message": "m", "traceback": "", "missing": [3]},
    ],
)
def test_a_malformed_error_record_is_a_protocol_error(record: object) -> None:
    with pytest.raises(isolhub.ProtocolError):
        ErrorRecord.decode(record)


# -- the wire, with real workers -----------------------------------------------------------------

LIAR = (
    CHANNEL
    + """
import struct, time
from isolhub._transport.codec import encode


def lie(error):
    sock = channel()
    payload = encode({"ok": False, "error": error})
    sock.sendall(struct.pack("!II", len(payload), 0) + payload)
    time.sleep(30)


def wrong_type():
    lie({"kind": "remote", "type": ["T"], "message": "m", "traceback": ""})


def unknown_kind():
    lie({"kind": "pwned", "type": "T", "message": "m", "traceback": ""})
"""
)


@pytest.fixture
def liar(tmp_path: Path) -> str:
    return spec_of(make_repo(tmp_path / "liar", {"hubconf.py": LIAR}))


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["wrong_type", "unknown_kind"])
def test_an_error_record_of_the_wrong_shape_is_a_protocol_error_that_kills_the_worker(
    liar: str, entry: str
) -> None:
    snap = fetch_snapshot(parse_spec(liar, "github"), verbose=False)
    with start_worker(snap) as w:
        with pytest.raises(isolhub.ProtocolError, match="error record"):
            w.request(CallRequest(entry=entry, result="value"), ValueReply, timeout=20)
        assert w.closed  # killed and reaped
        assert w.returncode is not None and w.returncode < 0


def _other_isolhub(into: Path, version: int) -> None:
    """A copy of this isolhub that speaks protocol `version` (another install, say)."""
    shutil.copytree(
        Path(isolhub.__file__).parent,
        into / "isolhub",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    messages = into / "isolhub" / "_process/messages.py"
    text, n = re.subn(
        r"^PROTOCOL_VERSION = \d+$",
        f"PROTOCOL_VERSION = {version}",
        messages.read_text(),
        count=1,
        flags=re.M,
    )
    assert n == 1
    messages.write_text(text)


def _net_snapshot(tmp_path: Path) -> Snapshot:
    """The snapshot of a new repo whose one entrypoint, `net`, returns 1."""
    repo = make_repo(tmp_path / "r", {"hubconf.py": "def net():\n    return 1\n"})
    return fetch_snapshot(parse_spec(spec_of(repo), "github"), verbose=False)


def _beside_the_next_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Make spawned workers run a copy of isolhub speaking the next protocol version; that version.

    `python -m isolhub._process.runtime` imports the isolhub of its current directory first: a
    real way for a worker to run another isolhub than its parent's.
    """
    other = PROTOCOL_VERSION + 1
    _other_isolhub(tmp_path / "elsewhere", other)
    monkeypatch.chdir(tmp_path / "elsewhere")
    return other


@pytest.mark.slow
def test_a_worker_of_another_protocol_version_is_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = _net_snapshot(tmp_path)
    other = _beside_the_next_version(tmp_path, monkeypatch)
    with pytest.raises(isolhub.ProtocolVersionError) as info:
        start_worker(snap, start_method="spawn")
    e = info.value
    assert (e.worker_protocol, e.parent_protocol) == (other, PROTOCOL_VERSION)
    text = str(e)
    assert f"protocol {other}" in text and f"protocol {PROTOCOL_VERSION}" in text
    assert str(tmp_path / "elsewhere" / "isolhub") in text  # where the other one came from
    assert "Install the same isolhub" in text
    assert isinstance(e, isolhub.ProtocolError)


@pytest.mark.slow
def test_a_lazily_started_worker_of_another_version_is_refused_at_its_first_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `load` reads the worker's hello with its first answer (`lazy=True`): the refusal is the same.
    snap = _net_snapshot(tmp_path)
    other = _beside_the_next_version(tmp_path, monkeypatch)
    w = start_worker(snap, start_method="spawn", lazy=True)
    with pytest.raises(isolhub.ProtocolVersionError) as info:
        w.request(CallRequest(entry="net", result="value"), ValueReply, timeout=60)
    assert (info.value.worker_protocol, info.value.parent_protocol) == (other, PROTOCOL_VERSION)
    assert w.closed  # killed and reaped


@pytest.mark.slow
def test_a_worker_of_an_isolhub_before_versions_is_refused_as_version_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = _net_snapshot(tmp_path)
    _other_isolhub(tmp_path / "old", PROTOCOL_VERSION)
    worker = tmp_path / "old" / "isolhub" / "_process/runtime.py"
    # Its hello as isolhub sent it before the handshake had a version.
    text = worker.read_text().replace(
        "send_frame(sock, encode(hello()))",
        'send_frame(sock, encode({"ok": True, "pid": os.getpid()}))',
    )
    assert "os.getpid()}))" in text
    worker.write_text(text)
    monkeypatch.chdir(tmp_path / "old")
    with pytest.raises(isolhub.ProtocolVersionError, match="speaks isolhub protocol 0") as info:
        start_worker(snap, start_method="spawn")
    assert info.value.worker_protocol == 0


@pytest.mark.slow
def test_the_same_version_shakes_hands(tmp_path: Path) -> None:
    snap = _net_snapshot(tmp_path)
    for method in ("spawn", "zygote"):
        with start_worker(snap, start_method=method) as w:
            assert w.request(ListRequest(), EntrypointsReply, timeout=60).names == ("net",)
