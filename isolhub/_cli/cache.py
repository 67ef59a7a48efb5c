"""`isolhub download` and `isolhub cache ls|verify|rm|prune`: the cache from the command line.

Only `cache verify --fix`, `cache rm` and `cache prune` ever delete anything, and only entries of
the hub dir (see `docs/cache.md`). Exit codes: 0 ok, 1 `verify` found problems it did not fix,
2 an error (raised as an `IsolhubError` and reported by the main CLI).

Example:
    >>> parser = argparse.ArgumentParser(prog="isolhub")
    >>> add_commands(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["cache", "ls", "--json"])
    >>> args.func(args)                 # an empty hub dir
    {
      "entries": [],
      "hub_dir": ".../hub",
      "repos": [],
      "total_size": 0
    }
    0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from dataclasses import asdict
from typing import Any

from .._cache.inventory import (
    Entry,
    entry_json,
    find_problems,
    fix,
    group_by_repo,
    prune,
    remove_entries,
    resolve_target,
    scan,
)
from .._cache.store import hub_dir
from .._errors import CacheError, DownloadError, UsageError
from .common import add_flags, output_flags

__all__ = [
    "add_commands",
    "cmd_download",
    "cmd_ls",
    "cmd_prune",
    "cmd_rm",
    "cmd_verify",
    "parse_age",
]


def add_commands(subparsers: Any) -> None:
    """Register `download` and `cache {ls,verify,rm,prune}` on the main parser's subparsers.

    Each leaf sets `func(args) -> int` (the exit code) and accepts `--json`.

    Example:
        >>> parser = argparse.ArgumentParser(prog="isolhub")
        >>> add_commands(parser.add_subparsers())
        >>> parser.parse_args(["cache", "prune", "--older-than", "30d", "--dry-run"]).dry_run
        True
    """
    dl = subparsers.add_parser(
        "download",
        help="download a file (into the checkpoint cache unless DST is given)",
        description="Download URL with retries, resume and hash checking. Without DST the file "
        "goes to <hub>/checkpoints/<name>, where load_state_dict_from_url finds it.",
    )
    dl.add_argument("url", metavar="URL")
    dl.add_argument("dst", metavar="DST", nargs="?", help="target file or existing folder")
    dl.add_argument("--sha256", metavar="HEX", help="expected SHA-256 (or a prefix of it)")
    dl.add_argument(
        "--file-name",
        metavar="NAME",
        help="name in the checkpoint cache (default: the URL's last path part)",
    )
    add_flags(dl, "--no-progress")
    _json_flag(dl)
    dl.set_defaults(func=cmd_download)

    cache = subparsers.add_parser(
        "cache",
        help="list, verify and clean the cache",
        description="Inspect and clean the hub dir (snapshots, refs and checkpoints).",
    )
    sub = cache.add_subparsers(dest="cache_command", metavar="{ls,verify,rm,prune}", required=True)

    ls = sub.add_parser("ls", help="list entries with size, kind and last use")
    _json_flag(ls)
    ls.set_defaults(func=cmd_ls)

    verify = sub.add_parser(
        "verify",
        help="re-hash checkpoints and find partial or broken entries",
        description="Exit 0 when nothing is wrong (or everything was fixed), 1 otherwise.",
    )
    verify.add_argument(
        "--fix", action="store_true", help="remove the corrupt and partial entries found"
    )
    _json_flag(verify)
    verify.set_defaults(func=cmd_verify)

    rm = sub.add_parser(
        "rm",
        help="remove one entry",
        description="TARGET is an entry as `cache ls` shows it (e.g. checkpoints/x.pth, "
        "repos/<key>/snapshots/<sha>, repos/<key>), a path inside the hub dir, a checkpoint "
        "file name or a snapshot SHA (prefix of 7 or more).",
    )
    rm.add_argument("target", metavar="TARGET")
    rm.add_argument(
        "--yes", "-y", action="store_true", help="do not ask (needed when stdin is not a terminal)"
    )
    rm.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    _json_flag(rm)
    rm.set_defaults(func=cmd_rm)

    prune = sub.add_parser(
        "prune",
        help="remove entries not used for a while, and leftovers",
        description="Remove snapshots and checkpoints last used before --older-than, refs to "
        "them, leftovers of interrupted downloads and extractions, and isolhub temp folders in "
        "$TMPDIR whose process is dead.",
    )
    prune.add_argument(
        "--older-than",
        metavar="AGE",
        type=parse_age,
        default=parse_age("30d"),
        help="e.g. 30d (default), 12h, 90m, 2w; a bare number is days",
    )
    prune.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    _json_flag(prune)
    prune.set_defaults(func=cmd_prune)


def _json_flag(parser: argparse.ArgumentParser) -> None:
    output_flags(parser)


def parse_age(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` or a bare number of days, in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid age {text!r}: use e.g. 30d, 12h, 90m or 2w")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}[m.group(2)]
    return float(m.group(1)) * unit


# -- the cache, as entries ---------------------------------------------------------------------


# -- download ----------------------------------------------------------------------------------


def cmd_download(args: argparse.Namespace) -> int:
    """`isolhub download URL [DST] [--sha256 HEX]`: fetch into the cache or to DST.

    Raises:
        DownloadError: the download failed or `--sha256` is not hexadecimal.
        HashMismatchError: the bytes do not match `--sha256`.
    """
    from .._http import safe_url
    from .._weights.checkpoints import checkpoint_name
    from .._weights.download import download_url_to_file, hash_matches, sha256_file

    sha = args.sha256.strip().lower() if args.sha256 else None
    if sha is not None and not re.fullmatch(r"[0-9a-f]{1,64}", sha):
        raise DownloadError(f"--sha256 {args.sha256!r} is not a hexadecimal SHA-256 (or prefix)")
    cached = False
    if args.dst:
        dst = os.path.expanduser(args.dst)
        if os.path.isdir(dst):
            dst = os.path.join(dst, checkpoint_name(args.url, args.file_name))
        download_url_to_file(args.url, dst, sha, progress=not (args.no_progress or args.quiet))
    else:
        folder = hub_dir(create=True) / "checkpoints"
        try:
            folder.mkdir(exist_ok=True)
        except OSError as e:
            raise CacheError(
                f"cache not writable: {folder} ({e.strerror}); set ISOLHUB_HOME or pass DST"
            ) from e
        dst = str(folder / checkpoint_name(args.url, args.file_name))
        cached = os.path.isfile(dst) and hash_matches(dst, sha)
        if not cached:
            download_url_to_file(args.url, dst, sha, progress=not (args.no_progress or args.quiet))
    result = {
        "url": safe_url(args.url),
        "path": dst,
        "size": os.path.getsize(dst),
        "sha256": sha256_file(dst),
        "cached": cached,
    }
    if args.json:
        _print_json(result)
    else:
        verb = "already cached" if cached else "saved"
        print(f"{verb}: {dst} ({_human(result['size'])}, sha256 {result['sha256']})")
    return 0


# -- ls ----------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    """`isolhub cache ls`: repos with their size, refs and snapshots, then the checkpoints.

    As `huggingface-cli scan-cache`: one line per repo (total size, snapshot count, the refs and
    what they point at, last use), its snapshots under it (unused ones marked), then checkpoints.
    """
    root = hub_dir()
    entries = scan(root)
    repos = group_by_repo(entries)
    if args.json:
        _print_json(
            {
                "hub_dir": str(root),
                "repos": [{k: v for k, v in r.items() if k != "last_used_ts"} for r in repos],
                "entries": [entry_json(e) for e in entries],
                "total_size": sum(e.size for e in entries),
            }
        )
        return 0
    print(f"hub dir: {root}")
    if not entries:
        print("(empty)")
        return 0
    if repos:
        print(f"{'REPO':<40} {'SIZE':>9}  {'SNAPSHOTS':<13} {'LAST USED':<16}  REFS")
    for r in repos:
        snaps = f"{len(r['snapshots'])}" + (f" ({r['unused']} unused)" if r["unused"] else "")
        refs = ", ".join(f"{k} -> {(v or '?')[:12]}" for k, v in r["refs"].items()) or "-"
        print(
            f"{r['repo']:<40} {_human(r['size']):>9}  {snaps:<13} "
            f"{_when(r['last_used_ts']):<16}  {refs}"
        )
        for e in (x for x in entries if x.kind == "snapshot" and x.repo == r["repo"]):
            note = "refs: " + ", ".join(e.refs) if e.refs else "unused"
            print(f"  {_human(e.size):>9}  {_when(e.last_used):<16}  {e.id}  ({note})")
    ckpts = [e for e in entries if e.kind == "checkpoint"]
    if ckpts:
        print(f"\ncheckpoints ({_human(sum(e.size for e in ckpts))}):")
        for e in ckpts:
            print(f"  {_human(e.size):>9}  {_when(e.last_used):<16}  {e.id}")
    brokered = [e for e in entries if e.kind == "broker"]
    if brokered:
        print(
            f"\nbroker downloads, for sandboxed workers ({_human(sum(e.size for e in brokered))}):"
        )
        for e in brokered:
            print(f"  {_human(e.size):>9}  {_when(e.last_used):<16}  {e.id}")
    snap_all = [e for e in entries if e.kind == "snapshot"]
    counts = (
        f"{len(repos)} repo(s), {len(snap_all)} snapshot(s) "
        f"({sum(1 for e in snap_all if e.unused)} unused), "
        f"{sum(1 for e in entries if e.kind == 'ref')} ref(s), {len(ckpts)} checkpoint(s), "
        f"{len(brokered)} broker download(s)"
    )
    print(f"\n{counts}; {_human(sum(e.size for e in entries))} in total")
    return 0


# -- verify ------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    """`isolhub cache verify [--fix]`: re-hash what can be, find leftovers and broken entries."""
    root = hub_dir()
    problems, checked, in_progress = find_problems(root)
    if args.fix:
        fix(problems, root)
    left = [p for p in problems if not p.fixed]
    if args.json:
        _print_json(
            {
                "hub_dir": str(root),
                "checked": checked,
                "problems": [asdict(p) for p in problems],
                "in_progress": in_progress,
                "ok": not left,
            }
        )
    else:
        print(f"hub dir: {root}; {checked} entries checked")
        for p in problems:
            state = " [removed]" if p.fixed else ""
            print(f"problem: {p.id}: {p.problem}{state}")
        for path in in_progress:
            print(f"in progress (left alone): {path}")
        if not problems:
            print("no problems found")
        elif left and not args.fix:
            print("run `isolhub cache verify --fix` to remove the entries above")
    return 1 if left else 0


# -- rm ----------------------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    """`isolhub cache rm TARGET`: remove one entry (a snapshot also takes the refs to it).

    Raises:
        CacheError: TARGET matches no entry, several, or lies outside the hub dir.
    """
    root = hub_dir()
    entries = scan(root)
    chosen = resolve_target(args.target, root, entries)
    if not (args.yes or args.dry_run):
        _confirm(chosen)
    removed = remove_entries(chosen, entries, root, dry_run=args.dry_run)
    if args.json:
        _print_json({"hub_dir": str(root), "removed": removed})
    else:
        verb = "would remove" if args.dry_run else "removed"
        for r in removed:
            print(f"{verb} {r['kind']} {r['id']} ({_human(r['size'])})")
    return 0


def _confirm(chosen: list[Entry]) -> None:
    """Ask on the terminal before `cache rm` deletes; refuse when no one can answer."""
    import sys

    what = ", ".join(e.id for e in chosen[:5]) + (" ..." if len(chosen) > 5 else "")
    size = _human(sum(e.size for e in chosen))
    if not sys.stdin.isatty():
        raise UsageError(
            f"cache rm would remove {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'} "
            f"({what}; {size}): pass --yes to confirm (stdin is not a terminal), "
            "or --dry-run to see them"
        )
    try:
        answer = input(f"remove {what} ({size})? [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise UsageError(
            "cache rm: nothing removed (not confirmed); pass --yes to skip the question"
        )


# -- prune -------------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    """`isolhub cache prune [--older-than 30d] [--dry-run]`: drop what has not been used lately."""
    root = hub_dir()
    removed = prune(root, args.older_than, dry_run=args.dry_run)
    freed = sum(r["size"] for r in removed)
    if args.json:
        _print_json(
            {"hub_dir": str(root), "dry_run": args.dry_run, "removed": removed, "freed": freed}
        )
    else:
        verb = "would remove" if args.dry_run else "removed"
        for r in removed:
            print(f"{verb} {r['kind']} {r['id']} ({_human(r['size'])})")
        print(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, {_human(freed)}")
    return 0


# -- output ------------------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
