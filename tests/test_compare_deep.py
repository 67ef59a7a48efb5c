"""`compare`, deeper: per-side arguments, what changed in the code, many batches, layers, cost.

Every case is two tags of a real git repo built by the test (`hubrepos`), loaded in two workers.
"""

from __future__ import annotations

import gc
import re
import struct
import subprocess
import weakref
from pathlib import Path

import pytest
import torch
from test_compare import X, _chromium, by_name, diff, model, run_cli, two_tags  # noqa: F401 - fixture

from isolhub._compare.code import diff_trees
from isolhub._compare.compare import CompareReport, compare
from isolhub._compare.stream import align_layers
from isolhub._errors import SpecError, UsageError

from hubrepos import spec_of

# ----------------------------------------------------------------------------- per-side arguments


@pytest.mark.slow
def test_per_side_kwargs_reach_only_their_side(tmp_path: Path, run_cli) -> None:  # noqa: F811
    v2 = model(
        signature="pretrained=False, dropout=0.5",
        body="assert dropout == 0.0, dropout\nreturn Net()",
    )
    repo = two_tags(tmp_path, model(), v2)
    rep = diff(repo, kwargs_b={"dropout": 0.0}, pretrained=False, seed=0)
    assert not rep.failed, (rep.error_a, rep.error_b)
    assert rep.kwargs == (("pretrained", "False"),) and rep.kwargs_b == (("dropout", "0.0"),)
    assert {p.status for p in rep.parameters} == {"same"} and rep.outputs[0].status == "same"
    assert rep.differences == ("entrypoint net: signature changed",)
    text = rep.summary()
    assert "net(pretrained=False)" in text and "net(pretrained=False, dropout=0.0)" in text
    assert CompareReport.from_json(rep.to_json()) == rep
    # The same keyword on A (which has no such parameter) fails A only.
    wrong = diff(repo, kwargs_a={"dropout": 0.0})
    assert (
        wrong.error_a
        and "dropout" in wrong.error_a
        and wrong.error_b
        and "dropout" in str(wrong.b.error_detail)
    )
    code, out, err = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v2"), "net", "--input-shape", "2,4",
        "--kw-b", "dropout=0.0", "--seed", "0",
    )  # fmt: skip
    assert code == 1, err  # loads on both sides; only the signature differs
    assert "signature changed" in out or "signature" in out


@pytest.mark.slow
def test_per_side_positional_args_replace_the_shared_ones(tmp_path: Path) -> None:
    v1 = model(signature="width", layers="self.fc = nn.Linear(4, 3)")
    v2 = model(signature="width, depth", body="assert (width, depth) == (3, 1)\nreturn Net()")
    repo = two_tags(tmp_path, v1, v2)
    a, b = spec_of(repo, "v1"), spec_of(repo, "v2")
    rep = compare(a, b, "net", 3, args_b=(3, 1), inputs=X, seed=0, verbose=False)
    assert not rep.failed, (rep.error_a, rep.error_b)
    assert rep.args == ("3",) and rep.args_a is None and rep.args_b == ("3", "1")
    assert rep.outputs[0].status == "same"
    with pytest.raises(UsageError, match="args_a/args_b"):
        diff(repo, args_a=3)


# ----------------------------------------------------------------------------- code changes

UNUSED_BRANCH = '''
import torch
import torch.nn as nn


def net(pretrained=False):
    """A small net."""
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.copy_(torch.arange(12.0).reshape(3, 4) / 10)
        m.bias.fill_(0.5)
    if pretrained:
        {branch}
    return m
'''


