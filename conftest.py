"""What the docstring examples of `isolhub/` run with (`pytest --doctest-modules isolhub`).

Every example gets its own hub dir, working directory and temp dir (all under pytest's tmp_path,
so nothing is left outside it) and an environment without tokens or proxies, as tests/ does.
Its namespace holds two tiny hub repositories, built once per session:

* `repo`: a folder with a hubconf.py (for `source="local"`), whose entrypoint
  `net(pretrained=False, width=2)` builds `torch.nn.Linear(4, width)`;
* `git_repo`: a git repository of the same hubconf, tagged `v1` (width 2) and `v2` (width 3),
  named in specs as `f"git+file://{git_repo}@v1"`.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

HUBCONF = '''\
"""A tiny hub repository for isolhub's docstring examples."""

dependencies = ["torch"]
WIDTH = {width}


def net(pretrained=False, width=WIDTH):
    """A linear layer: 4 inputs, `width` outputs."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Linear(4, width)
'''

_GIT = ["git", "-c", "user.name=isolhub docs", "-c", "user.email=docs@isolhub.invalid"]


def _commit(repo: Path, width: int, tag: str) -> None:
    (repo / "hubconf.py").write_text(HUBCONF.format(width=width))
    subprocess.run([*_GIT, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*_GIT, "-C", str(repo), "commit", "-q", "-m", tag], check=True)
    subprocess.run([*_GIT, "-C", str(repo), "tag", tag], check=True)


@pytest.fixture(scope="session")
def _doctest_repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("doctest-repos")
    local = root / "tinynet"
    local.mkdir()
    (local / "hubconf.py").write_text(HUBCONF.format(width=2))
    git_repo = root / "tinynet.git"
    subprocess.run(["git", "init", "-q", "-b", "main", str(git_repo)], check=True)
    _commit(git_repo, 2, "v1")
    _commit(git_repo, 3, "v2")
    return {"repo": str(local), "git_repo": str(git_repo)}


def pytest_configure(config: pytest.Config) -> None:
    if config.option.doctestmodules:
        # `isolhub.X` renames X's module to "isolhub" on first use, which moves X's examples into
        # isolhub/__init__.py (run with its globals); load them all first, so that happens to all
        # of them whatever the order of collection.
        import isolhub

        for name in isolhub.__all__:
            getattr(isolhub, name)


_SCRUBBED = (
    "GITHUB_TOKEN",
    "ISOLHUB_HOME",
    "ISOLHUB_OFFLINE",
    "ISOLHUB_QUIET",
    "ISOLHUB_GITHUB_API",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token, proxy or isolhub setting of this machine reaches a test or an example."""
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _doctest_sandbox(request: pytest.FixtureRequest, _clean_environment: None) -> None:
    if not isinstance(request.node, DoctestItem):
        return
    import isolhub._config as config

    tmp_path: Path = request.getfixturevalue("tmp_path")
    monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setenv("ISOLHUB_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # uv's and pip's caches too
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "cache" / "uv"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(config, "_hub_dir_override", None)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)
    request.getfixturevalue("doctest_namespace").update(request.getfixturevalue("_doctest_repos"))
