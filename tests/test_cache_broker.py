"""`cache ls`, `verify`, `rm` and `prune` see the broker's store (`broker/`) and the `.verified/`
records, as they see checkpoints; run through the real command line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._weights.broker import weights_broker

from weights_server import WeightsServer


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isolhub", *args], capture_output=True, text=True, timeout=300
    )


def _checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf)
    return buf.getvalue()


@pytest.fixture
def brokered(hub_home: Path) -> Path:
    """A file the weights broker downloaded for a sandboxed worker (as it does, for real)."""
    with WeightsServer() as server:
        url = server.add("/w.pt", body=_checkpoint())
        policy = hub.Sandbox(weight_hosts=("127.0.0.1",))
        name, fd = weights_broker(policy)(url, None)
        os.close(fd)
    assert name == "w.pt"
    (path,) = (hub_home / "broker").glob("*/w.pt")
    return path


def test_cache_ls_lists_broker_downloads(brokered: Path, hub_home: Path) -> None:
    out = cli("cache", "ls", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (entry,) = [e for e in doc["entries"] if e["kind"] == "broker"]
    assert entry["id"] == brokered.relative_to(hub_home).as_posix()
    assert entry["size"] == brokered.stat().st_size and doc["total_size"] >= entry["size"]
    human = cli("cache", "ls")
    assert "broker downloads, for sandboxed workers" in human.stdout and "1 broker download" in (
        human.stdout
    )


def test_cache_verify_finds_a_changed_broker_download_by_its_record(brokered: Path) -> None:
    assert cli("cache", "verify").returncode == 0
    os.chmod(brokered, 0o644)
    data = bytearray(brokered.read_bytes())
    data[-1] ^= 1  # a flipped bit, same size
    brokered.write_bytes(bytes(data))
    out = cli("cache", "verify", "--json")
    assert out.returncode == 1
    (problem,) = json.loads(out.stdout)["problems"]
    assert problem["path"] == str(brokered) and "downloaded with" in problem["problem"]


def test_cache_verify_fix_removes_records_of_files_that_are_gone(
    brokered: Path, hub_home: Path
) -> None:
    records = list((hub_home / ".verified").glob("*.json"))
    assert records  # the download was recorded
    brokered.unlink()
    out = cli("cache", "verify", "--json")
    assert out.returncode == 1
    problems = json.loads(out.stdout)["problems"]
    assert {p["problem"] for p in problems} >= {"verification record of a file that is gone"}
    assert cli("cache", "verify", "--fix").returncode == 0
    assert list((hub_home / ".verified").glob("*.json")) == []
    assert not brokered.parent.exists()  # the empty folder of its URL went too
    assert cli("cache", "verify").returncode == 0


def test_cache_rm_of_a_broker_download_removes_its_record_and_folder(
    brokered: Path, hub_home: Path
) -> None:
    out = cli("cache", "rm", brokered.relative_to(hub_home).as_posix(), "--yes")
    assert out.returncode == 0, out.stderr
    assert not brokered.parent.exists()
    assert list((hub_home / ".verified").glob("*.json")) == []


def test_cache_prune_drops_old_broker_downloads(brokered: Path, hub_home: Path) -> None:
    old = time.time() - 90 * 86400
    os.utime(brokered, (old, old))
    out = cli("cache", "prune", "--older-than", "30d", "--json")
    assert out.returncode == 0, out.stderr
    kinds = {r["kind"] for r in json.loads(out.stdout)["removed"]}
    assert "broker" in kinds and not brokered.exists()
    assert list((hub_home / ".verified").glob("*.json")) == []
