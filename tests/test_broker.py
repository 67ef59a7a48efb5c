"""The weights broker against a hostile worker: what it checks is what it connects to.

Each class of attack is first shown to work unconfined (a plain `requests` call, or the naive
check the broker used to make) against a real loopback server and a real `~/.netrc` in a temp
HOME; then the broker is shown to refuse it, with the server proving that nothing was sent.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import torch
from urllib3.util import parse_url

import isolhub as hub
from isolhub._engine import call, policy_for, start_worker
from isolhub._errors import DownloadError
from isolhub._process.messages import BrokerAnswer, BrokerRequest
from isolhub._process.worker import answer_download
from isolhub._sandbox.policy import probe
from isolhub._transport.codec import decode, encode
from isolhub._weights.broker import check_url, weights_broker
from isolhub._weights.download import download_url_to_file

from hubrepos import make_repo, spec_of
from weights_server import WeightsServer, leftovers

HUBCONF = r"""
def weights(url):
    import torch.hub
    return dict(torch.hub.load_state_dict_from_url(url, progress=False))
"""

_SANDBOX_MISSING = [n for n in probe().missing if n in hub.Sandbox().requested()]
needs_sandbox = pytest.mark.skipif(
    bool(_SANDBOX_MISSING), reason=f"this kernel lacks sandbox protections: {_SANDBOX_MISSING}"
)


def _checkpoint(value: float = 1.0) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.full((4,), value)}, buf)
    return buf.getvalue()


@pytest.fixture
def netrc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME whose ~/.netrc holds credentials for github.com and 127.0.0.1."""
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text(
        "machine github.com login alice password gh-s3cret\n"
        "machine 127.0.0.1 login alice password lo-s3cret\n"
    )
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    return home


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _served(policy: hub.Sandbox, url: str, hash_prefix: str | None = None) -> BrokerAnswer:
    """What the parent answers a worker's download request, as the worker would send it."""
    wire = decode(encode(BrokerRequest(url, hash_prefix).to_wire()))
    return answer_download(weights_broker(policy), wire, [])


def _ask(policy: hub.Sandbox, url: str, hash_prefix: str | None = None) -> dict[str, object]:
    answer = _served(policy, url, hash_prefix)
    if answer.fd is not None:
        os.close(answer.fd)
    return answer.to_wire()


