"""Per-repo dependency environments: what a repo requires, installed once into an overlay folder.

    requirements ──▶ request key ──▶ record? ──yes──▶ the overlay it names (no network at all)
    (+ the zygote's                     │no
     imported packages,                 ▼
     Python, platform)        locked install by uv (or pip) into a staging folder, the zygote's
                              packages excluded ──▶ conflicts? ──▶ an environment of its own
                              ──▶ renamed to envs/<key of the resolved set> ──▶ record written

Layout under the hub dir:

    envs/<env-key>/site/           the installed packages (the worker puts this folder on
                                   sys.path after the snapshot, before site-packages)
    envs/<env-key>/env.json        what is in it, how and when it was made
    envs/requests/<req-key>.json   requirements + zygote packages + Python + platform ──▶ env-key,
                                   the choice made and why, and the snapshots that used it

The env key hashes the resolved set (name==version of every package installed), the zygote's
packages it was resolved against, the Python version, the platform and whether it is wheels
only, so identical sets share one folder whatever repo asked. A **shared** environment runs in
a worker forked from the one zygote: the packages that zygote has imported (torch, numpy, ...)
are excluded from the install, so they are never replaced. When a repo needs another version
of one of them, it gets an environment **of its own**: those packages installed too, and its own
zygote started with the overlay ahead of site-packages on its `sys.path`.

Installs are written beside their final place and renamed in (as snapshots are, `_cache.store`); a
filelock keeps concurrent first uses to one install, and correctness does not depend on it.

Example (a repo that requires only what the zygote already has: nothing to install):
    >>> from pathlib import Path
    >>> from isolhub._source.snapshot import fetch_snapshot
    >>> from isolhub._spec import parse_spec
    >>> Path("net").mkdir()
    >>> _ = Path("net/hubconf.py").write_text("dependencies = []\\n")
    >>> _ = Path("net/requirements.txt").write_text("torch>=2\\n")
    >>> snapshot = fetch_snapshot(parse_spec("net", source="local"))
    >>> env = prepare(snapshot, None, provided={"torch": "2.13.0"}, wheels_only=False, verbose=False)
    >>> env.kind, env.packages, env.source, env.requirements
    ('shared', (), 'requirements.txt', ('torch>=2',))
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .._cache.store import (
    STAGING_PREFIX,
    hub_dir,
    lock,
    make_read_only,
    remove_tree,
    sweep_staging,
    write_text_atomic,
)
from .._config import is_offline
from .._errors import EnvError, OfflineError
from .._progress import notice
from .requirements import Requirements, read_requirements

__all__ = [
    "ENVS",
    "Env",
    "EnvEntry",
    "INSTALLERS",
    "choose_installer",
    "conflicts",
    "envs_dir",
    "list_envs",
    "prepare",
    "prune_envs",
    "python_tag",
    "remove_env",
    "uv_binary",
]

ENVS = "envs"
INSTALLERS = ("uv", "pip")
_INSTALL_TIMEOUT_S = 1800
_TAIL_LINES = 25
# Never excluded or pinned: isolhub's own distribution is not something a repo resolves against.
_NOT_SHARED = {"isolhub"}


@dataclass(frozen=True)
class Env:
    """An installed environment and why it was chosen: the load's dependency provenance.

    Attributes:
        key: the environment's folder name under `<hub>/envs` (a content address).
        kind: `"shared"` (a worker forked from the common zygote, its packages shared) or
            `"own"` (its own zygote, because a requirement conflicts with the common one's).
        packages: `name==version` of every package installed in it.
        shared: `name==version` of the common zygote's packages it runs with (not installed).
        reason: why this kind was chosen, in words.
        source: where the requirements came from (`requirements.txt`, `pyproject.toml`,
            `argument`).
        requirements: the requirement lines, normalized.
        installer: `uv` or `pip` (the one that made it).
        reused: whether it was already installed (no installer ran, no network request).
        seconds: how long this call spent on it (install included when not reused).
    """

    key: str
    path: Path
    kind: str
    packages: tuple[str, ...]
    shared: tuple[str, ...]
    reason: str
    source: str
    requirements: tuple[str, ...]
    installer: str
    reused: bool
    seconds: float = field(default=0.0, compare=False)

    @property
    def site(self) -> Path:
        """The folder the worker puts on `sys.path`."""
        return self.path / "site"

    def describe(self) -> str:
        """One line for people: which environment, what is in it, and why."""
        what = ", ".join(self.packages) or "nothing beyond the shared packages"
        how = "reused" if self.reused else f"installed by {self.installer} in {self.seconds:.1f} s"
        why = self.reason
        if self.kind == "shared":
            torch = [p.replace("==", " ") for p in self.shared if p.startswith("torch==")]
            others = len(self.shared) - len(torch)
            why = f"shares {', '.join(torch) or 'nothing'} and {others} more with the zygote"
        return f"environment {self.key[:12]} ({self.kind}; {how}): {what}; {why}"

    def provenance(self) -> dict[str, Any]:
        """The resolved versions and the choice, as plain data (JSON, `Result.env`)."""
        d = asdict(self)
        d["path"] = str(self.path)
        for k in ("packages", "shared", "requirements"):
            d[k] = list(d[k])
        return d


def envs_dir() -> Path:
    """`<hub>/envs`."""
    return hub_dir() / ENVS


def prepare(
    snapshot: Any,
    requirements: Any,
    *,
    provided: dict[str, str],
    wheels_only: bool,
    verbose: bool = True,
) -> Env | None:
    """The environment for the repo at `snapshot` (a `Snapshot`), installing it if it is new.

    `provided` maps the distributions the common zygote has imported to their versions;
    `wheels_only` (sandboxed repos) refuses anything that would have to be built. None when the
    repo requires nothing.

    Raises:
        EnvError: the requirements are malformed or could not be installed.
        OfflineError: offline, and no environment for these requirements is installed.
    """
    start = time.monotonic()
    reqs = read_requirements(Path(snapshot.path), requirements)
    if not reqs.lines:
        return None
    shared: dict[str, str] = {canonicalize_name(k): v for k, v in provided.items()}
    for name in _NOT_SHARED:
        shared.pop(name, None)
    request = {
        "requirements": list(reqs.lines),
        "provided": sorted(f"{k}=={v}" for k, v in shared.items()),
        "python": python_tag(),
        "platform": sysconfig.get_platform(),
        "wheels_only": wheels_only,
    }
    req_key = _digest(request)
    user = str(snapshot.path)
    env = _lookup(req_key, reqs, user, start)
    if env is not None:
        return _told(env, verbose)
    if is_offline():
        raise OfflineError(
            f"offline (ISOLHUB_OFFLINE) and no environment is installed for the requirements of "
            f"{snapshot.label} ({', '.join(reqs.lines)}); load it once online to install it"
        )
    envs = envs_dir()
    try:
        (envs / "requests").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EnvError(f"cannot create {envs} ({e.strerror}); set ISOLHUB_HOME") from e
    with lock(f"env-{req_key}"):
        env = _lookup(req_key, reqs, user, start)
        if env is None:
            env = _install(request, req_key, reqs, shared, wheels_only, user, snapshot.label)
            env = _with(env, seconds=time.monotonic() - start)
    return _told(env, verbose)


def python_tag() -> str:
    """`cpython-3.11`: environments are made for one Python minor version."""
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"


def _told(env: Env, verbose: bool) -> Env:
    if verbose:
        notice(env.describe())
    return env


def _with(env: Env, **changes: Any) -> Env:
    return Env(**{**asdict(env), "path": env.path, **changes})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def _lookup(req_key: str, reqs: Requirements, user: str, start: float) -> Env | None:
    record_path = envs_dir() / "requests" / f"{req_key}.json"
    record = _read_json(record_path)
    if record is None:
        return None
    key = str(record.get("env", ""))
    meta = _read_json(envs_dir() / key / "env.json") if key and "/" not in key else None
    if meta is None:
        return None  # the environment was removed: install it again
    if user not in record.get("users", []):
        record["users"] = [*record.get("users", []), user]
        with contextlib.suppress(OSError):
            write_text_atomic(record_path, json.dumps(record, indent=1))
    return Env(
        key=key,
        path=envs_dir() / key,
        kind=str(meta.get("kind")),
        packages=tuple(meta.get("packages", ())),
        shared=tuple(meta.get("shared", ())),
        reason=str(record.get("reason", "")),
        source=reqs.source,
        requirements=reqs.lines,
        installer=str(meta.get("installer")),
        reused=True,
        seconds=time.monotonic() - start,
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def conflicts(reqs: list[Requirement], shared: dict[str, str]) -> dict[str, str]:
    """{package: why} for each requirement that the shared version of its package does not meet."""
    found: dict[str, str] = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        if name not in shared:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if not req.specifier.contains(shared[name], prereleases=True):
            found[name] = (
                f"{req} conflicts with {name} {shared[name]}, which the zygote has imported"
            )
    return found


def _install(
    request: dict[str, Any],
    req_key: str,
    reqs: Requirements,
    shared: dict[str, str],
    wheels_only: bool,
    user: str,
    label: str,
) -> Env:
    envs = envs_dir()
    sweep_staging(envs)
    installer = choose_installer()
    clash = conflicts(reqs.parsed(), shared)
    staging = envs / f"{STAGING_PREFIX}{req_key[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        kind = "own" if clash else "shared"
        notice(f"installing the requirements of {label} ({', '.join(reqs.lines)}) with {installer}")
        if clash:
            _own(installer, staging / "site", reqs, _without(shared, clash), wheels_only, clash)
        else:
            _run_installer(installer, staging / "site", reqs, shared, wheels_only)
        if not clash:  # what the installed packages themselves require of the shared ones
            clash = conflicts(_installed_requirements(staging / "site"), shared)
            if clash:
                remove_tree(staging / "site")
                kind = "own"
                _own(installer, staging / "site", reqs, _without(shared, clash), wheels_only, clash)
        packages = _installed(staging / "site")
        kept = _without(shared, clash)
        reason = (
            "; ".join(clash.values()) + ": it runs in a zygote of its own"
            if clash
            else "shares "
            + (", ".join(f"{k} {v}" for k, v in sorted(kept.items())) or "nothing")
            + " with the zygote"
        )
        meta = {
            "kind": kind,
            "packages": packages,
            "shared": sorted(f"{k}=={v}" for k, v in kept.items()),
            "python": request["python"],
            "platform": request["platform"],
            "wheels_only": wheels_only,
            "installer": installer,
            "created": time.time(),
        }
        key = _digest(
            {
                k: meta[k]
                for k in ("kind", "packages", "shared", "python", "platform", "wheels_only")
            }
        )
        final = envs / key
        if not (final / "env.json").is_file():
            (staging / "env.json").write_text(json.dumps(meta, indent=1))
            make_read_only(staging)
            with contextlib.suppress(FileExistsError, OSError):
                os.rename(staging, final)  # lost to an identical set: use that one
        if not (final / "env.json").is_file():
            raise EnvError(f"could not put the environment in place at {final}")
        record = {
            "env": key,
            "reason": reason,
            "request": request,
            "source": reqs.source,
            "users": [user],
        }
        write_text_atomic(envs / "requests" / f"{req_key}.json", json.dumps(record, indent=1))
    finally:
        if staging.exists():
            remove_tree(staging)
    return Env(
        key=key,
        path=final,
        kind=kind,
        packages=tuple(packages),
        shared=tuple(meta["shared"]),
        reason=reason,
        source=reqs.source,
        requirements=reqs.lines,
        installer=installer,
        reused=False,
    )


def _own(
    installer: str,
    site: Path,
    reqs: Requirements,
    shared: dict[str, str],
    wheels_only: bool,
    clash: dict[str, str],
) -> None:
    """Install an environment of its own: the conflicting packages too, at the versions asked."""
    try:
        _run_installer(installer, site, reqs, shared, wheels_only)
    except EnvError as e:
        raise EnvError(
            f"{'; '.join(clash.values())}, so the repo needs an environment of its own, and "
            f"installing that failed: {e}",
            packages=list(reqs.lines),
            conflicts=dict(clash),
        ) from e


def _without(shared: dict[str, str], clash: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in shared.items() if k not in clash}


def choose_installer() -> str:
    """`$ISOLHUB_INSTALLER` (uv or pip), else uv when it is installed, else pip."""
    wanted = os.environ.get("ISOLHUB_INSTALLER", "").strip().lower()
    if wanted and wanted not in INSTALLERS:
        raise EnvError(f"ISOLHUB_INSTALLER={wanted!r}: use one of {', '.join(INSTALLERS)}")
    if wanted:
        return wanted
    return "uv" if uv_binary() else "pip"


def uv_binary() -> str | None:
    """The uv executable: the `uv` package's own, else one on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _run_installer(
    installer: str, site: Path, reqs: Requirements, shared: dict[str, str], wheels_only: bool
) -> None:
    """Install `reqs` into the folder `site`, never touching the packages in `shared`.

    The index and its credentials come from the installer's own configuration (`UV_INDEX_URL`,
    `UV_DEFAULT_INDEX`, `uv.toml`; `PIP_INDEX_URL`, `pip.conf`).
    """
    with tempfile.TemporaryDirectory(prefix="isolhub-env-") as tmp:
        req_file = Path(tmp, "requirements.txt")
        req_file.write_text("".join(line + "\n" for line in reqs.lines))
        names = Path(tmp, "shared.txt")
        if installer == "uv":
            binary = uv_binary()
            if binary is None:
                raise EnvError("uv is not installed: pip install uv, or set ISOLHUB_INSTALLER=pip")
            names.write_text("".join(f"{k}\n" for k in sorted(shared)))
            # --excludes: the shared packages are left out of the resolution altogether (so
            # nothing ever downloads another torch); their versions are checked by `conflicts`.
            cmd = [binary, "pip", "install", "--python", sys.executable, "--target", str(site)]
            # --compile-bytecode: the folder is read-only and workers write no bytecode, so it
            # is compiled once here (as pip does by default) rather than at every import.
            cmd += ["--link-mode", "copy", "--compile-bytecode"]
            cmd += ["--excludes", str(names), "-r", str(req_file)]
            if wheels_only:
                cmd.append("--no-build")
            _check(_run(cmd, "uv"), reqs, wheels_only)
            return
        _pip_install(site, reqs, shared, wheels_only, req_file, names)


