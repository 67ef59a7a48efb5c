"""Build real git hub repositories for tests (no network): `make_repo(path, {file: text})`."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

# Hubconf source for hostile tests: `channel()` is a new socket object on the worker's channel to
# the parent (found in /proc/self/fd), to send it frames of the repo's own making.
CHANNEL = """
import os, socket

def channel():
    for fd in sorted(int(f) for f in os.listdir("/proc/self/fd")):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                return socket.socket(fileno=os.dup(fd))
        except OSError:
            pass
"""

GIT = ["git", "-c", "user.name=isolhub tests", "-c", "user.email=tests@isolhub.invalid"]


def commit(repo: Path, files: dict[str, str | None], *, tag: str | None = None) -> str:
    """Write (or, for None, delete) `files` in `repo`, commit, optionally tag; return the SHA."""
    for name, text in files.items():
        path = repo / name
        if text is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-q", "-m", "update"], check=True)
    if tag:
        subprocess.run([*GIT, "-C", str(repo), "tag", tag], check=True)
    return subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def make_repo(path: Path, files: dict[str, str | None], *, tag: str | None = None) -> Path:
    """A new git repository at `path` (branch main) with one commit of `files`."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    commit(path, files, tag=tag)
    return path


def spec_of(repo: Path, ref: str | None = None) -> str:
    """The isolhub spec of a local repository at `ref`."""
    return f"git+file://{repo}" + (f"@{ref}" if ref else "")


def net_files(version: str, width: int, act: str = "ReLU") -> dict[str, str | None]:
    """A repo with a `model/` package and a top-level `utils.py`, the names that collide."""
    return {
        "hubconf.py": f'''
            """net {version}"""
            dependencies = ["torch"]
            from model.net import Net


            def net(pretrained=False, scale=1.0):
                """Build Net {version}."""
                return Net(scale)
        ''',
        "model/__init__.py": "",
        "model/net.py": f"""
            import torch
            import torch.nn as nn
            from utils import VERSION


            class Net(nn.Module):
                version = VERSION

                def __init__(self, scale):
                    super().__init__()
                    self.fc = nn.Linear(4, {width})
                    self.act = nn.{act}()
                    with torch.no_grad():
                        self.fc.weight.copy_(torch.arange(4 * {width}).reshape({width}, 4) * scale)
                        self.fc.bias.fill_({width})

                def forward(self, x):
                    return self.act(self.fc(x))
        """,
        "utils.py": f'VERSION = "{version}"\n',
    }