def _naive_check_passes(url: str, hosts: tuple[str, ...]) -> bool:
    """The broker's old check: one parser for the check, another one for the connection."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and parts.hostname in hosts


# -- parser confusion ------------------------------------------------------------------------


def test_unconfined_a_backslash_sends_github_netrc_credentials_to_another_host(
    netrc_home: Path,
) -> None:
    with WeightsServer() as server:
        server.add("/%5C@github.com/x.pt", body=b"x")
        url = f"http://127.0.0.1:{server.port}\\@github.com/x.pt"
        assert _naive_check_passes(url, ("github.com",))  # the old check saw github.com
        requests.get(url, timeout=10)
        (seen,) = server.log()
        assert seen.headers.get("authorization") == _basic("alice", "gh-s3cret")


def test_the_broker_refuses_a_backslash_url_and_sends_nothing(netrc_home: Path) -> None:
    with WeightsServer() as server:
        server.add("/%5C@github.com/x.pt", body=_checkpoint())
        url = f"http://127.0.0.1:{server.port}\\@github.com/x.pt"
        reply = _ask(hub.Sandbox(weight_hosts=("github.com",)), url)
        assert reply["ok"] is False
        assert "backslash" in str(reply["error"])
        assert server.count() == 0


@pytest.mark.slow
@needs_sandbox
def test_a_sandboxed_worker_cannot_steal_netrc_credentials_with_a_backslash(
    netrc_home: Path, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo", {"hubconf.py": HUBCONF})
    with WeightsServer() as server:
        server.add("/%5C@github.com/x.pt", body=_checkpoint())
        url = f"http://127.0.0.1:{server.port}\\@github.com/x.pt"
        snap = hub.fetch(spec_of(repo))
        policy = policy_for(hub.Sandbox(weight_hosts=("github.com",)), "value")
        with start_worker(snap, sandbox=policy) as w, pytest.raises(hub.RemoteError) as info:
            call(w, "weights", (url,), result="value", timeout=60)
        assert "backslash" in str(info.value)
        assert server.count() == 0


# URLs where the check's parser (urlsplit) and the connection's (urllib3) name different hosts.
CONFUSED = [
    "http://127.0.0.1:{port}\\@github.com/x.pt",
    "http://[::1]\\@github.com/x.pt",
    "http://127.0.0.1:{port}/a\\b.pt",  # harmless here, but parsers disagree on it too
]


@pytest.mark.parametrize("template", CONFUSED[:2])
def test_unconfined_the_two_parsers_disagree_about_the_host(template: str) -> None:
    url = template.format(port=8080)
    assert _naive_check_passes(url, ("github.com",))
    try:
        connects_to = parse_url(requests.Request("GET", url).prepare().url).host
    except (ValueError, requests.exceptions.RequestException):
        connects_to = "<refused by requests>"
    assert connects_to != "github.com"


HOSTILE = [
    *CONFUSED,
    # user info that smuggles a host-like string (and credentials) to an allowed host
    "http://127.0.0.1:{port}%5c@github.com/x.pt",
    "http://127.0.0.1%2523@github.com/x.pt",
    "http://127.0.0.1:{port};@github.com/x.pt",
    "http://127.0.0.1:{port} @github.com/x.pt",
    "http://github.com@127.0.0.1:{port}/x.pt",  # user info, even to an allowed host
    "http://alice:pw@127.0.0.1:{port}/x.pt",
    "http://127.0.0.1:{port}/x.pt\t",
    "http://127.0.0.1:{port}/x\n.pt",
    "http://127.0.0.1:{port}/x\x00.pt",
    "http://127.0.0.1:{port}/\u00e9.pt",
    "http://github\u3002com/x.pt",  # an ideographic full stop, NFKC-normalised by some parsers
    "http://g\u0131thub.com/x.pt",  # a dotless i (IDNA trick)
    "http://127.1:{port}/x.pt",  # inet_aton reads it as 127.0.0.1
    "http://0x7f000001:{port}/x.pt",
    "http://2130706433:{port}/x.pt",
    "http://0177.0.0.1:{port}/x.pt",
    "http://%31%32%37.0.0.1:{port}/x.pt",  # percent-encoded host
    "http:///x.pt",  # empty host
    "http://:{port}/x.pt",
    "http:/127.0.0.1:{port}/x.pt",  # one slash
    "http:127.0.0.1:{port}/x.pt",
    "http://127.0.0.1:0/x.pt",
    "http://127.0.0.1:65536/x.pt",
    "http://127.0.0.1:0{port}/x.pt",  # a leading zero
    "http://127.0.0.1:{port}:1/x.pt",
    "http://github.com./x.pt",  # a trailing dot
    "http://-github.com/x.pt",
    "http://127.0.0.1:{port}/x%zz.pt",
    "ftp://127.0.0.1:{port}/x.pt",
    "file:///etc/passwd",
    "//127.0.0.1:{port}/x.pt",
]


@pytest.mark.slow
@pytest.mark.parametrize("template", HOSTILE)
def test_the_broker_refuses_parser_confusion_forms_before_any_request(
    template: str, netrc_home: Path
) -> None:
    with WeightsServer() as server:
        url = template.format(port=server.port)
        hosts = ("127.0.0.1", "github.com", "[::1]")
        with pytest.raises(DownloadError, match="the sandbox may not download"):
            check_url(url, hosts)
        reply = _ask(hub.Sandbox(weight_hosts=hosts), url)
        assert reply["ok"] is False
        assert server.count() == 0


def test_a_plain_url_is_rebuilt_canonically_and_is_what_gets_requested() -> None:
    checked = check_url("HTTPS://GitHub.com:443/a/w.pt?x=1#frag", ("github.com",))
    assert checked.url == "https://github.com:443/a/w.pt?x=1"
    assert (checked.host, checked.port) == ("github.com", 443)
    assert check_url("http://[0:0::1]:81/w", ("[::1]",)).url == "http://[::1]:81/w"
    with WeightsServer() as server:
        server.add("/a/w.pt", body=_checkpoint())
        reply = _ask(hub.Sandbox(weight_hosts=("127.0.0.1",)), server.url("/a/w.pt#ignored"))
        assert reply == {"ok": True, "name": "w.pt"}
        assert [r.path for r in server.log()] == ["/a/w.pt"]


# -- credentials and proxies from the environment -----------------------------------------------


def test_unconfined_requests_attaches_netrc_credentials(netrc_home: Path) -> None:
    with WeightsServer() as server:
        url = server.add("/w.pt", body=b"x")
        requests.get(url, timeout=10)
        assert server.log()[0].headers.get("authorization") == _basic("alice", "lo-s3cret")


def test_broker_requests_carry_no_netrc_or_environment_credentials(
    netrc_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETRC", str(netrc_home / ".netrc"))
    with WeightsServer() as server:
        url = server.add("/w.pt", body=_checkpoint())
        assert _ask(hub.Sandbox(weight_hosts=("127.0.0.1",)), url)["ok"] is True
        (seen,) = server.log()
        assert "authorization" not in seen.headers
        assert "cookie" not in seen.headers


def _proxy_env(monkeypatch: pytest.MonkeyPatch, proxy: WeightsServer) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.base)
    monkeypatch.setenv("HTTPS_PROXY", proxy.base)


def test_unconfined_requests_goes_through_the_environment_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with WeightsServer() as origin, WeightsServer("127.0.0.2") as proxy:
        url = origin.add("/w.pt", body=b"x")
        proxy.add("/w.pt", body=b"x")
        _proxy_env(monkeypatch, proxy)
        requests.get(url, timeout=10)
        assert [r.proxied for r in proxy.log()] == [True]
        assert origin.count() == 0


def test_the_broker_ignores_environment_proxies_and_uses_only_the_policys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with WeightsServer() as origin, WeightsServer("127.0.0.2") as proxy:
        url = origin.add("/w.pt", body=_checkpoint())
        proxy.add("/w.pt", body=_checkpoint())
        _proxy_env(monkeypatch, proxy)
        assert _ask(hub.Sandbox(weight_hosts=("127.0.0.1",)), url)["ok"] is True
        assert proxy.count() == 0
        assert origin.count() == 1
        named = hub.Sandbox(weight_hosts=("127.0.0.1",), weight_proxy=proxy.base)
        assert _ask(named, url.replace("w.pt", "w.pt?again=1"))["ok"] is True
        assert [r.proxied for r in proxy.log()] == [True]


# -- redirects -----------------------------------------------------------------------------------


def test_unconfined_a_redirect_leads_anywhere() -> None:
    with WeightsServer() as allowed, WeightsServer("127.0.0.2") as other:
        target = other.add("/secret", body=b"internal")
        url = allowed.add("/w.pt", redirect_to=target)
        assert requests.get(url, timeout=10).content == b"internal"
        assert other.count() == 1


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.2:{port}/w.pt",
        "http://127.0.0.2:{port}\\@127.0.0.1/w.pt",
        "http://alice@127.0.0.2:{port}/w.pt",
        "//127.0.0.2:{port}/w.pt",
    ],
)
def test_every_redirect_hop_is_checked_against_the_allow_list(location: str) -> None:
    with WeightsServer() as allowed, WeightsServer("127.0.0.2") as other:
        other.add("/w.pt", body=_checkpoint())
        hop = allowed.add("/hop", redirect_to=location.format(port=other.port))
        url = allowed.add("/w.pt", redirect_to=hop)
        reply = _ask(hub.Sandbox(weight_hosts=("127.0.0.1",)), url)
        assert reply["ok"] is False
        assert "the sandbox may not download" in str(reply["error"])
        assert other.count() == 0
        assert allowed.statuses() == [302, 302]


def test_a_redirect_to_another_allowed_host_is_followed() -> None:
    with WeightsServer() as first, WeightsServer("127.0.0.2") as second:
        target = second.add("/w.pt", body=_checkpoint(3.0))
        url = first.add("/w.pt", redirect_to=target)
        policy = hub.Sandbox(weight_hosts=("127.0.0.1", "127.0.0.2"))
        assert _ask(policy, url)["ok"] is True
        assert second.statuses() == [200]


def test_an_https_url_may_not_redirect_to_plain_http() -> None:
    first = check_url("https://github.com/w.pt", ("github.com",))
    with pytest.raises(DownloadError, match="may not be redirected to plain http"):
        check_url("http://github.com/w.pt", ("github.com",), after=first)


# -- the size cap ----------------------------------------------------------------------------


def test_unconfined_the_whole_body_arrives_before_any_size_check(tmp_path: Path) -> None:
    body = os.urandom(8 << 20)
    with WeightsServer() as server:
        url = server.add("/big.pt", body=body, no_content_length=True)
        download_url_to_file(url, str(tmp_path / "big.pt"), progress=False)
        assert (tmp_path / "big.pt").stat().st_size == len(body)


def test_max_download_bytes_stops_the_body_while_it_streams(hub_home: Path) -> None:
    body = os.urandom(32 << 20)
    cap = 256 << 10
    with WeightsServer() as server:
        url = server.add("/big.pt", body=body, no_content_length=True)
        reply = _ask(hub.Sandbox(weight_hosts=("127.0.0.1",), max_download_bytes=cap), url)
        assert reply["ok"] is False
        assert f"exceeds the {cap}-byte cap (the sandbox's max_download_bytes)" in str(
            reply["error"]
        )
        server.stop()
        assert server.log()[0].sent < len(body)  # the connection was dropped mid-body
    assert not list((hub_home / "broker").glob("*/big.pt"))
    assert leftovers(hub_home) == []


def test_an_announced_length_over_the_cap_is_refused_before_the_body(hub_home: Path) -> None:
    with WeightsServer() as server:
        url = server.add("/big.pt", body=os.urandom(1 << 20))
        reply = _ask(hub.Sandbox(weight_hosts=("127.0.0.1",), max_download_bytes=1000), url)
        assert "more than the 1000-byte cap" in str(reply["error"])
    assert leftovers(hub_home) == []


# -- cache poisoning -----------------------------------------------------------------------------


class _Planted:
    """Unpickling it creates `marker`: code execution in whoever loads it unchecked."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (str(self.marker),))


