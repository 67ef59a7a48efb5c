"""The GitHub REST source against a real loopback GitHub serving real git repositories."""

from __future__ import annotations

import io
import os
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from isolhub._errors import ArchiveError, DownloadError, FetchError, RefNotFoundError, ResolveError
from isolhub._source import github as _github
from isolhub._source.archive import extract_tar
from isolhub._source.github import api_session, download_tarball, resolve_ref

from github_server import FakeGitHub, commit, git, init_repo


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, object]:
    """A repo with main (2 commits), tag v1 (light) and v2 (annotated), branch feature/x."""
    path = init_repo(tmp_path / "net")
    first = commit(path, {"hubconf.py": "def net():\n    return 1\n", "pkg/a.py": "A = 1\n"})
    git(path, "tag", "v1")
    git(path, "tag", "-a", "v2", "-m", "release 2")
    git(path, "checkout", "-q", "-b", "feature/x")
    feature = commit(path, {"feature.py": "F = 1\n"}, "feature")
    git(path, "checkout", "-q", "main")
    main = commit(path, {"pkg/a.py": "A = 2\n", "run.sh": "#!/bin/sh\n"}, "second")
    return {"path": path, "first": first, "feature": feature, "main": main}


@pytest.fixture
def gh(repo: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    """The fake GitHub serving `repo` as owner/net, with isolhub pointed at it."""
    with FakeGitHub() as fake:
        fake.add_repo("owner", "net", repo["path"])  # type: ignore[arg-type]
        monkeypatch.setenv("ISOLHUB_GITHUB_API", fake.url)
        monkeypatch.setattr(_github, "BACKOFF_S", 0.01)
        yield fake


def test_a_branch_resolves_to_its_tip(gh: FakeGitHub, repo: dict[str, object]) -> None:
    assert resolve_ref("owner", "net", "main") == ("main", repo["main"])


@pytest.mark.parametrize("tag", ["v1", "v2"], ids=["lightweight", "annotated"])
def test_a_tag_resolves_to_its_commit(gh: FakeGitHub, repo: dict[str, object], tag: str) -> None:
    assert resolve_ref("owner", "net", tag) == (tag, repo["first"])


def test_a_ref_with_a_slash_is_url_quoted(gh: FakeGitHub, repo: dict[str, object]) -> None:
    assert resolve_ref("owner", "net", "feature/x") == ("feature/x", repo["feature"])
    assert gh.count("/commits/feature%2Fx") == 1


def test_a_sha_prefix_resolves_to_the_full_sha(gh: FakeGitHub, repo: dict[str, object]) -> None:
    sha = str(repo["main"])
    assert resolve_ref("owner", "net", sha[:7]) == (sha[:7], sha)
    assert resolve_ref("owner", "net", sha) == (sha, sha)


def test_no_ref_means_the_default_branch(gh: FakeGitHub, repo: dict[str, object]) -> None:
    assert resolve_ref("owner", "net", None) == ("main", repo["main"])
    gh.add_repo("owner", "net", repo["path"], default_branch="feature/x")  # type: ignore[arg-type]
    assert resolve_ref("owner", "net", None) == ("feature/x", repo["feature"])


def test_the_api_session_sends_the_user_agent_and_the_sha_media_type(gh: FakeGitHub) -> None:
    with api_session() as s:
        resolve_ref("owner", "net", "main", session=s)
    (req,) = gh.log
    assert req.header("User-Agent") == "isolhub"
    assert req.header("Accept") == "application/vnd.github.sha"
    assert req.header("Authorization") is None


def test_an_unknown_ref_is_ref_not_found(gh: FakeGitHub) -> None:
    with pytest.raises(RefNotFoundError, match="owner/net has no branch, tag or commit 'nope'"):
        resolve_ref("owner", "net", "nope")


@pytest.mark.parametrize("ref", ["main", None])
def test_an_unknown_repository_is_ref_not_found_naming_it(gh: FakeGitHub, ref: str | None) -> None:
    with pytest.raises(RefNotFoundError, match="owner/missing not found.*GITHUB_TOKEN"):
        resolve_ref("owner", "missing", ref)


def test_a_rate_limit_says_when_it_resets_and_suggests_github_token(gh: FakeGitHub) -> None:
    gh.rate_limit_after = 0
    gh.rate_limit_reset = int(time.time()) + 600
    reset = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(gh.rate_limit_reset))
    with pytest.raises(ResolveError, match="rate limit") as err:
        resolve_ref("owner", "net", "main")
    assert f"{reset} UTC" in str(err.value)
    assert "set GITHUB_TOKEN" in str(err.value)
    assert len(gh.log) == 1, "a rate limit must not be retried"


