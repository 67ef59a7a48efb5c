"""`owner/name[:ref]` specs load through a GitHub-compatible API served on 127.0.0.1."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import isolhub as hub

from github_server import FakeGitHub
from hubrepos import commit, make_repo, net_files


@pytest.fixture
def gh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    repo = make_repo(tmp_path / "net", net_files("v1", width=3), tag="v1")
    commit(repo, net_files("v2", width=5), tag="v2")
    with FakeGitHub() as server:
        server.add_repo("someone", "net", repo)
        server.add_repo("pytorch", "vision", repo)
        monkeypatch.setenv("ISOLHUB_GITHUB_API", server.url)
        yield server


@pytest.mark.slow
def test_a_github_spec_loads_at_a_tag_and_at_the_default_branch(gh: FakeGitHub) -> None:
    a = hub.load("someone/net:v1", "net", trust_repo=True)
    b = hub.load("someone/net", "net", trust_repo=True)
    assert (type(a).version, type(b).version) == ("v1", "v2")
    assert gh.count("/tarball/") == 2


def test_a_cached_commit_is_not_downloaded_again(gh: FakeGitHub) -> None:
    hub.load("someone/net:v1", "net", trust_repo=True)
    hub.load("someone/net:v1", "net", trust_repo=True)
    assert gh.count("/tarball/") == 1


@pytest.mark.slow
def test_offline_a_cached_branch_loads_with_zero_requests(
    gh: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.load("someone/net:main", "net", trust_repo=True)
    before = len(gh.log)
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    assert type(hub.load("someone/net:main", "net")).version == "v2"
    assert len(gh.log) == before
    with pytest.raises(hub.OfflineError):
        hub.load("someone/net:v1", "net")
    assert len(gh.log) == before


def test_the_token_goes_to_the_api_host_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "sekrit")
    repo = make_repo(tmp_path / "net", net_files("v1", width=3), tag="v1")
    with FakeGitHub(tarball_redirect_host="127.0.0.2") as gh:
        gh.add_repo("someone", "net", repo)
        monkeypatch.setenv("ISOLHUB_GITHUB_API", gh.url)
        hub.load("someone/net:v1", "net", trust_repo=True)
    api = [r for r in gh.log if r.host == "127.0.0.1"]
    other = [r for r in gh.log if r.host == "127.0.0.2"]
    assert api and other
    assert all(r.header("Authorization") == "token sekrit" for r in api)
    assert all(r.header("Authorization") is None for r in other)


def test_module_mode_passes_the_users_environment_unchanged(
    gh: FakeGitHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Module mode runs trusted code with the user's environment, as torch.hub does; only the
    # sandbox scrubs it (see the security docs).
    monkeypatch.setenv("GITHUB_TOKEN", "sekrit")
    src = "import os\n\ndef env():\n    return os.environ.get('GITHUB_TOKEN')\n"
    gh.add_repo("someone", "envrepo", make_repo(tmp_path / "envrepo", {"hubconf.py": src}))
    assert hub.load("someone/envrepo", "env", trust_repo=True) == "sekrit"


def test_an_archive_of_another_commit_is_refused_and_nothing_is_cached(
    gh: FakeGitHub, hub_home: Path
) -> None:
    gh.serve_tarball_for = "v1"
    with pytest.raises(hub.ArchiveError, match="expected"):
        hub.load("someone/net:v2", "net", trust_repo=True)
    assert list(hub_home.glob("repos/*/snapshots/*")) == []


def test_an_unknown_ref_is_a_value_error_in_torch_hubs_words(gh: FakeGitHub) -> None:
    for skip_validation in (False, True):
        with pytest.raises(ValueError) as e:
            hub.load("someone/net:nope", "net", trust_repo=True, skip_validation=skip_validation)
        assert isinstance(e.value, hub.RefNotFoundError)
        assert str(e.value).startswith(
            f"Cannot find nope in {gh.web_url}/someone/net. If it's a commit from a forked repo, "
            "please call hub.load() with forked repo directly."
        )
        assert "has no branch, tag or commit 'nope'" in str(e.value)


def test_an_untrusted_repo_without_a_terminal_is_refused_before_any_download(
    gh: FakeGitHub, hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(hub.UntrustedRepoError, match="trust_repo=True") as info:
        hub.load("someone/net:v1", "net")
    assert "someone_net" in str(info.value)
    assert gh.log == []


def test_trust_repo_true_adds_owner_name_to_the_trusted_list(
    gh: FakeGitHub, hub_home: Path
) -> None:
    hub.list("someone/net:v1", trust_repo=True)
    assert (hub_home / "trusted_list").read_text().splitlines() == ["someone_net"]
    hub.list("someone/net:v1")  # "check" passes now, no prompt
    assert (hub_home / "trusted_list").read_text().splitlines() == ["someone_net"]


def test_trusted_owners_need_no_prompt_and_are_not_written(gh: FakeGitHub, hub_home: Path) -> None:
    assert "net" in hub.list("pytorch/vision:v1")
    assert (hub_home / "trusted_list").read_text() == ""  # created empty, as torch.hub does


@pytest.mark.slow
def test_trust_repo_none_trusts_silently_as_torch_2_13_does(gh: FakeGitHub, hub_home: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hub.list("someone/net:v1", trust_repo=None)
    assert [w for w in caught if issubclass(w.category, UserWarning)] == []
    assert (hub_home / "trusted_list").read_text().splitlines() == ["someone_net"]


def test_a_prompt_answered_yes_trusts_and_no_refuses(
    gh: FakeGitHub, hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty("no\n"))
    with pytest.raises(hub.UntrustedRepoError, match="Untrusted repository"):
        hub.list("someone/net:v1")
    monkeypatch.setattr(sys, "stdin", Tty("yes\n"))
    hub.list("someone/net:v1")
    assert "someone_net" in (hub_home / "trusted_list").read_text()


def test_what_was_downloaded_before_counts_as_trusted(gh: FakeGitHub, hub_home: Path) -> None:
    hub.list("someone/net:v1", trust_repo=True)
    (hub_home / "trusted_list").unlink()
    hub.list("someone/net:v1")  # legacy rule, as torch.hub: a cached repo is trusted
