"""`python -m isolhub.run [options] script.py [args...]`: run a script with torch.hub patched.

The script runs as `__main__` (as `python script.py` would run it: `sys.argv` is
`[script.py, args...]` and the script's folder is first on `sys.path`), with
`isolhub.patched_torch_hub(...)` on, so every `torch.hub.load` it makes is served by isolhub.
`-m module` runs a module instead, as `python -m module` does. Options go before the script:

    --mode {module,state_dict,remote}   what torch.hub.load returns (default: module)
    --sandbox strict                    confine the workers (needs --mode remote or state_dict)
    --timeout SECONDS                   kill a worker whose call takes longer than this
    --seed N                            seed torch, random and numpy in each worker first

The shared flags are declared once, in `isolhub._cli.common.FLAGS`, as for `isolhub`.

Example:
    $ python -m isolhub.run --mode remote --sandbox strict eval.py --batch 8

The exit status is the script's; 2 when the options are wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import sys

from ._cli.common import add_flags, sandbox_of
from ._errors import IsolhubError
from ._options import MODES
from ._patch import patched_torch_hub

__all__ = ["main"]

_TAKES_VALUE = ("--mode", "--sandbox", "--timeout", "--seed")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m isolhub.run",
        usage="%(prog)s [options] (script.py | -m module) [args ...]",
        description="Run a Python script with torch.hub routed to isolhub.",
    )
    p.add_argument("--mode", choices=MODES, default="module", help="what torch.hub.load returns")
    add_flags(p, "--sandbox", "--timeout", "--seed")
    p.add_argument("-m", dest="module", metavar="module", help="run a module, as python -m does")
    return p


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(isolhub's options, [script or -m module, its args...]): options end at the first
    positional, `-m module` or `--`."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return argv[:i], argv[i + 1 :]
        if arg == "-m":
            return argv[: i + 2], argv[i + 2 :]
        if arg in _TAKES_VALUE:
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            return argv[:i], argv[i:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    """Run the script or module named in `argv` (default `sys.argv[1:]`) with torch.hub patched.

    Example:
        >>> from pathlib import Path
        >>> _ = Path("eval.py").write_text(
        ...     "import sys, torch\\n"
        ...     "with torch.hub.load(sys.argv[1], 'net', source='local') as m:\\n"
        ...     "    print(type(m).__name__, m(torch.ones(1, 4)).shape)\\n")
        >>> main(["--mode", "remote", "eval.py", repo])   # `repo`: a folder with a hubconf.py
        RemoteModule torch.Size([1, 2])
        0

    Raises:
        SystemExit: whatever the script raises (its exit status), or 2 for bad options.
    """
    own, rest = _split(list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    opts = parser.parse_args(own)
    if opts.module is None and not rest:
        parser.error("name a script to run (or -m module)")
    saved_argv, saved_path = sys.argv, list(sys.path)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                patched_torch_hub(
                    mode=opts.mode, sandbox=sandbox_of(opts), timeout=opts.timeout, seed=opts.seed
                )
            )
        except IsolhubError as e:
            parser.error(str(e))
        try:
            if opts.module is not None:
                sys.argv = [opts.module, *rest]  # runpy puts the module's file name first
                runpy.run_module(opts.module, run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(rest)
                sys.path[0:1] = [os.path.dirname(os.path.abspath(rest[0]))]
                runpy.run_path(rest[0], run_name="__main__")
        finally:
            sys.argv = saved_argv
            sys.path[:] = saved_path
    return 0


if __name__ == "__main__":
    sys.exit(main())
