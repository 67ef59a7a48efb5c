"""A real GitHub-compatible HTTP server on loopback, serving real local git repositories.

Only what isolhub (and torch.hub-compat tests) need: repo metadata, ref resolution, tarballs and
zipballs made by `git archive` (so the pax comment is the real commit id), paged branches and tags,
plus fault knobs (rate limit, injected statuses, wrong-commit archives, a redirect to another
loopback host). Import it as `from github_server import FakeGitHub` (pytest puts `tests/` on
`sys.path`, since `tests/` has no `__init__.py`).

Example:
    >>> repo = init_repo(tmp_path / "net")
    >>> sha = commit(repo, {"hubconf.py": "def net(): return 1\\n"})
    >>> with FakeGitHub() as gh:
    ...     gh.add_repo("owner", "net", repo)
    ...     monkeypatch.setenv("ISOLHUB_GITHUB_API", gh.url)
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

API_PREFIX = "/api/v3"
GIT_TIMEOUT_S = 60
_GIT_IDENTITY = ("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false")


def git(repo: Path, *args: str) -> str:
    """Run `git -C repo args...` (bounded in time) and return its stdout, stripped."""
    out = subprocess.run(
        ["git", "-C", str(repo), *_GIT_IDENTITY, *args],
        check=True,
        capture_output=True,
        timeout=GIT_TIMEOUT_S,
    )
    return out.stdout.decode().strip()


def init_repo(path: Path, branch: str = "main") -> Path:
    """Create an empty git repository at `path` whose first branch is `branch`; return `path`."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    return path


