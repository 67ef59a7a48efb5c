"""No worker text reaches the terminal raw: control sequences are escaped, output is capped.

Each hubconf entrypoint here writes raw OSC/CSI sequences (window title, OSC 52 clipboard
write, clear screen) where the parent prints or raises: in its output, an exception, a
docstring, an entrypoint name, a repr. The parent must show them escaped (`\\x1b`), keep a
docstring's newlines and tabs, and cap how much output it forwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import isolhub as hub
from isolhub._cli.main import main
from isolhub._escape import escape_controls

from hubrepos import make_repo, spec_of

ESC = "\x1b"
TITLE = "\x1b]0;pwned\x07"
CLIPBOARD = "\x1b]52;c;cHduZWQ=\x07"
CLEAR = "\x1b[2J\x1b[H"

HUBCONF = r'''
import sys
import torch.nn as nn

globals()["evil\x1b[2J"] = lambda: 1


def docs():
    """Line one\x1b]52;c;cHduZWQ=\x07
	tab-indented line\x1b]0;pwned\x07"""


def raises():
    raise ValueError("boom \x1b]0;pwned\x07 \x1b[2J\x1b[H")


def chatter():
    print("hello \x1b]0;pwned\x07 \x1b]52;c;cHduZWQ=\x07 \x1b[2J\x1b[H", flush=True)
    print("10%\r20%", flush=True)
    return {"w": __import__("torch").ones(1)}


def shout(mib=64):
    line = "\x1b]52;c;cHduZWQ=\x07" + "x" * 1000 + "\n"
    written = 0
    while written < mib << 20:
        sys.stdout.write(line)
        written += len(line)
    sys.stdout.flush()
    return written


def warns():
    import warnings

    warnings.warn("careful \x1b]0;pwned\x07\x1b[2J")
    return {"w": __import__("torch").ones(1)}


class Sly(nn.Module):
    def __repr__(self):
        return "sly \x1b]0;pwned\x07\x1b[2J"

    def __len__(self):
        raise TypeError("no \x1b]0;pwned\x07 here")


def sly():
    return Sly()
'''


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> str:
    return spec_of(make_repo(tmp_path_factory.mktemp("evil") / "repo", {"hubconf.py": HUBCONF}))


def test_unconfined_torch_hub_passes_the_sequences_to_the_terminal_raw(
    evil: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The twin: without isolhub's escaping, the same repo writes its sequences as they are."""
    import torch.hub

    path = evil.removeprefix("git+file://")
    with pytest.raises(ValueError, match="boom") as info:
        torch.hub.load(path, "raises", source="local", trust_repo=True, verbose=False)
    assert TITLE in str(info.value) and CLEAR in str(info.value)
    torch.hub.load(path, "chatter", source="local", trust_repo=True, verbose=False)
    assert f"hello {TITLE} {CLIPBOARD} {CLEAR}" in capfd.readouterr().out


def test_a_remote_error_shows_the_workers_escape_sequences_escaped(evil: str) -> None:
    raw = f"boom {TITLE} {CLEAR}"
    with pytest.raises(hub.RemoteError) as info:
        hub.load(evil, "raises", trust_repo=True, verbose=False)
    e = info.value
    assert ESC not in str(e) and ESC not in e.remote_traceback
    assert e.remote_message == escape_controls(raw) != raw  # the worker did send them raw
    assert "boom \\x1b]0;pwned\\x07" in str(e)


def test_a_sandboxed_remote_error_is_escaped_too(evil: str) -> None:
    with pytest.raises(hub.RemoteError) as info:
        hub.load(evil, "raises", mode="remote", sandbox="strict")
    assert ESC not in str(info.value) and "\\x1b[2J" in str(info.value)


