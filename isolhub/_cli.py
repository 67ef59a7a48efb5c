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
import ast
import importlib
import json
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ._errors import IsolhubError, SpecError

# Each module registers its sub-commands with `add_commands(subparsers)`.
_COMMAND_MODULES: tuple[str, ...] = ("_cli_cache", "_cli_diff", "_cli_run")

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_kw(items: Sequence[str]) -> dict[str, Any]:
    """Turn `k=v` strings into keyword arguments; values are Python literals, else strings.

    Raises:
        SpecError: an item has no `=`.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise SpecError(f"bad --kw {item!r}: expected name=value (e.g. pretrained=true)")
        low = raw.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="owner/name[:ref], git+<url>[@ref], or a dir with --local")
    p.add_argument("--local", action="store_true", help="SPEC is a local directory")
    p.add_argument("--force-reload", action="store_true", help="fetch the snapshot again")
    p.add_argument(
        "--trust", action="store_true", help="trust the repository (adds it to trusted_list)"
    )
    p.add_argument("--timeout", type=float, default=None, help="kill the worker after N seconds")
    p.add_argument(
        "--sandbox",
        choices=("none", "strict"),
        default="none",
        help="confine the worker (no network, no secrets, writes to scratch only); see doctor",
    )


def _hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "source": "local" if args.local else "github",
        "force_reload": args.force_reload,
        "trust_repo": True if args.trust else "check",
        "timeout": args.timeout,
        "verbose": not args.json,
        "sandbox": None if args.sandbox == "none" else args.sandbox,
    }


def _print(args: argparse.Namespace, value: Any, human: str) -> None:
    if args.json:
        json.dump(value, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(human)


def cmd_list(args: argparse.Namespace) -> int:
    from . import _api

    names = _api.list(args.spec, **_hub_kwargs(args))
    _print(args, names, "\n".join(names))
    return EXIT_OK


def cmd_help(args: argparse.Namespace) -> int:
    from . import _api

    doc = _api.help(args.spec, args.entry, **_hub_kwargs(args))
    _print(args, {"entry": args.entry, "doc": doc}, doc or f"{args.entry} has no docstring")
    return EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    import torch

    from . import _api

    kwargs = parse_kw(args.kw)
    if args.save and not args.save.endswith((".safetensors", ".pt", ".pth")):
        raise SpecError(f"--save {args.save!r}: use a .safetensors, .pt or .pth file name")
    sd = _api.load_state_dict(args.spec, args.entry, seed=args.seed, **_hub_kwargs(args), **kwargs)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    info = {
        "spec": args.spec,
        "entry": args.entry,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "saved": args.save,
    }
    if args.save:
        if args.save.endswith(".safetensors"):
            from safetensors.torch import save_file

            # safetensors refuses shared storages: give each tensor its own copy.
            save_file({k: v.contiguous().clone() for k, v in tensors.items()}, args.save)
        else:
            torch.save(sd, args.save)
    human = (
        f"{args.spec} {args.entry}: {info['tensors']} tensors, {info['parameters']:,} values, "
        f"{info['bytes']:,} bytes" + (f"; saved to {args.save}" if args.save else "")
    )
    _print(args, info, human)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from ._sandbox import Sandbox, probe

    report = probe()
    missing = [n for n in report.missing if n in Sandbox().requested()]
    _print(args, report.to_dict(), str(report))
    if missing and not args.json:
        print(f"\nsandbox='strict' would refuse to run here: missing {', '.join(missing)}")
    return EXIT_DIFFERENT if missing else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `isolhub` command."""
    parser = argparse.ArgumentParser(
        prog="isolhub",
        description="Load PyTorch Hub repos, each repo@ref in its own worker process.",
        epilog="Exit codes: 0 ok, 1 difference or problem found, 2 error, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list a repo's entrypoints")
    _source_args(p)
    _common(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("help", help="show an entrypoint's docstring")
    _source_args(p)
    p.add_argument("entry", help="entrypoint name")
    _common(p)
    p.set_defaults(func=cmd_help)

    p = sub.add_parser("load", help="load an entrypoint's weights in a worker; summarise or save")
    _source_args(p)
    p.add_argument("entry", help="entrypoint name")
    p.add_argument(
        "--kw", action="append", default=[], metavar="K=V", help="keyword for the entrypoint"
    )
    p.add_argument("--seed", type=int, default=None, help="seed torch before the entrypoint runs")
    p.add_argument("--save", metavar="FILE", help="save the state dict (.safetensors, .pt, .pth)")
    _common(p)
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("doctor", help="what sandbox protections this kernel can enforce")
    _common(p)
    p.set_defaults(func=cmd_doctor)

    for module in _COMMAND_MODULES:
        importlib.import_module(f"isolhub.{module}").add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `isolhub` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("isolhub: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except IsolhubError as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"isolhub: error: {type(e).__name__}: {first}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
