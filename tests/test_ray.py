"""The Ray backend: one actor per repo@sha on a local Ray cluster, the same results and errors
as the local pool, the snapshot shipped through the object store, nothing left behind.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import isolhub as hub
from isolhub._pool.hub import Hub

from harness_repos import HANG_TIMEOUT, MEMORY_CAP, check_harness_results, evaluate, make_harness
from hubrepos import make_repo, net_files, spec_of

pytestmark = pytest.mark.ray

try:
    import ray
except ImportError:  # pragma: no cover - depends on the environment
    ray = None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray cluster whose nodes keep isolhub's cache apart from the driver's."""
    if ray is None:
        pytest.skip("ray is not installed (pip install 'isolhub[ray]')")
    node_home = tmp_path_factory.mktemp("ray-node-hub")
    _NODE_HOME[:] = [node_home]
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"ISOLHUB_HOME": str(node_home)}},
    )
    try:
        yield node_home
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_harness(tmp_path_factory.mktemp("harness"))


@pytest.mark.slow
def test_a_harness_over_24_repos_on_ray_gives_the_local_results(
    cluster: Path, harness: dict[str, str]
) -> None:
    # No wall-clock bound here (timings are noisy): a hang is caught by the per-task timeout.
    with Hub(max_workers=2, timeout=HANG_TIMEOUT, memory_bytes=MEMORY_CAP, backend="ray") as h:
        results = list(h.map(evaluate, harness.values(), entrypoint="model"))
    check_harness_results(results, harness)
    # The snapshots were shipped and installed in the nodes' own cache, not the driver's.
    shipped = {p.name for p in cluster.glob("repos/*/snapshots/*")}
    assert {r.sha for r in results if r.sha} <= shipped
    _assert_no_isolhub_process_left()


@pytest.mark.slow
def test_a_closure_runs_on_ray_and_ordered_keeps_the_input_order(
    cluster: Path, tmp_path: Path
) -> None:
    repos = [make_repo(tmp_path / f"net{w}", net_files(f"v{w}", width=w)) for w in (3, 1, 2)]
    x, factor = torch.ones(2, 4), 2.0

    def score(model: Any) -> Any:
        return {"out": model(x) * factor, "pid": os.getpid()}

    specs = [spec_of(r) for r in repos]
    with Hub(max_workers=3, backend="ray") as h:  # three live actors, each reused below
        results = list(h.map(score, specs, "net", ordered=True))
        widths = [r.value for r in h.map(lambda m: m.fc.out_features, specs, "net")]
        sd = h.load_state_dict(specs[0], "net")
        model = h.load(specs[0], "net", scale=2.0)
        assert h.list(specs[0]) == ["Net", "net"]
        assert h.help(specs[0], "net") == "Build Net v3."
    assert [r.spec for r in results] == specs
    assert all(r.ok for r in results), [r.summary() for r in results]
    assert [tuple(r.value["out"].shape) for r in results] == [(2, 3), (2, 1), (2, 2)]
    assert results[0].value["pid"] != os.getpid()
    assert sorted(widths) == [1, 2, 3]
    assert list(sd) == ["fc.weight", "fc.bias"] and sd["fc.weight"].shape == (3, 4)
    assert type(model).version == "v3" and model.fc.weight[0, 1].item() == 2.0
    _assert_no_isolhub_process_left()


_KILLS_ITS_ACTOR = """
import os, signal, time

def model(flag):
    if not os.path.exists(flag):
        open(flag, "w").close()
        zygote = os.getppid()
        with open(f"/proc/{zygote}/stat") as f:
            actor = int(f.read().rsplit(")", 1)[1].split()[1])
        os.kill(actor, signal.SIGKILL)  # as if the actor's node went away
        time.sleep(60)
    return "second actor, second time lucky"
"""


@pytest.mark.slow
def test_a_dead_actor_is_an_infrastructure_failure_and_is_retried(
    cluster: Path, tmp_path: Path
) -> None:
    spec = spec_of(make_repo(tmp_path / "r", {"hubconf.py": _KILLS_ITS_ACTOR}))
    flag = tmp_path / "flag"
    with Hub(max_workers=1, timeout=120, backend="ray", retries=1) as h:
        (r,) = h.map(None, [spec], "model", kwargs={"flag": str(flag)})
    assert r.ok and r.value == "second actor, second time lucky" and r.attempts == 2
    flag.unlink()
    with Hub(max_workers=1, timeout=120, backend="ray") as h:
        (r,) = h.map(None, [spec], "model", kwargs={"flag": str(flag)})
    assert isinstance(r.error, hub.WorkerCrashedError) and "Ray actor" in str(r.error)
    _assert_no_isolhub_process_left()


@pytest.mark.slow
def test_closing_a_ray_hub_mid_run_kills_its_actors(cluster: Path, tmp_path: Path) -> None:
    hang = "def pause():\n    import time\n    time.sleep(600)\n"
    specs = [spec_of(make_repo(tmp_path / f"hang{i}", {"hubconf.py": hang})) for i in range(3)]
    h = Hub(max_workers=2, timeout=300, backend="ray")
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            list(h.map(None, specs, "pause"))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    deadline = time.monotonic() + 60
    while len(_isolhub_processes()) < 2 * 3 and time.monotonic() < deadline:
        time.sleep(0.1)  # two actors, each with a zygote and a hung worker
    h.close()
    t.join(30)
    assert not t.is_alive()  # close() returned and the map ended within the join's 30 s
    assert len(errors) == 1 and isinstance(errors[0], hub.IsolhubError)
    _assert_no_isolhub_process_left()


def _isolhub_processes() -> list[int]:
    """Live actors, zygotes and workers of this test's Ray cluster (found by its hub dir)."""
    marker = f"ISOLHUB_HOME={_NODE_HOME[0]}".encode() if _NODE_HOME else b"\0never"
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        ours = b"isolhub._process.zygote" in cmd or b"_RepoActor" in cmd
        if ours and marker in env and state != "Z":
            out.append(int(pid))
    return out


_NODE_HOME: list[Path] = []


def _assert_no_isolhub_process_left(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (left := _isolhub_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
