"""torch.hub's behaviour under `isolhub.patch_torch_hub()`, check by check, on loopback only.

The checks are the 40 of ../shared/reference/torchhub-checklist.md (section e); each test names its
check(s) as `test_cNN_...`. Where isolhub deliberately differs, the test pins what isolhub does
instead and docs/torchhub-compat.md says why. Where it helps, the real torch.hub runs as an oracle
in a subprocess (`oracle()`, its github.com and api.github.com URLs rewritten to the FakeGitHub),
so "same" means "same as torch 2.13 did here", not "same as we think torch does".

Nothing leaves the machine: an autouse guard fails any test whose process connects to, or
resolves, a non-loopback host (check 40); the subprocesses carry the same guard.
"""

from __future__ import annotations

import builtins
import errno
import fractions
import io
import ipaddress
import json
import logging
import os
import pickle
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import types
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.hub
import torch.utils.model_zoo

import isolhub
from isolhub import _config, _patch
from isolhub._errors import (
    EntrypointError,
    IsolhubError,
    MissingDependenciesError,
    OfflineError,
    RefNotFoundError,
    RefValidationError,
    ResolveError,
    SandboxError,
    UntrustedRepoError,
    UsageError,
)
from isolhub._options import HubOptions
from isolhub._patch import patch_torch_hub, patched_torch_hub, unpatch_torch_hub
from isolhub._source import github as _github
from isolhub._spec import RepoSpec, parse_spec
from isolhub._weights.checkpoints import (
    load_state_dict_from_url as isolhub_load_state_dict_from_url,
)
from isolhub._weights.checkpoints import load_url as isolhub_load_url

from github_server import FakeGitHub, git
from hubrepos import commit, make_repo, net_files, spec_of
from weights_server import WeightsServer, sha256

REAL_INPUT = builtins.input
# Held in a dict, not as module globals, so the patch's alias rebinding leaves them alone.
ORIGINAL = {name: getattr(torch.hub, name) for name in _patch.HUB_NAMES}
ORIGINAL["model_zoo.load_url"] = torch.utils.model_zoo.load_url

BASIC = {
    "hubconf.py": '''
        """The basic test repo."""
        dependencies = ["torch"]
        import os

        from helpers import twice
        from torch.hub import load_state_dict_from_url

        not_callable = 3


        def echo(*args, **kwargs):
            """Echo the arguments."""
            return {"args": list(args), "kwargs": kwargs}


        def nodoc():
            return 1


        def _private():
            return "private"


        def file():
            return __file__


        def late():
            import helpers

            return helpers.twice(21)
    ''',
    "helpers.py": "def twice(x):\n    return 2 * x\n",
}
DEPS = {
    "hubconf.py": """
        dependencies = ["torch", "no_such_mod_a", "no_such_mod_b"]


        def net():
            '''doc'''
            return 1
    """
}


def version_files(version: str) -> dict[str, str | None]:
    return {"hubconf.py": f"def version():\n    return {version!r}\n"}


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Check 40: refuse (and fail the test on) any non-loopback connection or name lookup."""
    blocked: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address: Any) -> None:
        if isinstance(address, tuple) and not _is_loopback(str(address[0])):
            blocked.append(f"connect {address!r}")
            raise OSError(errno.ENETUNREACH, f"test guard: {address[0]} is not loopback")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if host is not None and name != "localhost" and not _is_loopback(name):
            blocked.append(f"resolve {name!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: {name} is not loopback")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield blocked
    assert not blocked, f"non-loopback traffic attempted: {blocked}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def restore_modules_and_path() -> Iterator[None]:
    """Real torch.hub, run here for comparison, leaves repo modules behind; later tests must not
    see them (that leak is exactly what isolhub exists to avoid)."""
    modules, path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


@pytest.fixture(autouse=True)
def clean_patch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every test starts and must end unpatched; torch's own hub dir is private to the test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(_github, "BACKOFF_S", 0.01)
    yield
    leaked = bool(_patch._installed or _patch._frames or _patch._base)
    with _patch._lock:
        _patch._frames.clear()
        _patch._base = None
        _patch._restore()
    assert not leaked, "a test left torch.hub patched"
    assert all(getattr(torch.hub, n) is ORIGINAL[n] for n in _patch.HUB_NAMES)


@pytest.fixture
def gh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    """A FakeGitHub serving someone/net (BASIC; tags v1 and v2 on two commits)."""
    repo = make_repo(tmp_path / "repos" / "net", BASIC, tag="v1")
    commit(repo, {"extra.txt": "x\n"}, tag="v2")
    with FakeGitHub() as server:
        server.add_repo("someone", "net", repo)
        monkeypatch.setenv("ISOLHUB_GITHUB_API", server.url)
        yield server


def add_repo(
    gh: FakeGitHub, tmp_path: Path, slug: str, files: dict[str, str | None], **kwargs: Any
) -> Path:
    owner, name = slug.split("/")
    repo = make_repo(
        tmp_path / "repos" / slug.replace("/", "--"), files, tag=kwargs.pop("tag", None)
    )
    gh.add_repo(owner, name, repo, **kwargs)
    return repo


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """A terminal whose user answers from the first list; prompts land in the second."""
    queue: list[str] = []
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        return queue.pop(0)

    monkeypatch.setattr(sys, "stdin", _TTY())
    monkeypatch.setattr(builtins, "input", fake_input)
    return queue, prompts


def paths(gh: FakeGitHub, start: int = 0, *parts: str) -> list[str]:
    """Request paths from log index `start` on, keeping those containing any of `parts`."""
    return [r.path for r in gh.log[start:] if not parts or any(p in r.path for p in parts)]


# --- the real torch.hub, as an oracle in a subprocess -----------------------------------------

_GUARD = """
import ipaddress, socket
def _loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
_connect = socket.socket.connect
def _guarded(self, address):
    if isinstance(address, tuple) and not _loopback(str(address[0])):
        raise SystemExit(f"GUARD: non-loopback connect to {address!r}")
    return _connect(self, address)
socket.socket.connect = _guarded
"""

_ORACLE = (
    _GUARD
    + """
