"""A cached snapshot is never served damaged: manifests at install, checks at load and in verify.

Damage is done for real: bytes flipped in the installed files, files deleted, permissions taken
away (with the capabilities that let root read anything dropped, as a normal user lacks them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import isolhub as hub
from isolhub._cache.store import manifest_path

from hubrepos import make_repo, net_files, spec_of

REPO_ROOT = Path(__file__).resolve().parent.parent


def _flip(path: Path, old: bytes, new: bytes, *, keep_mtime: bool = False) -> None:
    """Replace `old` by `new` (same length) in a read-only installed file."""
    st = path.stat()
    path.chmod(0o644)
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    path.chmod(st.st_mode)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _cli(*argv: str, drop_caps: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "isolhub", *argv]
    if drop_caps:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _verify() -> tuple[int, dict]:
    out = _cli("cache", "verify", "--json")
    assert out.stdout, out.stderr
    return out.returncode, json.loads(out.stdout)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")


def test_every_installed_snapshot_has_a_manifest_of_its_files(repo: Path) -> None:
    snap = hub.fetch(spec_of(repo, "v1"))
    manifest = json.loads(manifest_path(snap.path).read_text())
    assert manifest["commit"] == snap.sha
    assert set(manifest["files"]) == {"hubconf.py", "model/__init__.py", "model/net.py", "utils.py"}
    size, _mtime, digest = manifest["files"]["utils.py"]
    data = (snap.path / "utils.py").read_bytes()
    assert size == len(data)
    assert digest == hashlib.sha256(data).hexdigest()


def test_a_changed_byte_in_a_cached_file_is_noticed_at_load_and_the_snapshot_fetched_again(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = spec_of(repo, "v1")
    snap = hub.fetch(spec)
    _flip(snap.path / "model/net.py", b"nn.Linear(4, 3)", b"nn.Linear(4, 4)")
    with caplog.at_level(logging.WARNING, logger="isolhub.cache"):
        model = hub.load(spec, "net")
    assert model.fc.out_features == 3
    assert b"nn.Linear(4, 3)" in (snap.path / "model/net.py").read_bytes()
    assert "model/net.py changed" in caplog.text and "fetching it again" in caplog.text


@pytest.mark.parametrize("name", ["utils.py", "hubconf.py"])
def test_a_deleted_cached_file_is_noticed_at_load_and_fetched_again(repo: Path, name: str) -> None:
    spec = spec_of(repo, "v1")
    snap = hub.fetch(spec)
    (snap.path / name).unlink()
    assert type(hub.load(spec, "net")).version == "v1"
    assert (snap.path / name).is_file()


def test_offline_a_damaged_snapshot_is_a_cache_corrupted_error_naming_the_file(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_of(repo, "v1")
    snap = hub.fetch(spec)
    _flip(snap.path / "utils.py", b"v1", b"v9")
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    with pytest.raises(hub.CacheCorruptedError, match="utils.py changed") as info:
        hub.load(spec, "net")
    assert info.value.file == str(snap.path / "utils.py")
    assert "cache verify --fix" in str(info.value)
    assert isinstance(info.value, hub.CacheError)


def test_a_snapshot_from_before_manifests_is_fetched_again_online_and_used_as_is_offline(
    repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = spec_of(repo, "v1")
    snap = hub.fetch(spec)
    manifest_path(snap.path).unlink()
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="isolhub.cache"):
        assert hub.fetch(spec).path == snap.path
    assert "no manifest" in caplog.text and "as it is" in caplog.text
    assert not manifest_path(snap.path).exists()
    monkeypatch.delenv("ISOLHUB_OFFLINE")
    assert hub.fetch(spec).path == snap.path
    assert manifest_path(snap.path).is_file()


def test_a_commit_without_hubconf_leaves_no_snapshot_in_the_cache(
    tmp_path: Path, hub_home: Path
) -> None:
    bare = make_repo(tmp_path / "bare", {"README.md": "no hub here\n"})
    with pytest.raises(hub.FetchError, match="has no hubconf.py"):
        hub.fetch(spec_of(bare))
    left = [p for p in hub_home.rglob("*") if "snapshots/" in str(p) or "manifests/" in str(p)]
    assert left == []


def test_cache_verify_names_a_changed_file_even_with_its_mtime_put_back(repo: Path) -> None:
    snap = hub.fetch(spec_of(repo, "v1"))
    assert _verify()[0] == 0
    _flip(snap.path / "model/net.py", b"nn.Linear(4, 3)", b"nn.Linear(4, 7)", keep_mtime=True)
    code, report = _verify()
    assert code == 1
    [problem] = report["problems"]
    assert problem["path"] == str(snap.path)
    assert "model/net.py: changed (sha256" in problem["problem"]
    human = _cli("cache", "verify")
    assert human.returncode == 1 and "model/net.py: changed" in human.stdout


@pytest.mark.slow
def test_cache_verify_names_missing_and_planted_files_and_fix_removes_the_snapshot(
    repo: Path, hub_home: Path
) -> None:
    spec = spec_of(repo, "v1")
    snap = hub.fetch(spec)
    (snap.path / "utils.py").unlink()
    (snap.path / "model" / "extra.py").write_text("print('planted')\n")
    code, report = _verify()
    assert code == 1
    [problem] = report["problems"]
    assert "utils.py: missing" in problem["problem"]
    assert "model/extra.py: unexpected" in problem["problem"]
    out = _cli("cache", "verify", "--fix", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not snap.path.exists() and not manifest_path(snap.path).exists()
    assert list(hub_home.glob("repos/*/refs/*")) == []  # the refs to it went with it
    assert _verify()[0] == 0
    assert type(hub.load(spec, "net")).version == "v1"


def test_cache_verify_reports_a_snapshot_without_manifest(repo: Path) -> None:
    snap = hub.fetch(spec_of(repo, "v1"))
    manifest_path(snap.path).unlink()
    code, report = _verify()
    assert code == 1
    assert "no manifest" in report["problems"][0]["problem"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop capabilities")
def test_cache_verify_reports_unreadable_files_and_folders_instead_of_crashing(
    repo: Path, hub_home: Path
) -> None:
    snap = hub.fetch(spec_of(repo, "v1"))
    ckpts = hub_home / "checkpoints"
    ckpts.mkdir()
    locked = ckpts / "net-0123abcd.pth"
    locked.write_bytes(b"x" * 100)
    os.chmod(snap.path / "utils.py", 0)
    os.chmod(locked, 0)
    os.chmod(snap.path / "model", 0)
    try:
        out = _cli("cache", "verify", "--json", drop_caps=True)
    finally:
        os.chmod(snap.path / "model", 0o755)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    found = {p["id"]: p["problem"] for p in json.loads(out.stdout)["problems"]}
    snap_id = str(snap.path.relative_to(hub_home))
    assert "utils.py: unreadable" in found[snap_id]
    assert "model: unreadable (folder" in found[snap_id]
    assert "unreadable" in found["checkpoints/net-0123abcd.pth"]
