"""The `isolhub` command: shell habits (--help, --json, exit codes, one-line errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from isolhub._cli import main, parse_kw

from hubrepos import make_repo, net_files, spec_of


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isolhub", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")


def test_help_lists_the_commands_and_exit_codes() -> None:
    out = run("--help")
    assert out.returncode == 0
    for word in ("list", "help", "load", "Exit codes"):
        assert word in out.stdout


def test_list_prints_entrypoints_and_json(repo: Path) -> None:
    out = run("list", spec_of(repo, "v1"))
    assert out.returncode == 0 and out.stdout.split() == ["Net", "net"]
    out = run("list", spec_of(repo, "v1"), "--json")
    assert json.loads(out.stdout) == ["Net", "net"]


def test_help_prints_the_docstring(repo: Path) -> None:
    out = run("help", spec_of(repo, "v1"), "net", "--json")
    assert json.loads(out.stdout) == {"entry": "net", "doc": "Build Net v1."}


def test_load_saves_safetensors_and_reports_counts(repo: Path, tmp_path: Path) -> None:
    dest = tmp_path / "w.safetensors"
    out = run("load", spec_of(repo, "v1"), "net", "--kw", "scale=2", "--save", str(dest), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tensors"] == 2 and info["parameters"] == 3 * 4 + 3
    from safetensors.torch import load_file

    assert load_file(str(dest))["fc.weight"][1, 0].item() == 8.0


def test_errors_are_one_line_on_stderr_with_exit_code_2(repo: Path) -> None:
    out = run("list", spec_of(repo, "nope"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("isolhub: error: RefNotFoundError:")
    out = run("list", "not a spec")
    assert out.returncode == 2 and "SpecError" in out.stderr


def test_verbose_adds_the_traceback(repo: Path) -> None:
    out = run("help", spec_of(repo, "v1"), "missing", "--verbose")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "EntrypointError" in out.stderr


def test_main_returns_the_exit_code_in_process(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", spec_of(repo, "v1"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ["Net", "net"]


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (
            ["pretrained=true", "n=3", "name=resnet", "x=None"],
            {"pretrained": True, "n": 3, "name": "resnet", "x": None},
        ),
        (["shape=(2, 3)", "f=0.5", "s='quoted'"], {"shape": (2, 3), "f": 0.5, "s": "quoted"}),
    ],
)
def test_kw_values_are_literals_or_strings(items: list[str], expected: dict[str, object]) -> None:
    assert parse_kw(items) == expected


def test_a_kw_without_equals_is_a_spec_error() -> None:
    from isolhub import SpecError

    with pytest.raises(SpecError, match="name=value"):
        parse_kw(["pretrained"])


def test_list_and_load_run_confined_with_sandbox_strict(repo: Path) -> None:
    out = run("load", spec_of(repo, "v1"), "net", "--sandbox", "strict", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tensors"] == 2
    out = run("list", spec_of(repo, "v1"), "--sandbox", "strict")
    assert out.returncode == 0 and out.stdout.split() == ["Net", "net"]


def test_doctor_reports_what_the_kernel_can_enforce() -> None:
    out = run("doctor", "--json")
    assert out.returncode in (0, 1)
    report = json.loads(out.stdout)
    assert "landlock" in report["protections"]
