"""Warnings raised in a worker are re-issued in the caller, through the caller's filters.

torch.hub runs the repo in the caller, so `warnings.catch_warnings(record=True)`, `-W error` and
pytest's filters see its warnings. Each test here raises one in the worker (at hubconf import, in
an entrypoint, in a remote call) and checks the caller gets it once, with category, message,
filename and line, and that hostile worker data about warnings is bounded or refused.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import isolhub as hub
from isolhub._errors import ProtocolError

from hubrepos import CHANNEL, make_repo, spec_of

HUBCONF = '''
import warnings

import torch
import torch.nn as nn

if __import__("os").environ.get("WARN_AT_IMPORT"):
    warnings.warn("hubconf imported", UserWarning)  # line 8


class ArchWarning(DeprecationWarning):
    pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        warnings.warn("forward ran", RuntimeWarning)  # line 21
        return self.fc(x)


def net():
    """Doc."""
    warnings.warn("legacy format", FutureWarning)  # line 27
    return Net()


def arch():
    warnings.warn("old arch", ArchWarning)  # line 32
    return 1


def traced():
    warnings.warn("a tracer warning", torch.jit.TracerWarning)  # line 37
    return 1


def leak(path):
    open(path).read()  # line 42: the file object is freed unclosed: a ResourceWarning
    return 1


def loop():
    warnings.warn("x" * 100_000, UserWarning)  # line 47
    for _ in range(1000):
        warnings.warn("again", UserWarning)  # line 49
    for i in range(1000):
        warnings.warn(f"distinct {i}", UserWarning)  # line 51
    return 1
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warn") / "repo"
    root.mkdir()
    (root / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    return root


def caught(fn, *args, **kwargs) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [w for w in log if w.filename.endswith("hubconf.py")]


def one(log: list[warnings.WarningMessage]) -> warnings.WarningMessage:
    assert len(log) == 1, [str(w.message) for w in log]
    return log[0]


def test_a_warning_in_an_entrypoint_is_raised_in_the_caller_with_its_origin(repo: Path) -> None:
    for fn, kwargs in (
        (hub.load, {}),
        (hub.load, {"mode": "state_dict"}),
        (hub.load_state_dict, {}),
        (hub.load, {"mode": "remote"}),
        (hub.load, {"mode": "state_dict", "sandbox": "strict"}),
    ):
        w = one(caught(fn, str(repo), "net", source="local", verbose=False, **kwargs))
        assert w.category is FutureWarning and str(w.message) == "legacy format", kwargs
        assert w.filename == str(repo / "hubconf.py") and w.lineno == 27, kwargs


def test_a_warning_at_hubconf_import_reaches_list_help_and_load(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARN_AT_IMPORT", "1")
    for fn, args in ((hub.list, ()), (hub.help, ("net",)), (hub.load, ("arch",))):
        log = caught(fn, str(repo), *args, source="local", verbose=False)
        w = [w for w in log if w.lineno == 8]
        assert len(w) == 1 and w[0].category is UserWarning, fn
        assert str(w[0].message) == "hubconf imported"


def test_a_warning_in_a_remote_call_is_raised_in_the_caller(repo: Path) -> None:
    with pytest.warns(FutureWarning, match="legacy format"):
        m = hub.load(str(repo), "net", source="local", mode="remote", verbose=False)
    with m:
        w = one(caught(m, torch.ones(1, 2)))
    assert w.category is RuntimeWarning and str(w.message) == "forward ran" and w.lineno == 21


def test_the_callers_error_filter_turns_a_worker_warning_into_the_exception(repo: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(FutureWarning, match="legacy format"):
            hub.load(str(repo), "net", source="local", verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            assert isinstance(
                hub.load(str(repo), "net", source="local", verbose=False), torch.nn.Module
            )


def test_an_error_filter_on_a_resource_warning_goes_to_the_unraisable_hook_as_in_one_process(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In one process a ResourceWarning is raised by a finalizer: an "error" filter cannot make the
    # call fail, the exception is reported through sys.unraisablehook. The worker's is the same.
    (tmp_path / "f").write_text("x")
    seen: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        assert hub.load(str(repo), "leak", str(tmp_path / "f"), source="local", verbose=False) == 1
    (args,) = seen
    assert isinstance(args.exc_value, ResourceWarning) and "unclosed file" in str(args.exc_value)
    assert args.exc_value.__traceback__ is args.exc_traceback


@pytest.mark.slow
def test_dash_w_error_makes_the_load_raise_as_torch_hub_would(repo: Path) -> None:
    code = (
        "import isolhub, sys\n"
        "try:\n"
        f"    isolhub.load({str(repo)!r}, 'net', source='local', verbose=False)\n"
        "except FutureWarning as e:\n"
        "    print('raised', e); sys.exit(3)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 3, out.stderr
    assert "raised legacy format" in out.stdout


def test_pytest_warns_sees_a_worker_warning(repo: Path) -> None:
    with pytest.warns(FutureWarning, match="legacy format"):
        hub.load(str(repo), "net", source="local", verbose=False)


@pytest.mark.slow
def test_a_worker_warning_is_printed_once_with_its_source_line(repo: Path) -> None:
    code = f"import isolhub; isolhub.load({str(repo)!r}, 'net', source='local', verbose=False)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("legacy format") == 2, out.stderr  # the message and the source line
    assert f"{repo / 'hubconf.py'}:27: FutureWarning: legacy format" in out.stderr
    assert 'warnings.warn("legacy format", FutureWarning)' in out.stderr


def test_a_repo_defined_category_becomes_a_same_named_subclass_of_its_nearest_builtin_base(
    repo: Path,
) -> None:
    w = one(caught(hub.load, str(repo), "arch", source="local", verbose=False))
    assert issubclass(w.category, DeprecationWarning) and w.category is not DeprecationWarning
    assert w.category.__name__ == "ArchWarning" and str(w.message) == "old arch"
    again = one(caught(hub.load, str(repo), "arch", source="local", verbose=False))
    assert again.category is w.category  # one class per category, so filters and registries hold
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with pytest.raises(DeprecationWarning, match="old arch"):
            hub.load(str(repo), "arch", source="local", verbose=False)


def test_a_category_the_caller_has_imported_is_that_class(repo: Path) -> None:
    w = one(caught(hub.load, str(repo), "traced", source="local", verbose=False))
    assert w.category is torch.jit.TracerWarning


def test_a_flood_of_warnings_is_bounded_and_says_how_many_were_dropped(repo: Path) -> None:
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        assert hub.load(str(repo), "loop", source="local", verbose=False) == 1
    from_repo = [w for w in log if w.filename.endswith("hubconf.py")]
    assert len([w for w in from_repo if str(w.message) == "again"]) == 1  # duplicates collapse
    assert 10 <= len(from_repo) <= 100
    huge = [w for w in from_repo if w.lineno == 47]
    assert len(huge) == 1 and str(huge[0].message).startswith("xxxx")
    assert all(len(str(w.message)) <= 8192 for w in from_repo)
    dropped = [w for w in log if "more warnings" in str(w.message)]
    assert len(dropped) == 1 and "isolhub" in str(dropped[0].message)


FORGE = (
    CHANNEL
    + """