def test_isolhub_list_prints_entrypoint_names_escaped(
    evil: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "evil\x1b[2J" in hub.list(evil, trust_repo=True, verbose=False)  # the API: as is
    assert main(["list", evil, "--trust"]) == 0
    out = capsys.readouterr().out
    assert ESC not in out and "evil\\x1b[2J" in out.splitlines()


def test_isolhub_help_prints_a_docstring_escaped_with_its_lines_and_tabs(
    evil: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["help", evil, "docs", "--trust"]) == 0
    out = capsys.readouterr().out
    assert ESC not in out and "\x07" not in out
    assert "Line one\\x1b]52;c;cHduZWQ=\\x07\n\ttab-indented line\\x1b]0;pwned\\x07" in out


@pytest.mark.parametrize("sandbox", [None, "strict"])
def test_forwarded_worker_output_is_escaped(
    evil: str, capsys: pytest.CaptureFixture[str], sandbox: str | None
) -> None:
    hub.load_state_dict(evil, "chatter", trust_repo=True, verbose=False, sandbox=sandbox)
    err = capsys.readouterr().err
    assert "hello \\x1b]0;pwned\\x07 \\x1b]52;c;cHduZWQ=\\x07 \\x1b[2J\\x1b[H\n" in err
    assert ESC not in err and "\x07" not in err
    # A trusted worker's progress bar redraws its line; a confined one may not overwrite lines.
    assert ("10%\r20%\n" if sandbox is None else "10%\\x0d20%\n") in err


def test_forwarded_worker_output_is_capped_in_rate_with_a_note(
    evil: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with hub.Hub(max_workers=1, trust_repo=True) as h:
        [r] = h.map(None, [evil], "shout")
    assert r.ok and r.value >= 64 << 20  # the worker did write 64 MiB
    err = capsys.readouterr().err
    assert len(err) < 40 << 20  # a 4 MiB burst and 1 MiB/s: the write would take half a minute
    assert "[isolhub: dropped " in err and "bytes of output from worker pid" in err
    assert ESC not in err


def test_a_confined_workers_forwarded_output_is_capped_at_its_file_size(
    evil: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cap = 1 << 20  # under the burst: only the total stops it
    with hub.Hub(max_workers=1, sandbox=hub.Sandbox(file_size_bytes=cap)) as h:
        [r] = h.map(None, [evil], "shout", kwargs={"mib": 8})
    assert r.ok and r.value >= 8 << 20
    err = capsys.readouterr().err
    # The cap counts the worker's bytes; each line's two controls grow by 6 once escaped.
    assert cap - 2000 < len(err.encode()) < cap + 6 * (cap // 1000) + 1000
    assert f"over its cap of 1048576 bytes/s with bursts of 4194304, {cap} bytes in all" in err


def test_a_remote_objects_repr_is_escaped(evil: str) -> None:
    with hub.load(evil, "sly", mode="remote", sandbox="strict") as m:
        text = repr(m)
    assert ESC not in text and "sly \\x1b]0;pwned\\x07\\x1b[2J" in text


def test_an_error_a_remote_object_raises_is_escaped(evil: str) -> None:
    with hub.load(evil, "sly", mode="remote", sandbox="strict") as m:
        with pytest.raises(TypeError) as info:
            len(m)
    assert ESC not in str(info.value) and "no \\x1b]0;pwned\\x07 here" in str(info.value)


def test_escape_controls_keeps_text_and_escapes_every_control() -> None:
    assert escape_controls("naïve — ok\n\tdone") == "naïve — ok\n\tdone"
    assert escape_controls("\x9b2J\u202eevil\r\x00") == "\\x9b2J\\u202eevil\\x0d\\x00"
    assert escape_controls("a\nb\tc", keep_lines=False) == "a\\x0ab\\x09c"


def test_the_escaping_is_visible_and_stable(tmp_path: Path) -> None:
    once = escape_controls(TITLE + CLIPBOARD + CLEAR)
    assert escape_controls(once) == once and ESC not in once


def test_a_workers_warning_is_reissued_escaped(evil: str) -> None:
    with pytest.warns(UserWarning) as record:
        hub.load_state_dict(evil, "warns", sandbox="strict")
    [text] = [str(w.message) for w in record if "careful" in str(w.message)]
    assert text == "careful \\x1b]0;pwned\\x07\\x1b[2J"