def _pip_install(
    site: Path,
    reqs: Requirements,
    shared: dict[str, str],
    wheels_only: bool,
    req_file: Path,
    pins: Path,
) -> None:
    """pip cannot exclude packages; it resolves against this environment with the shared ones
    pinned (so an installed torch satisfies, and is never fetched), then installs the plan."""
    pins.write_text("".join(f"{k}=={v}\n" for k, v in sorted(shared.items())))
    report = pins.with_name("report.json")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    binary = ["--only-binary", ":all:"] if wheels_only else []
    cmd = [*pip, "install", "--dry-run", "--report", str(report)]
    _check(_run([*cmd, *binary, "-c", str(pins), "-r", str(req_file)], "pip"), reqs, wheels_only)
    plan = json.loads(report.read_text()).get("install", [])
    pinned = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in plan]
    site.mkdir(parents=True, exist_ok=True)
    if pinned:
        cmd = [*pip, "install", "--no-deps", "--target", str(site), *binary, *pinned]
        _check(_run(cmd, "pip"), reqs, wheels_only)


def _run(cmd: list[str], who: str) -> subprocess.CompletedProcess[str]:
    """Run an installer command, passing its output on line by line as progress (`who: ...`).

    Raises:
        EnvError: it could not be started, or ran past `_INSTALL_TIMEOUT_S` (it is killed).
    """
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as e:
        raise EnvError(f"the installer could not run: {e}") from e
    with proc:
        return _follow(proc, cmd, who)


