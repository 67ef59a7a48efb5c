"""Module results: storages read straight out of the worker; where the kernel refuses, the arena."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub import _engine
from isolhub._transport import pull as _pull

from hubrepos import make_repo, net_files, spec_of

REFUSED = """
import ctypes, os, sys
import torch
import isolhub
from isolhub._transport import pull as _pull
from isolhub._sandbox import seccomp as _seccomp

repo = sys.argv[1]
first = isolhub.load(repo, "net", source="local")  # starts the zygote (its exec comes first)
assert not _pull.refused()
ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
# The sandbox's deny list refuses process_vm_readv with EPERM, as a hardened kernel would.
_seccomp.install(_seccomp.build(arch=_seccomp.native_arch(), deny_sockets=False,
                                allow_fork=False, own_pid=os.getpid()))
second = isolhub.load(repo, "net", source="local")
third = isolhub.load(repo, "net", source="local")
x = torch.randn(2, 4)
assert _pull.refused()
assert all(torch.equal(first(x), m(x)) for m in (second, third))
print("same results through the arena")
"""


@pytest.mark.slow
def test_a_module_comes_through_the_arena_where_the_kernel_refuses_to_pull(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    script = tmp_path / "refused.py"
    script.write_text(textwrap.dedent(REFUSED))
    out = subprocess.run(
        [sys.executable, str(script), str(repo)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "same results through the arena" in out.stdout


def test_a_module_result_is_pulled_out_of_the_worker(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    m = hub.load(spec_of(repo), "net")
    assert not _pull.refused()
    w = m.fc.weight
    assert w.untyped_storage().data_ptr() % 64 == 0
    w.data.add_(1)  # private and writable
    assert torch.equal(hub.load(spec_of(repo), "net").fc.weight + 1, w)


@pytest.mark.parametrize("mode", ["module", "state_dict"])
def test_storage_addresses_the_worker_does_not_have_are_a_protocol_error(
    tmp_path: Path, mode: str
) -> None:
    from test_hostile_replies import PRELUDE

    body = textwrap.dedent(PRELUDE).replace("MARKER", repr(str(tmp_path / "pwned")))
    body += textwrap.dedent(
        """
        def bogus():
            send_raw(encode({"ok": True, "kind": "pickle", "data": b"\\x80\\x05K\\x01.",
                             "pull": True, "layout": struct.pack("<QQ", 0x10, 1 << 20)}))
        """
    )
    repo = make_repo(tmp_path / "bogus", {"hubconf.py": body})
    with pytest.raises(hub.ProtocolError):
        hub.load(spec_of(repo), "bogus", mode=mode, timeout=20)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_worker_that_stays_up_frees_what_it_pinned_once_it_is_read(tmp_path: Path) -> None:
    hubconf = "import torch\n\ndef big():\n    return torch.nn.Linear(4096, 4096, bias=False)\n"
    snap = hub.fetch(spec_of(make_repo(tmp_path / "r", {"hubconf.py": hubconf})))
    with _engine.start_worker(snap) as w:
        before = _rss_mib(w.pid)
        m = _engine.call(w, "big", result="module")  # 64 MiB, built, pinned, read, then dropped
        deadline = time.monotonic() + 10
        while _rss_mib(w.pid) > before + 32 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rss_mib(w.pid) <= before + 32, "the worker still holds the module's storages"
        assert m.weight.shape == (4096, 4096)


# One process_vm_readv call moves at most 2 GiB - 4 KiB (the kernel's MAX_RW_COUNT): the parent
# reads on until everything is in. The storages are torch.empty (no page touched until read)
# with a marker byte near each end and on both sides of the first call's limit.
BIG = """
import torch

GIB = 1 << 30


def _marked(nbytes, tag):
    t = torch.empty(nbytes, dtype=torch.uint8)
    for i, offset in enumerate(sorted({0, min(2 * GIB - 4097, nbytes - 1), nbytes - 1})):
        t[offset] = tag + i
    return t


class Buffers(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        for i, n in enumerate(sizes):
            self.register_buffer(f"b{i}", _marked(n, 10 * i + 1))


def big(sizes):
    return Buffers(sizes)
"""


def _markers_ok(t: torch.Tensor, tag: int) -> bool:
    gib, n = 1 << 30, t.numel()
    offsets = sorted({0, min(2 * gib - 4097, n - 1), n - 1})
    return all(int(t[o]) == tag + i for i, o in enumerate(offsets))


@pytest.mark.slow
@pytest.mark.parametrize(
    "sizes",
    [[2 << 30], [512 << 20] * 5, [4 << 30]],
    ids=["one-2GiB-tensor", "five-512MiB-buffers", "one-4GiB-tensor"],
)
def test_module_storages_past_2_gib_are_pulled_whole(tmp_path: Path, sizes: list[int]) -> None:
    repo = make_repo(tmp_path / "r", {"hubconf.py": BIG})
    m = hub.load(spec_of(repo), "big", sizes)
    assert not _pull.refused()
    buffers = [getattr(m, f"b{i}") for i in range(len(sizes))]
    assert [b.numel() for b in buffers] == sizes
    assert all(_markers_ok(b, 10 * i + 1) for i, b in enumerate(buffers))
    del m, buffers  # 2-4 GiB: gone before the next case starts
