"""The worker pool: every spec gets a typed result, one repo never takes the run down, and
cancelling (close(), Ctrl-C, leaving the loop) leaves no process, fd, memfd or temp dir behind.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import isolhub as hub
import isolhub._cli.main as cli
from isolhub._pool import hub as _pool
from isolhub._pool.hub import Hub, Result

from harness_repos import HANG_TIMEOUT, MEMORY_CAP, check_harness_results, evaluate, make_harness
from hubrepos import make_repo, net_files, spec_of
from procs import child_pids, open_fds, scratch_dirs, zombie_pids


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_harness(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def warm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warm")
    return make_repo(root / "warm", {"hubconf.py": "def one():\n    return 1\n"})


@pytest.fixture
def clean(warm_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Warm the zygote, then check nothing (processes, fds, memfds, scratch dirs) leaks."""
    hub.load(spec_of(warm_repo), "one")
    private_tmp = tmp_path / "tmp"  # /tmp is shared with other processes' workers
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    fds, children, scratch = _fds(), child_pids(), scratch_dirs()
    assert scratch == set()
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (child_pids() != children or _fds() != fds):
        time.sleep(0.05)
    assert child_pids() == children
    assert _fds() == fds, [os.readlink(f"/proc/self/fd/{f}") for f in _fds() - fds]
    assert scratch_dirs() == scratch
    assert zombie_pids() == []


@pytest.mark.slow
def test_a_harness_over_24_repos_reports_every_failure_typed_and_leaves_nothing(
    harness: dict[str, str], clean: None
) -> None:
    with Hub(max_workers=2, timeout=HANG_TIMEOUT, memory_bytes=MEMORY_CAP) as h:
        results = list(h.map(evaluate, harness.values(), entrypoint="model"))
    check_harness_results(results, harness)
    assert sorted(r.index for r in results) == list(range(24))


@pytest.mark.slow
def test_a_lambda_and_a_closure_run_next_to_the_model(tmp_path: Path, clean: None) -> None:
    repo = make_repo(tmp_path / "net", net_files("v1", width=3))
    x, factor = torch.ones(2, 4), 3.0

    def score(model: Any) -> Any:
        return model(x) * factor

    with Hub(max_workers=2) as h:
        (by_lambda,) = h.map(lambda m: m.fc.out_features, [spec_of(repo)], "net")
        (by_closure,) = h.map(score, [spec_of(repo)], "net")
        model = h.load(spec_of(repo), "net")
    assert by_lambda.ok and by_lambda.value == 3
    assert by_closure.ok and torch.equal(by_closure.value, model(x) * factor)


def module_level_function(model: Any) -> str:
    """Defined in this test file, which a worker cannot import: it must travel by value."""
    return f"{type(model).__name__} via {_helper()}"


def _helper() -> str:
    return "a helper from the same module"


def test_a_function_from_a_module_the_worker_cannot_import_travels_by_value(
    tmp_path: Path,
) -> None:
    repo = make_repo(tmp_path / "net", net_files("v1", width=3))
    with Hub(max_workers=1) as h:
        (r,) = h.map(module_level_function, [spec_of(repo)], "net")
    assert r.ok, r.summary()
    assert r.value == "Net via a helper from the same module"


@pytest.mark.slow
def test_ordered_results_follow_the_input_order(tmp_path: Path) -> None:
    slow = make_repo(tmp_path / "slow", {"hubconf.py": _SLEEPY.format(delay=1.5)})
    fast = [make_repo(tmp_path / f"fast{i}", {"hubconf.py": _SLEEPY.format(delay=0)}) for i in "12"]
    specs = [spec_of(slow), *map(spec_of, fast)]
    with Hub(max_workers=3) as h:
        unordered = [r.spec for r in h.map(None, specs, "pause")]
        ordered = [r.spec for r in h.map(None, specs, "pause", ordered=True)]
    assert unordered[-1] == specs[0]  # the slow one finishes last...
    assert ordered == specs  # ...but ordered=True waits for it


_SLEEPY = """
def pause():
    import time
    time.sleep({delay})
    return {delay}
"""


