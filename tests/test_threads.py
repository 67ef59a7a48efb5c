"""A worker runs torch on the caller's intra-op threads, as torch.hub's load in the caller's own
process would; a pool's workers (and compare's two sides) share them instead of each taking
every core. Measured in the worker: torch's count, OpenMP's own, and the OS threads that a
parallel op starts.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._engine import caller_threads
from isolhub._pool.hub import Hub
from isolhub._sandbox.policy import probe

from hubrepos import make_repo, spec_of

HUBCONF = '''
import os
import re

import torch

dependencies = ["torch"]


def _tasks():
    return len(os.listdir("/proc/self/task"))


def threads():
    """What this worker runs torch's intra-op work on."""
    return _measure()


class Probe:
    def measure(self):
        return _measure()


def probe():
    return Probe()


def _measure():
    before = _tasks()
    x = torch.ones(1 << 22)
    for _ in range(3):
        (x * 2).sum()  # a parallel op: OpenMP makes its team on the first
    omp = re.search(r"omp_get_max_threads\\(\\) : (\\d+)", torch.__config__.parallel_info())
    return {
        "torch": torch.get_num_threads(),
        "omp": int(omp.group(1)) if omp else None,
        "started": _tasks() - before,
    }
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    return spec_of(make_repo(tmp_path_factory.mktemp("threads") / "r", {"hubconf.py": HUBCONF}))


@pytest.fixture
def caller_set() -> Iterator[None]:
    """The test sets this process's threads; they are put back after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_a_load_runs_on_the_callers_one_thread_and_starts_no_others(
    repo: str, caller_set: None
) -> None:
    torch.set_num_threads(1)
    seen = hub.load(repo, "threads")
    # Without the caller's count the worker keeps the zygote's default (every core here), and
    # its first parallel op starts OpenMP's team.
    assert seen == {"torch": 1, "omp": 1, "started": 0}


@pytest.mark.slow
def test_a_load_runs_on_as_many_threads_as_the_caller_set(repo: str, caller_set: None) -> None:
    torch.set_num_threads(3)  # not the default but on a 3-core machine
    seen = hub.load(repo, "threads")
    assert (seen["torch"], seen["omp"]) == (3, 3)


@pytest.mark.slow
def test_a_remote_handle_runs_on_the_callers_threads(repo: str, caller_set: None) -> None:
    torch.set_num_threads(1)
    with hub.load(repo, "probe", mode="remote") as handle:
        assert handle.measure()["torch"] == 1


@pytest.mark.slow
def test_a_pools_two_workers_share_the_callers_threads(repo: str, caller_set: None) -> None:
    torch.set_num_threads(6)
    with Hub(max_workers=2) as h:
        results = list(h.map(None, [repo] * 2, "threads"))
    assert [(r.value["torch"], r.value["omp"]) for r in results] == [(3, 3)] * 2


@pytest.mark.slow
def test_a_pool_of_more_workers_than_threads_gives_each_one(repo: str, caller_set: None) -> None:
    torch.set_num_threads(2)
    with Hub(max_workers=3) as h:
        (result,) = h.map(None, [repo], "threads")
    assert result.value == {"torch": 1, "omp": 1, "started": 0}


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.skipif(bool(probe().missing), reason="this kernel lacks sandbox protections")
def test_a_sandboxed_worker_sets_its_threads_once_confined(repo: str, caller_set: None) -> None:
    # The sandbox needs a single-threaded process; setting the count starts threads, so it
    # comes after.
    torch.set_num_threads(3)
    with hub.load(repo, "probe", mode="remote", sandbox="strict") as handle:
        seen = handle.measure()
    assert (seen["torch"], seen["omp"]) == (3, 3)


def test_the_callers_threads_are_split_and_never_below_one(caller_set: None) -> None:
    torch.set_num_threads(5)
    assert [caller_threads(n) for n in (1, 2, 3, 5, 6, 100)] == [5, 2, 1, 1, 1, 1]


def test_without_torch_imported_the_cpus_stand_for_the_callers_threads(tmp_path: Path) -> None:
    code = (
        "import os, sys\n"
        "from isolhub._engine import caller_threads\n"
        "assert 'torch' not in sys.modules\n"
        "cpus = len(os.sched_getaffinity(0))\n"
        "print(caller_threads() == cpus, caller_threads(cpus + 1) == 1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
        env={"PYTHONPATH": str(Path(hub.__file__).parent.parent), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout.split() == ["True", "True"]
