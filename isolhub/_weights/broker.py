"""The parent's side of weights for sandboxed code: it downloads, the worker only reads.

A confined worker has no network. When its hubconf calls `torch.hub.load_state_dict_from_url`
(or `download_url_to_file`), the worker asks the parent, and the parent:

* parses the URL once, strictly (`check_url`): http(s) only, no user info, no backslash, no
  whitespace, control or non-ASCII character, no percent-encoded or non-canonical host, a port in
  1..65535; the host must be in `Sandbox.weight_hosts`. The URL is rebuilt from the parsed parts
  and that exact string is what is requested (`_http` checks that requests' own parse of it names
  the same host and port);
* downloads with a session that reads nothing from the environment (no `.netrc`, no proxy
  variables, no credentials), through `Sandbox.weight_proxy` only when the policy names one, and
  re-checks every redirect hop the same way (an https URL may not redirect to http);
* stops the body as soon as it passes `max_download_bytes`;
* stores the file in its own store, `<hub>/broker/<sha256 of the URL>/<name>`, never in the
  shared `checkpoints/` that trusted `load_state_dict_from_url` reads: nothing a worker causes to
  be stored can be taken later by trusted code, and a worker reads only what was downloaded from
  the URL it asked for;
* passes back a read-only fd of the file, checked against the worker's hash prefix if it gave one.

The worker's request and the answer are `_process.messages.BrokerRequest` and `BrokerAnswer`;
the parent's `Worker` decodes the one and builds the other (`_process.worker.answer_download`).

Example (a request for a host the policy does not allow is refused, not fetched):
    >>> serve = weights_broker(Sandbox(weight_hosts=("download.pytorch.org",)))
    >>> serve("https://evil.example/w.pt", None)
    Traceback (most recent call last):
    ...
    isolhub.DownloadError: the sandbox may not download 'https://evil.example/w.pt': host ...
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .._config import get_dir
from .._errors import DownloadError
from .._sandbox.policy import Sandbox

__all__ = [
    "Broker",
    "BrokerGuard",
    "CheckedURL",
    "check_url",
    "same_target",
    "store_path",
    "weights_broker",
]

# (the URL a worker asked for, its hash prefix or None) -> (the file's name, a read-only fd).
Broker = Callable[[str, "str | None"], tuple[str, int]]

_MAX_URL = 4096
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_NETLOC = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?")
_BAD_PERCENT = re.compile(r"%(?![0-9a-fA-F]{2})")
_HEX_PREFIX = re.compile(r"[0-9a-f]{0,64}")


@dataclass(frozen=True)
class CheckedURL:
    """A URL as the broker parsed it; `url` is the string rebuilt from the parts, to request."""

    url: str
    scheme: str
    host: str  # lower case; an IPv6 address in brackets
    port: int | None


def check_url(url: str, hosts: tuple[str, ...], *, after: CheckedURL | None = None) -> CheckedURL:
    """Parse `url` strictly, check its host against `hosts`, and rebuild it from its parts.

    `after` is the hop being redirected from: an https URL may not redirect to http.

    Example:
        >>> check_url("HTTPS://GitHub.com/a/w.pt#x", ("github.com",)).url
        'https://github.com/a/w.pt'

    Raises:
        DownloadError: the URL is malformed, ambiguous, or names a host not in `hosts`.
    """
    shown = _shown(url)

    def refuse(why: str) -> DownloadError:
        return DownloadError(f"the sandbox may not download {shown}: {why}", url=shown)

    if not isinstance(url, str) or len(url) > _MAX_URL:
        raise refuse(f"not a URL string of at most {_MAX_URL} characters")
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise refuse("it holds whitespace, control or non-ASCII characters (percent-encode them)")
    if "\\" in url:
        raise refuse("it holds a backslash, which URL parsers disagree about")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise refuse(f"it cannot be parsed ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or url[: len(scheme) + 3].lower() != scheme + "://":
        raise refuse("only http:// and https:// URLs are served")
    netloc = parts.netloc
    if "@" in netloc:
        raise refuse("user info (user:password@) is not allowed in a weights URL")
    if "%" in netloc:
        raise refuse("the host is percent-encoded")
    m = _NETLOC.fullmatch(netloc.lower())
    if m is None or not m.group("host"):
        raise refuse(f"the host part {netloc!r} is empty or malformed")
    host = _canonical_host(m.group("host"), refuse)
    port = _port(m.group("port"), refuse)
    path, query = parts.path or "/", parts.query
    if not path.startswith("/"):
        raise refuse("the path must start with '/'")
    if _BAD_PERCENT.search(path) or _BAD_PERCENT.search(query):
        raise refuse("a '%' not followed by two hex digits")
    if after is not None and after.scheme == "https" and scheme == "http":
        raise refuse("an https download may not be redirected to plain http")
    allowed = {h.lower() for h in hosts}
    if host not in allowed:
        raise refuse(
            f"host {host!r} is not in its weight_hosts {sorted(allowed)}; add it with "
            "Sandbox(weight_hosts=(...)) if you trust it"
        )
    netloc = host if port is None else f"{host}:{port}"
    rebuilt = f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
    checked = CheckedURL(rebuilt, scheme, host, port)
    same_target(checked, rebuilt)
    return checked


def same_target(checked: CheckedURL, url: str) -> None:
    """Refuse unless urllib3 (what requests connects with) reads `url` as `checked`'s target.

    Raises:
        DownloadError: another parser sees another scheme, host, port or user info.
    """
    from urllib3.util import parse_url

    try:
        p = parse_url(url)
    except ValueError:
        p = None
    default = 443 if checked.scheme == "https" else 80
    if (
        p is None
        or (p.scheme or "").lower() != checked.scheme
        or (p.host or "").lower() != checked.host
        or (p.port or default) != (checked.port or default)
        or p.auth is not None
    ):
        raise DownloadError(
            f"the sandbox may not download {_shown(url)}: the connection would not go to "
            f"{checked.host} as checked",
            url=_shown(url),
        )


def _canonical_host(host: str, refuse: Callable[[str], DownloadError]) -> str:
    if host.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise refuse(f"{host!r} is not an IPv6 address") from None
    labels = host.split(".")
    if all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        # inet_aton reads 127.1, 0x7f000001 and 0177.0.0.1 as addresses: only dotted quads pass.
        try:
            if str(ipaddress.IPv4Address(host)) == host:
                return host
        except ValueError:
            pass
        raise refuse(f"{host!r} is not a dotted-quad IPv4 address")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise refuse(f"{host!r} is not a plain host name (empty label, trailing dot or bad label)")
    return host


def _port(raw: str | None, refuse: Callable[[str], DownloadError]) -> int | None:
    if raw is None:
        return None
    port = int(raw)
    if not 1 <= port <= 65535 or str(port) != raw:
        raise refuse(f"port {raw!r} is out of range or not canonical")
    return port


def _shown(url: object) -> str:
    """The URL for a message: escaped (it comes from the worker) and bounded."""
    text = url if isinstance(url, str) else repr(url)
    return repr(text[:300] + ("..." if len(text) > 300 else ""))


@dataclass(frozen=True)
class BrokerGuard:
    """What `_http` needs to download for the broker: the hop check, the proxy, the size cap."""

    hosts: tuple[str, ...]
    proxy: str | None
    max_bytes: int | None

    def check(self, url: str, after: CheckedURL | None = None) -> CheckedURL:
        return check_url(url, self.hosts, after=after)

    def same_target(self, checked: CheckedURL, url: str) -> None:
        same_target(checked, url)


def store_path(checked: CheckedURL) -> str:
    """Where the broker keeps what it downloaded from `checked`: one folder per full URL."""
    from .checkpoints import checkpoint_name

    key = hashlib.sha256(checked.url.encode()).hexdigest()
    return os.path.join(get_dir(), "broker", key, checkpoint_name(checked.url))


def weights_broker(policy: Sandbox) -> Broker:
    """What serves a sandboxed worker's downloads under `policy`: `serve(url, hash_prefix)` is
    the file's name and a read-only fd of it (the caller's to close).

    `serve` raises `IsolhubError` (a `DownloadError` for a URL or hash prefix it refuses): the
    worker is answered with its message.
    """

    def serve(url: str, hash_prefix: str | None) -> tuple[str, int]:
        if hash_prefix is not None and not _HEX_PREFIX.fullmatch(hash_prefix):
            raise DownloadError("malformed hash prefix (expected up to 64 hex digits)")
        return _fetch(policy, url, hash_prefix)

    return serve


def _fetch(policy: Sandbox, url: str, hash_prefix: str | None) -> tuple[str, int]:
    from .._cache.verified import fd_digest
    from .download import download

    guard = BrokerGuard(policy.weight_hosts, policy.weight_proxy, policy.max_download_bytes)
    checked = guard.check(url)
    dest = store_path(checked)
    name = os.path.basename(dest)
    for attempt in range(2):
        if attempt or not os.path.isfile(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            download(checked.url, dest, hash_prefix, True, guard=guard)
        fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if policy.max_download_bytes is not None and size > policy.max_download_bytes:
                raise DownloadError(
                    f"{_shown(checked.url)} is {size} bytes, over the sandbox's "
                    f"max_download_bytes ({policy.max_download_bytes})",
                    url=checked.url,
                )
            # What was stored earlier is handed out only as what the URL served (its digest
            # recorded at download) and, when the worker names one, with its hash prefix.
            digest, downloaded = fd_digest(fd, dest)
            if downloaded and (hash_prefix is None or digest.startswith(hash_prefix)):
                return name, fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise DownloadError(f"{_shown(checked.url)} could not be stored intact", url=checked.url)