def _follow(
    proc: subprocess.Popen[str], cmd: list[str], who: str
) -> subprocess.CompletedProcess[str]:
    late = threading.Event()

    def stop() -> None:
        late.set()
        proc.kill()

    timer = threading.Timer(_INSTALL_TIMEOUT_S, stop)
    timer.start()
    lines: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES * 8)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                notice(f"{who}: {line}")
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if late.is_set():
        raise EnvError(f"the installer ran past {_INSTALL_TIMEOUT_S} s and was stopped")
    return subprocess.CompletedProcess(cmd, code, "\n".join(lines), "")


def _check(done: subprocess.CompletedProcess[str], reqs: Requirements, wheels_only: bool) -> None:
    if done.returncode == 0:
        return
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-_TAIL_LINES:])
    hint = ""
    if wheels_only and any(w in tail for w in ("no-build", "building is disabled", "binary")):
        hint = (
            "the repo is sandboxed, so its requirements are installed from wheels only (no build "
            "script of theirs runs) and one of them has no wheel for this platform; require a "
            "version that has one, or trust the repo and load it without a sandbox. "
        )
    raise EnvError(
        f"could not install {', '.join(reqs.lines)}: {hint}the installer said:\n{tail}",
        packages=list(reqs.lines),
    )


def _installed(site: Path) -> list[str]:
    return sorted(
        f"{canonicalize_name(d.metadata['Name'])}=={d.version}"
        for d in md.distributions(path=[str(site)])
    )