def test_the_rate_limit_applies_after_the_allowed_calls(gh: FakeGitHub) -> None:
    gh.rate_limit_after = 2
    resolve_ref("owner", "net", "main")
    resolve_ref("owner", "net", "v1")
    with pytest.raises(ResolveError, match="rate limit"):
        resolve_ref("owner", "net", "v2")


def test_server_errors_are_retried_then_succeed(gh: FakeGitHub, repo: dict[str, object]) -> None:
    gh.fail_next = [500, 500]
    assert resolve_ref("owner", "net", "main") == ("main", repo["main"])
    assert gh.count("/commits/main") == 3


def test_persistent_server_errors_give_up_after_bounded_attempts(gh: FakeGitHub) -> None:
    gh.fail_next = [502] * 10
    with pytest.raises(ResolveError, match=r"commits/main failed after 4 attempts: HTTP 502"):
        resolve_ref("owner", "net", "main")
    assert len(gh.log) == 4


@pytest.mark.slow
def test_a_short_retry_after_is_waited_out(gh: FakeGitHub, repo: dict[str, object]) -> None:
    gh.fail_next = [(429, {"Retry-After": "1"})]
    start = time.monotonic()
    assert resolve_ref("owner", "net", "main")[1] == repo["main"]
    assert time.monotonic() - start >= 1


@pytest.mark.timeout(60)  # a hang (or a long sleep) where none belongs fails here
def test_a_day_long_retry_after_is_refused_not_slept(gh: FakeGitHub) -> None:
    gh.fail_next = [(503, {"Retry-After": "86400"})]
    with pytest.raises(ResolveError, match="failed after 1 attempts: HTTP 503"):
        resolve_ref("owner", "net", "main")  # a day's sleep would trip the test's timeout


def test_an_unreachable_api_is_a_resolve_error_naming_the_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ISOLHUB_GITHUB_API", f"http://127.0.0.1:{port}/api/v3")
    with pytest.raises(
        ResolveError, match=f"could not reach http://127.0.0.1:{port}/api/v3/repos/o/n/commits/main"
    ):
        resolve_ref("o", "n", "main")


def test_the_token_goes_to_the_api_host_only_never_to_another_host(
    gh: FakeGitHub, repo: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "s3cret")
    with FakeGitHub(tarball_redirect_host="127.0.0.2") as fake:
        fake.add_repo("owner", "net", repo["path"])  # type: ignore[arg-type]
        monkeypatch.setenv("ISOLHUB_GITHUB_API", fake.url)
        _, sha = resolve_ref("owner", "net", "main")
        download_tarball("owner", "net", sha, tmp_path / "src.tar.gz")
        api, code = fake.log[-2], fake.log[-1]
        assert fake.log[0].header("Authorization") == "token s3cret"
        assert "/tarball/" in api.path and api.host == "127.0.0.1"
        assert api.header("Authorization") == "token s3cret"
        assert code.path.startswith("/_codeload/") and code.host == "127.0.0.2"
        assert code.header("Authorization") is None
        assert all("s3cret" not in str(r.headers) for r in fake.log if r.host == "127.0.0.2")


def test_requests_alone_also_drops_the_token_on_a_cross_host_redirect(
    repo: dict[str, object],
) -> None:
    # The belt to isolhub's braces: plain requests strips Authorization when the host changes.
    with FakeGitHub(tarball_redirect_host="127.0.0.2") as fake:
        fake.add_repo("owner", "net", repo["path"])  # type: ignore[arg-type]
        url = f"{fake.url}/repos/owner/net/tarball/main"
        resp = requests.get(url, headers={"Authorization": "token s3cret"}, timeout=10)
        assert resp.status_code == 200
        assert [r.host for r in fake.log] == ["127.0.0.1", "127.0.0.2"]
        assert fake.log[1].header("Authorization") is None


