"""One options object and one trust decision for every public entry point.

`isolhub.load`/`load_state_dict`/`list`/`help`/`fetch`, `Hub.load_state_dict`/`list`/`map`,
`compare`, the torch.hub patch and the CLI each build one `HubOptions` and hand it, with the spec,
to `_source.trust.admit` before anything is fetched; `admit` alone asks `check_trust`, and only for code
that will run unconfined. These tests watch `admit` (a recording wrapper that calls the real one)
and `check_trust` (likewise), so a second trust path, or an entry point building its options
differently, fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import isolhub
from isolhub._cli import main as _cli
from isolhub._errors import UntrustedRepoError
from isolhub._options import HubOptions
from isolhub._source import trust as _trust
from isolhub._source.snapshot import fetch_snapshot

SPEC = "someone/net:v1"
OTHER = "someone/net:v2"
# Options every entry point below takes (compare's skip_validation is always True).
COMMON: dict[str, Any] = {
    "force_reload": True,
    "verbose": False,
    "skip_validation": True,
    "timeout": 30.0,
}


class _Stop(BaseException):
    """Raised after a confined admission, so nothing is fetched (no network here)."""


@pytest.fixture
def decisions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any, str, Any]]]:
    """Every `admit` call as (spec, options, calling_fn, what check_trust was asked or None)."""
    seen: list[tuple[str, Any, str, Any]] = []
    real_admit, real_check = _trust.admit, _trust.check_trust
    asked: list[Any] = []

    def check_trust(spec: Any, trust_repo: Any, calling_fn: str = "load") -> None:
        asked.append((str(spec), trust_repo, calling_fn))
        real_check(spec, trust_repo, calling_fn)

    def admit(spec: Any, o: Any, calling_fn: str = "load") -> None:
        asked.clear()
        try:
            real_admit(spec, o, calling_fn)
        finally:
            seen.append((str(spec), o, calling_fn, asked[0] if asked else None))
        raise _Stop  # admitted (confined): stop before any fetch

    monkeypatch.setattr(_trust, "check_trust", check_trust)
    monkeypatch.setattr(_trust, "admit", admit)
    yield seen


def _entry_points(sandbox: Any) -> dict[str, Callable[[], Any]]:
    """Each public entry point, called on SPEC with COMMON and `sandbox`."""
    mode = "module" if sandbox is None else "remote"
    flags = ["--force-reload", "--skip-validation", "--timeout", "30", "--quiet"]
    flags += ["--sandbox", "strict"] if sandbox else []

    def patched() -> Any:
        import torch

        with isolhub.patched_torch_hub(mode=mode, sandbox=sandbox, timeout=COMMON["timeout"]):
            return torch.hub.load(
                SPEC,
                "net",
                force_reload=True,
                verbose=False,
                skip_validation=True,
            )

    def hub(call: Callable[[isolhub.Hub], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with isolhub.Hub(sandbox=sandbox, **COMMON) as h:
                return call(h)

        return run

    def compare() -> Any:
        given = {k: v for k, v in COMMON.items() if k != "skip_validation"}
        return isolhub.compare(SPEC, OTHER, "net", sandbox=sandbox, **given)

    return {
        "load": lambda: isolhub.load(SPEC, "net", mode=mode, sandbox=sandbox, **COMMON),
        "load_state_dict": lambda: isolhub.load_state_dict(SPEC, "net", sandbox=sandbox, **COMMON),
        "list": lambda: isolhub.list(SPEC, sandbox=sandbox, **COMMON),
        "help": lambda: isolhub.help(SPEC, "net", sandbox=sandbox, **COMMON),
        "Hub.load_state_dict": hub(lambda h: h.load_state_dict(SPEC, "net")),
        "Hub.list": hub(lambda h: h.list(SPEC)),
        "Hub.map": hub(lambda h: [r.error for r in h.map(None, [SPEC], "net")]),
        "compare": compare,
        "torch.hub.load (patched)": patched,
        "isolhub list (CLI)": lambda: _cli.main(["list", SPEC, *flags]),
        "isolhub help (CLI)": lambda: _cli.main(["help", SPEC, "net", *flags]),
    }


def _call(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (_Stop, UntrustedRepoError):
        pass


@pytest.mark.parametrize("sandbox", [None, "strict"])
def test_every_entry_point_admits_the_same_options_for_the_same_arguments(
    decisions: list[tuple[str, Any, str, Any]], sandbox: Any
) -> None:
    want = HubOptions(sandbox=sandbox, **COMMON)
    for name, fn in _entry_points(sandbox).items():
        decisions.clear()
        _call(fn)
        assert decisions, f"{name} fetched without asking _trust.admit"
        for spec, o, _, _ in decisions:
            assert spec in (SPEC, OTHER), name
            assert isinstance(o, HubOptions), name
            # A Hub's and compare's mode is the method called; the rest is the call's options.
            assert dataclasses.replace(o, mode="module") == want, name


@pytest.mark.parametrize("sandbox", [None, "strict"])
def test_every_entry_point_makes_the_same_trust_decision(
    decisions: list[tuple[str, Any, str, Any]], sandbox: Any
) -> None:
    entries = _entry_points(sandbox)
    if sandbox is None:
        entries["fetch"] = lambda: isolhub.fetch(SPEC, force_reload=True, verbose=False)
    for name, fn in entries.items():
        decisions.clear()
        _call(fn)
        for spec, _, calling_fn, asked in decisions:
            if sandbox is None:  # unconfined: torch.hub's trust_repo rules, asked of check_trust
                assert asked == (spec, "check", calling_fn), name
            else:  # confined code needs no trust: nobody is asked
                assert asked is None, name


def test_an_untrusted_repo_is_refused_by_every_entry_point_before_any_fetch(
    decisions: list[tuple[str, Any, str, Any]],
) -> None:
    for name, fn in _entry_points(None).items():
        decisions.clear()
        _call(fn)
        assert decisions and all(asked is not None for *_, asked in decisions), name
        assert not (Path(isolhub.get_dir()) / "repos").exists(), name


PACKAGE = Path(isolhub.__file__).parent
_TRUST_INTERNALS = {"check_trust", "is_trusted", "_prompt", "_add"}


def test_only_admit_decides_trust() -> None:
    """No module but `_source.trust` reaches its rules; every other module asks `_source.trust.admit`."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "_source/trust.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = None
            if isinstance(node, ast.Name):
                name = node.id
            elif isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.alias):
                name = node.name
            if name in _TRUST_INTERNALS or (isinstance(node, ast.alias) and name == "admit"):
                offenders.append(
                    f"{path.relative_to(PACKAGE).as_posix()}:{getattr(node, 'lineno', '?')} {name}"
                )
    assert not offenders, offenders


def test_fetching_decides_nothing_about_trust() -> None:
    params = inspect.signature(fetch_snapshot).parameters
    assert not {"trusted", "trust_repo", "calling_fn"} & set(params)


def test_hub_options_is_the_one_carrier_of_a_calls_options() -> None:
    carried = {"trust_repo", "force_reload", "skip_validation", "sandbox"}
    carriers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                fields = {
                    s.target.id
                    for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                }
                if fields & carried:
                    carriers.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.name}")
    assert carriers == ["_options.py:HubOptions"]