@pytest.mark.slow
def test_only_the_code_of_an_unused_branch_changes_is_equivalent_and_the_change_is_listed(
    tmp_path: Path,
    run_cli,  # noqa: F811
) -> None:
    v1 = {"hubconf.py": UNUSED_BRANCH.format(branch="m.bias.fill_(1.0)")}
    v2 = {
        "hubconf.py": UNUSED_BRANCH.format(branch="m.bias.fill_(2.0)\n        m.weight.mul_(3)"),
        "NOTES.md": "new\n",
    }
    repo = two_tags(tmp_path, v1, v2)
    rep = diff(repo, seed=0)
    assert rep.equivalent, rep.differences
    files = {c.path: c for c in rep.code}
    assert set(files) == {"hubconf.py", "NOTES.md", "README"}
    assert (files["hubconf.py"].status, files["hubconf.py"].added) == ("modified", 2)
    assert files["hubconf.py"].removed == 1 and files["NOTES.md"].status == "added"
    # The counts are git's own.
    numstat = subprocess.run(
        ["git", "-C", str(repo), "diff", "--numstat", "v1", "v2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    git_counts = {line.split("\t")[2]: tuple(map(int, line.split("\t")[:2])) for line in
                  numstat.splitlines()}  # fmt: skip
    assert {p: (c.added, c.removed) for p, c in files.items()} == git_counts
    assert rep.changed_entrypoints == ("net",)
    assert by_name(rep.entrypoints)["net"].changes == ("source",)
    code, out, _ = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v2"), "net", "--input-shape", "2,4",
        "--seed", "0", "--html", str(tmp_path / "r.html"),
    )  # fmt: skip
    assert code == 0, out
    assert (
        "hubconf.py |    3 ++-" in out and "3 files changed, 4 insertions(+), 2 deletions(-)" in out
    )
    assert "entrypoints whose source changed: net" in out
    page = (tmp_path / "r.html").read_text()
    assert (
        '<table id="code">' in page and "hubconf.py" in page and 'id="changed-entrypoints"' in page
    )


def test_the_tree_diff_counts_binary_and_removed_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "pkg").mkdir(parents=True)
        (d / ".git").mkdir()
        (d / ".git" / "HEAD").write_text(d.name)
    (a / "pkg" / "m.py").write_text("x = 1\ny = 2\n")
    (b / "pkg" / "m.py").write_text("x = 1\ny = 3\nz = 4\n")
    (a / "old.txt").write_text("gone\n")
    (a / "w.bin").write_bytes(b"\0\1\2")
    (b / "w.bin").write_bytes(b"\0\1\3")
    (a / "same.py").write_text("same\n")
    (b / "same.py").write_text("same\n")
    rows = [(c.path, c.status, c.added, c.removed, c.binary) for c in diff_trees(a, b)]
    assert rows == [
        ("old.txt", "removed", 0, 1, False),
        ("pkg/m.py", "modified", 2, 1, False),
        ("w.bin", "modified", 0, 0, True),
    ]


@pytest.mark.slow
def test_a_rename_that_keeps_the_weights_is_equivalent_and_says_keys_need_mapping(
    tmp_path: Path,
) -> None:
    v2 = model(layers="self.head = nn.Linear(4, 3)", forward="return torch.relu(self.head(x))")
    rep = diff(two_tags(tmp_path, model(), v2))
    assert [(p.name, p.name_b) for p in rep.renamed] == [
        ("fc.weight", "head.weight"),
        ("fc.bias", "head.bias"),
    ]
    assert rep.equivalent and rep.differences == ()
    assert "2 parameters renamed" in rep.summary()


# ----------------------------------------------------------------------------- layers

DEEP_LAYERS = """\
self.stem = nn.Linear(4, 8)
self.act = nn.ReLU()
self.{mid} = nn.Linear(8, 8)
self.head = nn.Linear(8, 3)"""
DEEP_FORWARD = "return self.head(self.act(self.{mid}(self.act(self.stem(x)))))"


def deep(mid: str = "mid", post: str = "") -> dict[str, str | None]:
    return model(
        layers=DEEP_LAYERS.format(mid=mid), forward=DEEP_FORWARD.format(mid=mid), post=post
    )


BATCHES = [torch.linspace(-1, 1, 12).reshape(3, 4) * (i + 1) for i in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["module", "remote"])
def test_one_changed_layer_is_named_as_the_first_divergence(tmp_path: Path, mode: str) -> None:
    repo = two_tags(tmp_path, deep(), deep(post="self.mid.weight.add_(0.25)"))
    rep = diff(repo, inputs=BATCHES, layers=True, seed=0, mode=mode)
    assert not rep.failed, (rep.error_a, rep.error_b)
    assert [x.name for x in rep.layers] == ["stem", "act", "mid", "act#2", "head"]
    rows = {x.name: x for x in rep.layers}
    assert rows["stem"].status == "same" and rows["act"].status == "same"
    assert rows["stem"].exact and rows["stem"].batches == len(BATCHES)
    first = rep.first_divergence
    assert first is not None and first.name == "mid" and first.name_b == "mid"
    assert first.status == "changed" and first.max_abs > 0.1 and 0 < first.rel < 1
    assert first.shape_a == (3, 8) and first.type_a == "Linear"
    assert [x.name for x in rep.divergence_path] == ["mid", "act#2", "head"]
    assert "first divergence: mid" in rep.summary()
    again = CompareReport.from_json(rep.to_json())
    assert again == rep and again.first_divergence == first