@pytest.mark.slow
def test_identical_specs_share_one_download_and_an_idle_worker_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "net", net_files("v1", width=3), tag="v1")
    fetched: list[str] = []
    real = _pool.snapshot_of

    def counting(spec: Any, *args: Any, **kw: Any) -> Any:
        fetched.append(str(spec))
        time.sleep(0.2)  # let the other tasks for the same spec arrive meanwhile
        return real(spec, *args, **kw)

    monkeypatch.setattr(_pool, "snapshot_of", counting)
    specs = [spec_of(repo, "v1")] * 4 + [spec_of(repo, "main")]
    with Hub(max_workers=2) as h:
        results = list(h.map(lambda m: os.getpid(), specs, "net"))
        assert all(r.ok for r in results)
        assert h._live <= 2
    assert sorted(fetched) == sorted({spec_of(repo, "v1"), spec_of(repo, "main")})
    assert len({r.sha for r in results}) == 1  # v1 and main are one commit: one repo@sha
    assert len({r.value for r in results}) <= 2  # five tasks, at most two workers


def test_a_failed_spec_does_not_poison_its_worker_for_the_next(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"hubconf.py": _FLAKY})
    with Hub(max_workers=1) as h:
        results = list(h.map(None, [spec_of(repo)] * 3, "flaky", kwargs={"fail": False}))
        bad = list(h.map(None, [spec_of(repo)], "flaky", kwargs={"fail": True}))
        again = list(h.map(None, [spec_of(repo)], "flaky", kwargs={"fail": False}))
    assert [r.value for r in results] == [1, 2, 3]  # one worker, reused
    assert isinstance(bad[0].error, hub.RemoteError)
    assert again[0].value == 1  # a fresh worker after the failure


_FLAKY = """
CALLS = []

def flaky(fail):
    CALLS.append(1)
    if fail:
        raise RuntimeError("asked to fail")
    return len(CALLS)
"""


@pytest.mark.slow
def test_only_infrastructure_failures_are_retried(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"hubconf.py": _KILLED_ONCE})
    flag = tmp_path / "killed-once"
    with Hub(max_workers=1, retries=2) as h:
        (killed,) = h.map(None, [spec_of(repo)], "killed_once", kwargs={"flag": str(flag)})
        (raised,) = h.map(None, [spec_of(repo)], "raises")
        (segv,) = h.map(None, [spec_of(repo)], "segfault")
    assert killed.ok and killed.value == "second time lucky" and killed.attempts == 2
    assert isinstance(raised.error, hub.RemoteError) and raised.attempts == 1
    assert segv.signal == "SIGSEGV" and segv.attempts == 1
    with Hub(max_workers=1, retries=0) as h:
        flag.unlink()
        (killed,) = h.map(None, [spec_of(repo)], "killed_once", kwargs={"flag": str(flag)})
    assert isinstance(killed.error, hub.WorkerCrashedError) and killed.signal == "SIGKILL"


_KILLED_ONCE = """
import os, signal

def killed_once(flag):
    if not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    return "second time lucky"

def raises():
    raise KeyError("never retried")

def segfault():
    import ctypes
    ctypes.string_at(0)
"""


def _hang_repos(tmp_path: Path, n: int) -> list[str]:
    return [
        spec_of(make_repo(tmp_path / f"hang{i}", {"hubconf.py": _SLEEPY.format(delay=600)}))
        for i in range(n)
    ]


@pytest.mark.slow
def test_close_mid_run_kills_the_running_workers_and_leaves_nothing(
    tmp_path: Path, clean: None
) -> None:
    specs = _hang_repos(tmp_path, 4)
    h = Hub(max_workers=2, timeout=300)
    started = threading.Event()
    seen: list[Result] = []

    def consume() -> None:
        it = h.map(None, specs, "pause")
        started.set()
        with pytest.raises(hub.PoolClosedError, match="closed"):
            seen.extend(it)

    t = threading.Thread(target=consume)
    t.start()
    started.wait()
    _wait_for(lambda: h._live == 2)
    h.close()
    t.join(10)
    assert not t.is_alive()  # close() stopped the consumer: nothing waited on the hung workers
    assert seen == []
    with pytest.raises(hub.PoolClosedError, match="closed"):
        h.map(None, specs, "pause")


