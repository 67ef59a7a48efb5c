"""A loopback HTTP server that serves weights and misbehaves on demand, for the download tests.

Each path is configured with a `Resource`: its bytes, and the faults to inject (a cut, a reset, a
stall, a lying Content-Length, statuses, redirects...). Every request is logged with its headers,
status and the bytes sent. Every sleep is bounded (`MAX_SLEEP`) and ends when the server stops.
A request whose target is an absolute URI is answered as a forward proxy would (from this
server's own resources, or with `proxy_status`), and logged with `proxied=True`.

Example:
    with WeightsServer() as srv:
        url = srv.add("/w.pt", body=data, cut_after=0.5)
        download_url_to_file(url, dst)
        assert srv.statuses("/w.pt") == [200, 206]
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

MAX_SLEEP = 30.0
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>login</body></html>\n"


@dataclass
class Resource:
    """How one path is served. Fault offsets are bytes, or a fraction of the body when < 1."""

    body: bytes = b""
    status: list[int] = field(default_factory=list)  # served first, one per request, in order
    retry_after: str | None = None  # sent with those statuses
    ranges: bool = True  # honour Range / If-Range
    etag: str | None = "auto"  # "auto": derived from the body; None: no ETag
    last_modified: str | None = None
    throttle: float | None = None  # bytes per second (a fault: see fault_times)
    stall_after: float | None = None  # then stay silent for `stall_s`
    stall_s: float = MAX_SLEEP
    cut_after: float | None = None  # then FIN
    reset_after: float | None = None  # then RST
    corrupt_at: int | None = None  # flip the byte at this offset of the body
    fault_times: int | None = 1  # how many full responses get the faults above; None: all
    content_length: int | None = None  # announce this instead of the real length
    no_content_length: bool = False
    bad_content_range: bool = False  # 206 with a wrong start
    new_body: bytes | None = None  # served (with a new ETag) from the second response on
    gzip: bool = False  # Content-Encoding: gzip, whatever the client accepts
    redirect_to: str | None = None
    redirect_status: int = 302
    html_200: bool = False
    endless: bool = False  # a body that never ends, without Content-Length
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)
    served: int = 0


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    host: str
    proxied: bool = False
    status: int = 0
    sent: int = 0
    at: float = field(default_factory=time.monotonic)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    owner: WeightsServer


class WeightsServer:
    """A fault-injecting HTTP server on `host` (127.0.0.1, or 127.0.0.2 as "another host")."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.resources: dict[str, Resource] = {}
        self.requests: list[Request] = []
        self.proxy_status: int | None = None
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WeightsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._httpd = _Server((self.host, 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, **config: object) -> str:
        """Serve `path` as configured (see `Resource`); returns its URL."""
        # Looked up without the query and percent-decoded, as the handler sees it.
        self.resources[unquote(path.split("?", 1)[0])] = Resource(**config)  # type: ignore[arg-type]
        return self.url(path)

    def log(self, path: str | None = None) -> list[Request]:
        """The requests seen so far (for `path`, given as `add` was given it)."""
        key = None if path is None else unquote(path.split("?", 1)[0])
        with self._lock:
            return [r for r in self.requests if key is None or r.path == key]

    def count(self, path: str | None = None) -> int:
        return len(self.log(path))

    def statuses(self, path: str | None = None) -> list[int]:
        return [r.status for r in self.log(path)]

    def record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def sleep(self, seconds: float) -> bool:
        """Sleep at most `seconds` (capped at MAX_SLEEP); False when the server is stopping."""
        return not self.stopping.wait(min(seconds, MAX_SLEEP))


class _Abort(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def handle(self) -> None:
        with contextlib.suppress(_Abort, OSError):
            super().handle()

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve(head=True)

    # -- helpers --

    def _send(self, req: Request, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except OSError as e:
            raise _Abort from e
        req.sent += len(data)

    def _simple(self, req: Request, status: int, body: bytes = b"", **headers: str) -> None:
        req.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._send(req, body)

    def _serve(self, head: bool = False) -> None:
        owner = self.server.owner
        target = self.path
        proxied = target.startswith(("http://", "https://"))
        path = unquote(urlsplit(target).path if proxied else target.split("?", 1)[0])
        req = Request(
            method=self.command,
            path=path,
            headers={k.lower(): v for k, v in self.headers.items()},
            host=owner.host,
            proxied=proxied,
        )
        owner.record(req)
        if proxied and owner.proxy_status is not None:
            self._simple(req, owner.proxy_status, b"proxy says no\n", Proxy_Authenticate="Basic")
            return
        res = owner.resources.get(path)
        if res is None:
            self._simple(req, 404, b"not found\n")
            return
        with owner._lock:
            nth = sum(1 for r in owner.requests if r.path == path) - 1
        if nth < len(res.status):
            extra = {"Retry_After": res.retry_after} if res.retry_after is not None else {}
            self._simple(req, res.status[nth], b"try later\n", **extra)
            return
        if res.redirect_to is not None:
            self._simple(req, res.redirect_status, b"", Location=res.redirect_to)
            return
        self._serve_body(req, res, head)

    def _serve_body(self, req: Request, res: Resource, head: bool) -> None:
        owner = self.server.owner
        with owner._lock:
            serial = res.served
            res.served += 1
        faulty = res.fault_times is None or serial < res.fault_times
        body = res.new_body if res.new_body is not None and serial >= 1 else res.body
        content_type = res.content_type
        if res.html_200:
            body, content_type = HTML_PAGE, "text/html; charset=utf-8"
        etag = None
        if res.etag == "auto":
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        elif res.etag is not None:
            etag = res.etag
        if res.corrupt_at is not None and faulty and res.corrupt_at < len(body):
            i = res.corrupt_at
            body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]

        status, start = 200, 0
        headers: dict[str, str] = {"Content-Type": content_type}
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        validators = {v for v in (etag, res.last_modified) if v}
        if rng and res.ranges and not res.gzip and (if_range is None or if_range in validators):
            first = rng.removeprefix("bytes=").split("-", 1)[0]
            start = int(first or 0)
            if start >= len(body):
                self._simple(req, 416, b"", Content_Range=f"bytes */{len(body)}")
                return
            status = 206
            shown = start + 7 if res.bad_content_range else start
            headers["Content-Range"] = f"bytes {shown}-{len(body) - 1}/{len(body)}"
        payload = body[start:]
        if res.gzip:
            payload = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        if res.ranges and not res.gzip:
            headers["Accept-Ranges"] = "bytes"
        if etag:
            headers["ETag"] = etag
        if res.last_modified:
            headers["Last-Modified"] = res.last_modified
        headers.update(res.headers)
        close = False
        if res.endless or res.no_content_length:
            headers["Connection"] = "close"
            close = True
        elif res.content_length is not None and status == 200:
            headers["Content-Length"] = str(res.content_length)
            close = res.content_length != len(payload)
        else:
            headers["Content-Length"] = str(len(payload))

        req.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        if res.endless:
            self._send_endless(req, res)
            self.close_connection = True
            return

        def at(value: float | None) -> int | None:
            if value is None or not faulty:
                return None
            return int(value * len(body)) if 0 < value < 1 else int(value)

        fault, limit = None, None
        for kind, value in (
            ("cut", at(res.cut_after)),
            ("reset", at(res.reset_after)),
            ("stall", at(res.stall_after)),
        ):
            if value is not None:
                fault, limit = kind, max(0, value - start) if start else value
                break
        rate = res.throttle if faulty else None
        self._send_paced(req, rate, payload if limit is None else payload[:limit])
        if fault == "cut":
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
        elif fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif fault == "stall":
            owner.sleep(res.stall_s)
            self.close_connection = True
        elif close:
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True

    def _send_paced(self, req: Request, rate: float | None, data: bytes) -> None:
        if not rate:
            self._send(req, data)
            return
        owner = self.server.owner
        piece = max(1, int(rate * 0.05))
        deadline = time.monotonic() + MAX_SLEEP
        for i in range(0, len(data), piece):
            self._send(req, data[i : i + piece])
            if time.monotonic() > deadline or not owner.sleep(piece / rate):
                raise _Abort

    def _send_endless(self, req: Request, res: Resource) -> None:
        owner = self.server.owner
        deadline = time.monotonic() + MAX_SLEEP
        rate = res.throttle
        piece = max(1, int(rate * 0.05)) if rate else 64 * 1024
        while time.monotonic() < deadline and not owner.stopping.is_set():
            self._send(req, b"\0" * piece)
            if rate and not owner.sleep(piece / rate):
                return


# -- "nothing lost" helpers ---------------------------------------------------------------------


def file_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file under `root`, by relative path."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[Path]:
    """Temp, partial or staging entries under `root` (there should be none after a failure)."""
    found = []
    for p in _walk(root):
        name = p.name
        if name.endswith((".partial", ".incomplete", ".tmp")) or name.startswith(".staging-"):
            found.append(p)
    return found


def _walk(root: Path) -> Iterator[Path]:
    if not root.exists():
        return
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            yield Path(dirpath, name)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Guard:
    """A good cache entry and a sentinel folder next to the hub; `check()` proves nothing was lost.

    Example:
        guard = Guard(hub)
        ...  # a failing download
        guard.check(out_dir)
    """

    def __init__(self, hub: Path) -> None:
        self.hub = hub
        self.seed = hub / "checkpoints" / "seed-0123abcd.bin"
        self.seed.parent.mkdir(parents=True, exist_ok=True)
        self.seed.write_bytes(b"seeded checkpoint\n" * 64)
        snapshot = hub / "repos" / "github--o--r" / "snapshots" / ("a" * 40)
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "hubconf.py").write_text("def net():\n    return 1\n")
        self.sentinel = hub.parent / "sentinel"
        self.sentinel.mkdir(parents=True, exist_ok=True)
        self.before = file_digests(hub)

    def check(self, *dirs: Path) -> None:
        now = file_digests(self.hub)
        for name, digest in self.before.items():
            assert now.get(name) == digest, f"{name} changed or vanished"
        assert list(self.sentinel.iterdir()) == [], "something was written next to the hub"
        for d in (self.hub, *dirs):
            assert leftovers(d) == [], f"leftovers under {d}"
