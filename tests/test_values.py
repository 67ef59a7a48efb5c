"""A function from the parent runs next to the model in the worker; only plain values return."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._engine import call, start_worker

from hubrepos import make_repo, net_files, spec_of


def test_a_closure_runs_in_the_worker_and_only_its_result_crosses(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    x = torch.ones(2, 4)
    factor = 2.0

    def evaluate(model):
        import sys

        return {
            "out": model(x) * factor,
            "version": type(model).version,
            "repo_modules": sorted(m for m in sys.modules if m.split(".")[0] == "model"),
        }

    with start_worker(hub.fetch(spec_of(repo))) as w:
        result = call(w, "net", result="value", then=evaluate)
    model = hub.load(spec_of(repo), "net")
    assert torch.equal(result["out"], model(x) * factor)
    assert result["version"] == "v1"
    assert "model.net" in result["repo_modules"]


def test_a_lambda_works_and_an_object_that_cannot_cross_is_a_clear_error(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    with start_worker(hub.fetch(spec_of(repo))) as w:
        assert call(w, "net", result="value", then=lambda m: m.fc.out_features) == 3
        with pytest.raises(hub.RemoteError, match="cannot cross back"):
            call(w, "net", result="value", then=lambda m: m)
        assert call(w, "net", result="value", then=lambda m: [1, (2.5, None), {"k": b"v"}]) == [
            1,
            (2.5, None),
            {"k": b"v"},
        ]


def test_a_function_the_worker_cannot_unpickle_is_a_remote_error_not_a_crash(
    tmp_path: Path,
) -> None:
    import types

    repo = make_repo(tmp_path / "r", net_files("v1", width=3))
    ghost = types.ModuleType("isolhub_test_ghost_module")  # exists only in this process
    exec("def width(m):\n    return m.fc.out_features\n", ghost.__dict__)
    import sys

    sys.modules[ghost.__name__] = ghost
    try:
        with start_worker(hub.fetch(spec_of(repo))) as w:
            with pytest.raises(hub.RemoteError, match="isolhub_test_ghost_module"):
                call(w, "net", result="value", then=ghost.width)
            assert call(w, "net", result="value", then=lambda m: m.fc.out_features) == 3
    finally:
        del sys.modules[ghost.__name__]
