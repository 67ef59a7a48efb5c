"""`isolhub run`: one function over an entrypoint of many repos, each in its own worker.

    $ cat specs.txt
    # one spec per line
    git+file:///srv/nets/a.git@v1
    owner/repo:v2
    $ isolhub run specs.txt --entry model --fn harness:evaluate --kw pretrained=false \\
          --workers 4 --timeout 300 --memory 4G --jsonl results.jsonl
    ok      git+file:///srv/nets/a.git@v1  57dad2b49707  {"top1": 0.71}
    FAILED  owner/repo:v2  0b1c2d3e4f5a  WorkerCrashedError: ... killed by SIGSEGV (-11)

Results stream to stdout as they finish (`--ordered` keeps the file's order); a progress bar
(done / failed / running, ETA) goes to stderr, or plain lines when stderr is not a terminal.
Exit codes: 0 every spec succeeded, 1 some failed, 2 an error (bad file, --fn not found),
130 interrupted (running workers are killed first).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .._errors import IsolhubError, UsageError
from .._escape import escape_controls
from .common import (
    EXIT_DIFFERENT,
    EXIT_OK,
    add_flags,
    cli_message,
    env_of,
    output_flags,
    parse_kw,
    sandbox_of,
    trust_of,
)

__all__ = ["add_commands", "cmd_run", "load_function", "parse_size", "read_specs", "result_record"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`4G`, `512M`, `1.5GiB`, `1000000` → bytes (K/M/G/T are powers of 1024).

    Example:
        >>> parse_size("1.5G")
        1610612736

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4G, 512M, 1073741824)")
    scale = 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    return int(float(m.group(1)) * scale)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count")
    return n


def _positive(text: str) -> int:
    n = _count(text)
    if n == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def read_specs(path: str) -> list[str]:
    """Specs from a file (`-`: stdin): one a line; blank lines and `#` comments ignored.

    Example:
        >>> _ = Path("specs.txt").write_text("# two refs\\ngit+file:///srv/a.git@v1\\n\\nowner/repo:v2\\n")
        >>> read_specs("specs.txt")
        ['git+file:///srv/a.git@v1', 'owner/repo:v2']

    Raises:
        UsageError: the file cannot be read or holds no spec.
    """
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise UsageError(f"cannot read the specs file {path}: {e.strerror or e}") from e
    specs = []
    for line in text.splitlines():
        spec = re.sub(r"\s+#.*$", "", line).strip()
        if spec and not spec.startswith("#"):
            specs.append(spec)
    if not specs:
        raise UsageError(f"the specs file {path} holds no spec (one per line, '#' for comments)")
    return specs


def load_function(text: str) -> Callable[..., Any]:
    """Import `module:function` (or `path/to/file.py:function`) for `--fn`.

    A module is looked up from the current directory first, as `python -m` does.

    Example:
        >>> _ = Path("harness.py").write_text("def evaluate(model):\\n    return 1\\n")
        >>> load_function("harness.py:evaluate")
        <function evaluate at 0x...>

    Raises:
        UsageError: the module or the function cannot be found.
    """
    module_name, sep, attr = text.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--fn {text!r}: expected module:function or file.py:function")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name).resolve()
            name = f"_isolhub_run_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None or not path.is_file():
                raise ImportError(f"no Python file at {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # cloudpickle ships it by value from there
            spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(cwd)
        fn: Any = module
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        raise UsageError(f"--fn {text!r}: {type(e).__name__}: {e}") from e
    if not callable(fn):
        raise UsageError(f"--fn {text!r} is a {type(fn).__name__}, not a function")
    return fn


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # tensors
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


def result_record(r: Any) -> dict[str, Any]:
    """A `Result` as a JSON-ready dict (dump it with `default=_jsonable` for tensors, bytes).

    Example:
        >>> from isolhub import Result, WorkerCrashedError
        >>> r = Result("owner/net:v1", None, False, error=WorkerCrashedError("it died"))
        >>> record = result_record(r)
        >>> record["ok"], record["error_type"], record["error"]
        (False, 'WorkerCrashedError', 'it died')
    """
    return {
        "index": r.index,
        "spec": str(r.spec),
        "sha": r.sha,
        "ok": r.ok,
        "value": r.value,
        "error_type": None if r.error is None else type(r.error).__name__,
        "error": _error_text(r.error),
        "elapsed": round(r.elapsed, 4),
        "returncode": r.returncode,
        "signal": r.signal,
        "attempts": r.attempts,
        "stderr_tail": r.stderr_tail,
        "env": r.env,
    }


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return cli_message(error) if isinstance(error, IsolhubError) else str(error)


def _human(r: Any) -> str:
    sha = (r.sha or "-")[:12]
    if r.ok:
        return f"ok      {r.spec}  {sha}  {json.dumps(r.value, default=_jsonable)}"
    first = ((_error_text(r.error) or "").strip().splitlines() or [""])[0]
    return f"FAILED  {r.spec}  {sha}  {type(r.error).__name__}: {escape_controls(first)}"


@contextlib.contextmanager
def _above_the_bar() -> Iterator[None]:
    """Print to stdout without tearing a progress bar drawn on the same terminal."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):
            yield
    else:
        yield