def test_a_tarball_round_trips_through_extract_tar_with_its_commit_checked(
    gh: FakeGitHub, repo: dict[str, object], tmp_path: Path
) -> None:
    _, sha = resolve_ref("owner", "net", "main")
    download_tarball("owner", "net", sha, tmp_path / "src.tar.gz")
    dest = tmp_path / "staging"
    dest.mkdir()
    extract_tar(tmp_path / "src.tar.gz", dest, expected_commit=sha, strip_top_dir=True)
    assert (dest / "pkg/a.py").read_text() == "A = 2\n"
    assert (dest / "hubconf.py").read_text() == "def net():\n    return 1\n"
    assert not (dest / "feature.py").exists()
    assert gh.count(f"/_codeload/owner/net/tar.gz/{sha}") == 1


def test_a_tarball_of_another_commit_is_refused(
    gh: FakeGitHub, repo: dict[str, object], tmp_path: Path
) -> None:
    _, sha = resolve_ref("owner", "net", "main")
    gh.serve_tarball_for = str(repo["first"])
    download_tarball("owner", "net", sha, tmp_path / "src.tar.gz")
    dest = tmp_path / "staging"
    dest.mkdir()
    with pytest.raises(ArchiveError, match=f"is for commit {repo['first']}, expected {sha}"):
        extract_tar(tmp_path / "src.tar.gz", dest, expected_commit=sha, strip_top_dir=True)
    assert os.listdir(dest) == []


def test_a_branch_that_moves_after_resolving_still_downloads_the_resolved_commit(
    gh: FakeGitHub, repo: dict[str, object], tmp_path: Path
) -> None:
    _, sha = resolve_ref("owner", "net", "main")
    commit(repo["path"], {"pkg/a.py": "A = 3\n"}, "moved")  # type: ignore[arg-type]
    download_tarball("owner", "net", sha, tmp_path / "src.tar.gz")
    dest = tmp_path / "staging"
    dest.mkdir()
    extract_tar(tmp_path / "src.tar.gz", dest, expected_commit=sha, strip_top_dir=True)
    assert (dest / "pkg/a.py").read_text() == "A = 2\n"


def test_a_failed_download_is_a_fetch_error_naming_the_url_without_credentials(
    gh: FakeGitHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_GITHUB_API", gh.url.replace("http://", "http://user:pw@"))
    with pytest.raises(DownloadError) as err:
        download_tarball("owner", "net", "f" * 40, tmp_path / "src.tar.gz")
    assert isinstance(err.value, FetchError)
    assert f"/repos/owner/net/tarball/{'f' * 40}" in str(err.value)
    assert "HTTP 404" in str(err.value)
    assert "pw" not in str(err.value)


def test_a_download_never_writes_through_a_symlink_at_the_destination(
    gh: FakeGitHub, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "src.tar.gz").symlink_to(victim)
    _, sha = resolve_ref("owner", "net", "main")
    with pytest.raises(OSError):
        download_tarball("owner", "net", sha, tmp_path / "src.tar.gz")
    assert victim.read_text() == "keep"


def test_the_fake_pages_branches_and_tags_like_github(
    gh: FakeGitHub, repo: dict[str, object]
) -> None:
    def names(kind: str, page: int, per_page: int = 1) -> list[tuple[str, str]]:
        url = f"{gh.url}/repos/owner/net/{kind}?per_page={per_page}&page={page}"
        return [(b["name"], b["commit"]["sha"]) for b in requests.get(url, timeout=10).json()]

    assert names("branches", 1) == [("feature/x", repo["feature"])]
    assert names("branches", 2) == [("main", repo["main"])]
    assert names("branches", 3) == []
    assert names("tags", 1, 100) == [("v1", repo["first"]), ("v2", repo["first"])]


def test_the_fake_serves_zipballs_made_by_git_archive(
    gh: FakeGitHub, repo: dict[str, object]
) -> None:
    resp = requests.get(f"{gh.web_url}/owner/net/zipball/main", timeout=10)
    assert resp.status_code == 200
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        assert zf.comment.decode() == repo["main"]
        prefix = f"owner-net-{str(repo['main'])[:7]}/"
        assert zf.read(prefix + "pkg/a.py") == b"A = 2\n"
