"""The pool's progress shows workers starting, before any result: a bar on a tty, lines elsewhere."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from isolhub._progress import PoolProgress

from hubrepos import make_repo, net_files, spec_of


@pytest.fixture
def specs_file(tmp_path: Path) -> Path:
    repo = make_repo(tmp_path / "r", net_files("v1", width=3), tag="v1")
    f = tmp_path / "specs.txt"
    f.write_text(f"{spec_of(repo, 'v1')}\n{spec_of(repo, 'main')}\n")
    (tmp_path / "fns.py").write_text("def width(model):\n    return model.fc.out_features\n")
    return f


def run_argv(specs_file: Path) -> list[str]:
    fn = f"{specs_file.parent / 'fns.py'}:width"
    return [sys.executable, "-m", "isolhub", "run", str(specs_file), "--entry", "net", "--fn", fn]


@pytest.mark.slow
def test_plain_lines_say_workers_are_starting_before_the_first_result(specs_file: Path) -> None:
    out = subprocess.run(
        run_argv(specs_file),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    starting = [i for i, line in enumerate(lines) if "starting 2 workers" in line]
    first_result = next(i for i, line in enumerate(lines) if "[1/2]" in line)
    assert starting and starting[0] < first_result, lines
    assert lines[starting[0]].startswith("isolhub: [0/2]")


@pytest.mark.slow
def test_the_bar_on_a_terminal_says_workers_are_starting(specs_file: Path) -> None:
    master, slave = pty.openpty()
    # A terminal of 30 rows by 120 columns (a fresh pty has 0 by 0, where tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        run_argv(specs_file),
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")
    text = seen.decode(errors="replace")
    assert "starting" in text and "\r" in text, text  # tqdm redraws in place
    assert "isolhub: [0/2]" not in text  # no plain lines on a terminal


def test_the_counts_follow_starting_running_and_done() -> None:
    stream = io.StringIO()
    p = PoolProgress(3, True, stream)
    p.started(0)
    p.started(1)
    p.launched(2)
    assert "isolhub: [0/3] starting 2 workers for 3 specs" in stream.getvalue()
    assert (p.starting, p.running) == (2, 0)
    p.running_now(0)
    assert (p.starting, p.running) == (1, 1)

    class Done:
        ok, index = True, 0

        def summary(self) -> str:
            return "ok"

    p.finished(Done())
    assert (p.starting, p.running, p.done) == (1, 0, 1)
    assert "starting 1, running 0" in stream.getvalue().splitlines()[-1]
