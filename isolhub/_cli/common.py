"""What every `isolhub` sub-command shares: exit codes, its flags (declared once), `--kw` values.

Sub-command modules import this, never `_cli.main` itself, so the command line has no import cycle.

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
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

from .._errors import IsolhubError, Option, SpecError, UsageError

__all__ = [
    "FLAGS",
    "EXIT_DIFFERENT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "cli_message",
    "cli_words",
    "add_flags",
    "output_flags",
    "parse_kw",
    "env_of",
    "sandbox_of",
    "seconds",
    "spec_source",
    "trust_of",
]

EXIT_OK, EXIT_DIFFERENT, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# The words shells and YAML use for booleans; `--kw pretrained=no` means False, not 'no'.
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off"})


# Settings whose flag is not the dashed argument name. None: the command line has no such choice
# to make (it picks the mode itself: `load` is a state-dict load, sandboxable).
_SETTING_FLAGS: dict[tuple[str, Any], str | None] = {
    ("trust_repo", True): "--trust",
    ("source", "local"): "--local",
    ("mode", "remote"): None,
    ("mode", "state_dict"): None,
}
_NAME_FLAGS = {"file_name": "--file-name NAME", "memory_bytes": "--memory"}


def cli_words(option: Option) -> str:
    """How the command line reads an `Option`: `--trust`, `--sandbox strict`, `--timeout`."""
    words = [_NAME_FLAGS.get(n, "--" + n.replace("_", "-")) for n in option.names]
    for name, value in option.settings:
        dashed = "--" + name.replace("_", "-")
        default = dashed if value is True else f"{dashed} {value}"
        try:
            flag = _SETTING_FLAGS.get((name, value), default)
        except TypeError:  # an unhashable value
            flag = default
        if flag is not None:
            words.append(flag)
    return " ".join(words)


def cli_message(e: IsolhubError) -> str:
    """`e`'s message as the command line says it: its options as flags."""
    return e.render(cli_words)


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (`--timeout 30`)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def spec_source(spec: str, local: bool) -> str:
    """The `source` for SPEC: "local" with `--local`, or for an existing directory whose name is
    no spec (`./net`, `~/net`, `net`); else "github" (a directory `owner/name` stays GitHub's)."""
    from .._spec import parse_spec

    if local:
        return "local"
    if os.path.isdir(os.path.expanduser(spec)):
        try:
            parse_spec(spec)
        except SpecError:
            return "local"
    return "github"


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


# Every flag more than one command takes, declared once: the same spelling, type, default and
# help wherever it appears (tests/test_cli.py compares every command's help).
FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "--local": (
        ("--local",),
        {"action": "store_true", "help": "the specs are local directories"},
    ),
    "--force-reload": (
        ("--force-reload",),
        {"action": "store_true", "help": "fetch the snapshots again, even when cached"},
    ),
    "--skip-validation": (
        ("--skip-validation",),
        {
            "action": "store_true",
            "help": "do not check that a GitHub ref is a branch or tag (an older commit, say)",
        },
    ),
    "--trust": (
        ("--trust",),
        {"action": "store_true", "help": "trust the repositories (adds them to trusted_list)"},
    ),
    "--timeout": (
        ("--timeout",),
        {
            "type": seconds,
            "default": None,
            "metavar": "SECONDS",
            "help": "kill a worker whose call takes longer than this",
        },
    ),
    "--sandbox": (
        ("--sandbox",),
        {
            "choices": ("none", "strict"),
            "default": "none",
            "help": "confine the workers (no network, no secrets, writes to scratch only); "
            "see `isolhub doctor`",
        },
    ),
    "--env": (
        ("--env",),
        {
            "choices": ("none", "auto"),
            "default": "none",
            "help": "auto: install what each repo requires (its requirements.txt or pyproject "
            "dependencies) into a cached environment of its own; see docs/environments.md",
        },
    ),
    "--kw": (
        ("--kw",),
        {
            "action": "append",
            "default": [],
            "metavar": "K=V",
            "help": "a keyword for the entrypoint, repeatable; V is a Python literal, "
            "true/false/yes/no (booleans), none, or else a string",
        },
    ),
    "--seed": (
        ("--seed",),
        {
            "type": int,
            "default": None,
            "metavar": "N",
            "help": "seed torch, random and numpy in each worker before the entrypoint runs",
        },
    ),
    "--no-progress": (
        ("--no-progress",),
        {"action": "store_true", "help": "no progress bar or progress lines on stderr"},
    ),
    "--json": (("--json",), {"action": "store_true", "help": "print JSON on stdout, not text"}),
    "--quiet": (
        ("--quiet", "-q"),
        {
            "action": "store_true",
            "help": "no progress bars or notices on stderr (as ISOLHUB_QUIET=1); errors still print",
        },
    ),
    "--verbose": (
        ("--verbose",),
        {"action": "store_true", "help": "show tracebacks on errors"},
    ),
}


def add_flags(p: argparse.ArgumentParser, *flags: str) -> None:
    """Add the shared `flags` (keys of `FLAGS`, e.g. `"--trust"`) to `p`, as declared there."""
    for flag in flags:
        names, options = FLAGS[flag]
        p.add_argument(*names, **options)


def output_flags(p: argparse.ArgumentParser) -> None:
    """Add `--json`, `--quiet` and `--verbose`, the same on every sub-command."""
    add_flags(p, "--json", "--quiet", "--verbose")


def env_of(args: argparse.Namespace) -> Literal["auto"] | None:
    """The `env=` of `--env` (its choices are none and auto): None for `none`."""
    return "auto" if args.env == "auto" else None


def sandbox_of(args: argparse.Namespace) -> Literal["strict"] | None:
    """The `sandbox=` of `--sandbox` (its choices are none and strict): None for `none`."""
    return "strict" if args.sandbox == "strict" else None


def trust_of(args: argparse.Namespace) -> Literal[True, "check"]:
    """The `trust_repo=` of `--trust`: True, else torch.hub's "check"."""
    return True if args.trust else "check"