import json, sys, urllib.request
import torch.hub
web, api, hub, ops = json.loads(sys.argv[1])
torch.hub.set_dir(hub)
_urlopen = torch.hub.urlopen
def urlopen(req, *args, **kwargs):
    if isinstance(req, str):
        req = urllib.request.Request(req)
    url = req.full_url.replace("https://api.github.com", api)
    req.full_url = url.replace("https://github.com", web)
    return _urlopen(req, *args, **kwargs)
torch.hub.urlopen = urlopen
out = []
for name, args, kwargs in ops:
    try:
        out.append(["ok", getattr(torch.hub, name)(*args, **kwargs)])
    except BaseException as e:
        out.append(["error", type(e).__name__, str(e)])
print("ORACLE:" + json.dumps(out, default=repr))
"""
)


def oracle(
    gh: FakeGitHub, hub: Path, ops: list[tuple[str, list[Any], dict[str, Any]]]
) -> list[Any]:
    """Run `torch.hub.<name>(*args, **kwargs)` for each op in a fresh interpreter (real torch.hub,
    hub dir `hub`, github.com rewritten to `gh`, stdin closed); return [["ok", value] or
    ["error", type name, message], ...]."""
    proc = subprocess.run(
        [sys.executable, "-c", _ORACLE, json.dumps([gh.web_url, gh.url, str(hub), ops])],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ORACLE:")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("ORACLE:") :])


def outcome(fn: Any, *args: Any, **kwargs: Any) -> list[Any]:
    """Like one oracle entry, but in this process (through the patch)."""
    try:
        return ["ok", json.loads(json.dumps(fn(*args, **kwargs), default=repr))]
    except Exception as e:
        return ["error", type(e).__name__, str(e), e]


# --- the patch itself ------------------------------------------------------------------------


def test_the_patch_routes_every_function_with_torch_hubs_signatures_and_restores_exactly() -> None:
    import inspect

    with patched_torch_hub():
        for name in _patch.HUB_NAMES:
            ours, theirs = getattr(torch.hub, name), ORIGINAL[name]
            assert ours is not theirs and ours.__name__ == name
            assert [
                (p.name, p.default, p.kind) for p in inspect.signature(ours).parameters.values()
            ] == [
                (p.name, p.default, p.kind) for p in inspect.signature(theirs).parameters.values()
            ]
        # check 39: model_zoo.load_url stays the same callable as load_state_dict_from_url
        assert torch.utils.model_zoo.load_url is torch.hub.load_state_dict_from_url
    assert all(getattr(torch.hub, n) is ORIGINAL[n] for n in _patch.HUB_NAMES)
    assert torch.utils.model_zoo.load_url is ORIGINAL["model_zoo.load_url"]


def test_patch_torch_hub_is_idempotent_and_unpatch_restores_and_may_repeat() -> None:
    unpatch_torch_hub()  # not patched: nothing happens
    patch_torch_hub()
    wrapper = torch.hub.load
    patch_torch_hub(mode="state_dict")  # replaces the options, installs nothing twice
    assert torch.hub.load is wrapper and _patch._active() == HubOptions(mode="state_dict")
    unpatch_torch_hub()
    unpatch_torch_hub()
    assert torch.hub.load is ORIGINAL["load"]


def test_blocks_nest_inherit_unset_options_and_may_end_in_any_order() -> None:
    patch_torch_hub(mode="state_dict", seed=1)
    with patched_torch_hub(timeout=5):
        assert _patch._active() == HubOptions(mode="state_dict", timeout=5, seed=1)
        with patched_torch_hub(mode="module", seed=None):
            assert _patch._active() == HubOptions(mode="module", timeout=5)
        assert _patch._active() == HubOptions(mode="state_dict", timeout=5, seed=1)
    unpatch_torch_hub()
    assert torch.hub.load is ORIGINAL["load"]

    outer, inner = patched_torch_hub(seed=1), patched_torch_hub(seed=2)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # ends first: the inner block's options stay in force
    assert _patch._active() == HubOptions(seed=2) and torch.hub.load is not ORIGINAL["load"]
    inner.__exit__(None, None, None)
    assert torch.hub.load is ORIGINAL["load"]


def test_bad_options_are_refused_before_anything_is_patched() -> None:
    with pytest.raises(UsageError, match="unknown mode"):
        patch_torch_hub(mode="everything")
    with pytest.raises(SandboxError, match="mode='remote'"):
        patch_torch_hub(sandbox="strict")  # mode="module" would run the repo's classes here
    with pytest.raises(SandboxError), patched_torch_hub(sandbox="nonsense"):
        pass
    assert torch.hub.load is ORIGINAL["load"] and not _patch._frames


@pytest.mark.slow
def test_threads_entering_and_leaving_blocks_leave_torch_hub_restored() -> None:
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for _ in range(50):
                with patched_torch_hub(seed=seed):
                    assert torch.hub.load is not ORIGINAL["load"]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not _patch._frames
    assert torch.hub.load is ORIGINAL["load"]


def test_aliases_bound_before_the_patch_are_rebound_then_restored() -> None:
    lib = types.ModuleType("some_eval_lib")
    lib.hub_load = ORIGINAL["load"]  # `from torch.hub import load as hub_load`
    lib.load_state_dict_from_url = ORIGINAL["load_state_dict_from_url"]
    lib.unrelated = print
    sys.modules[lib.__name__] = lib
    try:
        with patched_torch_hub():
            assert lib.hub_load is torch.hub.load is _patch._WRAPPERS["load"]
            assert lib.load_state_dict_from_url is torch.hub.load_state_dict_from_url
            lib.hub_load = "changed by the user"
        assert lib.hub_load == "changed by the user"  # not ours any more: left as set
        assert lib.load_state_dict_from_url is ORIGINAL["load_state_dict_from_url"]
        assert lib.unrelated is print
    finally:
        del sys.modules[lib.__name__]


def test_a_reference_the_patch_cannot_see_still_uses_isolhubs_dir_and_downloader(
    hub_home: Path,
) -> None:
    held = {"f": ORIGINAL["load_state_dict_from_url"]}  # in a dict: not rebound
    data = _saved({"w": torch.ones(2)})
    with WeightsServer() as srv, patched_torch_hub():
        url = srv.add("/held.pth", body=data)
        sd = held["f"](url, progress=False)
        agent = _agents(srv, "/held.pth").pop()
    assert torch.equal(sd["w"], torch.ones(2))
    assert (hub_home / "checkpoints" / "held.pth").is_file()  # isolhub's dir, via torch.hub.get_dir
    assert agent.startswith("isolhub")  # isolhub's download_url_to_file, via torch.hub's namespace


def test_a_wrapper_that_outlives_the_patch_calls_torch_hubs_original(tmp_path: Path) -> None:
    with patched_torch_hub():
        get_dir = torch.hub.get_dir  # `from torch.hub import get_dir` while patched
        assert get_dir() == isolhub.get_dir()
    assert get_dir() == ORIGINAL["get_dir"]() == str(tmp_path / "torch" / "hub")


@pytest.mark.slow
def test_python_m_isolhub_run_runs_a_script_with_the_patch_on(
    gh: FakeGitHub, tmp_path: Path
) -> None:
    net = make_repo(tmp_path / "repos" / "twonet", net_files("v1", width=3), tag="v1")
    script = tmp_path / "script.py"
    script.write_text(
        _GUARD
        + textwrap.dedent(f"""
        import sys
        import torch, torch.hub
        print("argv", sys.argv[1:])
        print("entries", torch.hub.list("someone/net:v1", trust_repo=True))
        sd = torch.hub.load({spec_of(net, "v1")!r}, "net")
        print("keys", sorted(sd))
        print("leaked", sorted(m for m in ("model", "utils", "helpers") if m in sys.modules))
        sys.exit(3)
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "isolhub.run", "--mode", "state_dict", str(script), "a", "--b"],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(isolhub.__file__).parents[1])},
    )
    assert proc.returncode == 3, proc.stderr
    out = proc.stdout.splitlines()
    assert "argv ['a', '--b']" in out
    assert any(line.startswith("entries [") and "'echo'" in line for line in out)
    assert "keys ['fc.bias', 'fc.weight']" in out  # mode=state_dict came from the command line
    assert "leaked []" in out