def cmd_run(args: argparse.Namespace) -> int:
    """The `run` sub-command: 0 all ok, 1 some failed.

    Raises:
        UsageError: the specs file, `--fn` or `--jsonl` cannot be used (exit 2 in `main`).
        IsolhubError: the Hub could not start (e.g. `--backend ray` without Ray).
    """
    from .._pool.hub import Hub

    specs = read_specs(args.specs_file)
    fn = load_function(args.fn) if args.fn else None
    kwargs = parse_kw(args.kw)
    jsonl: IO[str] | None = None
    if args.json and args.jsonl == "-":
        raise UsageError("--json and --jsonl - both write to stdout: give --jsonl a file name")
    if args.jsonl == "-":
        jsonl = sys.stdout
    elif args.jsonl:
        try:
            jsonl = open(args.jsonl, "w")  # noqa: SIM115 - closed in the finally below
        except OSError as e:
            raise UsageError(f"cannot write {args.jsonl}: {e.strerror or e}") from e
    start = time.monotonic()
    ok = failed = 0
    records: list[dict[str, Any]] = []
    try:
        with Hub(
            max_workers=args.workers,
            timeout=args.timeout,
            memory_bytes=args.memory,
            retries=args.retries,
            backend=args.backend,
            source="local" if args.local else "github",
            trust_repo=trust_of(args),
            sandbox=sandbox_of(args),
            env=env_of(args),
            progress=not (args.no_progress or args.quiet),
            seed=args.seed,
        ) as h:
            for r in h.map(fn, specs, args.entry, kwargs=kwargs, ordered=args.ordered):
                ok, failed = ok + r.ok, failed + (not r.ok)
                record = result_record(r)
                if args.json:
                    records.append(record)
                with _above_the_bar():
                    if jsonl is not None:
                        jsonl.write(json.dumps(record, default=_jsonable) + "\n")
                        jsonl.flush()
                    if jsonl is not sys.stdout and not args.json:
                        print(_human(r), flush=True)
    finally:
        if jsonl is not None and jsonl is not sys.stdout:
            jsonl.close()
    elapsed = time.monotonic() - start
    if args.json:
        summary = {"specs": ok + failed, "ok": ok, "failed": failed, "elapsed": round(elapsed, 3)}
        json.dump({**summary, "results": records}, sys.stdout, indent=2, default=_jsonable)
        sys.stdout.write("\n")
    elif not args.quiet:
        print(
            f"isolhub run: {ok + failed} specs, {ok} ok, {failed} failed in {elapsed:.1f} s",
            file=sys.stderr,
        )
    return EXIT_OK if failed == 0 else EXIT_DIFFERENT


def add_commands(subparsers: Any) -> None:
    """Register `isolhub run` on the `isolhub` command's sub-parsers.

    Example:
        >>> parser = argparse.ArgumentParser(prog="isolhub")
        >>> add_commands(parser.add_subparsers())
        >>> args = parser.parse_args(["run", "specs.txt", "--entry", "net", "--fn", "m:f"])
        >>> args.entry, args.fn, args.func is cmd_run
        ('net', 'm:f', True)
    """
    p = subparsers.add_parser(
        "run",
        help="run a function on an entrypoint of many repos, each in its own worker",
        description=(
            "Load ENTRY from every repo in SPECS_FILE, each repo@sha in its own worker, apply "
            "--fn to it there, and stream one result per spec (with --json, one JSON document "
            "at the end: totals and every result). Exit 0 if all succeeded, 1 if some failed, "
            "2 on error."
        ),
    )
    p.add_argument("specs_file", help="one spec per line ('#' comments); '-' reads stdin")
    p.add_argument("--entry", required=True, help="the entrypoint to call in each repo")
    p.add_argument(
        "--fn",
        metavar="MODULE:FUNCTION",
        help="applied in the worker to what ENTRY returns (module from the current directory, "
        "or path/to/file.py:function); it must return plain values and tensors. Default: "
        "ENTRY's result itself",
    )
    add_flags(p, "--kw")
    p.add_argument(
        "--workers", type=_positive, default=None, help="workers at once (default: CPUs)"
    )
    add_flags(p, "--timeout")
    p.add_argument("--memory", type=parse_size, default=None, help="memory cap per worker: 4G")
    p.add_argument("--retries", type=_count, default=0, help="retries for infrastructure failures")
    p.add_argument("--jsonl", metavar="FILE", help="also write one JSON record per spec ('-')")
    p.add_argument("--ordered", action="store_true", help="report in the file's order")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    add_flags(p, "--local", "--trust", "--sandbox", "--env", "--seed", "--no-progress")
    output_flags(p)
    p.set_defaults(func=cmd_run)
