"""A hostile worker cannot run code in, crash, or corrupt the parent through what it sends.

Each hubconf here grabs the worker's own channel socket and writes a crafted frame on it, as
malicious code could. The parent must answer with a `ProtocolError`, kill the worker, never
unpickle anything, and stay healthy.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import isolhub as hub

from hubrepos import CHANNEL, make_repo, spec_of

PRELUDE = (
    CHANNEL
    + """
import fcntl, os, socket, struct, time
from isolhub._transport.codec import encode

def send_raw(payload, fds=(), announced=None):
    sock = channel()
    header = struct.pack("!II", len(payload) if announced is None else announced, len(fds))
    if fds:
        import array
        sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    else:
        sock.sendall(header)
    sock.sendall(payload)
    time.sleep(30)

class X:
    pass  # stands for a tensor: the codec encodes it through the extension hook

EMPTY_F32 = struct.pack("<IBB?QQQ", 0, 1, 1, False, 0, 0, 1)  # packed: storage 0, float32, shape (0,)

def columnar(names, run):
    body = encode({"names": names, "tensors": run})
    send_raw(encode({"ok": True, "kind": "state_dict", "body": body, "layout": [[0, 0]]}))

def as_tensor(meta):
    return encode([["w", X()]], lambda v: {"t": meta})

class Evil:
    def __reduce__(self):
        return (open, (MARKER, "w"))
"""
)

CASES = {
    "pickle_reply": "import pickle; send_raw(pickle.dumps(Evil()))",
    "pickle_kind": (
        "import pickle; send_raw(encode({'ok': True, 'kind': 'pickle', "
        "'data': pickle.dumps(Evil()), 'layout': []}))"
    ),
    "oversize_header": "send_raw(b'x' * 16, announced=2**31)",
    "truncated_value": (
        "from isolhub._transport.codec import encode; send_raw(encode({'ok': True, 'kind': 'value', "
        "'body': b's\\x00\\x00\\x10\\x00abc', 'layout': []}))"
    ),
    "unknown_kind": "from isolhub._transport.codec import encode; send_raw(encode({'ok': True, 'kind': 'pickle2'}))",
    "tensor_past_arena": (
        "from isolhub._transport.codec import encode\n"
        "    import os\n"
        "    fd = os.memfd_create('x', os.MFD_ALLOW_SEALING)\n"
        "    os.ftruncate(fd, 64)\n"
        "    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)\n"
        "    body = as_tensor({'s': 0, 'dtype': 'float32', 'shape': [1000000], 'stride': [1], 'offset': 0, 'grad': False})\n"
        "    send_raw(encode({'ok': True, 'kind': 'state_dict', 'body': body, 'layout': [[0, 64]]}), fds=[fd])"
    ),
    "unsealed_memfd": (
        "from isolhub._transport.codec import encode\n"
        "    import os\n"
        "    fd = os.memfd_create('x', os.MFD_ALLOW_SEALING)\n"
        "    os.ftruncate(fd, 64)\n"
        "    body = as_tensor({'s': 0, 'dtype': 'float32', 'shape': [4], 'stride': [1], 'offset': 0, 'grad': False})\n"
        "    send_raw(encode({'ok': True, 'kind': 'state_dict', 'body': body, 'layout': [[0, 64]]}), fds=[fd])"
    ),
    "bad_dtype": (
        "from isolhub._transport.codec import encode\n"
        "    body = as_tensor({'s': 0, 'dtype': 'object', 'shape': [0], 'stride': [1], 'offset': 0, 'grad': False})\n"
        "    send_raw(encode({'ok': True, 'kind': 'state_dict', 'body': body, 'layout': [[0, 0]]}))"
    ),
    "names_outnumber_tensors": "columnar(['a', 'b'], EMPTY_F32)",
    "tensors_outnumber_names": "columnar(['a'], EMPTY_F32 * 2)",
    "truncated_description_run": "columnar(['a'], EMPTY_F32[:-3])",
    "short_description_run": "columnar(['a'], EMPTY_F32[:9])",
    "names_not_text": "columnar([1], EMPTY_F32)",
    "description_names_no_storage": "columnar(['a'], struct.pack('<IBB?QQQ', 5, 1, 1, False, 0, 0, 1))",
    "pairs_not_pairs": (
        "send_raw(encode({'ok': True, 'kind': 'state_dict', 'body': encode([['w']]), 'layout': []}))"
    ),
}


@pytest.fixture
def hostile_repo(tmp_path: Path) -> Path:
    marker = tmp_path / "pwned"
    body = textwrap.dedent(PRELUDE).replace("MARKER", repr(str(marker)))
    for name, code in CASES.items():
        body += f"\ndef {name}():\n    {code}\n"
    body += "\ndef fine():\n    import torch\n    return {'w': torch.ones(3)}\n"
    return make_repo(tmp_path / "hostile", {"hubconf.py": body})


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["state_dict", "remote"])
def test_a_crafted_reply_is_a_protocol_error_and_runs_nothing(
    hostile_repo: Path, case: str, mode: str
) -> None:
    with pytest.raises(hub.ProtocolError):
        hub.load(spec_of(hostile_repo), case, mode=mode, timeout=20)
    assert not (hostile_repo.parent / "pwned").exists()
    sd = hub.load_state_dict(spec_of(hostile_repo), "fine")
    assert torch.equal(sd["w"], torch.ones(3))


TAMPER = """
import os
import torch
import torch.nn as nn

KEPT = []
_real = os.memfd_create


def _spy(name, flags=0):
    fd = _real(name, flags)
    KEPT.append(os.dup(fd))  # keep a way back into every arena this worker sends
    return fd


os.memfd_create = _spy


class Tamperer(nn.Module):
    def big(self):
        return torch.arange(1 << 20, dtype=torch.float32)

    def tamper(self):
        outcomes = []
        for fd in KEPT:
            for attempt in (lambda: os.ftruncate(fd, 0), lambda: os.pwrite(fd, b"\\xff" * 64, 0)):
                try:
                    attempt()
                    outcomes.append("done")
                except OSError as e:
                    outcomes.append(e.errno)
        return outcomes


def tamperer():
    return Tamperer()
"""


def test_tampering_with_a_sent_arena_changes_nothing_in_the_parent(tmp_path: Path) -> None:
    import errno

    repo = make_repo(tmp_path / "tamper", {"hubconf.py": TAMPER})
    with hub.load(spec_of(repo), "tamperer", mode="remote") as m:
        t = m.big()
        expected = torch.arange(1 << 20, dtype=torch.float32)
        outcomes = m.tamper()
        assert outcomes and set(outcomes) == {errno.EPERM}
        assert torch.equal(t, expected)  # still mapped, no SIGBUS, unchanged
        assert float(t[-1]) == float((1 << 20) - 1)
