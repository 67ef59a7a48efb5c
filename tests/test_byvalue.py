"""Which modules a worker ships by value: those loaded from the snapshot, found without a scan."""

from __future__ import annotations

import fractions
import importlib.util
import inspect
import os
import pickle
import sys
import textwrap
import traceback
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from isolhub._transport import byvalue as _byvalue


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


@pytest.fixture
def by_value_module(tmp_path: Path) -> Iterator[types.ModuleType]:
    """A module imported from a file and registered to be pickled by value, as a repo's are."""
    name = f"isolhub_test_byvalue_{uuid.uuid4().hex}"
    path = tmp_path / f"{name}.py"
    path.write_text(
        textwrap.dedent('''
            def double(x):
                """Twice x."""
                return 2 * x


            def fail():
                raise ValueError("from the snapshot")


            class Box:
                def get(self):
                    return 1
        ''')
    )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    try:
        yield module
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        sys.modules.pop(name, None)


def _round_trip(obj: object) -> object:
    data, fd, layout = _byvalue.dumps(obj)
    return _byvalue.loads(data, fd, layout)


def test_by_value_code_keeps_its_file_and_line_numbers(by_value_module: types.ModuleType) -> None:
    double = _round_trip(by_value_module.double)
    box = _round_trip(by_value_module.Box)
    assert double is not by_value_module.double and double(3) == 6
    assert double.__code__.co_filename == by_value_module.__file__
    assert double.__code__.co_firstlineno == by_value_module.double.__code__.co_firstlineno
    assert box.get.__code__.co_filename == by_value_module.__file__
    assert inspect.getsource(double) == inspect.getsource(by_value_module.double)


def test_a_traceback_through_by_value_code_shows_the_source_line(
    by_value_module: types.ModuleType,
) -> None:
    fail = _round_trip(by_value_module.fail)
    with pytest.raises(ValueError) as info:
        fail()
    last = traceback.extract_tb(info.tb)[-1]
    assert (last.filename, last.lineno) == (by_value_module.__file__, 8)
    assert last.line == 'raise ValueError("from the snapshot")'


def test_code_marshal_cannot_hold_still_keeps_its_file(by_value_module: types.ModuleType) -> None:
    code = by_value_module.double.__code__
    odd = code.replace(co_consts=(*code.co_consts, fractions.Fraction(1, 3)))
    back = _round_trip(odd)
    assert back.co_filename == by_value_module.__file__
    assert back.co_consts[-1] == fractions.Fraction(1, 3)


def test_a_torchscript_function_of_an_importable_module_arrives_as_that_same_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    name = f"isolhub_test_scripted_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\n\n\n@torch.jit.script\ndef plus_one(x: torch.Tensor) -> torch.Tensor:\n"
        "    return x + 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    try:
        assert _round_trip(module.plus_one) is module.plus_one
        assert _round_trip(torch.ops) is torch.ops
    finally:
        sys.modules.pop(name, None)


def test_a_torchscript_function_without_python_source_is_refused_when_pickled() -> None:
    import torch

    unit = torch.jit.CompilationUnit("def twice(x: int) -> int:\n    return 2 * x\n")
    with pytest.raises(pickle.PicklingError, match="not compiled from a Python function"):
        _byvalue.dumps(unit.twice)


def test_the_remembered_real_path_of_a_module_file_is_what_os_path_realpath_says(
    tmp_path: Path,
) -> None:
    from isolhub._transport.byvalue import _realpath

    (tmp_path / "real/pkg").mkdir(parents=True)
    (tmp_path / "real/pkg/a.py").write_text("")
    (tmp_path / "elsewhere.py").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")  # a symlinked folder
    (tmp_path / "real/pkg/b.py").symlink_to(tmp_path / "elsewhere.py")  # a symlinked file
    for path in ["link/pkg/a.py", "link/pkg/b.py", "real/pkg/../pkg/a.py", "link/", "gone.py"]:
        assert _realpath(str(tmp_path / path)) == os.path.realpath(tmp_path / path), path
    assert _realpath("relative/x.py") == os.path.realpath("relative/x.py")