def commit(repo: Path, files: Mapping[str, str | bytes], message: str = "commit") -> str:
    """Write `files` (relative path -> content) into `repo`, commit them all, return the SHA."""
    for rel, content in files.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        target.write_bytes(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@dataclass(frozen=True)
class Request:
    """One request the server saw: `host` is the address it arrived on (127.0.0.1 or .2)."""

    method: str
    path: str
    headers: dict[str, str]
    host: str

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name, or None."""
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


@dataclass
class _Repo:
    path: Path
    default_branch: str


@dataclass(eq=False)
class FakeGitHub:
    """GitHub's REST API (`.url`, e.g. `http://127.0.0.1:PORT/api/v3`) over real git repos.

    Knobs (attributes, also constructor keywords; change them at any time):
    * `rate_limit_after`: answer API requests after the first N with 403, `x-ratelimit-remaining: 0`
      and `x-ratelimit-reset: rate_limit_reset` (epoch seconds, an hour from start by default).
    * `fail_next`: statuses (or `(status, {header: value})`) answered, in order, to the next
      requests of any kind, e.g. `[500, 500]`.
    * `serve_tarball_for`: a ref or SHA whose archive every tarball/zipball download serves
      instead of the one asked for (the name still says the requested commit).
    * `tarball_redirect_host`: host the archive redirects point at; "127.0.0.2" starts a second
      listener there (same port when free) sharing this state.

    Endpoints, under `.url`: `GET /repos/{o}/{n}`, `/repos/{o}/{n}/commits/{ref}` (the SHA as text
    with `Accept: application/vnd.github.sha`, else JSON; 422 when unknown), `/repos/{o}/{n}/
    {tarball,zipball}/{ref}` (302 to `/_codeload/{o}/{n}/{tar.gz,zip}/{sha}` on the redirect
    host), `/repos/{o}/{n}/{branches,tags}?per_page=&page=`. Also the web form
    `{web_url}/{o}/{n}/{zipball,tarball}/{ref}`, as torch.hub downloads it. `log` holds every
    `Request`; every response carries `Content-Length`; the server stops when the `with` ends.
    """

    rate_limit_after: int | None = None
    rate_limit_reset: int = field(default_factory=lambda: int(time.time()) + 3600)
    fail_next: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    serve_tarball_for: str | None = None
    tarball_redirect_host: str | None = None
    log: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self._api_calls = 0
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.port = self._listen("127.0.0.1", 0)
        self.redirect_port = self.port
        if self.tarball_redirect_host and self.tarball_redirect_host != "127.0.0.1":
            try:
                self.redirect_port = self._listen(self.tarball_redirect_host, self.port)
            except OSError:
                self.redirect_port = self._listen(self.tarball_redirect_host, 0)

    @property
    def web_url(self) -> str:
        """`http://127.0.0.1:PORT`, the server's root (the `github.com` of this fake)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The API base URL, for `ISOLHUB_GITHUB_API`."""
        return self.web_url + API_PREFIX

    def add_repo(self, owner: str, name: str, path: Path, default_branch: str = "main") -> None:
        """Serve the git repository at `path` (bare or not) as `owner/name`."""
        self.repos[(owner, name)] = _Repo(Path(path), default_branch)

    def count(self, path_contains: str = "", *, host: str | None = None) -> int:
        """How many logged requests have `path_contains` in their path (and came to `host`)."""
        with self._lock:
            return sum(1 for r in self.log if path_contains in r.path and host in (None, r.host))

    def close(self) -> None:
        """Stop all listeners and wait (bounded) for their threads."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()

    def __enter__(self) -> FakeGitHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _listen(self, host: str, port: int) -> int:
        server = ThreadingHTTPServer((host, port), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)
        return server.server_address[1]

    # --- request handling (called from handler threads) ---

    def _handle(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        with self._lock:
            self.log.append(Request(h.command, h.path, dict(h.headers.items()), h.server_host))
            injected = self.fail_next.pop(0) if self.fail_next else None
            is_api = split.path.startswith(API_PREFIX + "/")
            self._api_calls += is_api
            limited = is_api and self.rate_limit_after is not None
            limited = limited and self._api_calls > self.rate_limit_after  # type: ignore[operator]
        if injected is not None:
            status, headers = injected if isinstance(injected, tuple) else (injected, {})
            return h.reply(status, {"message": f"injected {status}"}, headers)
        if limited:
            return h.reply(
                403,
                {"message": "API rate limit exceeded for 127.0.0.1."},
                {"x-ratelimit-limit": "60", "x-ratelimit-remaining": "0",
                 "x-ratelimit-reset": str(self.rate_limit_reset)},
            )  # fmt: skip
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        if split.path.startswith(API_PREFIX + "/repos/") and len(segs) >= 5:
            return self._api(h, segs[3], segs[4], segs[5:], query)
        if segs[:1] == ["_codeload"] and len(segs) == 5:
            return self._codeload(h, segs[1], segs[2], segs[3], segs[4])
        if (
            len(segs) >= 3
            and segs[2] in ("zipball", "tarball")
            and (segs[0], segs[1]) in self.repos
        ):
            return self._archive_redirect(h, segs[0], segs[1], segs[2], "/".join(segs[3:]))
        return h.reply(404, {"message": "Not Found"})

    def _api(self, h: _Handler, o: str, n: str, rest: list[str], query: dict[str, str]) -> None:
        repo = self.repos.get((o, n))
        if repo is None:
            return h.reply(404, {"message": "Not Found"})
        what, ref = (rest[0], "/".join(rest[1:])) if rest else ("", "")
        if what == "":
            full = f"{o}/{n}"
            return h.reply(
                200, {"full_name": full, "name": n, "default_branch": repo.default_branch}
            )
        if what == "commits" and ref:
            sha = _rev_parse(repo.path, ref)
            if sha is None:
                return h.reply(422, {"message": f"No commit found for SHA: {ref}"})
            if "application/vnd.github.sha" in (h.headers.get("Accept") or ""):
                return h.send_bytes(200, sha.encode(), "application/vnd.github.sha")
            return h.reply(
                200,
                {
                    "sha": sha,
                    "commit": {"message": git(repo.path, "log", "-1", "--format=%B", sha)},
                },
            )
        if what in ("tarball", "zipball"):
            return self._archive_redirect(h, o, n, what, ref)
        if what in ("branches", "tags") and not ref:
            per_page = min(int(query.get("per_page", 30)), 100)
            page = max(int(query.get("page", 1)), 1)
            items = _refs(repo.path, "refs/heads" if what == "branches" else "refs/tags")
            chunk = items[(page - 1) * per_page : page * per_page]
            return h.reply(200, [{"name": k, "commit": {"sha": v}} for k, v in chunk])
        return h.reply(404, {"message": "Not Found"})

    def _archive_redirect(self, h: _Handler, o: str, n: str, kind: str, ref: str) -> None:
        repo = self.repos[(o, n)]
        sha = _rev_parse(repo.path, ref or repo.default_branch)
        if sha is None:
            return h.reply(404, {"message": "Not Found"})
        host = self.tarball_redirect_host or "127.0.0.1"
        port = self.redirect_port if host != "127.0.0.1" else self.port
        fmt = "tar.gz" if kind == "tarball" else "zip"
        location = f"http://{host}:{port}/_codeload/{quote(o)}/{quote(n)}/{fmt}/{sha}"
        return h.send_bytes(302, b"", "text/html", {"Location": location})

    def _codeload(self, h: _Handler, o: str, n: str, fmt: str, sha: str) -> None:
        repo = self.repos.get((o, n))
        served = _rev_parse(repo.path, self.serve_tarball_for or sha) if repo else None
        if repo is None or served is None or fmt not in ("tar.gz", "zip"):
            return h.reply(404, {"message": "Not Found"})
        prefix = f"{o}-{n}-{sha[:7]}/"
        body = subprocess.run(
            [
                "git",
                "-C",
                str(repo.path),
                "archive",
                f"--format={fmt}",
                f"--prefix={prefix}",
                served,
            ],
            check=True,
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
        ).stdout
        ctype = "application/x-gzip" if fmt == "tar.gz" else "application/zip"
        ext = "tar.gz" if fmt == "tar.gz" else "zip"
        disposition = f"attachment; filename={prefix[:-1]}.{ext}"
        return h.send_bytes(200, body, ctype, {"Content-Disposition": disposition})


def _rev_parse(repo: Path, ref: str) -> str | None:
    if not ref or ref.startswith("-"):
        return None
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError:
        return None


def _refs(repo: Path, prefix: str) -> list[tuple[str, str]]:
    """(short name, commit SHA) under `prefix`, annotated tags peeled, sorted by name."""
    fmt = "%(refname:strip=2)%00%(objectname)%00%(*objectname)"
    out = git(repo, "for-each-ref", f"--format={fmt}", prefix)
    rows = [line.split("\x00") for line in out.splitlines() if line]
    return sorted((name, peeled or obj) for name, obj, peeled in rows)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle keep-alive connections end; handler threads never hang forever

    @property
    def server_host(self) -> str:
        return str(self.server.server_address[0])

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        self.server.fake._handle(self)  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.fake._handle(self)  # type: ignore[attr-defined]

    def reply(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_bytes(status, body, "application/json; charset=utf-8", headers)

    def send_bytes(
        self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass
