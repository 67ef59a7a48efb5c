"""Repos never leak into the parent or into each other: each repo@ref runs in its own worker."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

import isolhub as hub

from hubrepos import commit, make_repo, net_files, spec_of


@pytest.fixture
def two_ref_repo(tmp_path: Path) -> Path:
    repo = make_repo(tmp_path / "net.git", net_files("v1", width=3), tag="v1")
    commit(repo, net_files("v2", width=5, act="Tanh"), tag="v2")
    return repo


def _repo_modules() -> set[str]:
    return {m for m in sys.modules if m.split(".")[0] in ("model", "utils", "hubconf")}


def test_two_refs_of_one_repo_load_side_by_side_from_their_own_code(two_ref_repo: Path) -> None:
    modules_before, path_before = set(sys.modules), list(sys.path)
    a = hub.load(spec_of(two_ref_repo, "v1"), "net", pretrained=False)
    b = hub.load(spec_of(two_ref_repo, "v2"), "net", pretrained=False)

    x = torch.ones(1, 4)
    assert a(x).shape == (1, 3) and b(x).shape == (1, 5)
    assert torch.equal(a(x), torch.relu(x @ a.fc.weight.T + a.fc.bias))
    assert torch.equal(b(x), torch.tanh(x @ b.fc.weight.T + b.fc.bias))
    assert (type(a).version, type(b).version) == ("v1", "v2")
    file_a, file_b = inspect.getfile(type(a).forward), inspect.getfile(type(b).forward)
    assert file_a != file_b
    assert file_a.endswith("model/net.py") and file_b.endswith("model/net.py")
    assert hub.fetch(spec_of(two_ref_repo, "v1")).sha in file_a
    assert hub.fetch(spec_of(two_ref_repo, "v2")).sha in file_b
    assert _repo_modules() == set()
    assert not {m for m in set(sys.modules) - modules_before if "hubconf" in m}
    assert sys.path == path_before


@pytest.mark.slow
def test_two_repos_that_both_ship_model_and_utils_load_in_either_order(tmp_path: Path) -> None:
    one = make_repo(tmp_path / "one", net_files("one", width=2))
    two = make_repo(tmp_path / "two", net_files("two", width=6))
    for first, second in ((one, two), (two, one)):
        m1 = hub.load(spec_of(first), "net")
        m2 = hub.load(spec_of(second), "net")
        assert {type(m1).version, type(m2).version} == {"one", "two"}
        assert type(m1).version != type(m2).version
    assert _repo_modules() == set()


def test_a_parent_package_named_utils_does_not_shadow_the_repos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent_pkg = tmp_path / "parent_site"
    parent_pkg.mkdir()
    (parent_pkg / "utils.py").write_text('VERSION = "parent"\n')
    monkeypatch.syspath_prepend(str(parent_pkg))
    import utils  # noqa: F401 - the parent's own `utils`

    repo = make_repo(tmp_path / "r", net_files("repo", width=2))
    assert type(hub.load(spec_of(repo), "net")).version == "repo"
    assert sys.modules["utils"].VERSION == "parent"
    del sys.modules["utils"]


def test_a_hubconf_that_edits_sys_path_affects_only_its_worker(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {
            "hubconf.py": """
                import sys
                sys.path.insert(0, "/nonexistent/injected")
                sys.modules["injected_marker"] = sys

                def probe():
                    return list(sys.path[:3])
            """
        },
    )
    path_before = list(sys.path)
    worker_path = hub.load(spec_of(repo), "probe")
    assert "/nonexistent/injected" in worker_path
    assert sys.path == path_before
    assert "injected_marker" not in sys.modules


def test_a_failed_load_leaves_nothing_that_changes_the_next_load(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {
            "hubconf.py": """
                import helpers

                def entry():
                    return helpers.VALUE
            """,
            "helpers.py": "VALUE = 1\nraise ImportError('half-imported on purpose')\n",
        },
        tag="broken",
    )
    with pytest.raises(hub.RemoteError, match="half-imported on purpose") as info:
        hub.load(spec_of(repo, "broken"), "entry")
    assert info.value.remote_type == "builtins.ImportError"
    commit(repo, {"helpers.py": "VALUE = 2\n"}, tag="fixed")
    assert hub.load(spec_of(repo, "fixed"), "entry") == 2
    assert "helpers" not in sys.modules


def test_hubconf_imports_its_own_modules_from_inside_the_entrypoint(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {
            "hubconf.py": """
                import os

                def entry():
                    import pkg.deep
                    return pkg.deep.where(), os.path.dirname(__file__)
            """,
            "pkg/__init__.py": "",
            "pkg/deep.py": "def where():\n    return __file__\n",
        },
    )
    where, hubconf_dir = hub.load(spec_of(repo), "entry")
    snap = hub.fetch(spec_of(repo))
    assert where == str(snap.path / "pkg" / "deep.py")
    assert hubconf_dir == str(snap.path)


def test_list_returns_public_callables_including_imported_ones(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {
            "hubconf.py": """
                from os.path import join
                dependencies = ["torch"]
                CONSTANT = 3

                def alpha():
                    "Alpha."

                def _hidden():
                    return "hidden"

                class Beta:
                    pass
            """
        },
    )
    assert hub.list(spec_of(repo)) == ["Beta", "alpha", "join"]
    assert hub.help(spec_of(repo), "alpha") == "Alpha."
    assert hub.help(spec_of(repo), "Beta") is None
    assert hub.load(spec_of(repo), "_hidden") == "hidden"


@pytest.mark.slow
def test_missing_entrypoint_and_missing_dependencies_are_typed(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {"hubconf.py": "dependencies = ['torch', 'no_such_mod_a', 'no_such_mod_b']\nx = 1\n"},
    )
    with pytest.raises(hub.MissingDependenciesError, match="no_such_mod_a, no_such_mod_b") as info:
        hub.load(spec_of(repo), "x")
    assert info.value.missing == ["no_such_mod_a", "no_such_mod_b"]
    assert isinstance(info.value, RuntimeError)
    assert hub.list(spec_of(repo)) == []
    commit(repo, {"hubconf.py": "x = 1\n"})
    with pytest.raises(hub.EntrypointError, match="Cannot find callable x in hubconf"):
        hub.load(spec_of(repo), "x")
    with pytest.raises(hub.EntrypointError, match="Cannot find callable nope in hubconf"):
        hub.help(spec_of(repo), "nope")
    with pytest.raises(ValueError, match="should be a string"):
        hub.load(spec_of(repo), 3)  # type: ignore[arg-type]


def test_args_and_kwargs_are_forwarded_unchanged(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {"hubconf.py": "def echo(*args, **kwargs):\n    return args, kwargs\n"},
    )
    args, kwargs = hub.load(
        spec_of(repo), "echo", 1, "two", verbose=False, three=[3], mode="module"
    )
    assert args == (1, "two") and kwargs == {"three": [3]}


def test_local_source_loads_a_plain_directory(tmp_path: Path) -> None:
    d = tmp_path / "checkout"
    d.mkdir()
    (d / "hubconf.py").write_text("def entry(k=1):\n    import torch\n    return torch.ones(k)\n")
    assert torch.equal(hub.load(str(d), "entry", source="local", k=3), torch.ones(3))
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    (sd_dir / "hubconf.py").write_text(
        "import torch.nn as nn\ndef lin():\n    return nn.Linear(2, 2)\n"
    )
    sd = hub.load_state_dict(str(sd_dir), "lin", source="local")
    assert list(sd) == ["weight", "bias"]


def test_local_dir_without_hubconf_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(hub.ResolveError, match="has no hubconf.py"):
        hub.load(str(tmp_path), "x", source="local")


def test_results_may_be_tuples_of_model_and_helper_functions(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {
            "hubconf.py": """
                import torch.nn as nn
                from helpers import preprocess

                def model_and_transform():
                    return nn.Linear(2, 1), preprocess
            """,
            "helpers.py": "def preprocess(x):\n    return x * 2 + OFFSET\nOFFSET = 1\n",
        },
    )
    model, transform = hub.load(spec_of(repo), "model_and_transform")
    assert transform(3) == 7
    assert model.weight.shape == (1, 2)
    assert "helpers" not in sys.modules


def test_torchscript_modules_come_back_working(tmp_path: Path) -> None:
    repo = make_repo(
        tmp_path / "r",
        {
            "hubconf.py": """
                import torch

                def scripted():
                    torch.manual_seed(0)
                    return torch.jit.script(torch.nn.Linear(3, 2))
            """
        },
    )
    m = hub.load(spec_of(repo), "scripted")
    assert isinstance(m, torch.jit.ScriptModule)
    torch.manual_seed(0)
    ref = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.allclose(m(x), ref(x))