def test_a_renamed_layer_keeping_its_weights_is_aligned_and_equivalent(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, deep(), deep(mid="middle"))
    rep = diff(repo, inputs=BATCHES, layers=True, seed=0)
    assert rep.equivalent, rep.differences
    rows = {x.name: x for x in rep.layers}
    assert set(rows) == {"stem", "act", "mid", "act#2", "head"}
    assert (rows["mid"].name_b, rows["mid"].status, rows["mid"].exact) == ("middle", "same", True)
    assert rep.first_divergence is None and rep.divergence_path == ()
    assert {(p.name, p.name_b) for p in rep.renamed} == {
        ("mid.weight", "middle.weight"),
        ("mid.bias", "middle.bias"),
    }


def test_an_added_layer_is_listed_only_in_b_and_the_rest_stays_aligned(tmp_path: Path) -> None:
    v2 = model(
        layers=DEEP_LAYERS.format(mid="mid") + "\nself.extra = nn.Identity()",
        forward="return self.head(self.extra(self.act(self.mid(self.act(self.stem(x))))))",
    )
    rep = diff(two_tags(tmp_path, deep(), v2), inputs=BATCHES, layers=True, seed=0)
    assert [(x.name, x.status) for x in rep.layers] == [
        ("stem", "same"),
        ("act", "same"),
        ("mid", "same"),
        ("act#2", "same"),
        ("extra", "added"),
        ("head", "same"),
    ]
    assert rep.first_divergence is None and rep.equivalent


def test_layers_past_the_byte_budget_are_compared_on_statistics(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, deep(), deep(post="self.head.bias.add_(1.0)"))
    # 3x8 float32 = 96 bytes: the budget keeps stem (96) and act (96) only.
    rep = diff(repo, inputs=BATCHES, layers=True, seed=0, layer_bytes=200)
    rows = {x.name: x for x in rep.layers}
    assert rows["stem"].exact and rows["stem"].status == "same"
    assert not rows["mid"].exact and rows["mid"].status == "unchecked"
    # head's mean moved by 1.0: its statistics alone prove the change (a lower bound).
    assert rows["head"].status == "changed" and not rows["head"].exact
    assert rows["head"].max_abs == pytest.approx(1.0)
    assert rep.first_divergence.name == "head"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["module", "remote"])
def test_layers_work_under_the_strict_sandbox(tmp_path: Path, mode: str) -> None:
    repo = two_tags(tmp_path, deep(), deep(post="self.mid.weight.add_(0.25)"))
    rep = diff(repo, inputs=BATCHES, layers=True, seed=0, mode=mode, sandbox="strict")
    assert not rep.failed, (rep.error_a, rep.error_b)
    assert rep.first_divergence.name == "mid"
    assert rep.metrics[0].batches == len(BATCHES)


# ----------------------------------------------------------------------------- many inputs

LOGITS = '''
import torch
import torch.nn as nn


def clf(shift=0.0):
    """Logits of a fixed linear classifier."""
    m = nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.copy_(torch.arange(12.0).reshape(3, 4).cos())
        m.bias.copy_(torch.tensor([0.0, shift, -shift]))
    return m
'''


def _local_clf(shift: float) -> torch.nn.Linear:
    m = torch.nn.Linear(4, 3)
    with torch.no_grad():
        m.weight.copy_(torch.arange(12.0).reshape(3, 4).cos())
        m.bias.copy_(torch.tensor([0.0, shift, -shift]))
    return m