def _poisoned(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": _Planted(marker)}, buf)
    return buf.getvalue()


def _named(good: bytes) -> str:
    return f"net-{hashlib.sha256(good).hexdigest()[:8]}.pt"


def test_unconfined_torch_hub_check_hash_loads_a_planted_cached_file_unchecked(
    tmp_path: Path,
) -> None:
    good, marker = _checkpoint(), tmp_path / "pwned"
    torch_dir = tmp_path / "torchhub"
    (torch_dir / "checkpoints").mkdir(parents=True)
    (torch_dir / "checkpoints" / _named(good)).write_bytes(_poisoned(marker))
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(torch_dir))
    try:
        with WeightsServer() as server:
            url = server.add(f"/good/{_named(good)}", body=good)
            torch.hub.load_state_dict_from_url(url, check_hash=True, weights_only=False)
            assert server.count() == 0
    finally:
        torch.hub.set_dir(before)
    assert marker.exists()


def test_what_a_sandboxed_worker_downloads_is_never_taken_by_a_trusted_load(
    hub_home: Path, tmp_path: Path
) -> None:
    good, marker = _checkpoint(2.0), tmp_path / "pwned"
    with WeightsServer() as server:
        evil = server.add(f"/evil/{_named(good)}", body=_poisoned(marker))
        url = server.add(f"/good/{_named(good)}", body=good)
        assert _ask(hub.Sandbox(weight_hosts=("127.0.0.1",)), evil)["ok"] is True
        assert not (hub_home / "checkpoints" / _named(good)).exists()
        sd = hub.load_state_dict_from_url(url, check_hash=True, progress=False)
        assert torch.equal(sd["w"], torch.full((4,), 2.0))
        assert server.statuses(f"/good/{_named(good)}") == [200]
    assert not marker.exists()


