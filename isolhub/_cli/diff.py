"""`isolhub diff`: compare one entrypoint at two refs; the exit code can gate CI.

Exit codes: 0 equivalent within the tolerances, 1 different, 2 error (a side could not be loaded:
the table still describes the other side, and each failure gets one line on stderr).

Example:
    $ isolhub diff git+file:///srv/net.git@v1 git+file:///srv/net.git@v2 tinynet \\
          --kw pretrained=true --input-shape 2,3,32,32 --seed 0 --html report.html
    $ isolhub diff A B resnet --layers --inputs batches.pt --kw-b dropout=0.0 --html report.html
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from .._errors import UsageError
from .._escape import escape_controls
from .common import (
    EXIT_DIFFERENT,
    EXIT_ERROR,
    EXIT_OK,
    add_flags,
    env_of,
    output_flags,
    parse_kw,
    sandbox_of,
    spec_source,
    trust_of,
)

__all__ = ["add_commands", "cmd_diff", "parse_shape"]


def add_commands(subparsers: Any) -> None:
    """Register `diff` on the `isolhub` sub-command parser."""
    p = subparsers.add_parser(
        "diff",
        help="compare an entrypoint at two refs (exit 0 same, 1 different, 2 error)",
        description="Load ENTRY at SPEC_A and at SPEC_B, each in its own worker, at once, and "
        "compare entrypoints, weights and outputs on the same inputs. --json prints the "
        "report as JSON (CompareReport.to_json).",
        epilog="Exit codes: 0 equivalent within --atol/--rtol, 1 different, 2 error.",
    )
    p.add_argument("spec_a", metavar="SPEC_A", help="first ref: owner/name[:ref], git+<url>[@ref]")
    p.add_argument("spec_b", metavar="SPEC_B", help="second ref, same forms")
    p.add_argument("entry", metavar="ENTRY", help="entrypoint name")
    add_flags(p, "--kw")
    p.add_argument(
        "--kw-a", action="append", default=[], metavar="K=V",
        help="keyword for SPEC_A's entrypoint only (over --kw)",
    )  # fmt: skip
    p.add_argument(
        "--kw-b", action="append", default=[], metavar="K=V",
        help="keyword for SPEC_B's entrypoint only (over --kw)",
    )  # fmt: skip
    p.add_argument(
        "--input-shape",
        metavar="N,C,H,W",
        help="feed both models the same torch.randn input of this shape (seeded by --seed or 0)",
    )
    p.add_argument(
        "--inputs", metavar="FILE",
        help="batches saved with torch.save (a tensor, a tuple of tensors, or a list of batches)",
    )  # fmt: skip
    p.add_argument(
        "--layers", action="store_true",
        help="record every submodule's output on both sides and name the first that diverges",
    )  # fmt: skip
    p.add_argument(
        "--layer-bytes", type=int, default=64 << 20, metavar="N",
        help="per side and batch, layer outputs kept whole up to N bytes (default 64 MiB); "
        "past it layers are compared on summary statistics",
    )  # fmt: skip
    add_flags(p, "--seed")
    p.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance (default 1e-6)")
    p.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    p.add_argument(
        "--mode",
        choices=("module", "remote"),
        default="module",
        help="module: describe the module fully; remote: only __call__ and state_dict()",
    )
    p.add_argument("--html", metavar="FILE", help="also write the self-contained HTML report")
    p.add_argument(
        "--max-rows", type=int, default=40, metavar="N", help="rows per table in the terminal"
    )
    add_flags(p, "--local", "--force-reload", "--trust", "--timeout", "--sandbox", "--env")
    output_flags(p)
    p.set_defaults(func=cmd_diff)


def parse_shape(text: str) -> tuple[int, ...]:
    """`"2,3,32,32"` (or `2x3x32x32`) → `(2, 3, 32, 32)`.

    Raises:
        UsageError: not a list of positive integers.
    """
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}: expected positive integers like 2,3,32,32")
    return shape


def cmd_diff(args: argparse.Namespace) -> int:
    """Run `isolhub diff`; returns the exit code.

    Raises:
        UsageError: bad arguments (a --kw that clashes with an option of compare, say).
    """
    import torch

    from .._compare.compare import compare

    kwargs = parse_kw(args.kw)
    own = [
        name
        for name, prm in inspect.signature(compare).parameters.items()
        if prm.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    clash = sorted(set(kwargs) & set(own))
    if clash:
        raise UsageError(f"--kw {', '.join(clash)}: that name is an option of diff, not passable")
    inputs: Any = None
    if args.inputs and args.input_shape:
        raise UsageError("--inputs and --input-shape: give one of them")
    if args.inputs:
        inputs = args.inputs
    if args.input_shape:
        gen = torch.Generator().manual_seed(args.seed if args.seed is not None else 0)
        inputs = torch.randn(parse_shape(args.input_shape), generator=gen)
    # Two existing directories (`./a ./b`) are local repos, as for `list`, `help` and `load`.
    sources = {spec_source(args.spec_a, False), spec_source(args.spec_b, False)}
    local = args.local or sources == {"local"}
    report = compare(
        args.spec_a,
        args.spec_b,
        args.entry,
        kwargs_a=parse_kw(args.kw_a) or None,
        kwargs_b=parse_kw(args.kw_b) or None,
        inputs=inputs,
        seed=args.seed,
        layers=args.layers,
        layer_bytes=args.layer_bytes,
        mode=args.mode,
        atol=args.atol,
        rtol=args.rtol,
        source="local" if local else "github",
        trust_repo=trust_of(args),
        force_reload=args.force_reload,
        verbose=not (args.json or args.quiet),
        timeout=args.timeout,
        sandbox=sandbox_of(args),
        env=env_of(args),
        **kwargs,
    )
    if args.html:
        report.to_html(args.html)
    if args.json:
        print(report.to_json())
    else:
        print(escape_controls(report.summary(max_rows=args.max_rows)))
        if args.html:
            print(f"HTML report: {args.html}")
    if report.failed:
        for label, side in (("A", report.a), ("B", report.b)):
            if side.error is None:
                continue
            if args.verbose and side.error_detail:
                print(escape_controls(side.error_detail), file=sys.stderr)
            print(
                f"isolhub: error: {label} ({side.spec}): {escape_controls(side.error)}",
                file=sys.stderr,
            )
        return EXIT_ERROR
    return EXIT_OK if report.equivalent else EXIT_DIFFERENT