def _installed_requirements(site: Path) -> list[Requirement]:
    out: list[Requirement] = []
    for dist in md.distributions(path=[str(site)]):
        for line in dist.requires or ():
            with contextlib.suppress(ValueError):
                out.append(Requirement(line))
    return out


# -- listing and removing (`isolhub env ls|rm|prune`) --------------------------------------------


@dataclass(frozen=True)
class EnvEntry:
    """One installed environment, for `isolhub env ls`."""

    key: str
    path: Path
    kind: str
    packages: tuple[str, ...]
    size: int
    users: tuple[str, ...]
    created: float

    @property
    def in_use(self) -> bool:
        """Whether a snapshot (or local directory) that used it is still there."""
        return any(os.path.isdir(u) for u in self.users)


def list_envs() -> list[EnvEntry]:
    """Every installed environment, with the snapshots that used it."""
    root = envs_dir()
    users: dict[str, list[str]] = {}
    for record in (root / "requests").glob("*.json") if root.is_dir() else ():
        data = _read_json(record) or {}
        users.setdefault(str(data.get("env")), []).extend(map(str, data.get("users", [])))
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        meta = _read_json(folder / "env.json")
        if meta is None or folder.name.startswith("."):
            continue
        out.append(
            EnvEntry(
                key=folder.name,
                path=folder,
                kind=str(meta.get("kind")),
                packages=tuple(meta.get("packages", ())),
                size=_size(folder),
                users=tuple(sorted(set(users.get(folder.name, ())))),
                created=float(meta.get("created") or 0),
            )
        )
    return out


