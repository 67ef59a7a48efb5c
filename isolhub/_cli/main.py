"""The `isolhub` command line: a thin layer over the public API.

Exit codes: 0 success, 1 a check found a difference or a problem, 2 an error (bad input, failed
load), 130 interrupted. Errors go to stderr in one line; `--verbose` adds the traceback.

Example:
    $ isolhub list git+file:///srv/net.git@v1 --json
    ["tinynet"]
    $ isolhub load git+file:///srv/net.git@v2 tinynet --kw pretrained=true --save net.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .._errors import IsolhubError, UsageError
from .._escape import escape_controls
from .common import (
    EXIT_DIFFERENT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    add_flags,
    cli_message,
    env_of,
    output_flags,
    parse_kw,
    sandbox_of,
    spec_source,
    trust_of,
)

__all__ = ["build_parser", "main", "parse_kw"]


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "spec",
        help="owner/name[:ref], git+<url>[@ref], or a directory (./dir, or any with --local)",
    )
    add_flags(p, "--local", "--force-reload", "--skip-validation", "--trust", "--timeout")
    add_flags(p, "--sandbox", "--env")


def _hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "source": spec_source(args.spec, args.local),
        "force_reload": args.force_reload,
        "skip_validation": args.skip_validation,
        "trust_repo": trust_of(args),
        "timeout": args.timeout,
        "verbose": not (args.json or args.quiet),
        "sandbox": sandbox_of(args),
        "env": env_of(args),
    }


def _print(args: argparse.Namespace, value: Any, human: str) -> None:
    if args.json:
        json.dump(value, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(escape_controls(human))  # much of it is a worker's text


def cmd_list(args: argparse.Namespace) -> int:
    from .. import _api

    names = _api.list(args.spec, **_hub_kwargs(args))
    _print(args, names, "\n".join(escape_controls(n, keep_lines=False) for n in names))
    return EXIT_OK


def cmd_help(args: argparse.Namespace) -> int:
    from .. import _api

    doc = _api.help(args.spec, args.entry, **_hub_kwargs(args))
    _print(args, {"entry": args.entry, "doc": doc}, doc or f"{args.entry} has no docstring")
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .. import _api

    kwargs = parse_kw(args.kw)
    if args.save and not args.save.endswith((".safetensors", ".pt", ".pth")):
        raise UsageError(f"--save {args.save!r}: use a .safetensors, .pt or .pth file name")
    hub_kwargs = _hub_kwargs(args)
    # Resolve once and load that commit, so the reported commit is the one loaded.
    snap = _api.fetch(
        args.spec,
        source=hub_kwargs["source"],
        trust_repo=hub_kwargs["trust_repo"],
        force_reload=hub_kwargs["force_reload"],
        verbose=hub_kwargs["verbose"],
    )
    spec = args.spec
    if snap.sha is not None:
        spec = str(dataclasses.replace(snap.spec, ref=snap.sha))
        hub_kwargs.update(force_reload=False, trust_repo=True)
    env = None
    if hub_kwargs["env"] is not None:  # installed (or found) first: it is the load's provenance
        env = _api.prepare_env(
            spec,
            source=hub_kwargs["source"],
            trust_repo=hub_kwargs["trust_repo"],
            sandbox=hub_kwargs["sandbox"],
            verbose=hub_kwargs["verbose"],
        )
    sd = _api.load_state_dict(spec, args.entry, seed=args.seed, **hub_kwargs, **kwargs)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    info = {
        "spec": args.spec,
        "commit": snap.sha,
        "entry": args.entry,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "saved": args.save,
        "env": None if env is None else env.provenance(),
    }
    if args.save:
        _save(sd, tensors, args.save)
    commit = f" at {snap.sha[:12]}" if snap.sha else ""
    human = (
        f"{args.spec}{commit} {args.entry}: {info['tensors']} tensors, "
        f"{info['parameters']:,} values, {info['bytes']:,} bytes"
        + (f"; {env.kind} environment {env.key[:12]}: {', '.join(env.packages)}" if env else "")
        + (f"; saved to {args.save}" if args.save else "")
    )
    _print(args, info, human)
    return EXIT_OK


def _save(sd: Any, tensors: dict[str, Any], path: str) -> None:
    """Write the state dict as `torch.save` would, whatever the format: new files get the
    permissions `open()` gives under the umask, an existing file keeps its own."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        # safetensors refuses shared storages: give each tensor its own copy.
        data = save({k: v.contiguous().clone() for k, v in tensors.items()})
        with open(path, "wb") as f:
            f.write(data)
    else:
        import torch

        torch.save(sd, path)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .._sandbox.policy import Sandbox, probe

    report = probe()
    missing = [n for n in report.missing if n in Sandbox().requested()]
    _print(args, report.to_dict(), report.describe(advice=False))
    if missing and not args.json:
        print(
            f"\n--sandbox strict would refuse to run here: missing {', '.join(missing)}; "
            "run without it, or from Python allow them missing (isolhub.Sandbox(allow_missing=...))"
        )
    return EXIT_DIFFERENT if missing else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `isolhub` command."""
    from .._version import __version__
    from . import cache as _cli_cache
    from . import diff as _cli_diff
    from . import env as _cli_env
    from . import run as _cli_run

    parser = argparse.ArgumentParser(
        prog="isolhub",
        description="Load PyTorch Hub repos, each repo@ref in its own worker process.",
        epilog="Exit codes: 0 ok, 1 difference or problem found, 2 error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"isolhub {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list a repo's entrypoints")
    _source_args(p)
    output_flags(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("help", help="show an entrypoint's docstring")
    _source_args(p)
    p.add_argument("entry", help="entrypoint name")
    output_flags(p)
    p.set_defaults(func=cmd_help)

    p = sub.add_parser("load", help="load an entrypoint's weights in a worker; summarise or save")
    _source_args(p)
    p.add_argument("entry", help="entrypoint name")
    add_flags(p, "--kw", "--seed")
    p.add_argument("--save", metavar="FILE", help="save the state dict (.safetensors, .pt, .pth)")
    output_flags(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("doctor", help="what sandbox protections this kernel can enforce")
    output_flags(p)
    p.set_defaults(func=cmd_doctor)

    for module in (_cli_cache, _cli_diff, _cli_env, _cli_run):
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `isolhub` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        # Read by every progress bar and notice, here and in workers (they inherit it).
        os.environ["ISOLHUB_QUIET"] = "1"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("isolhub: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except IsolhubError as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        text = cli_message(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        print(f"isolhub: error: {type(e).__name__}: {escape_controls(first)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