@pytest.mark.slow
def test_a_keyboard_interrupt_in_the_consuming_thread_cancels_cleanly(
    tmp_path: Path, warm_repo: Path, clean: None
) -> None:
    specs = _hang_repos(tmp_path, 3)
    main = threading.main_thread().ident
    assert threading.get_ident() == main
    with Hub(max_workers=2, timeout=300) as h:
        timer = threading.Timer(
            0.1,
            lambda: (
                _wait_for(lambda: h._live == 2),
                signal.pthread_kill(main, signal.SIGINT),  # type: ignore[arg-type]
            ),
        )
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            for _ in h.map(None, specs, "pause"):
                pass
        timer.join()
        assert h._live == 0
        (r,) = h.map(None, [spec_of(warm_repo)], "one")  # the Hub is still usable
        assert r.ok


@pytest.mark.slow
def test_leaving_the_loop_early_cancels_the_rest(tmp_path: Path, clean: None) -> None:
    quick = spec_of(make_repo(tmp_path / "quick", {"hubconf.py": _SLEEPY.format(delay=0)}))
    specs = [quick, *_hang_repos(tmp_path, 2)]
    with Hub(max_workers=3) as h:
        for r in h.map(None, specs, "pause"):
            assert r.spec == quick
            break
        assert h._live <= 1  # the hung workers are gone; the quick one idles for reuse


@pytest.mark.slow
def test_closing_the_hub_inside_the_loop_stops_the_map_at_its_next_step(
    tmp_path: Path, clean: None
) -> None:
    quick = spec_of(make_repo(tmp_path / "quick", {"hubconf.py": _SLEEPY.format(delay=0)}))
    specs = [quick, quick, *_hang_repos(tmp_path, 2)]
    seen = []
    with Hub(max_workers=4) as h, pytest.raises(hub.PoolClosedError, match="closed"):
        for r in h.map(None, specs, "pause"):
            seen.append(r)
            h.close()
    assert len(seen) == 1 and seen[0].spec == quick


@pytest.mark.slow
def test_the_hub_offers_load_list_and_help_with_its_settings(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "net", net_files("v1", width=3))
    hang = make_repo(tmp_path / "hang", {"hubconf.py": _SLEEPY.format(delay=600)})
    with Hub(max_workers=1, timeout=2) as h:
        assert h.list(spec_of(repo)) == ["Net", "net"]
        assert h.help(spec_of(repo), "net") == "Build Net v1."
        sd = h.load_state_dict(spec_of(repo), "net")
        assert list(sd) == ["fc.weight", "fc.bias"]
        assert h.load(spec_of(repo), "net", scale=2.0).fc.weight[0, 1].item() == 2.0
        with pytest.raises(hub.WorkerTimeoutError):
            h.load(spec_of(hang), "pause")
        with pytest.raises(hub.EntrypointError):
            h.help(spec_of(repo), "nope")


def test_a_spec_that_cannot_be_fetched_is_a_failed_result(tmp_path: Path) -> None:
    specs = ["not a spec at all", f"git+file://{tmp_path}/missing.git@v1"]
    with Hub(max_workers=2) as h:
        results = {r.spec: r for r in h.map(None, specs, "model")}
    assert isinstance(results[specs[0]].error, hub.SpecError)
    assert isinstance(results[specs[1]].error, hub.ResolveError)
    assert all(r.sha is None for r in results.values())


def test_bad_arguments_are_refused() -> None:
    for kwargs in ({"max_workers": 0}, {"timeout": -1}, {"retries": -1}, {"backend": "dask"}):
        with pytest.raises(ValueError):
            Hub(**kwargs)  # type: ignore[arg-type]
    with Hub() as h:
        with pytest.raises(TypeError, match="callable"):
            h.map(42, ["x/y"], "model")  # type: ignore[arg-type]
        lock = threading.Lock()
        with pytest.raises(TypeError, match="cannot be sent to the workers"):
            h.map(lambda m: lock, ["x/y"], "model")


