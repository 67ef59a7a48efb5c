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


@pytest.mark.slow
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


@pytest.mark.slow
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


STACK_HUBCONF = """
import torch
import torch.nn as nn


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.heads = nn.ModuleList([nn.Linear(2, 1), nn.Linear(2, 3)])
        self.register_buffer("steps", torch.zeros(1))
        self.features[2].weight.requires_grad_(False)

    @property
    def broken(self):
        return self.nothing_here

    def forward(self, x):
        return self.features(x)


def stack():
    torch.manual_seed(0)
    return Stack()


def wide(n=3000):
    return nn.Sequential(*[nn.Linear(1 + i % 5, 1) for i in range(n)])


def empty():
    return nn.Sequential()
"""


@pytest.fixture
def stack_repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "stack", {"hubconf.py": STACK_HUBCONF})


def test_missing_attributes_are_attribute_errors_not_hubconf_errors(stack_repo: Path) -> None:
    local = hub.load(spec_of(stack_repo), "stack")
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        assert hasattr(m, "features") and not hasattr(m, "nope")
        assert getattr(m, "nope", None) is None
        assert getattr(m, "broken", 5) == getattr(local, "broken", 5)  # raised inside a property
        with pytest.raises(AttributeError, match="has no attribute 'featurs'") as info:
            m.featurs  # noqa: B018
        assert isinstance(info.value, hub.IsolhubError)
        assert not isinstance(info.value, hub.RemoteError)
        assert "raised by hubconf code" not in str(info.value)
        assert "did you mean 'features'" in str(info.value).lower()
        assert info.value.name == "featurs"
        assert m(torch.ones(1, 4)).shape == (1, 2)  # the handle stays usable


def test_parameters_and_named_parameters_iterate_like_the_local_module(stack_repo: Path) -> None:
    local = hub.load(spec_of(stack_repo), "stack")
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        params = list(m.parameters())
        named = dict(m.named_parameters())
        assert next(m.parameters()).dtype == torch.float32
        assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in local.parameters())
        buffers = [name for name, _ in m.named_buffers()]
    assert len(params) == len(list(local.parameters()))
    assert list(named) == [name for name, _ in local.named_parameters()]
    for name, p in local.named_parameters():
        assert torch.equal(named[name], p)
        assert named[name].requires_grad == p.requires_grad
    assert buffers == ["steps"]


def test_containers_support_len_indexing_iteration_and_in(stack_repo: Path) -> None:
    local = hub.load(spec_of(stack_repo), "stack")
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        assert len(m.features) == 3 and len(m.heads) == 2
        first = m.features[0]
        assert first.out_features == 8
        assert m.features[-1].out_features == 2
        assert len(m.features[1:]) == 2
        assert [h.remote_type for h in m.features] == [
            f"{type(x).__module__}.{type(x).__qualname__}" for x in local.features
        ]
        assert [h.out_features for h in m.heads] == [1, 3]
        assert first in m.features and m.heads[0] not in m.features
        assert [h for h in m.features][0] is first  # one proxy per remote object
        with pytest.raises(IndexError):
            m.features[10]  # noqa: B018
        with pytest.raises(TypeError, match="has no len"):
            len(m)
        with pytest.raises(TypeError, match="not iterable"):
            iter(m)
        assert bool(m) is True
        with hub.load(spec_of(stack_repo), "empty", mode="remote") as e:
            assert bool(e) is False and len(e) == 0 and list(e) == []


def test_a_handle_is_only_sent_back_to_its_own_worker(stack_repo: Path) -> None:
    with (
        hub.load(spec_of(stack_repo), "stack", mode="remote") as a,
        hub.load(spec_of(stack_repo), "stack", mode="remote") as b,
    ):
        with pytest.raises(TypeError, match="another worker"):
            a.features[0] in b.features  # noqa: B015
        assert a.features[0] in a.features


def test_dir_lists_the_remote_attributes_and_the_handles_own(stack_repo: Path) -> None:
    local = hub.load(spec_of(stack_repo), "stack")
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        names = dir(m)
    assert set(dir(local)) <= set(names)
    assert {"close", "closed", "remote_type", "state_dict"} <= set(names)


@pytest.mark.slow
def test_repr_is_the_objects_whole_repr(stack_repo: Path) -> None:
    local = hub.load(spec_of(stack_repo), "stack")
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        assert repr(m) == repr(local)
        assert str(m.features) == str(local.features)
        assert repr(m.features[0]) == repr(local.features[0])
    assert "gone" in repr(m) and "Stack" in repr(m)  # a closed handle's repr does not raise