@pytest.mark.slow
def test_many_batches_give_aggregate_metrics_with_top1_agreement_and_kl(
    tmp_path: Path,
    run_cli,  # noqa: F811
) -> None:
    repo = two_tags(tmp_path, {"hubconf.py": LOGITS}, {"hubconf.py": LOGITS})
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 4, generator=gen) for _ in range(7)]
    rep = diff(repo, "clf", inputs=iter(batches), kwargs_b={"shift": 0.7}, seed=0)
    assert rep.batches == 7 and rep.b.forwards == 7 and rep.a.forwards == 7
    (m,) = rep.metrics
    ma, mb = _local_clf(0.0), _local_clf(0.7)
    with torch.no_grad():
        ya = torch.cat([ma(x) for x in batches]).double()
        yb = torch.cat([mb(x) for x in batches]).double()
    assert (m.name, m.batches, m.elements, m.rows) == ("output", 7, 105, 35)
    assert m.max_abs == pytest.approx(float((ya - yb).abs().max()), rel=1e-5)
    assert m.mean_abs == pytest.approx(float((ya - yb).abs().mean()), rel=1e-5)
    agree = float((ya.argmax(1) == yb.argmax(1)).double().mean())
    assert 0 < agree < 1 and m.top1_agreement == pytest.approx(agree)
    kl = torch.nn.functional.kl_div(
        yb.log_softmax(1), ya.log_softmax(1), log_target=True, reduction="batchmean"
    )
    assert m.kl_div == pytest.approx(float(kl), rel=1e-6)
    out = rep.outputs[0]
    assert out.status == "changed" and out.max_abs == pytest.approx(m.max_abs)
    # Cost side by side: a median and spread over the 7 forwards, each worker's peak memory.
    for side in (rep.a, rep.b):
        assert side.forward_min_s <= side.forward_s <= side.forward_max_s
        assert side.forward_iqr_s >= 0 and side.peak_memory > 1 << 20
    text = rep.summary()
    assert "top-1 agreement" in text and "peak memory" in text and "7 batches" in text

    # The same batches from a saved file, through the CLI.
    saved = tmp_path / "batches.pt"
    torch.save(batches, saved)
    code, out_text, err = run_cli(
        "diff", spec_of(repo, "v1"), spec_of(repo, "v2"), "clf", "--inputs", str(saved),
        "--kw-b", "shift=0.7", "--seed", "0", "--json",
    )  # fmt: skip
    assert code == 1, err
    data = CompareReport.from_json(out_text)
    assert data.batches == 7 and data.metrics[0].top1_agreement == pytest.approx(agree)