import time
from isolhub._transport.codec import encode, send_frame

def forge(records):
    send_frame(channel(), encode({"effects": {"warnings": records}}))
    send_frame(channel(), encode({"ok": True, "kind": "value", "body": encode(1), "layout": []}))
    time.sleep(30)
"""
)

GOOD = "{'category': ['builtins.UserWarning'], 'message': 'm', 'filename': 'f.py', 'lineno': 1, 'module': 'f'}"
FORGED = {
    "not_a_list": "{'x': 1}",
    "record_not_a_dict": "[1]",
    "lineno_not_int": f"[dict({GOOD}, lineno='1')]",
    "message_not_str": f"[dict({GOOD}, message=b'm')]",
    "too_many": f"[{GOOD}] * 100_000",
    "huge_message": f"[dict({GOOD}, message='m' * 1_000_000)]",
    "category_not_names": f"[dict({GOOD}, category=[1])]",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_warning_record_is_a_protocol_error_and_nothing_is_issued(
    tmp_path: Path, case: str
) -> None:
    repo = make_repo(
        tmp_path / "forge", {"hubconf.py": FORGE + f"\n\ndef evil():\n    forge({FORGED[case]})\n"}
    )
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with pytest.raises(ProtocolError):
            hub.load(spec_of(repo), "evil", mode="state_dict", trust_repo=True, verbose=False)
    assert not [w for w in log if w.filename == "f.py"]


def test_a_forged_category_never_imports_or_reads_beyond_what_the_caller_has(
    tmp_path: Path,
) -> None:
    record = (
        "[{'category': ['os.system', 'json.decoder.JSONDecodeError', 'nosuchmodule_xyz.W', "
        "'builtins.SyntaxWarning'], 'message': 'm', 'filename': 'f.py', 'lineno': 3, "
        "'module': 'f'}]"
    )
    repo = make_repo(
        tmp_path / "forge", {"hubconf.py": FORGE + f"\n\ndef evil():\n    forge({record})\n"}
    )
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        with pytest.raises(ProtocolError):  # the forged reply is followed by a sleep: killed
            hub.load(
                spec_of(repo), "evil", mode="state_dict", trust_repo=True, verbose=False, timeout=5
            )
    assert "nosuchmodule_xyz" not in sys.modules
    w = [w for w in log if w.filename == "f.py"]
    assert len(w) == 1 and issubclass(w[0].category, SyntaxWarning)
    assert w[0].category.__name__ == "system"
