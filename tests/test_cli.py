"""The `isolhub` command: shell habits (--help, --json, exit codes, one-line errors)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from isolhub import run as isolhub_run
from isolhub._cli.common import FLAGS, add_flags
from isolhub._cli.main import build_parser, main, parse_kw

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


@pytest.mark.slow
def test_list_prints_entrypoints_and_json(repo: Path) -> None:
    out = run("list", spec_of(repo, "v1"))
    assert out.returncode == 0 and out.stdout.split() == ["Net", "net"]
    out = run("list", spec_of(repo, "v1"), "--json")
    assert json.loads(out.stdout) == ["Net", "net"]


@pytest.mark.slow
def test_help_prints_the_docstring(repo: Path) -> None:
    out = run("help", spec_of(repo, "v1"), "net", "--json")
    assert json.loads(out.stdout) == {"entry": "net", "doc": "Build Net v1."}


@pytest.mark.slow
def test_load_saves_safetensors_and_reports_counts(repo: Path, tmp_path: Path) -> None:
    dest = tmp_path / "w.safetensors"
    out = run("load", spec_of(repo, "v1"), "net", "--kw", "scale=2", "--save", str(dest), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["tensors"] == 2 and info["parameters"] == 3 * 4 + 3
    from safetensors.torch import load_file

    assert load_file(str(dest))["fc.weight"][1, 0].item() == 8.0


@pytest.mark.slow
def test_errors_are_one_line_on_stderr_with_exit_code_2(repo: Path) -> None:
    out = run("list", spec_of(repo, "nope"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("isolhub: error: RefNotFoundError:")
    out = run("list", "not a spec")
    assert out.returncode == 2 and "SpecError" in out.stderr


@pytest.mark.slow
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


def test_a_kw_without_equals_is_a_usage_error() -> None:
    from isolhub import UsageError

    with pytest.raises(UsageError, match="name=value"):
        parse_kw(["pretrained"])


@pytest.mark.parametrize("word", ["no", "No", "off", "false"])
def test_kw_shell_words_for_false_are_booleans(word: str) -> None:
    assert parse_kw([f"pretrained={word}"]) == {"pretrained": False}


@pytest.mark.parametrize("word", ["yes", "ON", "true"])
def test_kw_shell_words_for_true_are_booleans(word: str) -> None:
    assert parse_kw([f"pretrained={word}"]) == {"pretrained": True}


def test_version_prints_the_package_version() -> None:
    import isolhub

    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"isolhub {isolhub.__version__}"
    pyproject = tomllib.loads((Path(isolhub.__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == isolhub.__version__


@pytest.mark.slow
def test_load_json_names_the_commit_that_was_loaded(repo: Path) -> None:
    import isolhub

    out = run("load", spec_of(repo, "v1"), "net", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["commit"] == isolhub.fetch(spec_of(repo, "v1")).sha


@pytest.mark.slow
def test_save_with_an_unknown_suffix_is_refused_before_anything_is_fetched(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repo.git"
    out = run("load", f"git+file://{missing}@v1", "net", "--save", str(tmp_path / "out.bin"))
    assert out.returncode == 2
    assert "UsageError" in out.stderr and "--save" in out.stderr
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.slow
def test_safetensors_and_pt_files_are_saved_with_the_same_permissions(
    repo: Path, tmp_path: Path
) -> None:
    modes = set()
    for name in ("w.safetensors", "w.pt"):
        out = run("load", spec_of(repo, "v1"), "net", "--save", str(tmp_path / name), "-q")
        assert out.returncode == 0, out.stderr
        modes.add((tmp_path / name).stat().st_mode)
    assert len(modes) == 1


@pytest.mark.slow
def test_quiet_prints_nothing_on_stderr_on_success(repo: Path) -> None:
    run("list", spec_of(repo, "v1"))  # fills the cache, so the next one would say "Using cache"
    out = run("list", spec_of(repo, "v1"), "--quiet")
    assert out.returncode == 0 and out.stdout.split() == ["Net", "net"]
    assert out.stderr == ""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["list", "help", "load", "diff", "run", "download", "doctor"])
def test_every_command_accepts_json_quiet_and_verbose(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0
    for flag in ("--json", "--quiet", "--verbose"):
        assert flag in out.stdout, (command, flag)


@pytest.mark.slow
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


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser: `isolhub`'s sub-commands (cache's too) and `python -m isolhub.run`."""
    found = {"python -m isolhub.run": isolhub_run._parser()}
    todo = [("isolhub", build_parser())]
    while todo:
        name, parser = todo.pop()
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


def test_a_flag_shared_by_commands_shows_the_same_help_in_every_command() -> None:
    parsers = _parsers()
    reference = argparse.ArgumentParser()
    add_flags(reference, *FLAGS)
    declared = {a.option_strings[0]: a for a in reference._actions if a.option_strings}
    seen: dict[str, set[str]] = {}
    for command, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in FLAGS:
                    continue
                seen.setdefault(flag, set()).add(command)
                names, options = FLAGS[flag]
                assert tuple(action.option_strings) == names, (command, flag)
                for key in ("help", "default", "const", "nargs", "choices", "type", "metavar"):
                    assert getattr(action, key) == getattr(declared[flag], key), (command, flag)
                assert type(action) is type(declared[flag]), (command, flag)
                assert " ".join(str(options["help"]).split()) in text, (command, flag)
    # Each shared flag is shared: the commands that load code all take the same ones.
    loaders = {"isolhub list", "isolhub help", "isolhub load", "isolhub diff", "isolhub run"}
    for flag in ("--trust", "--timeout", "--sandbox", "--local"):
        assert loaders <= seen[flag], flag
    assert "python -m isolhub.run" in seen["--sandbox"] & seen["--timeout"] & seen["--seed"]
    assert {"isolhub load", "isolhub diff", "isolhub run"} <= seen["--kw"] & seen["--seed"]
    assert all(len(commands) > 1 for commands in seen.values()), seen


@pytest.mark.slow
def test_run_takes_sandbox_strict_as_every_other_loading_command_does(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"hubconf.py": _NETWORK_PROBE})
    specs = tmp_path / "specs.txt"
    specs.write_text(spec_of(repo) + "\n")
    for extra, network in (([], True), (["--sandbox", "strict"], False)):
        out = run("run", str(specs), "--entry", "probe", "--json", "-q", *extra)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["results"][0]["value"] == {"network": network}


_NETWORK_PROBE = """
import socket

def probe():
    try:
        socket.socket().close()
    except OSError:
        return {"network": False}
    return {"network": True}
"""