def test_inputs_that_are_not_batches_are_refused_before_any_worker_starts(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, {"hubconf.py": LOGITS}, {"hubconf.py": LOGITS})
    with pytest.raises(SpecError, match="inputs must be"):
        diff(repo, "clf", inputs=3)
    with pytest.raises(SpecError, match="cannot read the inputs file"):
        diff(repo, "clf", inputs=str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_a_large_batch_count_holds_a_bounded_number_of_tensors(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, deep(), deep(post="self.mid.weight.add_(0.25)"))
    alive: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    held: dict[int, int] = {}
    seen_alive = []
    n = 240

    def batches():
        for i in range(n):
            seen_alive.append(len(alive))  # batches the parent still holds
            if i % 40 == 0:
                held[i] = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
            x = torch.full((3, 4), float(i % 7) - 3.0)
            alive.add(x)
            yield x

    rep = diff(repo, inputs=batches(), layers=True, seed=0)
    assert rep.batches == n and rep.first_divergence.name == "mid"
    # Asked for the next batch, the parent still holds at most the last two (locals that name
    # the batch just run): never a number that grows with the batches.
    assert max(seen_alive) <= 2 and seen_alive[-1] <= 2
    # Tensors alive in this process (outputs, activations, the report) do not grow with batches.
    counts = [held[i] for i in sorted(held) if i >= 40]
    assert max(counts) - min(counts) <= 8, held


def test_the_report_shows_layers_metrics_and_code_in_html_and_in_a_notebook(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, deep(), deep(post="self.mid.weight.add_(0.25)"))
    rep = diff(repo, inputs=BATCHES, layers=True, seed=0)
    page = rep.to_html(tmp_path / "r.html")
    for ident in ('<svg id="depth-plot"', '<table id="layers">', '<table id="metrics">',
                  '<table id="code">', 'id="first-divergence" data-layer="mid"'):  # fmt: skip
        assert ident in page
    assert re.findall(r'<g class="layer" data-layer="([^"]+)"', page) == [
        "stem", "act", "mid", "act#2", "head"
    ]  # fmt: skip
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    cell = rep._repr_html_()
    assert cell.startswith('<div class="isolhub-report"><style>') and "<html" not in cell
    # Every style rule is scoped to the report, so a notebook's own styles are left alone.
    css = cell.split("<style>", 1)[1].split("</style>", 1)[0]
    selectors = re.findall(r"([^{}]+)\{", css)
    assert selectors and all(
        part.strip().startswith(".isolhub-report") for sel in selectors for part in sel.split(",")
    )


def headless_chromium(page: Path, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local page (nothing fetched), as the report test does."""
    return subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
            f"--user-data-dir={profile}", *flags, page.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def deep_report(tmp_path: Path) -> CompareReport:
    """The layer report the browser test renders (and docs/compare-layers.png shows)."""
    repo = two_tags(tmp_path, deep(), deep(post="self.mid.weight.add_(0.25)"))
    return diff(repo, inputs=BATCHES, layers=True, seed=0, kwargs_b={"pretrained": False})


@pytest.mark.browser
@pytest.mark.skipif(
    _chromium() is None, reason="headless chromium is not installed (apt-get install chromium)"
)
def test_the_layer_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    deep_report(tmp_path).to_html(page)
    proc = headless_chromium(page, tmp_path / "profile", "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    for table in ("sides", "code", "metrics", "layers", "parameters", "outputs"):
        assert f'<table id="{table}">' in dom
    assert re.findall(r'<g class="layer" data-layer="([^"]+)"', dom) == [
        "stem", "act", "mid", "act#2", "head"
    ]  # fmt: skip
    assert '<g id="first-divergence" data-layer="mid">' in dom
    assert "first divergence: mid" in dom and "DIFFERENT" in dom
    shot = tmp_path / "report.png"
    proc = headless_chromium(
        page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1100,1500"
    )
    assert proc.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", shot.read_bytes()[16:24]) == (1100, 1500)


def test_a_name_taken_over_by_another_kind_of_layer_aligns_by_order_and_shape() -> None:
    def rec(name: str, kind: str, *shape: int) -> dict:
        return {"name": name, "type": kind, "shape": list(shape), "dtype": "float32"}

    a = [rec("act", "ReLU", 2, 8), rec("head.2", "Linear", 2, 10)]
    b = [rec("act", "GELU", 2, 8), rec("head.2", "Dropout", 2, 8), rec("head.3", "Linear", 2, 10)]
    pairs = [(x and x["name"], y and y["name"]) for x, y in align_layers(a, b)]
    # ReLU → GELU keeps its name (same shape); head.2 now names a Dropout: not the old Linear.
    assert pairs == [("act", "act"), (None, "head.2"), ("head.2", "head.3")]


TAMPER = """
import gc

import torch.nn as nn


class Net(nn.Linear):
    def forward(self, x):
        # Repo code runs beside the compare session in the worker: it rewrites the session's
        # answers from the next batch on.
        for o in gc.get_objects():
            if type(o).__name__ == "CompareSession":
                o.step = lambda inputs: {{"forward_s": {{}}, "layers": {junk}}}
        return super().forward(x)


def net():
    return Net(4, 3)
"""


def test_a_step_reply_the_repo_tampered_with_fails_its_side_only(tmp_path: Path) -> None:
    good = model()
    repo = two_tags(tmp_path, good, {"hubconf.py": TAMPER.format(junk='"junk"')})
    rep = diff(repo, inputs=BATCHES[:1] * 3, layers=True, seed=0)
    assert rep.error_a is None and rep.a.forwards == 3
    assert rep.error_b and "malformed" in rep.error_b and rep.b.forwards == 1
    assert rep.b.peak_memory is None and rep.a.peak_memory  # B was killed at once


TAMPERED_SUMMARY = """
import torch.nn as nn

import isolhub._compare.worker as session

# Repo code runs in the worker that summarises it: here it replaces the summary outright.
session.summarise = lambda *args, **kwargs: {"t0": "now", "parts": [{"path": 0}]}


def net():
    return nn.Linear(4, 3)
"""


def test_a_summary_the_repo_tampered_with_fails_its_side_only(tmp_path: Path) -> None:
    repo = two_tags(tmp_path, model(), {"hubconf.py": TAMPERED_SUMMARY})
    rep = diff(repo, inputs=BATCHES[:1], seed=0)
    assert rep.error_a is None and rep.a.forwards == 1
    assert rep.error_b and "compare summary is malformed" in rep.error_b
