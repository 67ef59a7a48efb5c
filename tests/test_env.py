"""Per-repo dependency environments (`env="auto"`), against a real index on 127.0.0.1.

Every install here is done by a real installer (uv, or pip where a test says so) from a package
index this file starts, serving wheels it builds; the installers are pointed at it alone (their
user configuration is switched off), so nothing is ever fetched from anywhere else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._env import environment as _env

from hubrepos import make_repo, spec_of
from pkgindex import PackageIndex

TINY = 'VERSION = "{v}"\nFACTOR = {f}\n'

HUBCONF = '''
    dependencies = ["torch"]
    import torch
    import tinypkg


    def version():
        """tinypkg's version, as this repo's worker sees it."""
        return tinypkg.VERSION


    def scaler():
        class Scale(torch.nn.Module):
            def forward(self, x):
                return x * tinypkg.FACTOR

        return Scale()
'''


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The loopback index with tinypkg 1.0 and 2.0, an sdist-only package, and one needing
    torch==1.0; the installers' environment points at it alone."""
    with PackageIndex(tmp_path / "index") as idx:
        idx.add_wheel("tinypkg", "1.0", {"tinypkg/__init__.py": TINY.format(v="1.0", f=1)})
        idx.add_wheel("tinypkg", "2.0", {"tinypkg/__init__.py": TINY.format(v="2.0", f=2)})
        idx.add_sdist("onlysrc", "1.0")
        idx.add_wheel("needsoldtorch", "1.0", {"needsoldtorch.py": ""}, ("torch==1.0",))
        for name in [k for k in os.environ if k.startswith(("UV_", "PIP_"))]:
            monkeypatch.delenv(name)
        for k, v in idx.installer_env(tmp_path / "installer-cache").items():
            if k.startswith(("UV_", "PIP_")):
                monkeypatch.setenv(k, v)
        yield idx


def _repo(tmp_path: Path, name: str, requirements: str, extra: dict[str, str] | None = None) -> str:
    files = {"hubconf.py": HUBCONF, "requirements.txt": requirements, **(extra or {})}
    return spec_of(make_repo(tmp_path / name, files))


@pytest.mark.slow
def test_two_repos_needing_two_versions_run_side_by_side_in_one_process(
    tmp_path: Path, index: PackageIndex
) -> None:
    a = _repo(tmp_path, "a", "tinypkg==1.0\n")
    b = _repo(tmp_path, "b", "tinypkg>=2\n")
    ma = hub.load(a, "scaler", env="auto", mode="remote", trust_repo=True)
    mb = hub.load(b, "scaler", env="auto", mode="remote", trust_repo=True)
    try:
        x = torch.ones(3)
        assert torch.equal(ma(x), x) and torch.equal(mb(x), 2 * x)  # both alive at once
    finally:
        ma.close()
        mb.close()
    assert hub.load(a, "version", env="auto", trust_repo=True) == "1.0"
    assert hub.load(b, "version", env="auto", trust_repo=True) == "2.0"
    assert "tinypkg" not in sys.modules  # the parent never imported either


@pytest.mark.slow
def test_two_repos_needing_two_versions_through_the_pool(
    tmp_path: Path, index: PackageIndex
) -> None:
    specs = [_repo(tmp_path, "a", "tinypkg==1.0\n"), _repo(tmp_path, "b", "tinypkg==2.0\n")]
    with hub.Hub(max_workers=2, env="auto", trust_repo=True) as h:
        results = list(h.map(None, specs, entrypoint="version", ordered=True))
    assert [r.ok for r in results] == [True, True], [r.summary() for r in results]
    assert [r.value for r in results] == ["1.0", "2.0"]
    assert [r.env["packages"] for r in results] == [["tinypkg==1.0"], ["tinypkg==2.0"]]
    assert all(r.env["kind"] == "shared" for r in results)


@pytest.mark.slow
def test_the_environment_is_the_loads_provenance(tmp_path: Path, index: PackageIndex) -> None:
    spec = _repo(tmp_path, "a", "# pinned\ntinypkg>=1,<2  # the old API\n")
    env = hub.prepare_env(spec, trust_repo=True)
    assert env.packages == ("tinypkg==1.0",) and env.kind == "shared"
    assert env.source == "requirements.txt" and env.requirements == ("tinypkg<2,>=1",)
    assert not env.reused and env.installer == "uv"
    assert "torch==" + torch.__version__ in env.shared  # resolved against, never installed
    assert not any(p.name.startswith("torch") for p in env.site.iterdir())
    again = hub.prepare_env(spec, trust_repo=True)
    assert again.reused and again.key == env.key