def remove_env(key: str, *, dry_run: bool = False) -> list[Path]:
    """Remove the environment `key` (a full key or a unique prefix) and the records naming it.

    Raises:
        EnvError: no environment, or more than one, has that key.
    """
    matches = [e for e in list_envs() if e.key.startswith(key)] if key else []
    if len(matches) != 1:
        raise EnvError(
            f"no environment {key!r}"
            if not matches
            else f"{key!r} names {len(matches)} environments"
        )
    return _remove(matches[0].key, dry_run)


def prune_envs(*, dry_run: bool = False) -> list[Path]:
    """Remove the environments no cached snapshot uses any more, and records of removed ones."""
    removed: list[Path] = []
    gone: set[str] = set()
    for entry in list_envs():
        if not entry.in_use:
            removed += _remove(entry.key, dry_run)
            gone.add(entry.key)
    root = envs_dir()
    for record in (root / "requests").glob("*.json") if root.is_dir() else ():
        key = str((_read_json(record) or {}).get("env"))
        if key not in gone and not (root / key / "env.json").is_file():
            if not dry_run:
                record.unlink(missing_ok=True)
            removed.append(record)
    if root.is_dir() and not dry_run:
        sweep_staging(root)
    return removed


def _remove(key: str, dry_run: bool = False) -> list[Path]:
    root = envs_dir()
    removed = []
    for record in (root / "requests").glob("*.json"):
        if (_read_json(record) or {}).get("env") == key:
            if not dry_run:
                record.unlink(missing_ok=True)
            removed.append(record)
    if dry_run:
        return [*removed, root / key]
    with lock(f"env-rm-{key}"):
        trash = root / f"{STAGING_PREFIX}00-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(root / key, trash)  # gone for readers at once, then deleted
            remove_tree(trash)
            removed.append(root / key)
    return removed


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total
