"""`isolhub env ls|rm|prune`: the per-repo dependency environments that `env="auto"` installed.

Example:
    $ isolhub env ls
    3f9a1c0e2b7d  shared  12.0 KiB  1 user   tinypkg==2.0
    $ isolhub env rm 3f9a1c0e2b7d
    $ isolhub env prune --dry-run
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._escape import escape_controls
from .common import EXIT_OK, output_flags

__all__ = ["add_commands", "cmd_ls", "cmd_prune", "cmd_rm"]


def add_commands(subparsers: Any) -> None:
    """Register `env {ls,rm,prune}` on the `isolhub` command's sub-parsers.

    Example:
        >>> parser = argparse.ArgumentParser(prog="isolhub")
        >>> add_commands(parser.add_subparsers())
        >>> args = parser.parse_args(["env", "rm", "3f2a", "--dry-run"])
        >>> args.key, args.dry_run, args.func is cmd_rm
        ('3f2a', True, True)
    """
    env = subparsers.add_parser(
        "env",
        help="list and remove the environments env='auto' installed",
        description="The per-repo dependency environments under <hub>/envs (docs/environments.md).",
    )
    sub = env.add_subparsers(dest="env_command", metavar="{ls,rm,prune}", required=True)

    ls = sub.add_parser("ls", help="list environments: key, kind, size, users, packages")
    output_flags(ls)
    ls.set_defaults(func=cmd_ls)

    rm = sub.add_parser(
        "rm",
        help="remove one environment (the next load installs it again)",
        description="KEY is an environment's key as `env ls` shows it, or a unique prefix.",
    )
    rm.add_argument("key", metavar="KEY")
    rm.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    output_flags(rm)
    rm.set_defaults(func=cmd_rm)

    prune = sub.add_parser(
        "prune",
        help="remove environments no cached snapshot uses, and leftovers",
        description="Remove the environments whose snapshots (or local directories) are all "
        "gone, the records of removed ones, and interrupted installs.",
    )
    prune.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    output_flags(prune)
    prune.set_defaults(func=cmd_prune)


def _record(e: Any) -> dict[str, Any]:
    return {
        "key": e.key,
        "path": str(e.path),
        "kind": e.kind,
        "packages": list(e.packages),
        "size": e.size,
        "users": list(e.users),
        "in_use": e.in_use,
        "created": e.created,
    }


def cmd_ls(args: argparse.Namespace) -> int:
    from .._env.environment import list_envs

    entries = list_envs()
    if args.json:
        json.dump([_record(e) for e in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    for e in entries:
        users = f"{len(e.users)} user{'s' if len(e.users) != 1 else ''}"
        unused = "" if e.in_use else " (unused)"
        print(
            escape_controls(
                f"{e.key[:12]}  {e.kind:6}  {_size_text(e.size):>10}  {users}{unused}  "
                + (", ".join(e.packages) or "-")
            )
        )
    if not entries and not args.quiet:
        print("no environments", file=sys.stderr)
    return EXIT_OK


def _removed(args: argparse.Namespace, paths: list[str]) -> int:
    if args.json:
        json.dump({"dry_run": args.dry_run, "removed": paths}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        verb = "would remove" if args.dry_run else "removed"
        for p in paths:
            print(escape_controls(f"{verb} {p}"))
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    from .._env.environment import remove_env

    return _removed(args, [str(p) for p in remove_env(args.key, dry_run=args.dry_run)])


def cmd_prune(args: argparse.Namespace) -> int:
    from .._env.environment import prune_envs

    return _removed(args, [str(p) for p in prune_envs(dry_run=args.dry_run)])


def _size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
