"""Messages that say what happened and what to do, in the words of the interface in use.

git's own words are kept (bounded) with the cause named; the command line names its flags where
Python names arguments; common mistakes get a suggestion.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import isolhub
from isolhub._errors import Option, UntrustedRepoError

from hubrepos import make_repo, net_files, spec_of


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isolhub", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")


# -- git's words, whole, with the cause ---------------------------------------------------------


def test_a_missing_git_repo_is_named_and_gits_whole_message_kept(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.git"
    with pytest.raises(isolhub.ResolveError) as info:
        isolhub.list(f"git+file://{missing}@v1")
    text = str(info.value)
    assert f"there is no repository at {missing}" in text
    # Every line of git's stderr, not only its last ("and the repository exists.").
    assert "does not appear to be a git repository" in text
    assert "Could not read from remote repository" in text
    assert "and the repository exists" in text
    assert "does not appear" in info.value.stderr


def test_a_folder_that_is_no_git_repo_is_said_to_be_one(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(isolhub.ResolveError, match=f"{plain} is not a git repository"):
        isolhub.list(f"git+file://{plain}@v1")


def test_a_missing_repo_on_the_command_line_is_one_line_with_the_cause(tmp_path: Path) -> None:
    out = run("list", f"git+file://{tmp_path / 'gone.git'}@v1")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "there is no repository at" in out.stderr and "git said: fatal:" in out.stderr


def test_gits_stderr_is_bounded(tmp_path: Path) -> None:
    from isolhub._source.git import _STDERR_CHARS, _said

    said = _said("fatal: first line\n" + "x" * 100_000 + "\nfatal: last line\n")
    assert len(said) <= _STDERR_CHARS + 10
    assert said.startswith("fatal: first line") and said.endswith("fatal: last line")


@pytest.fixture
def tiny_tmpdir(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root or CAP_SYS_ADMIN; skipped where it cannot be mounted)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if got.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {got.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_temp_dir_says_no_space_and_where(
    tmp_path: Path, tiny_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = net_files("v1", width=3)
    files["blob.txt"] = os.urandom(3 * 1024 * 1024).hex()  # a pack far over 1 MiB
    big = make_repo(tmp_path / "big", files, tag="v1")
    env = dict(os.environ, TMPDIR=str(tiny_tmpdir))
    out = run("list", spec_of(big, "v1"), env=env)
    assert out.returncode == 2, out.stderr
    assert f"no space left on the disk at {tiny_tmpdir}" in out.stderr
    assert "No space left on device" in out.stderr  # git's own words, kept
    assert "FetchError" in out.stderr
    assert os.listdir(tiny_tmpdir) == []  # the partial fetch was removed


# -- refs -----------------------------------------------------------------------------------------


def test_an_unknown_ref_of_a_file_repo_says_nothing_about_abbreviations(repo: Path) -> None:
    with pytest.raises(isolhub.RefNotFoundError) as info:
        isolhub.list(spec_of(repo, "nope"))
    assert "abbreviated" not in str(info.value)
    assert "has no branch, tag or commit 'nope'" in str(info.value)


def test_a_full_sha_that_does_not_exist_is_ref_not_found(repo: Path) -> None:
    with pytest.raises(isolhub.RefNotFoundError, match="1{40}"):
        isolhub.list(spec_of(repo, "1" * 40))


def test_a_full_sha_a_remote_does_not_have_is_ref_not_found_at_the_fetch(
    repo: Path, tmp_path: Path
) -> None:
    from isolhub._source.git import export

    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(isolhub.RefNotFoundError, match="not our ref"):
        export(f"file://{repo}", "2" * 40, dest)


# -- the command line's words -------------------------------------------------------------------


def test_an_untrusted_repo_on_the_command_line_names_the_flags() -> None:
    out = run("list", "someone/net")
    assert out.returncode == 2
    assert "UntrustedRepoError" in out.stderr
    assert "pass --trust," in out.stderr and "--sandbox strict" in out.stderr
    assert "trust_repo" not in out.stderr and "sandbox='strict'" not in out.stderr
    assert "mode=" not in out.stderr


def test_an_untrusted_repo_in_python_names_the_arguments() -> None:
    with pytest.raises(UntrustedRepoError) as info:
        isolhub.list("someone/net")
    text = str(info.value)
    assert "pass trust_repo=True," in text and "mode='remote', sandbox='strict'" in text


def test_an_error_keeps_its_interface_words_across_pickling() -> None:
    e = UntrustedRepoError(("pass ", Option.of(trust_repo=True), "; or not"), spec="a/b")
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == "pass trust_repo=True; or not" and back.spec == "a/b"
    from isolhub._cli.common import cli_message

    assert cli_message(back) == "pass --trust; or not"


def test_cli_words_for_options() -> None:
    from isolhub._cli.common import cli_words

    assert cli_words(Option.of(source="local")) == "--local"
    assert cli_words(Option.of(force_reload=True)) == "--force-reload"
    assert cli_words(Option.of(skip_validation=True)) == "--skip-validation"
    assert cli_words(Option.of("file_name")) == "--file-name NAME"
    assert cli_words(Option.of("timeout")) == "--timeout"
    assert Option.of("timeout").python() == "timeout="


def test_a_spec_error_on_the_command_line_names_local_not_source(tmp_path: Path) -> None:
    out = run("list", "not a spec")
    assert out.returncode == 2 and "--local" in out.stderr and "source=" not in out.stderr


def test_a_dir_without_hubconf_names_the_flag(tmp_path: Path) -> None:
    out = run("list", str(tmp_path), "--local")
    assert out.returncode == 2
    assert "has no hubconf.py; --local needs a hub repo dir" in out.stderr


def test_a_checkpoint_url_without_a_name_names_the_file_name_flag() -> None:
    out = run("download", "http://127.0.0.1:9/")
    assert out.returncode == 2 and "--file-name NAME" in out.stderr
    assert "file_name" not in out.stderr


# -- suggestions ----------------------------------------------------------------------------------


def test_a_mistyped_entrypoint_lists_close_matches_and_the_names(repo: Path) -> None:
    with pytest.raises(isolhub.EntrypointError) as info:
        isolhub.help(spec_of(repo, "v1"), "nett")
    text = str(info.value)
    assert text.startswith("Cannot find callable nett in hubconf")  # torch.hub's words first
    assert "did you mean net?" in text and "available: Net, net" in text


def test_owner_name_at_ref_suggests_the_colon() -> None:
    with pytest.raises(isolhub.SpecError, match="did you mean pytorch/vision:v0.10.0"):
        isolhub.list("pytorch/vision@v0.10.0")


def test_a_path_given_as_a_github_spec_suggests_local(tmp_path: Path) -> None:
    with pytest.raises(isolhub.SpecError, match="source='local'"):
        isolhub.list("./some/dir")


@pytest.mark.slow
def test_an_existing_directory_on_the_command_line_is_a_local_repo(
    repo: Path, tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "isolhub", "list", "./r"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Net", "net"]


# -- usage mistakes are typed ---------------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["abc", -1, 0, float("nan"), True])
def test_a_bad_timeout_is_a_usage_error_before_any_worker(repo: Path, timeout: object) -> None:
    with pytest.raises(isolhub.UsageError, match=r"timeout= must be a positive number"):
        isolhub.load(spec_of(repo, "v1"), "net", timeout=timeout)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"timeout": "x"}, "timeout="),
        ({"max_workers": 0}, "max_workers="),
        ({"max_workers": 2.5}, "max_workers="),
        ({"memory_bytes": -5}, "memory_bytes="),
        ({"retries": -1}, "retries="),
        ({"backend": "nope"}, "backend="),
    ],
)
def test_bad_hub_settings_are_usage_errors(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(isolhub.UsageError, match=name):
        isolhub.Hub(**kwargs)  # type: ignore[arg-type]


def test_an_unknown_mode_is_a_usage_error_not_a_spec_error(repo: Path) -> None:
    with pytest.raises(isolhub.UsageError, match="mode=") as info:
        isolhub.load(spec_of(repo, "v1"), "net", mode="modul")  # type: ignore[arg-type]
    assert not isinstance(info.value, isolhub.SpecError)


def test_a_negative_tolerance_is_a_usage_error(repo: Path) -> None:
    with pytest.raises(isolhub.UsageError, match="atol"):
        isolhub.compare(spec_of(repo, "v1"), spec_of(repo, "v1"), "net", atol=-1)


def test_an_unpicklable_kwarg_is_a_usage_error_naming_it(repo: Path) -> None:
    import threading

    with pytest.raises(isolhub.UsageError, match=r"scale=.*cannot be sent") as info:
        isolhub.load(spec_of(repo, "v1"), "net", scale=threading.Lock())
    assert "_thread.lock" in str(info.value)


def test_an_unpicklable_kwarg_in_a_pool_is_a_usage_error(repo: Path) -> None:
    import threading

    with isolhub.Hub(max_workers=1) as h, pytest.raises(isolhub.UsageError, match="scale="):
        h.load_state_dict(spec_of(repo, "v1"), "net", scale=threading.Lock())


def test_a_torch_allocation_past_the_memory_cap_is_a_memory_error(tmp_path: Path) -> None:
    hog = make_repo(
        tmp_path / "hog",
        {
            "hubconf.py": """
                import torch

                def hog():
                    return torch.empty(64 * 2**30, dtype=torch.uint8)
            """
        },
    )
    with isolhub.Hub(max_workers=1, memory_bytes=2 * 2**30) as h:
        (r,) = h.map(None, [spec_of(hog)], "hog")
    assert isinstance(r.error, isolhub.RemoteError), r.error
    assert r.error.remote_type == "builtins.MemoryError", r.error.remote_type
    assert "allocate" in r.error.remote_message


@pytest.mark.slow
def test_two_existing_directories_diff_as_local_repos(repo: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "isolhub", "diff", "./r", "./r", "net", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["equivalent"] is True


def test_doctor_gives_command_line_advice_only() -> None:
    from isolhub._sandbox.policy import PRETEND_MISSING_ENV

    out = run("doctor", env=dict(os.environ, **{PRETEND_MISSING_ENV: "landlock"}))
    assert out.returncode == 1
    assert "--sandbox strict would refuse to run here: missing landlock" in out.stdout
    assert "sandbox='strict'" not in out.stdout


@pytest.mark.parametrize(
    "body",
    [b"\x80\x02garbage" + bytes(range(256)) * 8, b"", b"hello world\n", b"PK\x03\x04" + b"\0" * 64],
    ids=["random", "empty", "text", "bad-zip"],
)
def test_a_download_that_is_no_checkpoint_is_a_typed_error(body: bytes, hub_home: Path) -> None:
    from isolhub._weights.checkpoints import load_state_dict_from_url

    from weights_server import WeightsServer

    with WeightsServer() as server:
        url = server.add("/w.pt", body=body)
        with pytest.raises(isolhub.CacheCorruptedError, match="w.pt"):
            load_state_dict_from_url(url, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["-1", "0", "abc", "inf"])
def test_a_bad_timeout_flag_is_refused_by_the_command_line(repo: Path, value: str) -> None:
    out = run("list", spec_of(repo, "v1"), f"--timeout={value}")
    assert out.returncode == 2
    assert "argument --timeout" in out.stderr and "not a positive number of seconds" in out.stderr


def test_a_full_sha_github_does_not_have_is_ref_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from github_server import FakeGitHub, commit, init_repo

    repo = init_repo(tmp_path / "gh")
    commit(repo, {"hubconf.py": "def net():\n    return 1\n"})
    with FakeGitHub() as gh:
        gh.add_repo("someone", "net", repo)
        monkeypatch.setenv("ISOLHUB_GITHUB_API", gh.url)
        with pytest.raises(isolhub.RefNotFoundError, match="Cannot find 1{40} in"):
            isolhub.list(f"someone/net:{'1' * 40}", trust_repo=True, skip_validation=True)
