"""One HTTP stack: the GitHub API and weight downloads share sessions, redirects and error words.

Both talk to real servers on 127.0.0.1 (tests/weights_server.py); nothing is mocked.
"""

from __future__ import annotations

import ast
import re
import socket
from pathlib import Path

import pytest
import requests

import isolhub as hub
from isolhub import _errormap, _http
from isolhub._errors import DownloadError, ResolveError
from isolhub._source.github import download_tarball, resolve_ref

from weights_server import WeightsServer

PACKAGE = Path(hub.__file__).parent
SHA = "ab" * 20


@pytest.fixture
def server() -> WeightsServer:
    with WeightsServer() as s:
        yield s


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ISOLHUB_HTTP_BACKOFF": "0.01",
        "ISOLHUB_HTTP_BACKOFF_MAX": "0.05",
        "ISOLHUB_HTTP_RETRIES": "1",
        "ISOLHUB_HTTP_TIMEOUT": "2",
        "ISOLHUB_HTTP_CONNECT_TIMEOUT": "2",
    }.items():
        monkeypatch.setenv(name, value)


def _chain(server: WeightsServer, start: str, hops: int, body: bytes) -> str:
    """`start` redirecting `hops` times before `body` is served; the URL of `start`."""
    paths = [start] + [f"/hop{i}" for i in range(1, hops)] + ["/end"]
    for here, there in zip(paths, paths[1:], strict=False):
        server.add(here, redirect_to=there)
    server.add("/end", body=body)
    return server.url(start)


@pytest.mark.parametrize("hops", [_http.MAX_REDIRECTS, _http.MAX_REDIRECTS + 1])
def test_the_github_api_follows_as_many_redirects_as_a_weights_download(
    server: WeightsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hops: int
) -> None:
    # The GitHub API stopped after 5 redirects, downloads after 10.
    monkeypatch.setenv("ISOLHUB_GITHUB_API", server.url("/api"))
    _chain(server, "/api/repos/o/n/commits/main", hops, SHA.encode())
    weights = tmp_path / "w.pt"
    url = f"{server.base}/w"
    server.add("/w", redirect_to="/api/repos/o/n/commits/main")
    if hops <= _http.MAX_REDIRECTS:
        assert resolve_ref("o", "n", "main") == ("main", SHA)
        hub.download_url_to_file(
            server.url("/api/repos/o/n/commits/main"), str(weights), progress=False
        )
        assert weights.read_bytes() == SHA.encode()
        return
    limit = f"more than {_http.MAX_REDIRECTS} redirects"
    with pytest.raises(ResolveError, match=limit):
        resolve_ref("o", "n", "main")
    with pytest.raises(DownloadError, match=limit):
        hub.download_url_to_file(url, str(weights), progress=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_refused_connection_reads_the_same_from_github_and_from_a_weights_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("ISOLHUB_GITHUB_API", base)
    words = re.escape("connection refused (the host is unreachable)")
    with pytest.raises(DownloadError, match="tarball/.*" + words) as gh:
        download_tarball("o", "n", SHA, tmp_path / "src.tar.gz")
    with pytest.raises(DownloadError, match=words) as weights:
        hub.download_url_to_file(f"{base}/w.pt", str(tmp_path / "w.pt"), progress=False)
    assert type(gh.value) is type(weights.value) is DownloadError
    assert isinstance(gh.value.__cause__, requests.ConnectionError)
    with pytest.raises(ResolveError, match=words):
        resolve_ref("o", "n", "main")


def test_a_tls_error_reads_the_same_from_github_and_from_a_weights_download(
    server: WeightsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # https:// to a plain-http server: the TLS handshake fails. GitHub used to show requests'
    # raw text; a download said what to check. Both say it now, and neither retries.
    base = server.base.replace("http://", "https://")
    monkeypatch.setenv("ISOLHUB_GITHUB_API", base)
    advice = "TLS error .*check the system clock and certificates"
    with pytest.raises(ResolveError, match=advice):
        resolve_ref("o", "n", "main")
    with pytest.raises(DownloadError, match=advice) as gh:
        download_tarball("o", "n", SHA, tmp_path / "src.tar.gz")
    with pytest.raises(DownloadError, match=advice) as weights:
        hub.download_url_to_file(f"{base}/w.pt", str(tmp_path / "w.pt"), progress=False)
    assert type(gh.value) is type(weights.value)
    assert "attempt" not in str(weights.value)  # not retried: another try would fail the same


def test_a_foreign_error_is_mapped_with_its_cause_kept() -> None:
    with pytest.raises(ResolveError, match="no: connection refused") as info:
        with _errormap.foreign_errors(lambda reason, _: ResolveError(f"no: {reason}")):
            requests.get(f"http://127.0.0.1:{_closed_port()}/", timeout=5)
    assert isinstance(info.value.__cause__, requests.ConnectionError)


def test_retry_after_reads_seconds_and_dates() -> None:
    assert _http.retry_after("3") == 3.0
    assert _http.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert _http.retry_after("soon") is None and _http.retry_after(None) is None


def _modules() -> dict[str, ast.Module]:
    return {
        p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text())
        for p in sorted(PACKAGE.rglob("*.py"))
    }


@pytest.mark.slow
def test_requests_sessions_and_requests_errors_are_handled_in_one_place_each() -> None:
    sessions, handlers, dates = set(), set(), set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "Session"
                and not _in_annotation(tree, node)
            ):
                sessions.add(name)
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                text = ast.unparse(node.type)
                if "requests" in text or "urllib3" in text:
                    handlers.add(name)
            if isinstance(node, ast.Name) and node.id == "parsedate_to_datetime":
                dates.add(name)
    assert sessions == {"_http.py"}
    assert handlers == {"_errormap.py"}
    assert dates == {"_http.py"}


def _in_annotation(tree: ast.Module, target: ast.AST) -> bool:
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs]
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        if any(a is not None and target in ast.walk(a) for a in annotations):
            return True
    return False