@pytest.mark.slow
def test_identical_requirement_sets_share_one_environment(
    tmp_path: Path, index: PackageIndex
) -> None:
    a = _repo(tmp_path, "a", "tinypkg==2.0\n")
    b = _repo(
        tmp_path,
        "b",
        "",
        {
            "requirements.txt": "-r requirements/base.txt\n",
            "requirements/base.txt": "TinyPkg == 2.0\n",
        },
    )
    ea = hub.prepare_env(a, trust_repo=True)
    eb = hub.prepare_env(b, trust_repo=True)
    assert ea.path == eb.path and eb.reused
    entries = _env.list_envs()
    assert len(entries) == 1 and len(entries[0].users) == 2


@pytest.mark.slow
def test_explicit_requirements_win_over_the_repos_files(
    tmp_path: Path, index: PackageIndex
) -> None:
    spec = _repo(tmp_path, "a", "tinypkg==1.0\n")
    got = hub.load(spec, "version", env="auto", requirements=["tinypkg==2.0"], trust_repo=True)
    assert got == "2.0"


@pytest.mark.slow
def test_pyproject_dependencies_are_read_when_there_is_no_requirements_txt(
    tmp_path: Path, index: PackageIndex
) -> None:
    pyproject = '[project]\nname = "x"\nversion = "0"\ndependencies = ["tinypkg==2.0"]\n'
    repo = make_repo(tmp_path / "p", {"hubconf.py": HUBCONF, "pyproject.toml": pyproject})
    assert hub.load(spec_of(repo), "version", env="auto", trust_repo=True) == "2.0"


