"""Type information: public signatures take `Literal`s, so a type checker catches a mistyped mode."""

from __future__ import annotations

import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import isolhub
from isolhub._types import Mode, Source, TrustRepo


def _hints(fn: object) -> dict[str, object]:
    names = {**vars(isolhub._types), "Sandbox": isolhub.Sandbox}
    return typing.get_type_hints(fn, localns=names)


def _is_sandbox_arg(hint: object) -> bool:
    return "Literal['strict']" in str(hint) and "Sandbox" in str(hint) and "None" in str(hint)


@pytest.mark.parametrize("fn", [isolhub.load, isolhub.load_state_dict, isolhub.list, isolhub.help])
def test_the_public_functions_take_literals(fn: object) -> None:
    hints = _hints(fn)
    assert hints["source"] == Source and hints["trust_repo"] == TrustRepo
    assert _is_sandbox_arg(hints["sandbox"])
    if fn is isolhub.load:
        assert hints["mode"] == Mode
    assert typing.get_args(Mode) == ("module", "state_dict", "remote")


def test_hub_and_compare_take_literals() -> None:
    hub = _hints(isolhub.Hub.__init__)
    assert typing.get_args(hub["backend"]) == ("local", "ray")
    assert _is_sandbox_arg(hub["sandbox"]) and hub["trust_repo"] == TrustRepo
    assert typing.get_args(_hints(isolhub.compare)["mode"]) == ("module", "remote")


def test_the_package_ships_py_typed() -> None:
    assert (Path(isolhub.__file__).parent / "py.typed").is_file()


@pytest.mark.slow
def test_mypy_flags_a_mistyped_mode_in_user_code(tmp_path: Path) -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed (it comes with the test extras)")
    user = tmp_path / "user.py"
    user.write_text(
        "import isolhub\n"
        "isolhub.load('o/r', 'net', mode='remot')\n"
        "isolhub.load('o/r', 'net', mode='remote', sandbox='strict', trust_repo=True)\n"
    )
    # torch is left out of the analysis (as Any): checking it is what makes mypy slow.
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nfollow_imports = silent\n"
        "[mypy-torch.*,numpy.*,safetensors.*,requests.*,filelock.*]\nfollow_imports = skip\n"
    )
    out = subprocess.run(
        [mypy, "--no-incremental", "--config-file", str(config), str(user)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(isolhub.__file__).parent.parent,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "user.py:2:" in errors[0] and "mode" in errors[0], out.stdout


@pytest.mark.slow
def test_mypy_is_clean_over_the_package() -> None:
    """As `scripts/test` checks it (pyproject's `[tool.mypy]`), so the suite alone catches a slip."""
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.skip("mypy is not installed (it comes with the test extras)")
    root = Path(isolhub.__file__).resolve().parent.parent
    out = subprocess.run([mypy], capture_output=True, text=True, timeout=900, cwd=root)
    assert out.returncode == 0, out.stdout + out.stderr
