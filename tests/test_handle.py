"""Remote handles: the model stays in its worker; only plain values and tensors come back."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch

import isolhub as hub

from hubrepos import make_repo, net_files, spec_of


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    files = net_files("v1", width=3)
    files["hubconf.py"] = (
        textwrap.dedent(files["hubconf.py"] or "")
        + """

import weakref

SPAWNED = weakref.WeakSet()


class Spawned:
    pass


def pid_of_worker():
    import os
    import torch.nn as nn

    class Holder(nn.Module):
        def pid(self):
            return os.getpid()

        def die(self):
            os.kill(os.getpid(), 9)

        def unsendable(self):
            return object()

        def spawn(self):
            obj = Spawned()
            SPAWNED.add(obj)
            return obj

        def slow(self, seconds):
            import time

            time.sleep(seconds)
            return seconds

        def live(self):
            import gc

            gc.collect()
            return len(SPAWNED)

    return Holder()
"""
    )
    return make_repo(tmp_path / "r", files)


def test_forward_methods_and_attributes_run_in_the_worker(repo: Path) -> None:
    local = hub.load(spec_of(repo), "net")
    with hub.load(spec_of(repo), "net", mode="remote") as m:
        x = torch.randn(5, 4)
        assert torch.equal(m(x), local(x))
        assert m.training is True
        assert m.eval() is m
        assert m.training is False
        assert m.fc.out_features == 3
        assert torch.equal(m.fc.weight, local.fc.weight)
        assert torch.equal(m.fc(x), local.fc(x))
        m.training = True
        assert m.training is True
        assert m.remote_type.endswith("Net")


@pytest.mark.parametrize("spin_us", ["0", "50", "5000"])
def test_calls_answer_alike_whether_the_sides_poll_or_sleep_while_waiting(
    repo: Path, spin_us: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_SPIN_US", spin_us)
    local = hub.load(spec_of(repo), "net")
    x = torch.randn(5, 4)
    with hub.load(spec_of(repo), "pid_of_worker", mode="remote") as h:
        assert h.slow(0.05) == 0.05  # longer than any spin: both sides end up asleep
        assert h.pid() == h.pid()
    with hub.load(spec_of(repo), "net", mode="remote") as m:
        for _ in range(20):
            assert torch.equal(m(x), local(x))


def test_state_dict_comes_through_shared_memory(repo: Path) -> None:
    local = hub.load(spec_of(repo), "net")
    with hub.load(spec_of(repo), "net", mode="remote") as m:
        sd = m.state_dict()
    assert list(sd) == list(local.state_dict())
    for k, v in local.state_dict().items():
        assert torch.equal(sd[k], v)


def test_objects_that_cannot_cross_come_back_as_handles_not_pickles(repo: Path) -> None:
    with hub.load(spec_of(repo), "pid_of_worker", mode="remote") as m:
        assert m.pid() != os.getpid()
        handle = m.unsendable()
        assert isinstance(handle, hub.RemoteObject)
        assert handle.remote_type == "builtins.object"


def test_a_dead_worker_closes_the_handle_and_never_hangs(repo: Path) -> None:
    m = hub.load(spec_of(repo), "pid_of_worker", mode="remote")
    with pytest.raises(hub.WorkerCrashedError, match="SIGKILL"):
        m.die()
    assert m.closed
    with pytest.raises(hub.HandleClosedError, match="load the model again"):
        m.pid()


def test_a_worker_killed_from_outside_is_noticed(repo: Path) -> None:
    m = hub.load(spec_of(repo), "pid_of_worker", mode="remote")
    os.kill(m.pid(), signal.SIGKILL)
    with pytest.raises((hub.WorkerCrashedError, hub.HandleClosedError)):
        m.pid()
    with pytest.raises(hub.HandleClosedError):
        m.pid()


def test_close_stops_the_worker(repo: Path) -> None:
    m = hub.load(spec_of(repo), "pid_of_worker", mode="remote")
    pid = m.pid()
    m.close()
    assert m.closed
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_remote_exception_is_a_remote_error_and_the_handle_stays_usable(repo: Path) -> None:
    with hub.load(spec_of(repo), "net", mode="remote") as m:
        with pytest.raises(hub.RemoteError, match="mat1 and mat2 shapes cannot be multiplied"):
            m(torch.ones(2, 7))
        assert m(torch.ones(2, 4)).shape == (2, 3)


def test_objects_behind_dropped_proxies_are_released_in_the_worker(repo: Path) -> None:
    import gc

    with hub.load(spec_of(repo), "pid_of_worker", mode="remote") as m:
        kept = m.spawn()
        dropped = [m.spawn() for _ in range(3)]
        assert m.live() == 4
        del dropped
        gc.collect()
        assert m.live() == 1  # the request carried the releases; only `kept` is still held
        assert kept.remote_type.endswith(".Spawned")
