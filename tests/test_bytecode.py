"""A worker caches the bytecode of a repo's modules as a torch.hub process does: in `__pycache__`
beside them (in the snapshot), unless $PYTHONDONTWRITEBYTECODE says not to or a sandbox forbids it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_broker import needs_sandbox
from test_cache_integrity import _verify

import isolhub as hub

from hubrepos import make_repo, spec_of

FILES = {
    "hubconf.py": "from pkg.mod import make\n\n\ndef net():\n    return make()\n",
    "pkg/__init__.py": "",
    "pkg/mod.py": "import torch.nn as nn\n\n\ndef make():\n    return nn.Linear(2, 2)\n",
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "r", FILES)


def _bytecode(root: Path) -> set[str]:
    return {str(p.relative_to(root).parent) for p in root.rglob("*.pyc")}


def test_a_load_caches_the_repos_bytecode_in_its_snapshot_and_verify_stays_clean(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    snap = hub.fetch(spec_of(repo)).path
    assert _bytecode(snap) == set()
    hub.load(spec_of(repo), "net")
    assert _bytecode(snap) == {"__pycache__", "pkg/__pycache__"}  # hubconf.py and pkg
    code, report = _verify()
    assert code == 0 and report["problems"] == [], report
    hub.load(spec_of(repo), "net")  # and read back by the next worker


def test_pythondontwritebytecode_in_the_callers_environment_is_honoured(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    snap = hub.fetch(spec_of(repo)).path
    hub.load(spec_of(repo), "net")
    assert _bytecode(snap) == set()


@needs_sandbox
def test_a_sandboxed_worker_writes_no_bytecode_and_loads_all_the_same(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    snap = hub.fetch(spec_of(repo)).path
    sd = hub.load_state_dict(spec_of(repo), "net", sandbox="strict", trust_repo=True)
    assert sd["weight"].shape == (2, 2)
    assert _bytecode(snap) == set()
