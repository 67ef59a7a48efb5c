"""One of each piece of infrastructure: the libc handle, and what every caller of it shares."""

from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import isolhub as hub
from isolhub import _libc

from hubrepos import make_repo, spec_of

PACKAGE = Path(hub.__file__).parent


def _calls(attr: str) -> dict[str, int]:
    """How many calls of `<something>.attr(...)` each isolhub module makes (code, not strings)."""
    found: dict[str, int] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        n = sum(
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == attr
            for node in ast.walk(tree)
        )
        if n:
            found[path.name] = n
    return found


def test_the_c_library_is_loaded_once_and_prctl_is_called_only_through_libc() -> None:
    assert _calls("CDLL") == {"_libc.py": 1}
    # prctl is variadic: plain Python ints would go through as C int, not unsigned long.
    assert set(_calls("prctl")) == {"_libc.py"}


def test_set_pdeathsig_reads_back_as_sigkill_in_a_child() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            _libc.set_pdeathsig(signal.SIGKILL)
            os._exit(0 if _libc.get_pdeathsig() == signal.SIGKILL else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


_PDEATHSIG_HUBCONF = """
import ctypes

def pdeathsig():
    out = ctypes.c_int(-1)
    zero = ctypes.c_ulong(0)
    ctypes.CDLL(None).prctl(ctypes.c_int(2), ctypes.byref(out), zero, zero, zero)
    return out.value
"""


def test_an_unsandboxed_worker_dies_with_its_zygote(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", {"hubconf.py": _PDEATHSIG_HUBCONF})
    assert hub.load(spec_of(repo), "pdeathsig", trust_repo=True) == signal.SIGKILL
