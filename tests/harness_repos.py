"""24 small hub repos for harness tests: most fine, the rest failing in every way a repo can.

Every repo's hubconf has a `model(width=...)` entrypoint returning a tiny `nn.Linear` that
knows where it came from (`origin`); `evaluate` below is the harness function run on each.

    ok_00 .. ok_14        fine (width 1..15)
    clash_a, clash_b      fine; both ship a `models/` package with different contents
    raises_call           the entrypoint raises ValueError
    raises_import         hubconf imports a module that does not exist
    no_entry              hubconf has no `model`
    segfault              the entrypoint dereferences NULL (SIGSEGV)
    hang                  the entrypoint sleeps for ten minutes
    exits                 the entrypoint calls os._exit(3)
    oom                   the entrypoint allocates 4 GiB (past a smaller memory cap)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hubrepos import make_repo, spec_of

MEMORY_CAP = 1536 * 1024**2
HANG_TIMEOUT = 3.0

_MODEL = '''
import torch


class Net(torch.nn.Linear):
    def __init__(self, width, origin):
        super().__init__(4, width)
        self.origin = origin


def model(width={width}):
    """A {name} model."""
{body}
    return Net(width, {origin})
'''

_FAILURES = {
    "raises_call": "    raise ValueError('bad weights in raises_call')",
    "segfault": "    import ctypes, sys\n    print('segfault: about to crash', file=sys.stderr, "
    "flush=True)\n    ctypes.string_at(0)",
    "hang": "    import time\n    time.sleep(600)",
    "exits": "    import os, sys\n    print('exits: leaving now', file=sys.stderr, flush=True)"
    "\n    os._exit(3)",
    "oom": "    hog = bytearray(4 * 1024**3)",
}


def _hubconf(name: str, width: int, body: str = "", origin: str | None = None) -> str:
    return _MODEL.format(
        name=name, width=width, body=body or "    pass", origin=origin or repr(name)
    )


def harness_files() -> dict[str, dict[str, str | None]]:
    """`{repo name: {file: text}}` for the 24 harness repos."""
    repos: dict[str, dict[str, str | None]] = {}
    for i in range(15):
        repos[f"ok_{i:02d}"] = {"hubconf.py": _hubconf(f"ok_{i:02d}", i + 1)}
    for side in ("a", "b"):
        repos[f"clash_{side}"] = {
            "hubconf.py": "from models import ORIGIN\n"
            + _hubconf(f"clash_{side}", 2, "", "ORIGIN"),
            "models/__init__.py": f"ORIGIN = 'models of clash_{side}'\n",
        }
    for name, body in _FAILURES.items():
        repos[name] = {"hubconf.py": _hubconf(name, 1, body)}
    repos["raises_import"] = {
        "hubconf.py": "import no_such_module_anywhere\n" + _hubconf("raises_import", 1)
    }
    repos["no_entry"] = {"hubconf.py": "def something_else():\n    return 1\n"}
    assert len(repos) == 24
    return repos


def make_harness(root: Path) -> dict[str, str]:
    """Create the 24 repos under `root`; return `{name: spec}` (tag v1 on each)."""
    specs = {}
    for name, files in harness_files().items():
        repo = make_repo(root / name, files, tag="v1")
        specs[name] = spec_of(repo, "v1")
    return specs


def evaluate(model: Any) -> dict[str, Any]:
    """The harness function: runs in the worker, returns plain values and a tensor."""
    import torch

    out = model(torch.ones(1, 4))
    return {"width": model.out_features, "origin": model.origin, "out": out.detach()}


def check_harness_results(results: list[Any], specs: dict[str, str]) -> None:
    """Assert every result is present, typed, and attributed to its own spec."""
    import isolhub as hub

    by_spec = {r.spec: r for r in results}
    assert len(results) == len(specs) == len(by_spec)
    name_of = {spec: name for name, spec in specs.items()}
    for spec, r in by_spec.items():
        name = name_of[spec]
        if name.startswith(("ok_", "clash_")):
            assert r.ok, r.summary()
            assert r.error is None and len(r.sha) == 40
        else:
            assert not r.ok and r.value is None, name
            assert isinstance(r.error, hub.IsolhubError), (name, r.error)
    for i in range(15):
        r = by_spec[specs[f"ok_{i:02d}"]]
        assert r.value["width"] == i + 1 and r.value["origin"] == f"ok_{i:02d}"
        assert tuple(r.value["out"].shape) == (1, i + 1)
    assert by_spec[specs["clash_a"]].value["origin"] == "models of clash_a"
    assert by_spec[specs["clash_b"]].value["origin"] == "models of clash_b"

    def failed(name: str) -> Any:
        return by_spec[specs[name]]

    assert isinstance(failed("raises_call").error, hub.RemoteError)
    assert failed("raises_call").error.remote_type == "builtins.ValueError"
    assert "bad weights in raises_call" in str(failed("raises_call").error)
    assert isinstance(failed("raises_import").error, hub.RemoteError)
    assert failed("raises_import").error.remote_type == "builtins.ModuleNotFoundError"
    assert isinstance(failed("no_entry").error, hub.EntrypointError)
    seg = failed("segfault")
    assert isinstance(seg.error, hub.WorkerCrashedError)
    assert (seg.returncode, seg.signal) == (-11, "SIGSEGV")
    assert "segfault: about to crash" in seg.stderr_tail
    assert isinstance(failed("hang").error, hub.WorkerTimeoutError)
    assert f"did not answer within {HANG_TIMEOUT:g} s" in str(failed("hang").error)
    ex = failed("exits")
    assert isinstance(ex.error, hub.WorkerCrashedError)
    assert (ex.returncode, ex.signal) == (3, None)
    assert "exits: leaving now" in ex.stderr_tail
    oom = failed("oom")
    assert isinstance(oom.error, hub.RemoteError)
    assert oom.error.remote_type == "builtins.MemoryError"
    for r in results:
        assert spec_of_error(r) in (None, r.spec), (r.spec, r.error)


def spec_of_error(r: Any) -> str | None:
    """The spec an error names (its `spec` attribute, up to the sha suffix), if any."""
    label = getattr(r.error, "spec", None)
    return None if label is None else str(label).split(" (")[0]
