"""Every stage of a load × every way of failing: a typed error naming the stage, and the next load.

The stages are where the repo's code runs: importing hubconf, listing it and reading a docstring,
calling the entrypoint, pickling its result (module mode) or encoding it (value mode), the
caller's `then=` function (`Hub.map`), unpickling in this process, `state_dict()`, and a call on
a remote handle. The ways are raising, `sys.exit(3)`, `os._exit(3)`, SIGSEGV and a hang past
`timeout=`. Each cell is its own repo whose hubconf fails at that stage in that way; loky's
`crash_cases` (tests/test_reusable_executor.py) is the model.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import isolhub as hub

from hubrepos import make_repo, spec_of

HANG_TIMEOUT = 2.0  # seconds: `timeout=` of the hanging cells, past which the worker is killed
TIMEOUT = 120.0  # every other cell's: only there so that a hang where none is meant fails

# Way → the statement that fails, and what the user gets when the worker runs it.
WAYS: dict[str, tuple[str, type[hub.IsolhubError], str]] = {
    "raises": ("raise RuntimeError('boom from the repo')", hub.RemoteError, "boom from the repo"),
    "sys_exit": ("sys.exit(3)", hub.WorkerCrashedError, "exit code 3"),
    "os_exit": ("os._exit(3)", hub.WorkerCrashedError, "exit code 3"),
    "segfault": ("os.kill(os.getpid(), signal.SIGSEGV)", hub.WorkerCrashedError, "SIGSEGV"),
    "hang": (
        "time.sleep(600)",
        hub.WorkerTimeoutError,
        f"did not answer within {HANG_TIMEOUT:g} s",
    ),
}

HEADER = """\
import os, signal, sys, time
import torch


def ok():
    return "fine"


def _fail():
    {way}
"""


@dataclass(frozen=True)
class Stage:
    """Where the repo fails: the hubconf's code for it, and how a user reaches it."""

    hubconf: str  # appended to HEADER; calls `_fail()` at this stage
    run: Callable[[str, dict[str, Any], str], Any]  # (spec, options, way) → the public call
    words: str  # how the message names the stage when the worker dies or hangs there
    raised: str  # how a raising cell's message (its traceback) names it
    sandboxed: bool = True  # reachable under a sandbox (module mode is refused there)
    # way → the error, and a part of its message, where they are not WAYS' own.
    errors: dict[str, tuple[type[hub.IsolhubError], str]] = field(default_factory=dict)

    def outcome(self, way: str) -> tuple[type[hub.IsolhubError], str, str]:
        """What the user gets when the repo fails here in `way`: type, message, stage words."""
        _, error, how = WAYS[way]
        error, how = self.errors.get(way, (error, how))
        return error, how, self.raised if way == "raises" else self.words


def _load(entry: str, mode: str) -> Callable[[str, dict[str, Any], str], Any]:
    def run(spec: str, o: dict[str, Any], way: str) -> Any:
        sandboxed = mode == "module" and o.get("sandbox")
        return hub.load(spec, entry, mode="remote" if sandboxed else mode, **o)

    return run


def _map(then: bool) -> Callable[[str, dict[str, Any], str], Any]:
    def run(spec: str, o: dict[str, Any], way: str) -> Any:
        with hub.Hub(max_workers=1, **o) as h:
            (r,) = h.map(_then(way) if then else None, [spec], "net")
        if not r.ok:
            raise r.error
        return r.value

    return run


def _remote_call(spec: str, o: dict[str, Any], way: str) -> Any:
    with hub.load(spec, "net", mode="remote", **o) as m:
        return m(torch.zeros(1))


def _then(way: str) -> Callable[[Any], Any]:
    """The caller's function for `Hub.map`: runs in the worker, fails there in `way`."""
    statement = WAYS[way][0]

    def then(result: Any) -> Any:
        exec(statement, {"os": os, "signal": signal, "sys": sys, "time": time})
        return result

    return then


