"""Which modules a worker ships by value: those loaded from the snapshot, found without a scan."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from isolhub import _byvalue


@pytest.fixture
def marked() -> Iterator[None]:
    saved = _byvalue._MARK
    _byvalue.mark_loaded_modules()
    yield
    _byvalue._MARK = saved


def _add(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module
    return module


def test_only_modules_loaded_after_the_mark_are_looked_at(marked: None) -> None:
    try:
        a, b = _add("isolhub_test_new_a"), _add("isolhub_test_new_b")
        assert _byvalue._modules_since_mark() == [
            ("isolhub_test_new_b", b),
            ("isolhub_test_new_a", a),
        ]
    finally:
        sys.modules.pop("isolhub_test_new_a", None)
        sys.modules.pop("isolhub_test_new_b", None)


def test_removing_an_older_module_falls_back_to_every_module(marked: None) -> None:
    first, older = list(sys.modules)[:2]
    saved = sys.modules.pop(older)
    try:
        new = _add("isolhub_test_new_c")
        seen = dict(_byvalue._modules_since_mark())
        assert seen["isolhub_test_new_c"] is new and first in seen
    finally:
        sys.modules.pop("isolhub_test_new_c", None)
        sys.modules[older] = saved


def test_replacing_the_marked_module_falls_back_to_every_module(marked: None) -> None:
    newest = next(reversed(sys.modules))
    saved = sys.modules.pop(newest)
    try:
        _add("isolhub_test_new_d")
        sys.modules[newest] = types.ModuleType(newest)  # re-imported: now after the new one
        seen = dict(_byvalue._modules_since_mark())
        assert "isolhub_test_new_d" in seen and next(iter(sys.modules)) in seen
    finally:
        sys.modules.pop("isolhub_test_new_d", None)
        sys.modules[newest] = saved