def test_isolhub_run_in_process_sets_argv_and_path_then_restores_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from isolhub import run

    script = tmp_path / "s.py"
    script.write_text(
        "import sys, torch.hub\n"
        "print(sys.argv, sys.path[0], torch.hub.get_dir())\n"
        "print('served by', torch.hub.load.__module__)\n"
    )
    argv_before, path_before = list(sys.argv), list(sys.path)
    assert run.main(["--timeout", "30", str(script), "x"]) == 0
    printed = capsys.readouterr().out
    assert f"[{str(script)!r}, 'x'] {tmp_path} {isolhub.get_dir()}" in printed
    assert "served by isolhub._patch" in printed
    assert sys.argv == argv_before and sys.path == path_before
    assert torch.hub.load is ORIGINAL["load"]

    with pytest.raises(SystemExit) as e:
        run.main(["--sandbox", "strict", str(script)])  # mode=module cannot be sandboxed
    assert e.value.code == 2 and "mode='remote'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run.main(["--mode", "remote"])
    assert e.value.code == 2
    assert run._split(["--mode=remote", "-m", "pkg.mod", "--mode", "x"]) == (
        ["--mode=remote", "-m", "pkg.mod"],
        ["--mode", "x"],
    )


# --- (e) checks 1-5: parsing and resolution --------------------------------------------------


def test_c01_parsing_needs_no_network() -> None:
    assert parse_spec("a/b:c") == RepoSpec("github", "a/b", "c")
    assert parse_spec("a/b") == RepoSpec("github", "a/b", None)


def test_c02_differs_the_default_branch_is_what_the_api_says_not_a_main_master_probe(
    gh: FakeGitHub, tmp_path: Path
) -> None:
    add_repo(gh, tmp_path, "someone/trunky", version_files("trunk"), default_branch="trunk")
    git(gh.repos[("someone", "trunky")].path, "branch", "-m", "trunk")
    with patched_torch_hub():
        assert torch.hub.load("someone/trunky", "version", trust_repo=True) == "trunk"
    assert not paths(gh, 0, "/tree/")  # no github.com/o/n/tree/main/ probe
    assert paths(gh, 0, "/repos/someone/trunky")[0] == "/api/v3/repos/someone/trunky"

    gh.fail_next = [403]  # other HTTP errors propagate, as in torch (typed here)
    with patched_torch_hub(), pytest.raises(ResolveError, match="HTTP 403"):
        torch.hub.load("someone/trunky", "version", trust_repo=True, force_reload=True)


@pytest.mark.slow
def test_c03_refs_with_slashes_load_and_names_that_torch_would_merge_stay_apart(
    gh: FakeGitHub, tmp_path: Path, hub_home: Path
) -> None:
    repo = add_repo(gh, tmp_path, "someone/slashy", version_files("main"), tag="v1")
    for branch, version in (("ci/test_slash", "slash"), ("ci_test_slash", "underscore")):
        git(repo, "checkout", "-q", "-b", branch, "main")
        commit(repo, version_files(version))
    with patched_torch_hub():
        assert torch.hub.load("someone/slashy:ci/test_slash", "version", trust_repo=True) == "slash"
        # torch maps both to someone_slashy_ci_test_slash (B3.7); here each has its commit
        assert torch.hub.load("someone/slashy:ci_test_slash", "version") == "underscore"
        assert (
            torch.hub.load("someone/slashy:refs/tags/v1", "version", skip_validation=True) == "main"
        )
    refs = hub_home / "repos" / "github--someone--slashy" / "refs"
    assert {"ci%2Ftest_slash", "ci_test_slash", "refs%2Ftags%2Fv1"} <= set(os.listdir(refs))
    # torch.hub's folder names are links to the snapshot last loaded under that name
    links = sorted(p.name for p in hub_home.glob("someone_slashy_*"))
    assert links == ["someone_slashy_ci_test_slash", "someone_slashy_refs_tags_v1"]
    merged = hub_home / "someone_slashy_ci_test_slash"
    assert "underscore" in (merged / "hubconf.py").read_text()


