"""The snapshot cache: keyed by commit, installed atomically, shared safely between processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

import isolhub as hub

from hubrepos import commit, make_repo, net_files, spec_of


def _snapshots(home: Path) -> list[Path]:
    return sorted(home.glob("repos/*/snapshots/*"))


def _leftovers(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if ".staging-" in p.name or p.name.endswith(".tmp")]


def _fetch_in_child(spec: str, home: str, break_lock: bool) -> str:
    os.environ["ISOLHUB_HOME"] = home
    if break_lock:
        # flock succeeding for everyone (some network filesystems): correctness must not change.
        import isolhub._cache.store as cache

        cache.lock = lambda name, timeout=600: contextlib.nullcontext()
    return str(hub.fetch(spec).path)


@pytest.mark.slow
@pytest.mark.parametrize("break_lock", [False, True], ids=["lock", "lying-lock"])
def test_eight_processes_fetching_one_uncached_spec_end_with_one_snapshot(
    tmp_path: Path, hub_home: Path, break_lock: bool
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    spec = spec_of(repo, "v1")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        paths = pool.starmap(_fetch_in_child, [(spec, str(hub_home), break_lock)] * 8)
    assert len(set(paths)) == 1
    assert _snapshots(hub_home) == [Path(paths[0])]
    assert (Path(paths[0]) / "hubconf.py").is_file()
    assert _leftovers(hub_home) == []


def test_snapshot_files_are_read_only_and_keyed_by_commit(tmp_path: Path, hub_home: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    snap = hub.fetch(spec_of(repo, "v1"))
    assert snap.path.name == snap.sha
    assert not os.stat(snap.path / "hubconf.py").st_mode & 0o222


def test_branches_that_point_at_one_commit_share_one_snapshot(
    tmp_path: Path, hub_home: Path
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    a = hub.fetch(spec_of(repo, "v1"))
    b = hub.fetch(spec_of(repo, "main"))
    c = hub.fetch(spec_of(repo))
    assert a.path == b.path == c.path
    assert len(_snapshots(hub_home)) == 1


def test_a_moved_branch_is_resolved_again_on_the_next_load(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    assert type(hub.load(spec_of(repo, "main"), "net")).version == "v1"
    commit(repo, net_files("v2", width=3))
    assert type(hub.load(spec_of(repo, "main"), "net")).version == "v2"


def test_offline_a_cached_branch_resolves_through_its_stored_ref_without_the_remote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    online = hub.fetch(spec_of(repo, "main"))
    shutil.rmtree(repo)  # any attempt to reach the remote would now fail
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    offline = hub.fetch(spec_of(repo, "main"))
    assert offline == online
    assert "may be stale" in capsys.readouterr().err
    assert type(hub.load(spec_of(repo, "main"), "net")).version == "v1"
    assert hub.fetch(spec_of(repo, online.sha)).path == online.path


def test_offline_a_miss_is_an_offline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    hub.fetch(spec_of(repo, "v1"))
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    with pytest.raises(hub.OfflineError, match="ISOLHUB_OFFLINE") as info:
        hub.fetch(spec_of(repo, "main"))  # never resolved here
    assert isinstance(info.value, ConnectionError)
    with pytest.raises(hub.OfflineError, match="not in the cache"):
        hub.fetch(spec_of(repo, "0" * 40))


def test_force_reload_fetches_the_snapshot_again(tmp_path: Path, hub_home: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    first = hub.fetch(spec_of(repo, "v1"))
    marker = first.path / "planted.txt"
    marker.write_text("left by hand")
    again = hub.fetch(spec_of(repo, "v1"))
    assert marker.exists() and again.path == first.path
    reloaded = hub.fetch(spec_of(repo, "v1"), force_reload=True)
    assert reloaded.path == first.path and not marker.exists()
    assert (reloaded.path / "hubconf.py").is_file()
    assert _leftovers(hub_home) == []


def test_a_stale_staging_dir_from_a_killed_process_is_swept_and_never_used(
    tmp_path: Path, hub_home: Path
) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    sha = hub.fetch(spec_of(repo, "v1")).sha
    snaps = hub.fetch(spec_of(repo, "v1")).path.parent
    shutil.rmtree(snaps / sha)
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    stale = snaps / f".staging-{sha[:12]}-{dead_pid}-deadbeef"
    stale.mkdir()
    (stale / "hubconf.py").write_text("raise SystemExit('half-extracted')\n")
    snap = hub.fetch(spec_of(repo, "v1"))
    assert not stale.exists()
    assert type(hub.load(spec_of(repo, "v1"), "net")).version == "v1"
    assert snap.path.name == sha


def test_unknown_refs_and_unreachable_repos_are_typed(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    with pytest.raises(hub.RefNotFoundError, match="nope"):
        hub.fetch(spec_of(repo, "nope"))
    with pytest.raises(hub.ResolveError, match="cannot list refs"):
        hub.fetch(spec_of(tmp_path / "missing"))


def test_an_abbreviated_commit_resolves_for_a_local_repository(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    sha = hub.fetch(spec_of(repo)).sha
    assert hub.fetch(spec_of(repo, sha[:10])).sha == sha


def test_a_commit_without_hubconf_is_a_clear_error(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"README.md": "no hub here\n"})
    with pytest.raises(hub.FetchError, match="has no hubconf.py"):
        hub.fetch(spec_of(repo))