def test_the_ray_backend_without_ray_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(hub.IsolhubError, match=r"pip install 'isolhub\[ray\]'"):
        Hub(backend="ray")


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo(tmp_path / "net", net_files("v1", width=3))
    with Hub(max_workers=1, progress=True) as h:
        list(h.map(lambda m: 1, [spec_of(repo), "bad spec"], "net"))
    err = capsys.readouterr().err
    assert "isolhub: [1/2]" in err and "isolhub: [2/2] failed 1" in err
    assert "FAILED bad spec: SpecError" in err


@pytest.mark.slow
def test_cli_run_streams_results_writes_jsonl_and_exits_1_when_some_failed(
    harness: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    specs_file = tmp_path / "specs.txt"
    names = ["ok_00", "ok_01", "clash_a", "raises_call", "segfault", "exits"]
    specs_file.write_text("# a harness\n\n" + "\n".join(harness[n] for n in names) + "\n")
    (tmp_path / "harness_fns.py").write_text(
        "def width(model, add=0):\n    return {'width': model.out_features + add}\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.jsonl"
    argv = ["run", str(specs_file), "--entry", "model", "--fn", "harness_fns:width"]
    argv += ["--kw", "width=5", "--workers", "2", "--timeout", "30", "--memory", "1536M"]
    code = cli.main([*argv, "--jsonl", str(out), "--ordered"])
    captured = capsys.readouterr()
    assert code == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["spec"] for r in records] == [harness[n] for n in names]
    by_name = dict(zip(names, records, strict=True))
    assert by_name["ok_00"]["ok"] and by_name["ok_00"]["value"] == {"width": 5}
    assert by_name["raises_call"]["error_type"] == "RemoteError"
    assert by_name["segfault"]["signal"] == "SIGSEGV"
    assert by_name["exits"]["returncode"] == 3
    assert all(len(r["sha"]) == 40 for r in records)
    assert "isolhub: [6/6]" in captured.err
    assert "3 ok, 3 failed" in captured.err
    ok_specs = [harness[n] for n in names[:3]]
    (tmp_path / "ok.txt").write_text("\n".join(ok_specs))
    assert cli.main(["run", "ok.txt", "--entry", "model", "--fn", "harness_fns:width"]) == 0
    capsys.readouterr()
    assert (
        cli.main(["run", "ok.txt", "--entry", "model", "--fn", "harness_fns:width", "--json"]) == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert (doc["specs"], doc["ok"], doc["failed"]) == (3, 3, 0)
    assert sorted(r["spec"] for r in doc["results"]) == sorted(ok_specs)
    assert cli.main(["run", "ok.txt", "--entry", "model", "--json", "--jsonl", "-"]) == 2
    assert cli.main(["run", "missing.txt", "--entry", "model"]) == 2
    assert cli.main(["run", "ok.txt", "--entry", "model", "--fn", "nope:width"]) == 2


def _wait_for(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _fds() -> set[str]:
    return open_fds()


@pytest.mark.slow
def test_a_sandboxed_pool_confines_every_worker_and_needs_no_trust(tmp_path: Path) -> None:
    import socket as socket_mod

    srv = socket_mod.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    repos = [make_repo(tmp_path / f"r{i}", net_files(f"v{i}", width=2 + i)) for i in range(3)]

    def probe(model: Any) -> dict[str, Any]:
        import os as os_mod
        import socket as s

        try:
            s.create_connection(("127.0.0.1", port), timeout=2).close()
            net = "connected"
        except OSError as e:
            net = type(e).__name__
        return {
            "width": model.fc.out_features,
            "net": net,
            "token": os_mod.environ.get("GITHUB_TOKEN"),
        }

    try:
        os.environ["GITHUB_TOKEN"] = "sekrit"
        with Hub(max_workers=2, sandbox="strict") as h:
            results = list(h.map(probe, [spec_of(r) for r in repos], "net", ordered=True))
            with pytest.raises(hub.SandboxError, match="mode='module'"):
                h.load(spec_of(repos[0]), "net")
            assert len(h.load_state_dict(spec_of(repos[0]), "net")) == 2
    finally:
        del os.environ["GITHUB_TOKEN"]
        srv.close()
    assert [r.value for r in results] == [
        {"width": 2 + i, "net": "PermissionError", "token": None} for i in range(3)
    ]