def test_check_hash_refuses_an_existing_cached_file_that_does_not_match_its_name(
    hub_home: Path, tmp_path: Path
) -> None:
    good, marker = _checkpoint(), tmp_path / "pwned"
    planted = hub_home / "checkpoints" / _named(good)
    planted.parent.mkdir(parents=True)
    planted.write_bytes(_poisoned(marker))
    with WeightsServer() as server:
        url = server.add(f"/good/{_named(good)}", body=good)
        with pytest.raises(hub.CacheCorruptedError, match="does not start with") as info:
            hub.load_state_dict_from_url(url, check_hash=True, progress=False)
        assert str(planted) in str(info.value) and "rm " in str(info.value)
    assert not marker.exists()
    assert planted.exists()  # reported, never silently replaced or used


def test_a_verified_file_is_not_hashed_again_until_it_changes(
    hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import isolhub._weights.checkpoints as checkpoints

    hashed: list[int] = []
    real = checkpoints.sha256_fd
    monkeypatch.setattr(checkpoints, "sha256_fd", lambda fd: hashed.append(fd) or real(fd))
    good = _checkpoint()
    with WeightsServer() as server:
        url = server.add(f"/{_named(good)}", body=good)
        for _ in range(3):
            hub.load_state_dict_from_url(url, check_hash=True, progress=False)
        assert hashed == []  # the digest recorded while downloading is believed
        cached = hub_home / "checkpoints" / _named(good)
        os.utime(cached, ns=(1, 1))
        hub.load_state_dict_from_url(url, check_hash=True, progress=False)
        hub.load_state_dict_from_url(url, check_hash=True, progress=False)
        assert len(hashed) == 1  # a new identity costs one full re-hash
        assert server.count() == 1


def test_a_sandboxed_worker_reads_only_what_its_own_url_served(hub_home: Path) -> None:
    private = hub_home / "checkpoints" / "secret.pt"
    private.parent.mkdir(parents=True)
    private.write_bytes(_checkpoint(9.0))
    policy = hub.Sandbox(weight_hosts=("127.0.0.1",))
    with WeightsServer() as server:
        reply = _ask(policy, server.url("/other/secret.pt"))  # 404: the cached one is not served
        assert reply["ok"] is False and "404" in str(reply["error"])
        a = server.add("/a/w.pt", body=_checkpoint(1.0))
        b = server.add("/b/w.pt", body=_checkpoint(2.0))
        for url, value in ((a, 1.0), (b, 2.0), (a, 1.0)):
            fd = _served(policy, url).fd
            assert fd is not None
            with os.fdopen(fd, "rb") as f:
                assert torch.equal(torch.load(f)["w"], torch.full((4,), value))
        assert server.count() == 3  # the second ask for /a/w.pt was served from its own store


def test_a_changed_broker_store_file_is_downloaded_again_not_served(hub_home: Path) -> None:
    policy = hub.Sandbox(weight_hosts=("127.0.0.1",))
    body = _checkpoint(4.0)
    with WeightsServer() as server:
        url = server.add("/w.pt", body=body)
        assert _ask(policy, url)["ok"] is True
        (stored,) = (hub_home / "broker").glob("*/w.pt")
        stored.write_bytes(b"tampered" + body[8:])
        fd = _served(policy, url).fd
        assert fd is not None
        with os.fdopen(fd, "rb") as f:
            assert f.read() == body
        assert server.count() == 2


def test_a_worker_hash_prefix_is_checked_against_what_is_stored(hub_home: Path) -> None:
    policy = hub.Sandbox(weight_hosts=("127.0.0.1",))
    body = _checkpoint(5.0)
    with WeightsServer() as server:
        url = server.add("/w.pt", body=body)
        assert _ask(policy, url)["ok"] is True
        assert _ask(policy, url, hashlib.sha256(body).hexdigest()[:10])["ok"] is True
        assert server.count() == 1
        reply = _ask(policy, url, "0000000000")
        assert reply["ok"] is False and "invalid hash value" in str(reply["error"])
        assert _ask(policy, url, "../x")["ok"] is False
        assert _ask(policy, url, "x" * 65)["ok"] is False  # refused as malformed, not fetched
        assert server.count() == 2


def test_a_malformed_download_request_is_answered_and_never_reaches_the_broker() -> None:
    asked = []

    def broker(url: str, hash_prefix: str | None) -> tuple[str, int]:
        asked.append(url)
        raise AssertionError("reached the broker")

    r, w = os.pipe()
    os.close(w)
    for raw, fds in [
        ({"broker": {"url": 7, "hash_prefix": None}}, []),
        ({"broker": {"url": "https://h/w.pt"}}, []),
        ({"broker": {"url": "https://h/w.pt", "hash_prefix": None, "to": "/etc"}}, []),
        ({"broker": {"url": "https://h/" + "a" * (1 << 17), "hash_prefix": None}}, []),
        ({"broker": {"url": "https://h/w.pt", "hash_prefix": None}}, [r]),
    ]:
        answer = answer_download(broker, raw, fds)
        assert answer.fd is None and "malformed download request" in str(answer.error)
    assert asked == []
    with pytest.raises(OSError):
        os.fstat(r)  # the fd sent with a request was closed