STAGES: dict[str, Stage] = {
    "import": Stage("_fail()\n", _load("ok", "module"), "while importing hubconf", "<module>"),
    "list": Stage(
        "def __dir__():\n    _fail()\n",
        lambda spec, o, way: hub.list(spec, **o),
        "while listing the entrypoints",
        "in __dir__",
    ),
    "help": Stage(
        "class _Documented:\n"
        "    @property\n"
        "    def __doc__(self):\n"
        "        _fail()\n"
        "    def __call__(self):\n"
        "        return 1\n"
        "net = _Documented()\n",
        lambda spec, o, way: hub.help(spec, "net", **o),
        "while reading the entrypoint's docstring",
        "in __doc__",
    ),
    "entrypoint": Stage(
        "def net():\n    _fail()\n",
        _load("net", "module"),
        "while calling the entrypoint",
        "in net",
    ),
    "pickle (module)": Stage(
        "class Obj:\n    def __reduce__(self):\n        _fail()\n\ndef net():\n    return Obj()\n",
        _load("net", "module"),
        "while pickling the result",
        "cannot be pickled",
        sandboxed=False,
        errors={"raises": (hub.TransportError, "RuntimeError: boom from the repo")},
    ),
    "encode (value)": Stage(
        # A tensor subclass runs the repo's code when the worker detaches it to send it.
        "class Odd(torch.Tensor):\n"
        "    @classmethod\n"
        "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
        "        if func is torch.Tensor.detach:\n"
        "            _fail()\n"
        "        return super().__torch_function__(func, types, args, kwargs or {})\n\n"
        "def net():\n    return {'x': torch.zeros(2).as_subclass(Odd)}\n",
        _map(then=False),
        "while encoding the result",
        "in encode_value",
    ),
    "then=": Stage("def net():\n    return 1\n", _map(then=True), "while running then=", "in then"),
    "unpickle (parent)": Stage(
        "class Obj:\n    def __reduce__(self):\n        return (_fail, ())\n\n"
        "def net():\n    return Obj()\n",
        _load("net", "module"),
        "unpickling failed in this process",
        "unpickling failed in this process",
        sandboxed=False,
        errors={
            "raises": (hub.TransportError, "RuntimeError: boom from the repo"),
            "sys_exit": (hub.TransportError, "SystemExit: 3"),
        },
    ),
    "state_dict()": Stage(
        "class Net(torch.nn.Module):\n"
        "    def state_dict(self, *args, **kwargs):\n"
        "        _fail()\n\n"
        "def net():\n    return Net()\n",
        lambda spec, o, way: hub.load_state_dict(spec, "net", **o),
        "while taking the result's state_dict()",
        "in state_dict",
    ),
    "remote call": Stage(
        "class Net(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        _fail()\n\n"
        "def net():\n    return Net()\n",
        _remote_call,
        "while calling the object on the remote handle",
        "in forward",
    ),
}

# Unpickling runs in this process (module mode is for trusted code, docs/architecture.md):
# an `os._exit`, a signal or a hang there is this process's own, as with torch.hub.
IN_THIS_PROCESS = {("unpickle (parent)", w) for w in ("os_exit", "segfault", "hang")}

# The unconfined cells that fail at once are the fast subset; hangs and sandboxed workers are slow.
CELLS = [
    pytest.param(
        stage,
        way,
        sandbox,
        id=f"{stage}-{way}{'-sandboxed' if sandbox else ''}",
        marks=[pytest.mark.slow] if sandbox or way == "hang" else [],
    )
    for sandbox in (False, True)
    for stage, s in STAGES.items()
    for way in WAYS
    if (stage, way) not in IN_THIS_PROCESS and (s.sandboxed or not sandbox)
]


@pytest.fixture(scope="module")
def sandbox_missing() -> str:
    """Why `sandbox="strict"` cannot run here ("" where it can: see `isolhub doctor`)."""
    missing = hub.sandbox_report().missing
    return f"the sandbox cannot apply {', '.join(missing)} here" if missing else ""


@pytest.fixture
def ok_repo(tmp_path: Path) -> str:
    return spec_of(make_repo(tmp_path / "ok", {"hubconf.py": "def ok():\n    return 'fine'\n"}))


@pytest.mark.parametrize(("stage", "way", "sandbox"), CELLS)
def test_a_repo_failing_at_any_stage_in_any_way_is_a_typed_error_naming_the_stage(
    stage: str, way: str, sandbox: bool, tmp_path: Path, ok_repo: str, sandbox_missing: str
) -> None:
    if sandbox and sandbox_missing:
        pytest.skip(sandbox_missing)
    s = STAGES[stage]
    error, how, words = s.outcome(way)
    hubconf = HEADER.format(way=WAYS[way][0]) + s.hubconf
    repo = spec_of(make_repo(tmp_path / "repo", {"hubconf.py": hubconf}))
    options: dict[str, Any] = {"timeout": HANG_TIMEOUT if way == "hang" else TIMEOUT}
    if sandbox:
        options["sandbox"] = "strict"

    with pytest.raises(error) as info:
        s.run(repo, options, way)

    assert type(info.value) is error  # the precise type, not a parent or a sibling of it
    message = str(info.value)
    assert how in message
    assert words in message
    if isinstance(info.value, hub.WorkerError):
        assert repo in message  # which repo's worker
    # This process survived and its next load, in a fresh worker, works.
    assert hub.load(ok_repo, "ok", timeout=TIMEOUT) == "fine"