def test_c04_differs_offline_is_explicit_and_typed(
    gh: FakeGitHub, hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with patched_torch_hub():
        torch.hub.load("someone/net", "nodoc", trust_repo=True)
        before = len(gh.log)
        monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
        assert torch.hub.load("someone/net", "nodoc") == 1  # the cached default branch
        assert len(gh.log) == before  # zero requests
        with pytest.raises(OfflineError, match=str(hub_home)) as e:
            torch.hub.load("someone/net:v1", "nodoc")  # never resolved here
        assert isinstance(e.value, ConnectionError) and not isinstance(e.value, RuntimeError)
        monkeypatch.delenv("ISOLHUB_OFFLINE")
        # without ISOLHUB_OFFLINE an unreachable API is an error, not a silent cache fallback
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        monkeypatch.setenv("ISOLHUB_GITHUB_API", f"http://127.0.0.1:{port}/api/v3")
        with pytest.raises(ResolveError, match="could not reach"):
            torch.hub.load("someone/net", "nodoc")


@pytest.mark.parametrize("spec", ["someone", "a/b/c", "a/b:c:d"])
def test_c05_a_malformed_spec_is_a_value_error(spec: str) -> None:
    with patched_torch_hub():
        for call in (
            lambda: torch.hub.load(spec, "x"),
            lambda: torch.hub.list(spec),
            lambda: torch.hub.help(spec, "x"),
        ):
            with pytest.raises(ValueError):
                call()


# --- checks 6-10: cache ----------------------------------------------------------------------


def test_c06_get_dir_is_torch_hubs_while_patched_and_set_dir_sets_isolhubs(
    hub_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    torch_dir = str(tmp_path / "torch" / "hub")  # $TORCH_HOME/hub
    assert torch.hub.get_dir() == torch_dir
    with patched_torch_hub():
        assert torch.hub.get_dir() == str(hub_home)  # $ISOLHUB_HOME overrides torch's rule
        monkeypatch.delenv("ISOLHUB_HOME")
        assert torch.hub.get_dir() == isolhub.get_dir() == torch_dir  # as torch answers
        torch.hub.set_dir("~/x")
        assert torch.hub.get_dir() == isolhub.get_dir() == str(tmp_path / "home" / "x")
        torch.hub.set_dir(tmp_path / "pathlike")
        assert torch.hub.get_dir() == str(tmp_path / "pathlike")
    assert torch.hub.get_dir() == torch_dir and torch.hub._hub_dir is None
    assert isolhub.get_dir() == str(tmp_path / "pathlike")  # set_dir outlasts the patch


def test_c07_differs_the_cache_is_keyed_by_commit_linked_from_torchs_name_and_leaves_no_zip(
    gh: FakeGitHub, hub_home: Path
) -> None:
    with patched_torch_hub():
        torch.hub.load("someone/net:v1", "nodoc", trust_repo=True)
    sha = git(gh.repos[("someone", "net")].path, "rev-parse", "v1")
    snap = hub_home / "repos" / "github--someone--net" / "snapshots" / sha
    assert (snap / "hubconf.py").is_file()
    link = hub_home / "someone_net_v1"  # torch.hub's name, a link to the snapshot
    assert link.is_symlink() and link.resolve() == snap.resolve()
    leftovers = [p for p in hub_home.rglob("*") if p.suffix == ".zip" or ".staging-" in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_c08_a_cached_load_downloads_and_validates_nothing_and_verbose_says_so(
    gh: FakeGitHub, capsys: pytest.CaptureFixture[str]
) -> None:
    with patched_torch_hub():
        torch.hub.load("someone/net:v1", "nodoc", trust_repo=True)
        capsys.readouterr()
        start = len(gh.log)
        torch.hub.load("someone/net:v1", "nodoc")
        assert "Using cache found in " in capsys.readouterr().err
        # differs: a tag or branch is re-resolved to its commit (one API call), nothing else
        assert paths(gh, start) == ["/api/v3/repos/someone/net/commits/v1"]
        torch.hub.load("someone/net:v1", "nodoc", verbose=False)
        assert "Using cache found in" not in capsys.readouterr().err
        # extends: the notice goes through the `isolhub` logger, so logging can silence it
        logger = logging.getLogger("isolhub")
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            torch.hub.load("someone/net:v1", "nodoc")
        finally:
            logger.setLevel(level)
        assert "Using cache found in" not in capsys.readouterr().err
        start = len(gh.log)
        sha = git(gh.repos[("someone", "net")].path, "rev-parse", "v1")
        torch.hub.load(f"someone/net:{sha}", "nodoc")  # a full SHA: zero requests
        assert paths(gh, start) == []


@pytest.mark.slow
def test_c09_force_reload_downloads_again_and_replaces_the_snapshot(
    gh: FakeGitHub, hub_home: Path
) -> None:
    with patched_torch_hub():
        path = torch.hub.load("someone/net:v1", "file", trust_repo=True)
        inode = os.stat(path).st_ino
        assert torch.hub.load("someone/net:v1", "file", force_reload=True) == path
    assert gh.count("/tarball/") == 2
    assert os.stat(path).st_ino != inode


@pytest.mark.slow
def test_c10_differs_torch_hub_uses_isolhubs_snapshots_not_the_reverse_and_shares_trust(
    gh: FakeGitHub, tmp_path: Path, hub_home: Path
) -> None:
    add_repo(gh, tmp_path, "other/net", version_files("other"), tag="v1")
    # real torch.hub fills <hub>/someone_net_v1 and trusts someone_net
    first = oracle(gh, hub_home, [("load", ["someone/net:v1", "nodoc"], {"trust_repo": True})])
    assert first == [["ok", 1]] and (hub_home / "someone_net_v1" / "hubconf.py").is_file()
    torch_files = sorted(p.name for p in (hub_home / "someone_net_v1").iterdir())
    with patched_torch_hub():
        # trusted through torch's trusted_list (no terminal here: a prompt would raise)...
        assert torch.hub.load("someone/net:v1", "nodoc") == 1
        torch.hub.load("other/net:v1", "version", trust_repo=True)
    # ...but torch's folder is not reused (isolhub downloads its own snapshot) nor touched
    assert gh.count("/tarball/") == 2
    assert sorted(p.name for p in (hub_home / "someone_net_v1").iterdir()) == torch_files
    start = len(gh.log)
    second = oracle(
        gh,
        hub_home,
        [
            ("_check_repo_is_trusted", ["other", "net", "other_net_v1"], {"trust_repo": "check"}),
            ("load", ["other/net:v1", "version"], {"trust_repo": "check"}),
        ],
    )
    assert second == [["ok", None], ["ok", "other"]]  # torch reads isolhub's trusted_list
    # and finds isolhub's snapshot under its own folder name (a link): nothing downloaded
    assert paths(gh, start, "/zipball/") == [] and (hub_home / "other_net_v1").is_symlink()
    assert (hub_home / "trusted_list").read_text().split() == ["someone_net", "other_net"]


# --- checks 11-14: validation ----------------------------------------------------------------


@pytest.fixture
def many(gh: FakeGitHub, tmp_path: Path) -> dict[str, str]:
    """someone/many: 150 extra branches (so /branches has two full pages), tag v1 on an older
    commit than main's head."""
    repo = add_repo(gh, tmp_path, "someone/many", version_files("old"), tag="v1")
    old = git(repo, "rev-parse", "HEAD")
    commit(repo, version_files("mid"))
    mid = git(repo, "rev-parse", "HEAD")
    head = commit(repo, version_files("head"))
    refs = "".join(f"create refs/heads/b{i:03d} {head}\n" for i in range(150))
    subprocess.run(
        ["git", "-C", str(repo), "update-ref", "--stdin"], input=refs.encode(), check=True
    )
    return {"old": old, "mid": mid, "head": head}


@pytest.mark.slow
def test_c11_validation_pages_branches_then_tags_exactly_as_torch_does(
    gh: FakeGitHub, many: dict[str, str], hub_home: Path, tmp_path: Path
) -> None:
    expected = [
        "/api/v3/repos/someone/many/branches?per_page=100&page=1",
        "/api/v3/repos/someone/many/branches?per_page=100&page=2",
        "/api/v3/repos/someone/many/branches?per_page=100&page=3",
        "/api/v3/repos/someone/many/tags?per_page=100&page=1",
    ]
    start = len(gh.log)
    assert oracle(
        gh, tmp_path / "torch-hub", [("load", ["someone/many:v1", "version"], {"trust_repo": True})]
    ) == [["ok", "old"]]
    assert paths(gh, start, "/branches", "/tags") == expected
    start = len(gh.log)
    with patched_torch_hub():
        assert torch.hub.load("someone/many:v1", "version", trust_repo=True) == "old"
        assert paths(gh, start, "/branches", "/tags") == expected
        # a prefix of a head commit passes; validation happens only when downloading
        assert torch.hub.load(f"someone/many:{many['head'][:10]}", "version") == "head"
        start = len(gh.log)
        with pytest.raises(ValueError, match="If it's a commit from a forked repo") as e:
            torch.hub.load(f"someone/many:{many['mid']}", "version")  # no branch or tag head
        assert isinstance(e.value, RefValidationError) and isinstance(e.value, RefNotFoundError)
        assert isinstance(e.value, IsolhubError)
        back = pickle.loads(pickle.dumps(e.value))
        assert type(back) is RefValidationError and back.ref == many["mid"]
        assert not paths(gh, start, "/tarball/")  # refused before any download
        assert (
            torch.hub.load(f"someone/many:{many['mid']}", "version", skip_validation=True) == "mid"
        )
    theirs = oracle(
        gh, tmp_path / "torch-hub", [("load", [f"someone/many:{many['mid']}", "version"], {})]
    )
    assert (
        theirs[0][:2] == ["error", "ValueError"]
        and "If it's a commit from a forked repo" in theirs[0][2]
    )


def test_c12_the_token_is_sent_and_a_failing_page_is_retried_without_it(
    gh: FakeGitHub, many: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "sekrit")
    gh.fail_next = [401]
    _github.validate_ref("someone", "many", "v1")
    first = [r for r in gh.log if "/branches?" in r.path and r.path.endswith("page=1")]
    assert [r.header("Authorization") for r in first] == ["token sekrit", None]
    tags = [r for r in gh.log if "/tags?" in r.path]
    assert [r.header("Authorization") for r in tags] == ["token sekrit"]  # differs: per page
    assert all(r.header("Accept") == "application/vnd.github.v3+json" for r in gh.log)

    monkeypatch.delenv("GITHUB_TOKEN")
    gh.fail_next = [401]  # no token: the HTTP error itself, not torch's KeyError
    with pytest.raises(ResolveError, match="HTTP 401"):
        _github.validate_ref("someone", "many", "v1")


def test_c13_differs_skip_validation_skips_validation_but_not_resolution(
    gh: FakeGitHub,
) -> None:
    with patched_torch_hub():
        torch.hub.load("someone/net:v2", "nodoc", trust_repo=True, skip_validation=True)
    sha = git(gh.repos[("someone", "net")].path, "rev-parse", "v2")
    assert paths(gh, 0) == [
        "/api/v3/repos/someone/net/commits/v2",  # resolution: the one API call left
        f"/api/v3/repos/someone/net/tarball/{sha}",
        f"/_codeload/someone/net/tar.gz/{sha}",  # the archive redirect's target
    ]


@pytest.mark.slow
def test_c14_differs_no_ambiguous_300_explicit_refs_choose_with_skip_validation(
    gh: FakeGitHub, tmp_path: Path
) -> None:
    repo = add_repo(gh, tmp_path, "someone/amb", version_files("tag"), tag="dual")
    git(repo, "checkout", "-q", "-b", "dual")
    commit(repo, version_files("branch"))
    with patched_torch_hub(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ambiguous" warning: the API names one commit
        load = torch.hub.load
        assert (
            load("someone/amb:refs/heads/dual", "version", trust_repo=True, skip_validation=True)
            == "branch"
        )
        assert load("someone/amb:refs/tags/dual", "version", skip_validation=True) == "tag"
        with pytest.raises(RefValidationError):
            load("someone/amb:refs/tags/dual", "version", force_reload=True)  # as torch
        assert load("someone/amb:dual", "version") in ("tag", "branch")  # the server decides
    assert not paths(gh, 0, "/zipball/")


# --- checks 15-21: trust ---------------------------------------------------------------------


def test_c15_trust_none_trusts_silently_and_adds_the_repo_as_torch_2_13_does(
    gh: FakeGitHub, hub_home: Path, answers: tuple[list[str], list[str]]
) -> None:
    with patched_torch_hub(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.hub.load("someone/net:v1", "nodoc", trust_repo=None) == 1
    assert [w for w in caught if issubclass(w.category, UserWarning)] == []
    assert answers[1] == [] and (hub_home / "trusted_list").read_text() == "someone_net\n"


@pytest.mark.slow
def test_c16_trust_true_appends_owner_name_without_a_prompt(
    gh: FakeGitHub, hub_home: Path, answers: tuple[list[str], list[str]]
) -> None:
    with patched_torch_hub():
        torch.hub.load("someone/net:v1", "nodoc", trust_repo=True)
        torch.hub.load("someone/net:v2", "nodoc", trust_repo=True)
    assert (hub_home / "trusted_list").read_text() == "someone_net\n"
    assert answers[1] == []


@pytest.mark.slow
@pytest.mark.parametrize("yes", ["y", "YES"])
def test_c17_trust_false_always_prompts_and_yes_adds_the_repo(
    gh: FakeGitHub, hub_home: Path, answers: tuple[list[str], list[str]], yes: str
) -> None:
    queue, prompts = answers
    queue += [yes, "yes"]
    with patched_torch_hub():
        torch.hub.load("someone/net:v1", "nodoc", trust_repo=False)
        torch.hub.load("someone/net:v1", "nodoc", trust_repo=False)  # trusted: still asks
    assert len(prompts) == 2 and prompts[0].startswith("The repository someone_net does not belong")
    assert (hub_home / "trusted_list").read_text() == "someone_net\n"


@pytest.mark.parametrize("answer", ["", "n", "No"])
def test_c17_no_refuses_with_untrusted_repository_and_fetches_nothing(
    gh: FakeGitHub, answers: tuple[list[str], list[str]], answer: str
) -> None:
    answers[0].append(answer)
    with patched_torch_hub(), pytest.raises(Exception, match="^Untrusted repository") as e:
        torch.hub.load("someone/net:v1", "nodoc", trust_repo=False)
    assert isinstance(e.value, UntrustedRepoError)
    assert gh.log == []  # check 21: nothing, not even a resolution, before the decision


def test_c17_other_answers_are_value_errors_and_eof_differs_as_an_untrusted_repo_error(
    gh: FakeGitHub, answers: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers[0].append("maybe")
    with patched_torch_hub():
        with pytest.raises(ValueError, match="^Unrecognized response maybe") as e:
            torch.hub.load("someone/net:v1", "nodoc", trust_repo=False)
        assert isinstance(e.value, UntrustedRepoError)
        monkeypatch.setattr(builtins, "input", REAL_INPUT)  # on an empty stdin
        monkeypatch.setattr(sys, "stdin", io.StringIO())
        with pytest.raises(UntrustedRepoError, match="there is no one to ask"):
            torch.hub.load("someone/net:v1", "nodoc")  # torch: input() raises EOFError


@pytest.mark.slow
def test_c18_check_prompts_only_until_the_repo_is_trusted(
    gh: FakeGitHub, answers: tuple[list[str], list[str]]
) -> None:
    answers[0].append("y")
    with patched_torch_hub():
        torch.hub.load("someone/net:v1", "nodoc", trust_repo="check")
        torch.hub.load("someone/net:v2", "nodoc", trust_repo="check")
        torch.hub.list("someone/net:v2")
    assert len(answers[1]) == 1


def test_c19_builtin_owners_are_trusted_without_a_prompt_or_a_write(
    gh: FakeGitHub, hub_home: Path, answers: tuple[list[str], list[str]]
) -> None:
    gh.add_repo("pytorch", "vision", gh.repos[("someone", "net")].path)
    with patched_torch_hub():
        torch.hub.load("pytorch/vision:v1", "nodoc", trust_repo="check")
    assert answers[1] == [] and (hub_home / "trusted_list").read_text() == ""  # touched


@pytest.mark.slow
def test_c20_legacy_trust_is_torch_hubs_folder_for_that_ref_and_the_file_is_recreated(
    gh: FakeGitHub, hub_home: Path, tmp_path: Path, answers: tuple[list[str], list[str]]
) -> None:
    with patched_torch_hub():
        torch.hub.load("someone/net:v1", "nodoc", trust_repo=True)
        (hub_home / "trusted_list").unlink()
        torch.hub.load("someone/net:v1", "nodoc")  # someone_net_v1 (isolhub's link) is there
        assert (hub_home / "trusted_list").read_text() == ""  # recreated, empty, as torch does
        assert answers[1] == []
        answers[0].append("n")
        with pytest.raises(UntrustedRepoError):
            torch.hub.load("someone/net:v2", "nodoc")  # another ref has no folder: asks
        assert len(answers[1]) == 1
        add_repo(gh, tmp_path, "other/net", version_files("x"), tag="v1")
        (hub_home / "other_net_v1").mkdir()  # torch.hub's own folder counts too
        assert torch.hub.load("other/net:v1", "version") == "x"


def test_c21_local_source_skips_trust(tmp_path: Path, answers: tuple[list[str], list[str]]) -> None:
    repo = make_repo(tmp_path / "local", BASIC)
    with patched_torch_hub():
        assert torch.hub.load(str(repo), "late", source="local", trust_repo=False) == 42
    assert answers[1] == []


# --- checks 22-28: import and entrypoints, against the real torch.hub --------------------------


@pytest.mark.slow
def test_c22_to_c26_list_help_load_and_their_errors_match_torch_hub(
    gh: FakeGitHub, tmp_path: Path
) -> None:
    add_repo(gh, tmp_path, "someone/deps", DEPS, tag="v1")
    forwarded = {"x": [1, 2], "mode": "m", "sandbox": "s", "timeout": 3, "seed": 4, "verbosity": 1}
    ops: list[tuple[str, list[Any], dict[str, Any]]] = [
        ("list", ["someone/net:v1"], {"trust_repo": True}),  # 22
        ("help", ["someone/net:v1", "echo"], {}),  # 23
        ("help", ["someone/net:v1", "nodoc"], {}),
        ("load", ["someone/net:v1", "echo", 1, "two"], forwarded),  # 24
        ("load", ["someone/net:v1", "_private"], {}),  # 25
        ("load", ["someone/net:v1", "missing"], {}),
        ("load", ["someone/net:v1", "not_callable"], {}),
        ("help", ["someone/net:v1", "missing"], {}),
        ("load", ["someone/net:v1", 3], {}),
        ("list", ["someone/deps:v1"], {"trust_repo": True}),  # 26
        ("help", ["someone/deps:v1", "net"], {}),
        ("load", ["someone/deps:v1", "net"], {}),
    ]
    theirs = oracle(gh, tmp_path / "torch-hub", ops)
    with patched_torch_hub():
        ours = [outcome(getattr(torch.hub, name), *args, **kw) for name, args, kw in ops]
    for op, t, o in zip(ops, theirs, ours, strict=True):
        if t[0] == "ok":
            assert o == t, op
        else:
            # torch.hub's message, whole; a missing entrypoint's adds the names after it.
            same = o[2] == t[2] or (
                isinstance(o[3], EntrypointError) and o[2].startswith(t[2] + "; ")
            )
            assert o[0] == "error" and same, (op, t, o[:3])
            assert isinstance(o[3], getattr(builtins, t[1])), (op, t[1], type(o[3]))
    assert isinstance(ours[5][3], EntrypointError)
    assert isinstance(ours[11][3], MissingDependenciesError)
    assert ours[0][1] == ["echo", "file", "late", "load_state_dict_from_url", "nodoc", "twice"]


def test_c27_hubconf_imports_its_own_modules_and_file_points_into_the_cache(
    gh: FakeGitHub, hub_home: Path
) -> None:
    with patched_torch_hub():
        assert torch.hub.load("someone/net:v1", "late", trust_repo=True) == 42
        path = Path(torch.hub.load("someone/net:v1", "file"))
    assert path.name == "hubconf.py" and path.is_relative_to(hub_home)
    assert "helpers" not in sys.modules


def test_c28_local_source_any_case_and_unknown_sources(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "local", BASIC)
    with patched_torch_hub():
        assert torch.hub.load(str(repo), "nodoc", source="LoCaL") == 1
        with pytest.raises(ValueError, match='Allowed values: "github" \\| "local"'):
            torch.hub.load(str(repo), "nodoc", source="gitlab")


# --- checks 29-32: isolation (torch.hub fails these; isolhub passes them under the patch) --------


def _repo_modules() -> set[str]:
    return {m for m in sys.modules if m.split(".")[0] in ("model", "models", "utils", "helpers")}


@pytest.mark.slow
def test_c29_c30_c31_clashing_repos_and_two_refs_load_side_by_side_and_leave_nothing(
    tmp_path: Path,
) -> None:
    one = make_repo(tmp_path / "one", net_files("one", width=2), tag="v1")
    commit(one, net_files("one-v2", width=4), tag="v2")
    two = make_repo(tmp_path / "two", net_files("two", width=6))
    modules, path = set(sys.modules), list(sys.path)
    with patched_torch_hub():
        for first, second in (
            (spec_of(one, "v1"), spec_of(two)),
            (spec_of(two), spec_of(one, "v1")),
        ):
            a, b = torch.hub.load(first, "net"), torch.hub.load(second, "net")
            assert {type(a).version, type(b).version} == {"one", "two"}
        v1, v2 = (
            torch.hub.load(spec_of(one, "v1"), "net"),
            torch.hub.load(spec_of(one, "v2"), "net"),
        )
    x = torch.ones(1, 4)
    assert (type(v1).version, type(v2).version) == ("one", "one-v2")
    assert (v1(x).shape, v2(x).shape) == ((1, 2), (1, 4))
    assert _repo_modules() == set() and sys.path == path
    assert not {m for m in set(sys.modules) - modules if "hubconf" in m}


def test_c31_a_parent_package_named_utils_does_not_shadow_the_repos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = tmp_path / "parent" / "utils"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('VERSION = "parent"\n')
    monkeypatch.syspath_prepend(str(tmp_path / "parent"))
    monkeypatch.delitem(sys.modules, "utils", raising=False)
    import utils  # type: ignore[import-not-found]

    repo = make_repo(tmp_path / "net", net_files("repo", width=2))
    with patched_torch_hub():
        assert type(torch.hub.load(spec_of(repo), "net")).version == "repo"
    assert utils.VERSION == "parent" and sys.modules["utils"] is utils
    del sys.modules["utils"]  # a plain del: monkeypatch would put it back at teardown


def test_c32_concurrent_loads_into_an_empty_cache_end_with_one_copy(
    gh: FakeGitHub, tmp_path: Path, hub_home: Path
) -> None:
    add_repo(gh, tmp_path, "other/net", version_files("other"))
    results: list[Any] = []

    def load(spec: str, entry: str) -> None:
        try:
            results.append(torch.hub.load(spec, entry, trust_repo=True))
        except BaseException as e:
            results.append(e)

    with patched_torch_hub():
        jobs = [("someone/net:main", "nodoc")] * 4 + [("other/net:main", "version")] * 2
        threads = [threading.Thread(target=load, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert sorted(map(str, results)) == ["1"] * 4 + ["other"] * 2
    assert gh.count("/api/v3/repos/someone/net/tarball/") == 1  # one download, one copy
    assert len(list((hub_home / "repos" / "github--someone--net" / "snapshots").iterdir())) == 1
    assert not [p for p in hub_home.rglob("*") if ".staging-" in p.name or p.suffix == ".zip"]


# --- checks 33-39: downloads and checkpoints through the patched functions ---------------------


def _saved(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def _agents(srv: WeightsServer, path: str) -> set[str]:
    return {v for r in srv.log(path) for k, v in r.headers.items() if k.lower() == "user-agent"}


@pytest.fixture
def weights() -> Iterator[WeightsServer]:
    with WeightsServer() as srv:
        yield srv


def test_c33_c34_download_url_to_file_is_atomic_checked_and_torch_like(
    weights: WeightsServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = os.urandom(300_000)
    url = weights.add("/blob.bin", body=data)
    moves: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        moves.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    dst = tmp_path / "out" / "blob.bin"
    dst.parent.mkdir()
    (tmp_path / "out" / "normal").write_bytes(b"")
    with patched_torch_hub():
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=sha256(data)[:8])
        assert "%" in capsys.readouterr().err  # progress on stderr
        tmp, final = next(m for m in moves if m[1] == str(dst))
        assert tmp.endswith(".partial") and os.path.dirname(tmp) == str(dst.parent)
        normal = stat.S_IMODE(os.stat(tmp_path / "out" / "normal").st_mode)
        assert stat.S_IMODE(os.stat(dst).st_mode) == normal
        with pytest.raises(
            RuntimeError, match=r'^invalid hash value \(expected "00ff", got "[0-9a-f]{64}"\)'
        ):
            torch.hub.download_url_to_file(url, str(dst), hash_prefix="00ff", progress=False)
        assert capsys.readouterr().err == ""  # progress=False is silent
    assert dst.read_bytes() == data and sorted(os.listdir(dst.parent)) == ["blob.bin", "normal"]
    assert _agents(weights, "/blob.bin") == {
        "isolhub (torch.hub compatible)"
    }  # "torch.hub or similar"


def test_c35_c36_checkpoints_land_in_get_dir_checkpoints_and_hashes_follow_the_name(
    weights: WeightsServer, hub_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _saved({"w": torch.arange(3.0)})
    good = f"/m/net-{sha256(data)[:10]}.pth"
    weights.add(good, body=data)
    weights.add("/m/net-00ff00.pth", body=data)
    weights.add("/m/plain.pth", body=data)
    with patched_torch_hub():
        sd = torch.hub.load_state_dict_from_url(weights.url(good), check_hash=True, progress=False)
        assert torch.equal(sd["w"], torch.arange(3.0))
        assert (hub_home / "checkpoints" / good.rsplit("/", 1)[1]).is_file()
        assert 'Downloading: "' in capsys.readouterr().out
        torch.hub.load_state_dict_from_url(weights.url(good), check_hash=True)  # cached
        assert weights.count(good) == 1
        with pytest.raises(RuntimeError, match="invalid hash value"):
            torch.hub.load_state_dict_from_url(weights.url("/m/net-00ff00.pth"), check_hash=True)
        torch.hub.load_state_dict_from_url(weights.url("/m/plain.pth"), check_hash=True)  # no hash
        torch.hub.load_state_dict_from_url(
            weights.url("/m/plain.pth"), model_dir=str(tmp_path / "md"), file_name="named.pth"
        )
    assert (tmp_path / "md" / "named.pth").is_file()
    assert not (hub_home / "checkpoints" / "net-00ff00.pth").exists()


def test_c37_a_legacy_zip_warns_and_a_modern_zip_loads_directly(
    weights: WeightsServer, hub_home: Path, tmp_path: Path
) -> None:
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.write(legacy, "legacy.pt")
    weights.add("/legacy.zip", body=buf.getvalue())
    weights.add("/modern.pt", body=_saved({"w": torch.zeros(2)}))
    with patched_torch_hub():
        with pytest.warns(FutureWarning, match="will be deprecated in favor of default zipfile"):
            sd = torch.hub.load_state_dict_from_url(weights.url("/legacy.zip"), progress=False)
        assert torch.equal(sd["w"], torch.ones(2))
        assert (hub_home / "checkpoints" / "legacy.pt").is_file()  # extracted into model_dir
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sd = torch.hub.load_state_dict_from_url(weights.url("/modern.pt"), progress=False)
        assert torch.equal(sd["w"], torch.zeros(2))


def test_c38_map_location_and_weights_only_are_forwarded_weights_only_false_by_default(
    weights: WeightsServer,
) -> None:
    weights.add("/obj.pt", body=_saved({"w": torch.ones(2), "ratio": fractions.Fraction(1, 3)}))
    with patched_torch_hub():
        sd = torch.hub.load_state_dict_from_url(weights.url("/obj.pt"), map_location="meta")
        assert sd["w"].is_meta and sd["ratio"] == fractions.Fraction(1, 3)
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.hub.load_state_dict_from_url(weights.url("/obj.pt"), weights_only=True)


def test_c39_model_zoo_load_url_is_the_same_callable_and_isolhub_offers_load_url() -> None:
    assert isolhub_load_url is isolhub_load_state_dict_from_url
    with patched_torch_hub():
        assert torch.utils.model_zoo.load_url is torch.hub.load_state_dict_from_url


def test_c40_the_loopback_guard_is_armed(loopback_only: list[str]) -> None:
    with pytest.raises(OSError, match="not loopback"), socket.socket() as s:
        s.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed, refused before sending
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("github.com", 443)
    assert len(loopback_only) == 2
    loopback_only.clear()


# --- the shared cache ------------------------------------------------------------------------


def test_torch_hub_and_isolhub_pointed_at_one_dir_download_a_checkpoint_once(
    weights: WeightsServer, hub_home: Path
) -> None:
    torch.hub.set_dir(str(hub_home))  # unpatched torch.hub, isolhub's dir
    a = weights.add("/a.pth", body=_saved({"a": torch.ones(1)}))
    b = weights.add("/b.pth", body=_saved({"b": torch.zeros(1)}))
    from_torch = ORIGINAL["load_state_dict_from_url"](a, progress=False)
    from_isolhub = isolhub_load_state_dict_from_url(a, progress=False)
    assert torch.equal(from_torch["a"], from_isolhub["a"]) and weights.count("/a.pth") == 1
    from_isolhub = isolhub_load_state_dict_from_url(b, progress=False)
    from_torch = ORIGINAL["load_state_dict_from_url"](b, progress=False)
    assert torch.equal(from_torch["b"], from_isolhub["b"]) and weights.count("/b.pth") == 1
    with patched_torch_hub():
        torch.hub.load_state_dict_from_url(a)
    assert weights.count("/a.pth") == 1
    assert sorted(os.listdir(hub_home / "checkpoints")) == ["a.pth", "b.pth"]


@pytest.mark.sandbox
def test_remote_and_sandboxed_loads_through_the_patch(gh: FakeGitHub) -> None:
    from isolhub._sandbox.policy import probe

    missing = [n for n in probe().missing if n in isolhub.Sandbox().requested()]
    if missing:
        pytest.skip(f"this kernel lacks sandbox protections: {', '.join(missing)}")
    with patched_torch_hub(mode="remote", sandbox="strict"):
        # confined code needs no trust: no warning with trust_repo=None, no trusted_list
        with torch.hub.load("someone/net:v1", "echo", 5, trust_repo=None) as handle:
            assert isinstance(handle, isolhub.RemoteModule)
            assert handle.remote_type == "builtins.dict"
    assert not (Path(_config.get_dir()) / "trusted_list").exists()
