"""One hub dir with torch.hub: its location, its checkpoints, and torch.hub's folder names.

The hub dir is found as torch.hub finds it; checkpoints and `trusted_list` are torch.hub's files;
snapshots stay under `repos/` (a folder torch.hub never touches) and each GitHub ref also gets
torch.hub's folder name, `<owner>_<name>_<ref>`, as a link to its snapshot. The real torch.hub
runs here against the same dir, unpatched, as the proof that it finds what isolhub left.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.hub

import isolhub
from isolhub._cli.main import main as isolhub_cli
from isolhub._patch import patched_torch_hub

from github_server import FakeGitHub, git
from hubrepos import commit, make_repo
from weights_server import WeightsServer

V1 = {"hubconf.py": "def version():\n    return 'v1'\n"}
V2 = {"hubconf.py": "def version():\n    return 'v2'\n"}


@pytest.fixture(autouse=True)
def torch_hub_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_home: Path
) -> Iterator[Path]:
    """No isolhub setting: the hub dir is `$TORCH_HOME/hub`, for isolhub and torch.hub alike.

    Restores `sys.modules` and `sys.path`, which the real torch.hub's imports change.
    """
    monkeypatch.delenv("ISOLHUB_HOME")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    modules, path = set(sys.modules), list(sys.path)
    yield tmp_path / "torch" / "hub"
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


@pytest.fixture
def gh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    repo = make_repo(tmp_path / "net", V1, tag="v1")
    with FakeGitHub() as server:
        server.add_repo("someone", "net", repo)
        monkeypatch.setenv("ISOLHUB_GITHUB_API", server.url)
        yield server


def _snapshot(gh: FakeGitHub, hub: Path, ref: str) -> Path:
    sha = git(gh.repos[("someone", "net")].path, "rev-parse", ref)
    return hub / "repos" / "github--someone--net" / "snapshots" / sha


def test_a_github_load_leaves_torch_hubs_folder_name_as_a_link_to_the_snapshot(
    gh: FakeGitHub, torch_hub_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert isolhub.load("someone/net:v1", "version", trust_repo=True) == "v1"
    assert isolhub.load("someone/net", "version") == "v1"  # the default branch, main
    for name, ref in (("someone_net_v1", "v1"), ("someone_net_main", "main")):
        link = torch_hub_home / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == _snapshot(gh, torch_hub_home, ref).resolve()
    # the real torch.hub, unpatched, finds it as its cache: no request, the snapshot's code
    capsys.readouterr()
    assert torch.hub.load("someone/net:v1", "version", trust_repo="check") == "v1"
    assert f"Using cache found in {torch_hub_home / 'someone_net_v1'}" in capsys.readouterr().err
    assert gh.count("/zipball/") == 0


def test_a_moved_branch_repoints_the_link_and_torch_hubs_own_folder_is_left_alone(
    gh: FakeGitHub, torch_hub_home: Path, tmp_path: Path
) -> None:
    isolhub.load("someone/net:main", "version", trust_repo=True)
    commit(gh.repos[("someone", "net")].path, V2)
    assert isolhub.load("someone/net:main", "version") == "v2"
    link = torch_hub_home / "someone_net_main"
    assert link.resolve() == _snapshot(gh, torch_hub_home, "main").resolve()
    own = torch_hub_home / "someone_net_v1"
    own.mkdir()
    (own / "hubconf.py").write_text("def version():\n    return 'torch'\n")
    assert isolhub.load("someone/net:v1", "version") == "v1"  # from isolhub's snapshot
    assert not own.is_symlink() and "torch" in (own / "hubconf.py").read_text()


def test_removing_a_snapshot_removes_the_links_to_it(
    gh: FakeGitHub, torch_hub_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    isolhub.load("someone/net:v1", "version", trust_repo=True)
    sha = _snapshot(gh, torch_hub_home, "v1").name
    assert isolhub_cli(["cache", "rm", sha, "--yes"]) == 0
    assert not os.path.lexists(torch_hub_home / "someone_net_v1")


def test_checkpoints_and_trust_are_shared_with_torch_hub_by_default(
    torch_hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3.0)}, buf)
    with WeightsServer() as weights:
        url = weights.add("/w-abc.pth", body=buf.getvalue())
        from_torch = torch.hub.load_state_dict_from_url(url, progress=False)
        from_isolhub = isolhub.load_state_dict_from_url(url, progress=False)
        assert weights.count("/w-abc.pth") == 1  # torch.hub's download is isolhub's
    assert torch.equal(from_torch["w"], from_isolhub["w"])
    assert isolhub.get_dir() == torch.hub.get_dir() == str(torch_hub_home)
    assert (torch_hub_home / "checkpoints" / "w-abc.pth").is_file()


def test_under_the_patch_get_dir_answers_as_torch_hub_does(
    torch_hub_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = torch.hub.get_dir
    torch.hub.set_dir(tmp_path / "chosen by torch")  # before the patch
    expected = original()
    with patched_torch_hub():
        assert torch.hub.get_dir is not original
        assert torch.hub.get_dir() == expected
        monkeypatch.setenv("TORCH_HUB", "old")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.hub.get_dir()
    assert [str(w.message) for w in caught] == [
        "TORCH_HUB is deprecated, please use env TORCH_HOME instead"
    ]
    assert caught[0].filename == __file__
