"""A function from the parent runs next to the model in the worker; only plain values return."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._api import call, start_worker

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
