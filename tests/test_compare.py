"""`compare` and `isolhub diff`: two refs of real local git repos, each in its own worker.

Each case builds a repo whose tags differ in one way (layer width, an added layer, a renamed
parameter, the activation, the entrypoint's signature, an entrypoint that raises) and checks that
the report names exactly that change, and that the CLI's exit code says so (0/1/2).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import isolhub._cli.main as cli
from isolhub._compare.compare import CompareReport, compare, find_renames
from isolhub._compare.html import layer_differences, render_svg
from isolhub._compare.worker import summarise

from hubrepos import commit, make_repo, net_files, spec_of

MODEL = '''\
import torch
import torch.nn as nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
{layers}
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() > 1:
                    p.copy_(torch.arange(p.numel()).reshape(p.shape) * 0.01 - 0.05)
                else:
                    p.fill_(0.5)
{post}

    def forward(self, x):
{forward}


def net({signature}):
    """{doc}"""
{body}
'''


def model(
    *,
    layers: str = "self.fc = nn.Linear(4, 3)",
    forward: str = "return torch.relu(self.fc(x))",
    signature: str = "pretrained=False",
    doc: str = "A small net.",
    body: str = "return Net()",
    post: str = "",
) -> dict[str, str | None]:
    def block(text: str, indent: int) -> str:
        return "\n".join(" " * indent + line for line in text.splitlines())

    return {
        "hubconf.py": MODEL.format(
            layers=block(layers, 8),
            post=block(post, 12),
            forward=block(forward, 8),
            signature=signature,
            doc=doc,
            body=block(body, 4),
        )
    }


X = torch.linspace(-1, 1, 8).reshape(2, 4)


def two_tags(tmp_path: Path, v1: dict[str, str | None], v2: dict[str, str | None]) -> Path:
    repo = make_repo(tmp_path / "net.git", {**v1, "README": "v1\n"}, tag="v1")
    commit(repo, {**v2, "README": "v2\n"}, tag="v2")
    return repo


def diff(repo: Path, entry: str = "net", **kwargs: object) -> CompareReport:
    kwargs.setdefault("inputs", X)
    return compare(spec_of(repo, "v1"), spec_of(repo, "v2"), entry, verbose=False, **kwargs)


def by_name(rows: tuple) -> dict:
    return {r.name: r for r in rows}


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `isolhub ...` in-process: `(exit code, stdout, stderr)`."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.slow
def test_identical_code_at_two_refs_is_equivalent_and_diff_exits_0(tmp_path: Path, run_cli) -> None:
    repo = two_tags(tmp_path, model(), model())
    rep = diff(repo, seed=0)
    assert rep.a.sha != rep.b.sha
    assert rep.equivalent and not rep.failed and rep.differences == ()
    assert {p.status for p in rep.parameters} == {"same"}
    assert [(o.name, o.status, o.shape_a) for o in rep.outputs] == [("output", "same", (2, 3))]
    assert {e.name: e.status for e in rep.entrypoints} == {"Net": "same", "net": "same"}
    assert (rep.a.parameters, rep.a.tensors, rep.a.bytes) == (15, 2, 60)
    assert rep.a.load_s is not None and 0 <= rep.a.load_s < 60
    code, out, err = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v2"), "net", "--input-shape", "2,4"
    )
    assert code == 0, err
    assert "EQUIVALENT" in out
    # A forward that fails the same way on both sides is not a difference, but it is reported.
    wrong = diff(repo, seed=0, inputs=torch.ones(2, 7))
    assert wrong.equivalent and wrong.outputs == ()
    assert wrong.a.forward_error.startswith("RuntimeError: mat1 and mat2 shapes cannot be")
    assert wrong.uncompared == (f"output: forward raised on both: {wrong.a.forward_error}",)


@pytest.mark.slow
def test_both_refs_load_at_the_same_time(tmp_path: Path) -> None:
    files = {
        "hubconf.py": """
            import time


            def slow():
                start = time.monotonic()
                time.sleep(1.0)
                return {"start": start, "end": time.monotonic()}
        """
    }
    rep = diff(two_tags(tmp_path, files, files), "slow", inputs=None)
    v = by_name(rep.values)
    # CLOCK_MONOTONIC is one clock for all processes: the two sleeps overlap.
    assert max(float(v["start"].a), float(v["start"].b)) < min(float(v["end"].a), float(v["end"].b))
    assert rep.notes[0] == "no inputs given: outputs were not compared"
    assert rep.notes[1].startswith("no seed given: both sides started from the same random state")


@pytest.mark.slow
def test_seed_makes_identical_code_give_identical_random_weights(tmp_path: Path) -> None:
    # hubconf reseeds from the OS at import, so only compare's seed (applied after the import,
    # before the entrypoint) makes the two workers draw the same weights.
    files = {
        "hubconf.py": """
            import torch
            import torch.nn as nn

            torch.seed()


            def net():
                return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
        """
    }
    repo = two_tags(tmp_path, files, files)
    unseeded = diff(repo)
    assert not unseeded.equivalent
    assert {p.status for p in unseeded.parameters} == {"changed"}
    seeded = diff(repo, seed=0)
    assert seeded.equivalent, seeded.differences
    assert {p.status for p in seeded.parameters} == {"same"}


@pytest.mark.slow
def test_a_changed_layer_width_is_reported_as_reshaped_and_diff_exits_1(
    tmp_path: Path, run_cli
) -> None:
    repo = two_tags(tmp_path, model(), model(layers="self.fc = nn.Linear(4, 5)"))
    rep = diff(repo)
    params = by_name(rep.parameters)
    assert params["fc.weight"].status == "reshaped"
    assert (params["fc.weight"].shape_a, params["fc.weight"].shape_b) == ((3, 4), (5, 4))
    assert params["fc.bias"].status == "reshaped"
    assert (rep.a.parameters, rep.b.parameters) == (15, 25)
    assert [(o.status, o.shape_a, o.shape_b) for o in rep.outputs] == [("reshaped", (2, 3), (2, 5))]
    assert any("fc.weight: reshaped 3x4 → 5x4" in d for d in rep.differences)
    assert not rep.equivalent and not rep.failed
    code, out, _ = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v2"), "net", "--input-shape", "1,4"
    )
    assert code == 1
    assert "reshaped  fc.weight" in out and "DIFFERENT" in out


@pytest.mark.slow
def test_an_added_layer_is_reported_as_added_and_the_rest_unchanged(tmp_path: Path) -> None:
    v2 = model(
        layers="self.fc = nn.Linear(4, 3)\nself.extra = nn.Linear(3, 3)",
        forward="return self.extra(torch.relu(self.fc(x)))",
    )
    rep = diff(two_tags(tmp_path, model(), v2))
    statuses = {p.name: p.status for p in rep.parameters}
    assert statuses == {
        "fc.weight": "same",
        "fc.bias": "same",
        "extra.weight": "added",
        "extra.bias": "added",
    }
    assert rep.outputs[0].status == "changed"
    assert rep.layer_differences()[0]["layer"] == "extra"


@pytest.mark.slow
def test_a_renamed_parameter_is_one_rename_not_a_removal_and_an_addition(tmp_path: Path) -> None:
    v2 = model(layers="self.head = nn.Linear(4, 3)", forward="return torch.relu(self.head(x))")
    rep = diff(two_tags(tmp_path, model(), v2))
    renames = {p.name: p.name_b for p in rep.parameters if p.status == "renamed"}
    # fc.bias is constant (all 0.5): it pairs up only because fc.weight → head.weight did.
    assert renames == {"fc.weight": "head.weight", "fc.bias": "head.bias"}
    assert len(rep.parameters) == 2
    assert rep.outputs[0].status == "same"
    # Same values, same outputs: equivalent (the verdict says the keys need mapping).
    assert rep.equivalent


def test_constant_tensors_alone_are_not_taken_for_a_rename() -> None:
    zeros = torch.zeros(3)
    weight = torch.randn(3, 4)
    assert find_renames({"old.bias": zeros}, {"new.bias": zeros.clone()}) == []
    pairs = find_renames(
        {"old.weight": weight, "old.bias": zeros, "gone.bias": zeros},
        {"new.weight": weight.clone(), "new.bias": zeros.clone(), "other.bias": zeros.clone()},
    )
    assert sorted(pairs) == [("old.bias", "new.bias"), ("old.weight", "new.weight")]


@pytest.mark.slow
def test_a_changed_activation_keeps_the_weights_but_changes_the_outputs(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "net.git", net_files("v1", width=3), tag="v1")
    commit(repo, net_files("v2", width=3, act="Tanh"), tag="v2")
    rep = diff(repo)
    assert {p.status for p in rep.parameters} == {"same"}
    (out,) = rep.outputs
    assert out.status == "changed" and out.allclose is False and out.max_abs > 0.1
    # The docstring names the version: reported, but not a difference by itself.
    assert by_name(rep.entrypoints)["net"].changes == ("docstring",)
    assert rep.differences and all(d.startswith("output") for d in rep.differences)


@pytest.mark.slow
def test_a_changed_entrypoint_signature_is_a_difference_a_docstring_alone_is_not(
    tmp_path: Path,
) -> None:
    repo = two_tags(tmp_path, model(), model(signature="pretrained=False, dropout=0.0"))
    commit(repo, model(doc="A small net, now documented better."), tag="v3")
    rep = diff(repo)
    entry = by_name(rep.entrypoints)["net"]
    assert (entry.status, entry.changes) == ("changed", ("signature", "source"))
    assert (entry.signature_a, entry.signature_b) == (
        "(pretrained=False)",
        "(pretrained=False, dropout=0.0)",
    )
    assert rep.differences == ("entrypoint net: signature changed",)
    doc_only = compare(spec_of(repo, "v1"), spec_of(repo, "v3"), "net", inputs=X, verbose=False)
    assert by_name(doc_only.entrypoints)["net"].changes == ("docstring",)
    assert doc_only.equivalent


@pytest.mark.slow
def test_an_entrypoint_that_raises_is_reported_and_the_other_side_still_described(
    tmp_path: Path, run_cli
) -> None:
    v2 = model(body='raise FileNotFoundError("weights.pt is missing")')
    repo = two_tags(tmp_path, model(), v2)
    rep = diff(repo)
    assert rep.failed and not rep.equivalent and rep.error_a is None
    assert rep.error_b.startswith("RemoteError: FileNotFoundError: weights.pt is missing")
    assert "Traceback" in rep.b.error_detail
    assert (rep.a.result_type, rep.a.parameters, rep.a.tensors) == ("Net", 15, 2)
    assert rep.parameters == () and rep.outputs == ()
    # B's entrypoints still listed (names and docstrings; its signatures are unknown).
    entries = by_name(rep.entrypoints)
    assert entries["net"].status == "same" and entries["net"].signature_b is None
    code, out, err = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v2"), "net", "--input-shape", "2,4"
    )
    assert code == 2
    assert "FAILED" in out and "parameters" in out and "15" in out
    assert "isolhub: error: B (" in err and "weights.pt is missing" in err


def test_a_ref_that_does_not_exist_is_an_error_on_its_side_only(tmp_path: Path, run_cli) -> None:
    repo = make_repo(tmp_path / "net.git", model(), tag="v1")
    rep = compare(spec_of(repo, "v1"), spec_of(repo, "nope"), "net", verbose=False)
    assert rep.error_a is None and rep.error_b and rep.a.parameters == 15
    code, _, err = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v1"), "net", "--input-shape", "0,4"
    )
    assert code == 2 and "--input-shape" in err


TUPLES = """
    import torch
    import torch.nn as nn


    class Preprocess:
        def __call__(self, x):
            return x * 2


    def pair():
        return nn.Linear(4, 2), Preprocess()


    def info():
        return {{"classes": ["cat", "dog"], "version": "{version}", "mean": torch.tensor([0.5, 0.25])}}


    def table():
        return torch.arange(6.0) * {scale}


    def multi():
        class Heads(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(4, 2)

            def forward(self, x):
                return {{"logits": self.a(x), "features": (x, x.sum())}}
        return Heads()
"""


@pytest.mark.slow
def test_tuple_and_non_module_results_are_compared_on_what_can_be_compared(
    tmp_path: Path,
) -> None:
    repo = make_repo(
        tmp_path / "t.git", {"hubconf.py": TUPLES.format(version="v1", scale=1)}, tag="v1"
    )
    commit(repo, {"hubconf.py": TUPLES.format(version="v2", scale=1.5)}, tag="v2")

    pair = diff(repo, "pair", seed=0)
    assert pair.a.result_type == "tuple[Linear, Preprocess]"
    assert {p.name: p.status for p in pair.parameters} == {"[0].weight": "same", "[0].bias": "same"}
    assert [(o.name, o.status) for o in pair.outputs] == [("[0].output", "same")]
    assert pair.uncompared == ("[1]: a Preprocess (callable, not a module, tensor or value)",)
    assert pair.equivalent  # what could be compared is equal; the report says what was not

    info = diff(repo, "info")
    assert {v.name: v.status for v in info.values} == {
        "classes[0]": "same",
        "classes[1]": "same",
        "version": "changed",
    }
    assert {p.name: p.status for p in info.parameters} == {"mean": "same"}
    assert info.differences == ("value version: changed",)

    table = diff(repo, "table")
    (result,) = table.parameters
    assert (result.name, result.status, result.max_abs) == ("result", "changed", 2.5)
    assert result.rel == pytest.approx(2.5 / 7.5)

    multi = diff(repo, "multi", seed=0)
    assert [o.name for o in multi.outputs] == [
        "output['logits']",
        "output['features'][0]",
        "output['features'][1]",
    ]
    assert multi.equivalent


@pytest.mark.slow
def test_remote_mode_needs_only_call_and_state_dict(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, model(), model(layers="self.fc = nn.Linear(4, 5)"))
    rep = diff(repo, mode="remote")
    assert rep.mode == "remote" and not rep.failed
    assert by_name(rep.parameters)["fc.weight"].status == "reshaped"
    assert (rep.a.parameters, rep.b.parameters) == (15, 25)  # every state-dict value
    assert any("remote mode" in n for n in rep.notes)

    class Proxy:
        """What `load(mode="remote")` returns, as far as compare may use it."""

        __slots__ = ("_m",)

        def __init__(self, m: torch.nn.Module) -> None:
            self._m = m

        def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self._m(*tensors)

        def state_dict(self) -> dict[str, torch.Tensor]:
            return self._m.state_dict()

        def close(self) -> None:
            pass

    m = torch.nn.Linear(4, 2)
    s = summarise(Proxy(m), (X,), seed=0, remote=True)
    assert torch.equal(s["outputs"]["output"], m(X).detach())
    assert set(s["tensors"]) == {"weight", "bias"} and s["parts"][0]["parameters"] is None


@pytest.mark.slow
def test_the_report_round_trips_through_json(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, model(), model(layers="self.fc = nn.Linear(4, 5)"))
    rep = diff(repo, seed=3, atol=1e-4)
    data = json.loads(rep.to_json())
    assert data["equivalent"] is False and data["seed"] == 3 and data["atol"] == 1e-4
    assert data["parameters"][0]["shape_a"] == [3, 4]
    again = CompareReport.from_json(rep.to_json())
    assert again == rep
    assert again.summary() == rep.summary()


@pytest.mark.slow
def test_diff_json_and_html_options(tmp_path: Path, run_cli) -> None:
    repo = two_tags(tmp_path, model(), model(forward="return torch.tanh(self.fc(x))"))
    page = tmp_path / "report.html"
    code, out, _ = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v2"), "net", "--input-shape", "3,4",
        "--json", "--html", str(page), "--seed", "0",
    )  # fmt: skip
    assert code == 1
    data = json.loads(out)
    assert data["outputs"][0]["status"] == "changed" and data["inputs"] == ["3x4 float32"]
    assert "<svg" in page.read_text() and "http" not in page.read_text().replace(
        "http://www.w3.org/2000/svg", ""
    )


PLOT_POST = "self.fc1.weight.add_(1e-3)\nself.fc2.weight.mul_(3.0)\nself.fc3.bias.add_(1e-2)"


def _plot_repo(tmp_path: Path) -> Path:
    layers = "self.fc1 = nn.Linear(4, 4)\nself.fc2 = nn.Linear(4, 4)\nself.fc3 = nn.Linear(4, 2)"
    forward = "return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))"
    return two_tags(
        tmp_path,
        model(layers=layers, forward=forward),
        model(layers=layers, forward=forward, post=PLOT_POST),
    )


@pytest.mark.slow
def test_the_plot_lists_the_layer_with_the_largest_difference_first(tmp_path: Path) -> None:
    rep = diff(_plot_repo(tmp_path))
    order = [e["layer"] for e in rep.layer_differences()]
    assert order == ["fc2", "fc3", "fc1"]
    svg = render_svg(layer_differences(rep.parameters))
    assert re.findall(r'class="bar" data-layer="([^"]+)"', svg) == order


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.browser
@pytest.mark.skipif(
    _chromium() is None, reason="headless chromium is not installed (apt-get install chromium)"
)
def test_the_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    rep = diff(_plot_repo(tmp_path))
    page = tmp_path / "report.html"
    rep.to_html(page)
    proc = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom", page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    for table in ("sides", "entrypoints", "parameters", "outputs"):
        assert f'<table id="{table}">' in dom
    assert '<svg id="layer-plot"' in dom
    bars = re.findall(r'<g class="bar" data-layer="([^"]+)"', dom)
    assert bars[0] == "fc2" and sorted(bars) == ["fc1", "fc2", "fc3"]
    assert "DIFFERENT" in dom
