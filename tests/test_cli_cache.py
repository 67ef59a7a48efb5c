"""`isolhub download` and `isolhub cache ls|verify|rm|prune`, through a parser built like the CLI's.

Invariant: only `verify --fix`, `rm` and `prune` delete anything, and only what they report.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from isolhub._cache import manifest as _manifest
from isolhub._cache.store import manifest_path, write_text_atomic
from isolhub._cli.cache import add_commands, parse_age
from isolhub._errors import CacheError, DownloadError, HashMismatchError, UsageError

from weights_server import WeightsServer, file_digests, leftovers, sha256

DATA = os.urandom(64 * 1024)
SHA_A = "a" * 40
SHA_B = "b" * 40
SHA_C = "c" * 40
DAY = 86400.0


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="isolhub")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = cli(*argv, "--json")
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def server() -> WeightsServer:
    with WeightsServer() as s:
        yield s


def listing(root: Path) -> dict[str, int]:
    """Relative path -> size of everything under `root`, without reading (atime is last use)."""
    return {str(p.relative_to(root)): p.lstat().st_size for p in root.rglob("*")}


def age(path: Path, days: float) -> None:
    """Make everything under `path` look last used `days` ago."""
    when = time.time() - days * DAY
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.utime(p, (when, when), follow_symlinks=False)


def snapshot(hub: Path, sha: str, repo: str = "github--o--r", files: int = 2) -> Path:
    d = hub / "repos" / repo / "snapshots" / sha
    d.mkdir(parents=True)
    (d / "hubconf.py").write_text("def net():\n    return 1\n")
    for i in range(files - 1):
        (d / f"m{i}.py").write_text("x = 1\n" * 100)
    origin = hub / "repos" / repo / "origin"
    if not origin.exists():
        origin.write_text(repo.split("--", 1)[1].replace("--", "/") + "\n")
    write_text_atomic(manifest_path(d), _manifest.dumps(_manifest.build(d, commit=sha)))
    return d


def ref(hub: Path, name: str, sha: str, repo: str = "github--o--r") -> Path:
    f = hub / "repos" / repo / "refs" / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(sha + "\n")
    return f


def checkpoint(hub: Path, name: str, data: bytes = DATA) -> Path:
    f = hub / "checkpoints" / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return f


@pytest.fixture
def populated(hub_home: Path) -> Path:
    """Two snapshots (one with a ref), a ref, and two checkpoints (one named by its hash)."""
    snapshot(hub_home, SHA_A)
    snapshot(hub_home, SHA_B)
    ref(hub_home, "main", SHA_A)
    checkpoint(hub_home, f"net-{sha256(DATA)[:8]}.pth")
    checkpoint(hub_home, "plain.pt", b"x" * 100)
    return hub_home


# -- download ----------------------------------------------------------------------------------


def test_download_saves_into_the_checkpoint_cache_and_reports_json(
    server: WeightsServer, hub_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/models/w.pth", body=DATA)
    code, result = cli_json(capsys, "download", url, "--no-progress")
    assert code == 0
    target = hub_home / "checkpoints" / "w.pth"
    assert result == {
        "url": url,
        "path": str(target),
        "size": len(DATA),
        "sha256": sha256(DATA),
        "cached": False,
    }
    assert target.read_bytes() == DATA
    code, again = cli_json(capsys, "download", url, "--sha256", sha256(DATA).upper())
    assert code == 0 and again["cached"] is True
    assert server.count() == 1


def test_download_to_dst_checks_sha256_and_prints_a_line(
    server: WeightsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/w.pth", body=DATA)
    dst = tmp_path / "w.bin"
    assert cli("download", url, str(dst), "--sha256", sha256(DATA)[:12], "--no-progress") == 0
    assert dst.read_bytes() == DATA
    assert capsys.readouterr().out.startswith(f"saved: {dst} (64.0 KiB, sha256 {sha256(DATA)}")
    assert cli("download", url, str(tmp_path), "--no-progress") == 0
    assert (tmp_path / "w.pth").read_bytes() == DATA


def test_download_with_a_wrong_sha256_raises_and_writes_nothing(
    server: WeightsServer, tmp_path: Path
) -> None:
    url = server.add("/w.pth", body=DATA)
    with pytest.raises(HashMismatchError, match="invalid hash value"):
        cli("download", url, str(tmp_path / "w.bin"), "--sha256", "00ff00ff", "--no-progress")
    with pytest.raises(DownloadError, match="not a hexadecimal"):
        cli("download", url, str(tmp_path / "w.bin"), "--sha256", "xyz")
    assert not (tmp_path / "w.bin").exists()
    assert leftovers(tmp_path) == []
    assert server.count() == 1


def test_download_off_a_terminal_prints_plain_progress_lines_not_bar_fragments(
    server: WeightsServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/w.pth", body=DATA)
    cli("download", url, str(tmp_path / "a"))
    err = capfd.readouterr().err
    assert err == "isolhub: downloaded a: 64.0 KiB of 64.0 KiB (100%) in " + err.split(" in ")[-1]
    assert "\r" not in err and "B/s" not in err
    for quiet in ("--no-progress", "--quiet"):
        cli("download", url, str(tmp_path / "b"), quiet)
        assert capfd.readouterr().err == ""


def test_a_failed_download_prints_no_progress_at_all(
    server: WeightsServer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(DownloadError, match="404"):
        cli("download", server.url("/missing.pth"), str(tmp_path / "a"))
    assert capfd.readouterr().err == ""


def test_download_on_a_terminal_draws_a_bar(
    server: WeightsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from isolhub._progress import bytes_bar

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    with bytes_bar(True, "w.pth", stream=tty) as bar:
        bar.reset(total=len(DATA))
        bar.update(len(DATA))
    assert "100%" in tty.getvalue() and "\r" in tty.getvalue()
    monkeypatch.setenv("ISOLHUB_QUIET", "1")
    tty = Tty()
    with bytes_bar(True, "w.pth", stream=tty) as bar:
        bar.update(len(DATA))
    assert tty.getvalue() == ""


# -- ls ----------------------------------------------------------------------------------------


def test_cache_ls_lists_kinds_sizes_last_use_and_unused_snapshots(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint(populated, "w.pth.0123456789abcdef0123456789abcdef.partial", b"half")
    (populated / "repos" / "github--o--r" / "snapshots" / ".staging-abc-1-x").mkdir()
    code, listing = cli_json(capsys, "cache", "ls")
    assert code == 0
    entries = {e["id"]: e for e in listing["entries"]}
    snap_a = f"repos/github--o--r/snapshots/{SHA_A}"
    snap_b = f"repos/github--o--r/snapshots/{SHA_B}"
    assert set(entries) == {
        snap_a,
        snap_b,
        "repos/github--o--r/refs/main",
        f"checkpoints/net-{sha256(DATA)[:8]}.pth",
        "checkpoints/plain.pt",
    }
    assert entries[snap_a]["kind"] == "snapshot" and entries[snap_a]["unused"] is False
    assert entries[snap_a]["refs"] == ["main"] and entries[snap_a]["repo"] == "o/r"
    assert entries[snap_b]["unused"] is True
    assert entries[snap_a]["size"] == len("def net():\n    return 1\n") + len("x = 1\n" * 100)
    assert entries["repos/github--o--r/refs/main"]["sha"] == SHA_A
    assert entries["checkpoints/plain.pt"] == {
        "id": "checkpoints/plain.pt",
        "kind": "checkpoint",
        "path": str(populated / "checkpoints" / "plain.pt"),
        "size": 100,
        "last_used": entries["checkpoints/plain.pt"]["last_used"],
        "repo": None,
        "sha": None,
        "ref": None,
    }
    assert listing["total_size"] == sum(e["size"] for e in listing["entries"])
    cli("cache", "ls")
    human = capsys.readouterr().out
    assert f"{snap_b}  (unused)" in human and f"{snap_a}  (refs: main)" in human
    assert "2 snapshot(s) (1 unused), 1 ref(s), 2 checkpoint(s)" in human
    assert ".partial" not in human and ".staging" not in human


def test_cache_ls_groups_snapshots_and_refs_by_repo_with_sizes(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot(populated, SHA_C, repo="github--x--y")
    code, listing = cli_json(capsys, "cache", "ls")
    assert code == 0
    by_repo = {r["repo"]: r for r in listing["repos"]}
    assert by_repo["o/r"]["refs"] == {"main": SHA_A}
    assert sorted(by_repo["o/r"]["snapshots"]) == sorted([SHA_A, SHA_B])
    assert by_repo["o/r"]["unused"] == 1
    snaps = [e for e in listing["entries"] if e["repo"] == "o/r"]
    assert by_repo["o/r"]["size"] == sum(e["size"] for e in snaps)
    assert cli("cache", "ls") == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("o/r "))
    assert "2 (1 unused)" in line and f"main -> {SHA_A[:12]}" in line
    assert f"  repos/github--o--r/snapshots/{SHA_B}  (unused)" in out
    assert "checkpoints (" in out and "2 repo(s), 3 snapshot(s)" in out


def test_cache_ls_on_an_empty_or_missing_hub_lists_nothing(
    hub_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, listing = cli_json(capsys, "cache", "ls")
    assert code == 0 and listing["entries"] == [] and not hub_home.exists()
    cli("cache", "ls")
    assert "(empty)" in capsys.readouterr().out


# -- verify ------------------------------------------------------------------------------------


def test_cache_verify_on_a_healthy_cache_exits_0(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = cli_json(capsys, "cache", "verify")
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert report["checked"] == 5


def test_cache_verify_finds_broken_entries_and_fix_removes_only_those(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = populated
    corrupt = checkpoint(hub, f"bad-{sha256(b'other')[:10]}.pth")
    dated = checkpoint(hub, "model-20240101.pth")  # all digits: a date, not a hash
    bad_st = checkpoint(hub, "x.safetensors", (1 << 40).to_bytes(8, "little") + b"{}")
    dead = checkpoint(hub, f"w.pth.{'0' * 32}.00000000-999999999.partial", b"half")
    age(dead, 2)
    # another running process (ours would be an abandoned, resumable partial unless in use)
    live = checkpoint(hub, f"w.pth.{'1' * 32}.{_host()}-{os.getppid()}.partial", b"half")
    staging = hub / "repos" / "github--o--r" / "snapshots" / ".staging-cccc-999999999-ab"
    staging.mkdir()
    empty = hub / "repos" / "github--o--r" / "snapshots" / SHA_C
    empty.mkdir()
    dangling = ref(hub, "gone", "d" * 40)
    good = file_digests(hub)
    for p in (corrupt, bad_st, dead, dangling):
        good.pop(str(p.relative_to(hub)))

    code, report = cli_json(capsys, "cache", "verify")
    assert code == 1 and report["ok"] is False
    found = {p["id"]: p["problem"] for p in report["problems"]}
    assert set(found) == {
        f"checkpoints/{corrupt.name}",
        f"checkpoints/{bad_st.name}",
        f"checkpoints/{dead.name}",
        f"repos/github--o--r/snapshots/{staging.name}",
        f"repos/github--o--r/snapshots/{SHA_C}",
        "repos/github--o--r/refs/gone",
    }
    assert "corrupt: sha256" in found[f"checkpoints/{corrupt.name}"]
    assert "header of 1099511627776 bytes" in found[f"checkpoints/{bad_st.name}"]
    assert "missing tree" in found[f"repos/github--o--r/snapshots/{SHA_C}"]
    assert report["in_progress"] == [str(live)]
    assert dated.exists() and corrupt.exists()  # plain verify deletes nothing

    cli("cache", "verify")
    human = capsys.readouterr().out
    assert "problem: checkpoints/" in human and "verify --fix" in human

    code, fixed = cli_json(capsys, "cache", "verify", "--fix")
    assert code == 0 and all(p["fixed"] for p in fixed["problems"])
    for p in (corrupt, bad_st, dead, staging, empty, dangling):
        assert not p.exists(), p
    assert live.exists() and dated.exists()
    assert file_digests(hub) == good
    code, again = cli_json(capsys, "cache", "verify")
    assert code == 0 and again["problems"] == []


def _host() -> str:
    from isolhub._cache.store import host_tag

    return host_tag()


# -- rm ----------------------------------------------------------------------------------------


def test_cache_rm_removes_a_checkpoint_by_id_or_by_name(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("cache", "rm", "checkpoints/plain.pt", "--yes") == 0
    assert "removed checkpoint checkpoints/plain.pt (100 B)" in capsys.readouterr().out
    name = f"net-{sha256(DATA)[:8]}.pth"
    code, result = cli_json(capsys, "cache", "rm", name, "--yes")
    assert code == 0 and result["removed"] == [
        {"id": f"checkpoints/{name}", "kind": "checkpoint", "size": len(DATA)}
    ]
    assert list((populated / "checkpoints").iterdir()) == []


def test_cache_rm_of_a_snapshot_takes_its_refs_and_keeps_the_rest(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result = cli_json(capsys, "cache", "rm", SHA_A[:10], "-y")
    assert code == 0
    assert {r["id"] for r in result["removed"]} == {
        f"repos/github--o--r/snapshots/{SHA_A}",
        "repos/github--o--r/refs/main",
    }
    repo = populated / "repos" / "github--o--r"
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [SHA_B]
    assert list((repo / "refs").iterdir()) == []
    assert (populated / "checkpoints" / "plain.pt").exists()


def test_cache_rm_of_a_whole_repo_by_path_or_origin(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot(populated, SHA_C, repo="github--x--y")
    assert cli("cache", "rm", str(populated / "repos" / "github--x--y"), "--yes") == 0
    assert not (populated / "repos" / "github--x--y").exists()
    assert cli("cache", "rm", "o/r", "--yes") == 0
    assert list((populated / "repos").iterdir()) == []
    assert (populated / "checkpoints" / "plain.pt").exists()


def test_cache_rm_refuses_anything_outside_the_hub_or_unknown(
    populated: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "precious.pt"
    outside.write_bytes(b"keep me")
    for target in (str(outside), str(populated), "..", "nope.pth", "/etc/passwd", "checkpoints"):
        with pytest.raises(CacheError, match="no cache entry matches"):
            cli("cache", "rm", target, "--yes")
    assert outside.read_bytes() == b"keep me"
    assert len(file_digests(populated)) == 10  # 2 snapshots of 2 files + manifests, 4 others


def test_cache_rm_of_an_ambiguous_sha_prefix_is_refused(populated: Path) -> None:
    snapshot(populated, "a" * 39 + "b", repo="github--x--y")
    with pytest.raises(CacheError, match="matches 2 snapshots"):
        cli("cache", "rm", "aaaaaaaa", "--yes")


def test_cache_rm_without_yes_off_a_terminal_removes_nothing_and_names_the_flag(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = file_digests(populated)
    with pytest.raises(UsageError, match="pass --yes"):
        cli("cache", "rm", "checkpoints/plain.pt")
    assert cli("cache", "rm", "checkpoints/plain.pt", "--dry-run") == 0
    assert "would remove checkpoint checkpoints/plain.pt" in capsys.readouterr().out
    assert file_digests(populated) == before


@pytest.mark.parametrize(("answer", "removed"), [(b"y\n", True), (b"n\n", False), (b"\n", False)])
def test_cache_rm_asks_on_a_terminal_and_removes_only_on_yes(
    populated: Path, answer: bytes, removed: bool
) -> None:
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "isolhub", "cache", "rm", "checkpoints/plain.pt"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    prompt = b""
    while b"[y/N]" not in prompt:
        prompt += os.read(leader, 1024)
    assert b"checkpoints/plain.pt (100 B)" in prompt
    os.write(leader, answer)
    assert proc.wait(timeout=60) == (0 if removed else 2)
    os.close(leader)
    assert (populated / "checkpoints" / "plain.pt").exists() is not removed


# -- prune -------------------------------------------------------------------------------------


def test_cache_prune_dry_run_changes_nothing_and_prune_removes_only_old_entries(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = populated
    repo = hub / "repos" / "github--o--r"
    age(repo / "snapshots" / SHA_A, 40)
    age(hub / "checkpoints" / "plain.pt", 40)
    dead = checkpoint(hub, f"w.pth.{'0' * 32}.00000000-999999999.partial", b"half")
    age(dead, 2)
    before = listing(hub)

    code, dry = cli_json(capsys, "cache", "prune", "--dry-run")
    assert code == 0 and dry["dry_run"] is True
    expected = {
        f"repos/github--o--r/snapshots/{SHA_A}",
        "repos/github--o--r/refs/main",
        "checkpoints/plain.pt",
        f"checkpoints/{dead.name}",
    }
    assert {r["id"] for r in dry["removed"]} == expected
    assert listing(hub) == before

    code, done = cli_json(capsys, "cache", "prune", "--older-than", "30d")
    assert code == 0 and {r["id"] for r in done["removed"]} == expected
    assert done["freed"] == sum(r["size"] for r in done["removed"]) > 0
    assert sorted(p.name for p in (repo / "snapshots").iterdir()) == [SHA_B]
    assert sorted(p.name for p in (hub / "checkpoints").iterdir()) == [
        f"net-{sha256(DATA)[:8]}.pth"
    ]
    cli("cache", "prune", "--older-than", "1000d")
    assert "removed 0 entries" in capsys.readouterr().out


def test_cache_prune_with_a_short_age_empties_the_cache_but_the_hub_stays(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    age(populated, 1)
    assert cli("cache", "prune", "--older-than", "12h") == 0
    assert "removed 5 entries" in capsys.readouterr().out
    assert list((populated / "repos").iterdir()) == []
    assert list((populated / "checkpoints").iterdir()) == []
    assert populated.is_dir()


def test_ages_parse_and_a_bad_age_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_age("30d") == 30 * DAY
    assert parse_age("12h") == 12 * 3600
    assert parse_age("2w") == 14 * DAY
    assert parse_age("90m") == 90 * 60
    assert parse_age("7") == 7 * DAY
    with pytest.raises(SystemExit) as info:
        cli("cache", "prune", "--older-than", "soon")
    assert info.value.code == 2
    assert "invalid age 'soon'" in capsys.readouterr().err


def test_ls_and_verify_never_delete_anything(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint(populated, f"bad-{sha256(b'other')[:10]}.pth")
    before = file_digests(populated)
    cli("cache", "ls")
    cli("cache", "verify")
    cli("cache", "ls", "--json")
    cli("cache", "verify", "--json")
    assert file_digests(populated) == before


def test_cache_verify_finds_an_abandoned_preload_temp_file_and_fix_removes_it(
    populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = populated / "preload"
    folder.mkdir()
    record = folder / "0123456789abcdef.json"
    record.write_text('{"used": {"yaml": 1.0}, "never": []}')
    abandoned = folder / ".preload-abc123"
    abandoned.write_text('{"used": {')
    age(abandoned, 2)
    fresh = folder / ".preload-def456"  # another process may be writing it right now
    fresh.write_text("{")

    code, report = cli_json(capsys, "cache", "verify")
    assert code == 1
    assert [p["id"] for p in report["problems"]] == ["preload/.preload-abc123"]
    assert report["in_progress"] == [str(fresh)]

    code, _ = cli_json(capsys, "cache", "verify", "--fix")
    assert code == 0 and not abandoned.exists()
    assert fresh.exists() and record.exists()
