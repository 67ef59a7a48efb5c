"""What every `isolhub` sub-command shares: exit codes, `--kw` values and the output flags.

Sub-command modules import this, never `_cli` itself, so the command line has no import cycle.

Example:
    >>> parse_kw(["pretrained=no", "n=3", "name=resnet"])
    {'pretrained': False, 'n': 3, 'name': 'resnet'}
    >>> p = argparse.ArgumentParser()
    >>> output_flags(p)
    >>> p.parse_args(["--json", "--quiet"]).quiet
    True
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Sequence
from typing import Any

from ._errors import UsageError

__all__ = [
    "EXIT_DIFFERENT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "output_flags",
    "parse_kw",
]

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# The words shells and YAML use for booleans; `--kw pretrained=no` means False, not 'no'.
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})


def parse_kw(items: Sequence[str]) -> dict[str, Any]:
    """Turn `k=v` strings into keyword arguments: booleans, None, Python literals, else strings.

    `true/yes/on` and `false/no/off` (any case) are booleans; `none`/`null` is None.

    Raises:
        UsageError: an item has no `=` or its name is not an identifier.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"bad --kw {item!r}: expected name=value (e.g. pretrained=true)")
        low = raw.strip().lower()
        if low in _TRUE or low in _FALSE:
            out[key] = low in _TRUE
        elif low in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                out[key] = raw
    return out


def output_flags(p: argparse.ArgumentParser, json_help: str = "print JSON on stdout") -> None:
    """Add `--json`, `--quiet` and `--verbose`, the same on every sub-command."""
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress bars or notices on stderr (as ISOLHUB_QUIET=1); errors still print",
    )
    p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
