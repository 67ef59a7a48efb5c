"""`compare`, deeper: per-side arguments, what changed in the code, many batches, layers, cost.

Every case is two tags of a real git repo built by the test (`hubrepos`), loaded in two workers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_compare import X, by_name, diff, model, run_cli, two_tags  # noqa: F401 - fixture

from isolhub._compare import CompareReport, compare
from isolhub._compare_code import diff_trees

from hubrepos import spec_of

# ----------------------------------------------------------------------------- per-side arguments


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


def test_per_side_positional_args_replace_the_shared_ones(tmp_path: Path) -> None:
    v1 = model(signature="width", layers="self.fc = nn.Linear(4, 3)")
    v2 = model(signature="width, depth", body="assert (width, depth) == (3, 1)\nreturn Net()")
    repo = two_tags(tmp_path, v1, v2)
    a, b = spec_of(repo, "v1"), spec_of(repo, "v2")
    rep = compare(a, b, "net", 3, args_b=(3, 1), inputs=X, seed=0, verbose=False)
    assert not rep.failed, (rep.error_a, rep.error_b)
    assert rep.args == ("3",) and rep.args_a is None and rep.args_b == ("3", "1")
    assert rep.outputs[0].status == "same"
    with pytest.raises(Exception, match="args_a/args_b"):
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
