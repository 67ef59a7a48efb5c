"""A `Hub` and `isolhub.load` take their options through one `HubOptions` flow, so they agree.

The pool once built its jobs positionally (dropping `seed=` in `Hub.load`) and fetched with its
own defaults (never validating GitHub refs); these pin that both paths behave alike.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._errors import RefValidationError
from isolhub._options import HubOptions

from github_server import FakeGitHub, git
from hubrepos import commit, make_repo

HUBCONF = """
import torch
import torch.nn as nn


def net():
    return nn.Linear(4, 8)


def version():
    return VERSION
"""


def test_hub_seed_reaches_every_entrypoint_call_as_isolhub_loads_seed_does(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "hubconf.py").write_text(HUBCONF)
    want = hub.load(str(root), "net", source="local", seed=0, verbose=False).state_dict()
    torch.manual_seed(0)
    assert torch.equal(want["weight"], torch.nn.Linear(4, 8).weight)
    with hub.Hub(source="local", seed=0) as h:
        for got in (h.load(str(root), "net").state_dict(), h.load_state_dict(str(root), "net")):
            assert all(torch.equal(got[k], want[k]) for k in want)
        (r,) = h.map(lambda m: m.weight, [str(root)], "net")
        assert torch.equal(r.value, want["weight"])


@pytest.fixture
def gh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """someone/many: tag v1, then a commit `mid` that is no branch or tag head, then main."""
    repo = make_repo(tmp_path / "many", {"hubconf.py": HUBCONF + "VERSION = 'old'\n"}, tag="v1")
    commit(repo, {"hubconf.py": HUBCONF + "VERSION = 'mid'\n"})
    mid = git(repo, "rev-parse", "HEAD")
    commit(repo, {"hubconf.py": HUBCONF + "VERSION = 'head'\n"})
    with FakeGitHub() as server:
        server.add_repo("someone", "many", repo)
        monkeypatch.setenv("ISOLHUB_GITHUB_API", server.url)
        yield {"mid": mid}


@pytest.mark.slow
def test_hub_and_isolhub_load_validate_a_github_ref_alike(gh: dict[str, str]) -> None:
    spec = f"someone/many:{gh['mid']}"
    with pytest.raises(RefValidationError):
        hub.load(spec, "version", trust_repo=True, verbose=False)
    with hub.Hub(trust_repo=True) as h, pytest.raises(RefValidationError):
        h.load(spec, "version")
    with hub.Hub(trust_repo=True, skip_validation=True) as h:
        assert h.load(spec, "version") == "mid"


def test_hub_takes_every_option_that_isolhub_load_takes() -> None:
    hub_params = inspect.signature(hub.Hub).parameters
    load_params = inspect.signature(hub.load).parameters
    for f in dataclasses.fields(HubOptions):
        assert f.name in load_params, f.name
        if f.name != "mode":  # a Hub's mode is the method called (load, load_state_dict, map)
            assert f.name in hub_params, f.name
            assert hub_params[f.name].default == load_params[f.name].default or f.name in (
                "verbose",  # a pool is quiet by default: many specs at once
            ), f.name