@pytest.mark.slow
def test_a_huge_repr_is_bounded_at_a_line_end_and_says_what_was_left_out(
    stack_repo: Path,
) -> None:
    local_lines = repr(hub.load(spec_of(stack_repo), "wide")).splitlines()
    with hub.load(spec_of(stack_repo), "wide", mode="remote") as w:
        text = repr(w)
    lines = text.splitlines()
    assert len(text) < len("\n".join(local_lines))
    assert len(text) <= 110_000
    shown, note = lines[:-1], lines[-1]
    assert shown == local_lines[: len(shown)]  # whole lines only, never cut mid-token
    assert f"{len(local_lines) - len(shown)} more lines" in note


def test_eval_train_and_to_chain_and_return_the_handle(stack_repo: Path) -> None:
    local = hub.load(spec_of(stack_repo), "stack")
    x = torch.randn(3, 4)
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        assert m.eval() is m
        assert m.training is False and m.features[0].training is False
        assert m.train() is m and m.features[0].training is True
        assert m.train(False) is m and m.training is False
        assert m.to("cpu") is m
        assert torch.equal(m.eval().to("cpu")(x), local(x))
        assert m.to(torch.float64) is m
        assert m.features[0].weight.dtype == torch.float64
        assert m.features.eval() is m.features


def test_state_dict_of_submodules_and_with_arguments(stack_repo: Path) -> None:
    local = hub.load(spec_of(stack_repo), "stack")
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        sub = m.features.state_dict()
        prefixed = m.state_dict(prefix="net.")
    assert list(sub) == list(local.features.state_dict())
    for k, v in local.features.state_dict().items():
        assert torch.equal(sub[k], v)
    assert list(prefixed) == ["net." + k for k in local.state_dict()]


HOSTILE_HANDLE = """
from isolhub._transport.codec import encode


def value_reply(value):
    from isolhub._transport.values import encode_value

    body, _, layout = encode_value(value)
    return encode({"ok": True, "kind": "value", "body": body, "layout": layout})


class Liar:
    def __init__(self, reply):
        self.reply = reply

    def __len__(self):
        send_raw(self.reply)

    def __iter__(self):
        return self

    def __next__(self):
        send_raw(self.reply)

    def __repr__(self):
        send_raw(self.reply)


RAISED = {"type": "x.Y", "message": "m", "traceback": "", "target": "x.Y", "name": "", "suggestions": []}


def unknown_builtin():
    return Liar(encode({"ok": True, "kind": "raised", "error": dict(RAISED, builtin="SystemExit")}))


def message_not_text():
    return Liar(encode({"ok": True, "kind": "raised", "error": dict(RAISED, builtin="TypeError", message=3)}))


def length_not_int():
    return Liar(value_reply("three"))


def too_many_items():
    return Liar(value_reply({"items": [1, 2, 3], "more": True}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("entry", "use"),
    [
        ("unknown_builtin", len),
        ("message_not_text", len),
        ("length_not_int", len),
        ("too_many_items", next),
        ("too_many_items", repr),
    ],
)
def test_a_lying_answer_to_a_handle_operation_is_a_protocol_error_and_kills_the_worker(
    tmp_path: Path, entry: str, use: object
) -> None:
    from test_hostile_replies import PRELUDE

    body = textwrap.dedent(PRELUDE).replace("MARKER", repr(str(tmp_path / "pwned")))
    repo = make_repo(tmp_path / "liar", {"hubconf.py": body + HOSTILE_HANDLE})
    h = hub.load(spec_of(repo), entry, mode="remote", timeout=20)
    if use is repr:
        assert "gone" in repr(h)  # a repr never raises; the worker is killed all the same
    else:
        with pytest.raises(hub.ProtocolError):
            use(h)  # type: ignore[operator]
    assert h.closed


def test_parameters_are_copies_and_load_state_dict_changes_the_worker(stack_repo: Path) -> None:
    with hub.load(spec_of(stack_repo), "stack", mode="remote") as m:
        weight = m.features[0].weight
        assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad
        with torch.no_grad():
            weight.zero_()
        assert m.features[0].weight.abs().sum() > 0  # the copy changed, the worker's did not
        sd = m.state_dict()
        sd["features.0.weight"] = torch.zeros_like(sd["features.0.weight"])
        m.load_state_dict(sd)
        assert torch.equal(m.features[0].weight, torch.zeros(8, 4))