@pytest.mark.slow
def test_offline_reuse_makes_no_request_and_a_missing_env_is_an_offline_error(
    tmp_path: Path, index: PackageIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _repo(tmp_path, "a", "tinypkg==1.0\n")
    other = _repo(tmp_path, "b", "tinypkg==2.0\n")
    hub.fetch(other, trust_repo=True)  # its snapshot is cached, its environment is not
    assert hub.load(spec, "version", env="auto", trust_repo=True) == "1.0"
    before = len(index.seen)
    assert before > 0
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    assert hub.load(spec, "version", env="auto", trust_repo=True) == "1.0"
    assert len(index.seen) == before  # not one request, not even for the index page
    with pytest.raises(hub.OfflineError, match="no environment is installed"):
        hub.load(other, "version", env="auto", trust_repo=True)
    assert len(index.seen) == before


@pytest.mark.slow
def test_a_repo_needing_another_torch_gets_its_own_environment_or_a_clear_error(
    tmp_path: Path, index: PackageIndex
) -> None:
    # torch is imported by every worker's zygote; this repo's requirement conflicts with it.
    # Its own environment would need torch 1.0, which the (loopback) index does not have.
    spec = _repo(tmp_path, "t", "needsoldtorch\n")
    with pytest.raises(hub.EnvError) as e:
        hub.load(spec, "version", env="auto", trust_repo=True)
    text = str(e.value)
    assert "torch==1.0 conflicts with torch " + torch.__version__ in text
    assert "own" in text and "torch" in text
    assert not any(p.name.startswith("torch") for p in (tmp_path / "hub").rglob("torch*"))


@pytest.mark.slow
def test_a_malformed_or_escaping_requirements_file_is_refused(
    tmp_path: Path, index: PackageIndex
) -> None:
    for i, text in enumerate(
        [
            "--index-url http://evil.invalid/\n",
            "-r ../../etc/passwd\n",
            "x @ https://e.invalid/x.whl\n",
            "-e .\n",
        ]
    ):
        spec = _repo(tmp_path, f"bad{i}", text)
        with pytest.raises(hub.EnvError):
            hub.prepare_env(spec, trust_repo=True)
    assert index.seen == []


def test_an_unknown_env_value_is_a_usage_error(tmp_path: Path) -> None:
    spec = spec_of(make_repo(tmp_path / "r", {"hubconf.py": "def f():\n    return 1\n"}))
    with pytest.raises(hub.UsageError, match="env='auto'"):
        hub.load(spec, "f", env="yes", trust_repo=True)
    with pytest.raises(hub.UsageError, match="requirements= needs env='auto'"):
        hub.load(spec, "f", requirements=["x"], trust_repo=True)
    assert hub.load(spec, "f", env="auto", trust_repo=True) == 1  # requires nothing: no env


@pytest.mark.slow
def test_pip_installs_the_same_environment_when_chosen(
    tmp_path: Path, index: PackageIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_INSTALLER", "pip")
    spec = _repo(tmp_path, "a", "tinypkg==2.0\n")
    env = hub.prepare_env(spec, trust_repo=True)
    assert env.installer == "pip" and env.packages == ("tinypkg==2.0",)
    assert hub.load(spec, "version", env="auto", trust_repo=True) == "2.0"


_CONCURRENT = textwrap.dedent(
    """
    import json, sys
    import isolhub as hub
    env = hub.prepare_env(sys.argv[1], trust_repo=True, verbose=False)
    print(json.dumps({"key": env.key, "reused": env.reused}))
    """
)


@pytest.mark.slow
def test_concurrent_first_use_by_four_processes_installs_once(
    tmp_path: Path, index: PackageIndex
) -> None:
    spec = _repo(tmp_path, "a", "tinypkg==1.0\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT, spec], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(4)
    ]
    outs = [json.loads(p.communicate(timeout=240)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len({o["key"] for o in outs}) == 1
    assert sorted(o["reused"] for o in outs) == [False, True, True, True]
    # One resolution (uv reads the wheel twice: its metadata, then the install).
    assert index.count("/simple/tinypkg/") == 1, index.seen
    assert len(_env.list_envs()) == 1


_OWN = textwrap.dedent(
    """
    import json, sys
    import isolhub as hub
    own, shared = sys.argv[1], sys.argv[2]
    out = {"own": hub.load(own, "version", env="auto", trust_repo=True),"shared": hub.load(shared, "version", env="auto", trust_repo=True)}
    for name, spec in (("own_env", own), ("shared_env", shared)):
        env = hub.prepare_env(spec, trust_repo=True, verbose=False)
        out[name] = [env.kind, env.reason, list(env.packages)]
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_a_repo_needing_another_version_of_a_zygote_package_gets_its_own_environment(
    tmp_path: Path, index: PackageIndex
) -> None:
    # zygpkg 1.0 is imported by the zygote (ISOLHUB_ZYGOTE_IMPORTS), so shared workers all have it.
    hubconf = "import zygpkg\n\ndef version():\n    return zygpkg.VERSION\n"
    index.add_wheel("zygpkg", "2.0", {"zygpkg/__init__.py": 'VERSION = "2.0"\n'})
    old = index.add_wheel("zygpkg", "1.0", {"zygpkg/__init__.py": 'VERSION = "1.0"\n'})
    preinstalled = tmp_path / "preinstalled"
    import zipfile

    zipfile.ZipFile(old).extractall(preinstalled)
    own = spec_of(
        make_repo(tmp_path / "own", {"hubconf.py": hubconf, "requirements.txt": "zygpkg==2.0\n"})
    )
    shared = spec_of(
        make_repo(tmp_path / "shared", {"hubconf.py": hubconf, "requirements.txt": "tinypkg\n"})
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(preinstalled), *sys.path]),
        ISOLHUB_ZYGOTE_IMPORTS="zygpkg",
    )
    done = subprocess.run(
        [sys.executable, "-c", _OWN, own, shared],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["own"] == "2.0" and out["shared"] == "1.0"  # each sees the version it asked for
    kind, reason, packages = out["own_env"]
    assert kind == "own" and packages == ["zygpkg==2.0"]
    assert "zygpkg==2.0 conflicts with zygpkg 1.0, which the zygote has imported" in reason
    assert out["shared_env"][0] == "shared" and out["shared_env"][2] == ["tinypkg==2.0"]
    # env="auto" says which it chose and why, as it installs.
    said = [line for line in done.stderr.splitlines() if line.startswith("environment ")]
    assert any("(own; installed by uv" in line and "zygpkg==2.0 conflicts" in line for line in said)
    assert any("(shared; installed by uv" in line for line in said)


def _sandboxed() -> None:
    from isolhub._sandbox.policy import probe

    missing = [n for n in probe().missing if n in hub.Sandbox().requested()]
    if missing:
        pytest.skip(f"this kernel lacks sandbox protections: {', '.join(missing)}")


@pytest.mark.slow
@pytest.mark.sandbox
def test_a_sandboxed_repo_reads_its_environment_installed_from_wheels(
    tmp_path: Path, index: PackageIndex
) -> None:
    _sandboxed()
    spec = _repo(tmp_path, "a", "tinypkg==2.0\n")
    m = hub.load(spec, "scaler", env="auto", sandbox="strict", mode="remote")
    try:
        assert torch.equal(m(torch.ones(2)), torch.full((2,), 2.0))
    finally:
        m.close()


@pytest.mark.slow
@pytest.mark.sandbox
def test_a_sandboxed_repo_whose_requirement_is_only_an_sdist_is_refused(
    tmp_path: Path, index: PackageIndex
) -> None:
    _sandboxed()
    spec = _repo(tmp_path, "s", "onlysrc==1.0\n")
    with pytest.raises(hub.EnvError, match="wheels only") as e:
        hub.load(spec, "version", env="auto", sandbox="strict", mode="remote")
    assert "onlysrc" in str(e.value)
    assert _env.list_envs() == []


WRITER = '''
    dependencies = ["torch"]
    import os
    import torch
    import tinypkg


    def writer():
        """Try to write into the environment's tinypkg; the result says whether it could."""
        try:
            with open(os.path.join(os.path.dirname(tinypkg.__file__), "planted.py"), "w") as f:
                f.write("x = 1\\n")
            wrote = 1
        except OSError:
            wrote = 0
        net = torch.nn.Module()
        net.register_buffer("wrote", torch.tensor(wrote))
        net.register_buffer("factor", torch.tensor(tinypkg.FACTOR))
        return net
'''


@pytest.mark.slow
@pytest.mark.sandbox
def test_a_sandboxed_worker_reads_its_environment_but_cannot_write_into_it(
    tmp_path: Path, index: PackageIndex
) -> None:
    _sandboxed()
    spec = _repo(tmp_path, "w", "tinypkg==2.0\n", {"hubconf.py": WRITER})
    sd = hub.load_state_dict(spec, "writer", env="auto", sandbox="strict")
    assert int(sd["factor"]) == 2 and int(sd["wrote"]) == 0
    env = hub.prepare_env(spec, sandbox="strict", verbose=False)
    assert env.reused and not (env.site / "tinypkg" / "planted.py").exists()


def _config_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No index in the environment: the installers must find it in their config files."""
    for name in ("UV_DEFAULT_INDEX", "UV_NO_CONFIG", "PIP_INDEX_URL", "PIP_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    return config


@pytest.mark.slow
def test_the_index_comes_from_uv_toml(
    tmp_path: Path, index: PackageIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config_only(monkeypatch, tmp_path)
    (config / "uv").mkdir(parents=True)
    (config / "uv" / "uv.toml").write_text(f'[[index]]\nurl = "{index.url}"\ndefault = true\n')
    env = hub.prepare_env(_repo(tmp_path, "a", "tinypkg==1.0\n"), trust_repo=True)
    assert env.installer == "uv" and env.packages == ("tinypkg==1.0",)
    assert index.count("/simple/tinypkg/") >= 1  # asked of the index uv.toml names


@pytest.mark.slow
def test_the_index_comes_from_pip_conf(
    tmp_path: Path, index: PackageIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config_only(monkeypatch, tmp_path)
    monkeypatch.setenv("ISOLHUB_INSTALLER", "pip")
    (config / "pip").mkdir(parents=True)
    (config / "pip" / "pip.conf").write_text(f"[global]\nindex-url = {index.url}\n")
    env = hub.prepare_env(_repo(tmp_path, "a", "tinypkg==2.0\n"), trust_repo=True)
    assert env.installer == "pip" and env.packages == ("tinypkg==2.0",)
    assert index.count("/simple/tinypkg/") >= 1


@pytest.mark.slow
def test_installing_shows_progress_lines_and_reuse_says_so(
    tmp_path: Path, index: PackageIndex, capfd: pytest.CaptureFixture[str]
) -> None:
    spec = _repo(tmp_path, "a", "tinypkg==1.0\n")
    hub.fetch(spec, trust_repo=True, verbose=False)
    capfd.readouterr()
    env = hub.prepare_env(spec, trust_repo=True)
    err = capfd.readouterr().err
    assert "installing the requirements of" in err and "tinypkg==1.0" in err
    assert "uv: " in err  # the installer's own progress, line by line
    assert f"environment {env.key[:12]} (shared; installed by uv in" in err
    hub.prepare_env(spec, trust_repo=True)
    err = capfd.readouterr().err
    assert "(shared; reused)" in err and "installing the requirements" not in err
    os.environ["ISOLHUB_QUIET"] = "1"
    try:
        hub.prepare_env(spec, trust_repo=True)
    finally:
        del os.environ["ISOLHUB_QUIET"]
    assert capfd.readouterr().err == ""


# -- the command line ---------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from isolhub._cli.main import main

    code = main(list(argv))
    return code, capsys.readouterr().out


@pytest.mark.slow
def test_cli_env_auto_on_list_help_and_load_reports_the_environment(
    tmp_path: Path, index: PackageIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _repo(tmp_path, "a", "tinypkg==2.0\n")
    code, out = _cli(capsys, "list", spec, "--env", "auto", "--trust", "--json")
    assert code == 0 and json.loads(out) == ["scaler", "version"]
    code, out = _cli(capsys, "help", spec, "version", "--env", "auto", "--trust", "--json")
    assert code == 0 and "tinypkg's version" in json.loads(out)["doc"]
    code, out = _cli(capsys, "load", spec, "scaler", "--env", "auto", "--trust", "--json")
    info = json.loads(out)
    assert code == 0 and info["env"]["packages"] == ["tinypkg==2.0"]
    assert info["env"]["kind"] == "shared" and info["env"]["reused"] is True
    plain = _repo(
        tmp_path,
        "p",
        "",
        {"hubconf.py": "import torch\n\ndef net():\n    return torch.nn.Linear(1, 1)\n"},
    )
    code, out = _cli(capsys, "load", plain, "net", "--trust", "--json")
    assert code == 0 and json.loads(out)["env"] is None


def test_cli_load_without_env_auto_fails_as_torch_hub_would(
    tmp_path: Path, index: PackageIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _repo(tmp_path, "a", "tinypkg==2.0\n")
    from isolhub._cli.main import main

    assert main(["list", spec, "--trust"]) == 2
    assert "tinypkg" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_diff_and_run_with_env_auto_give_each_repo_its_version(
    tmp_path: Path, index: PackageIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _repo(tmp_path, "a", "tinypkg==1.0\n")
    b = _repo(tmp_path, "b", "tinypkg==2.0\n")
    code, out = _cli(
        capsys, "diff", a, b, "scaler", "--env", "auto", "--trust", "--input-shape", "3", "--json"
    )
    report = json.loads(out)
    assert code == 1, out  # factor 1 against factor 2: the outputs differ
    assert any("tinypkg==1.0" in n for n in report["notes"])
    assert any("tinypkg==2.0" in n for n in report["notes"])
    specs = tmp_path / "specs.txt"
    specs.write_text(f"{a}\n{b}\n")
    code, out = _cli(
        capsys, "run", str(specs), "--entry", "version", "--env", "auto", "--trust", "--ordered",
        "--json",
    )  # fmt: skip
    results = json.loads(out)["results"]
    assert code == 0 and [r["value"] for r in results] == ["1.0", "2.0"]
    assert [r["env"]["packages"] for r in results] == [["tinypkg==1.0"], ["tinypkg==2.0"]]


@pytest.mark.slow
def test_cli_env_ls_rm_and_prune(
    tmp_path: Path, index: PackageIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    a = _repo(tmp_path, "a", "tinypkg==1.0\n")
    b = _repo(tmp_path, "b", "tinypkg==2.0\n")
    ea = hub.prepare_env(a, trust_repo=True, verbose=False)
    eb = hub.prepare_env(b, trust_repo=True, verbose=False)
    code, out = _cli(capsys, "env", "ls", "--json")
    listed = {e["key"]: e for e in json.loads(out)}
    assert code == 0 and set(listed) == {ea.key, eb.key}
    assert listed[ea.key]["packages"] == ["tinypkg==1.0"] and listed[ea.key]["in_use"]
    assert listed[ea.key]["size"] > 0
    code, out = _cli(capsys, "env", "ls")
    assert code == 0 and ea.key[:12] in out and "tinypkg==2.0" in out
    code, out = _cli(capsys, "env", "rm", ea.key[:12], "--json")
    assert code == 0 and not ea.path.exists() and eb.path.exists()
    from isolhub._cli.main import main

    assert main(["env", "rm", "nosuchkey"]) == 2
    assert "no environment 'nosuchkey'" in capsys.readouterr().err
    # b's snapshot leaves the cache: its environment is unused, and prune removes it.
    shutil.rmtree(hub.fetch(b, trust_repo=True, verbose=False).path)
    code, out = _cli(capsys, "env", "prune", "--dry-run", "--json")
    assert code == 0 and eb.path.exists() and any(eb.key in p for p in json.loads(out)["removed"])
    code, out = _cli(capsys, "env", "prune", "--json")
    assert code == 0 and not eb.path.exists() and _env.list_envs() == []
