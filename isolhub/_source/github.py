"""The GitHub REST source: resolve a ref to a commit and download that commit's tarball.

The API base is `isolhub._config.github_api()` (`$ISOLHUB_GITHUB_API`), read at call time, so
GitHub Enterprise and a loopback test server work alike. `$GITHUB_TOKEN` is sent only to the API's
own host and port: redirects are followed by hand, and the token is added per hop, never carried
to another host (codeload, a CDN, anything a redirect names).

Example (needs the network: GitHub's API):
    >>> ref, sha = resolve_ref("pytorch", "vision", "v0.10.0")  # doctest: +SKIP
    >>> download_tarball("pytorch", "vision", sha, Path("vision.tar.gz"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from .. import _config
from .._errormap import foreign_errors
from .._errors import DownloadError, Option, RefNotFoundError, RefValidationError, ResolveError
from .._http import follow, new_session, retry_after, safe_url

__all__ = [
    "BACKOFF_S",
    "MAX_RETRY_AFTER_S",
    "MAX_VALIDATION_PAGES",
    "RETRIES",
    "TIMEOUT",
    "api_session",
    "download_tarball",
    "resolve_ref",
    "torch_not_found",
    "validate_ref",
    "web_url",
]

TIMEOUT = (10, 60)  # (connect, read) seconds, per request
RETRIES = 3  # extra attempts after a 5xx or a 429 without a rate-limit reset
BACKOFF_S = 0.5  # first retry delay, doubled each time; tests lower it
MAX_RETRY_AFTER_S = 30  # a longer Retry-After is refused rather than slept through
MAX_VALIDATION_PAGES = 1000  # per listing, 100 refs a page: a server cannot page us forever
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA_MEDIA = "application/vnd.github.sha"


def api_session() -> requests.Session:
    """A `requests.Session` for the GitHub API: User-Agent `isolhub`, the v3 JSON media type.

    Timeouts are per request (`TIMEOUT`: connect 10 s, read 60 s); the token is added per request.

    Example:
        >>> with api_session() as s:
        ...     s.headers["Accept"]
        'application/vnd.github.v3+json'
    """
    return new_session(
        headers={"User-Agent": "isolhub", "Accept": "application/vnd.github.v3+json"}
    )


def resolve_ref(
    owner: str, name: str, ref: str | None, *, session: requests.Session | None = None
) -> tuple[str, str]:
    """Resolve a branch, tag or commit (the default branch when `ref` is None) to a commit SHA.

    Returns `(ref_name, sha)`, where `ref_name` is `ref`, or the default branch's name.

    Example (needs the network: GitHub's API):
        >>> resolve_ref("pytorch", "vision", "main")  # doctest: +SKIP
        ('main', '3f2a...')

    Raises:
        RefNotFoundError: no such repository, or it has no such branch, tag or commit.
        ResolveError: rate limited (with the reset time), unreachable, or a persistent 5xx.
    """
    api = _config.github_api()
    repo_url = f"{api}/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
    with _session_scope(session) as s:
        if ref is None:
            resp = _get(s, repo_url, ResolveError)
            if resp.status_code == 404:
                raise _repo_not_found(owner, name, api)
            _raise_for_status(resp, ResolveError)
            try:
                ref = str(resp.json()["default_branch"])
            except (ValueError, KeyError, TypeError) as e:
                raise ResolveError(f"{safe_url(repo_url)} gave no default branch ({e})") from e
        url = f"{repo_url}/commits/{quote(ref, safe='')}"
        resp = _get(s, url, ResolveError, accept=_SHA_MEDIA)
        if resp.status_code in (404, 422):
            if resp.status_code == 404 and _get(s, repo_url, ResolveError).status_code == 404:
                raise _repo_not_found(owner, name, api)
            raise RefNotFoundError(
                f"{torch_not_found(owner, name, ref, api)} (GitHub repository {owner}/{name} has "
                f"no branch, tag or commit {ref!r})",
                repo=f"{owner}/{name}",
                ref=ref,
            )
        _raise_for_status(resp, ResolveError)
        sha = resp.text.strip()
        if not _SHA.match(sha):
            raise ResolveError(f"{safe_url(url)} answered {sha[:80]!r}, not a commit SHA")
        return ref, sha


def download_tarball(
    owner: str, name: str, sha: str, dest_file: Path, *, session: requests.Session | None = None
) -> None:
    """Download the tarball of commit `sha` into `dest_file` (created or truncated, never followed).

    The API answers with a redirect (to codeload on github.com); the token never follows it to
    another host. Check the result with `extract_tar(..., expected_commit=sha)`. On error a
    partial file may be left at `dest_file`: pass a staging name and remove it.

    Example (needs the network: GitHub's API and codeload):
        >>> download_tarball("pytorch", "vision", sha, staging / "src.tar.gz")  # doctest: +SKIP

    Raises:
        DownloadError: (a `FetchError`) any HTTP status but 200, rate limited, unreachable, or the
            connection broke mid-body; the message names the URL (never with credentials).
    """
    url = f"{_config.github_api()}/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
    url += f"/tarball/{quote(sha, safe='')}"
    with _session_scope(session) as s:
        resp = _get(s, url, DownloadError, stream=True)
        with resp:
            _raise_for_status(resp, DownloadError)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            shown = safe_url(resp.url)
            with (
                foreign_errors(
                    lambda reason, _: DownloadError(
                        f"download of {shown} broke off: {reason}", url=shown
                    ),
                    TIMEOUT,
                ),
                os.fdopen(os.open(dest_file, flags, 0o644), "wb") as out,
            ):
                for chunk in resp.iter_content(1 << 20):
                    out.write(chunk)


def validate_ref(
    owner: str, name: str, ref: str, *, session: requests.Session | None = None
) -> None:
    """torch.hub's `_validate_not_a_forked_repo`: `ref` must be a branch or tag of owner/name.

    Pages `/branches`, then `/tags`, with `per_page=100` until an empty page; a match is an equal
    name or a head commit SHA starting with `ref`. A page that fails with `$GITHUB_TOKEN` sent is
    asked once more without it (the token may lack access); with no token set, the error is raised.

    Example (needs the network: GitHub's API):
        >>> validate_ref("pytorch", "vision", "nope")  # doctest: +SKIP
        Traceback (most recent call last):
        isolhub.RefValidationError: ...

    Raises:
        RefValidationError: nothing matched (a `ValueError`, mentioning forked repos).
        ResolveError: a page could not be had (HTTP error, rate limit, malformed JSON, or more
            than `MAX_VALIDATION_PAGES` pages).
    """
    api = _config.github_api()
    repo_url = f"{api}/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
    with _session_scope(session) as s:
        for kind in ("branches", "tags"):
            for page in range(1, MAX_VALIDATION_PAGES + 1):
                items = _validation_page(s, f"{repo_url}/{kind}?per_page=100&page={page}")
                if not items:
                    break
                if any(item[0] == ref or item[1].startswith(ref) for item in items):
                    return
            else:
                raise ResolveError(
                    (
                        f"{safe_url(repo_url)}/{kind} has more than {MAX_VALIDATION_PAGES} pages; "
                        "pass ",
                        Option.of(skip_validation=True),
                    )
                )
    raise RefValidationError(
        (
            f"{torch_not_found(owner, name, ref, api)} ({ref!r} names no branch or tag of "
            f"{owner}/{name} and is no prefix of one's head commit; for an older commit of this "
            "repository, pass ",
            Option.of(skip_validation=True),
            ")",
        ),
        repo=f"{owner}/{name}",
        ref=ref,
    )


def web_url(api: str) -> str:
    """The web root for an API base: github.com for api.github.com, else the base less `/api/v3`.

    GitHub Enterprise serves its API under `<host>/api/v3`, so its web root is `<host>`.
    """
    split = urlsplit(api)
    if split.netloc.lower() == "api.github.com":
        return "https://github.com"
    path = split.path.rstrip("/")
    path = path[: -len("/api/v3")] if path.endswith("/api/v3") else path
    return safe_url(urlunsplit((split.scheme, split.netloc, path, "", "")))


def torch_not_found(owner: str, name: str, ref: str, api: str) -> str:
    """torch.hub's sentence for a ref it cannot find (its `_validate_not_a_forked_repo`)."""
    return (
        f"Cannot find {ref} in {web_url(api)}/{owner}/{name}. If it's a commit from a forked "
        "repo, please call hub.load() with forked repo directly."
    )


def _validation_page(s: requests.Session, url: str) -> list[tuple[str, str]]:
    """One page of `/branches` or `/tags` as (name, head SHA) pairs."""
    resp = _get(s, url, ResolveError)
    if resp.status_code != 200 and _config.github_token():
        resp.close()
        resp = _get(s, url, ResolveError, token=False)  # as torch.hub: retry without the token
    _raise_for_status(resp, ResolveError)
    try:
        return [(str(i["name"]), str(i["commit"]["sha"])) for i in resp.json()]
    except (ValueError, KeyError, TypeError) as e:
        raise ResolveError(
            f"{safe_url(url)} answered malformed JSON ({e!r})", url=safe_url(url)
        ) from e


@contextlib.contextmanager
def _session_scope(session: requests.Session | None) -> Iterator[requests.Session]:
    """The caller's session, or a fresh `api_session()` closed afterwards."""
    if session is not None:
        yield session
        return
    with api_session() as fresh:
        yield fresh


def _get(
    s: requests.Session,
    url: str,
    error: type[ResolveError] | type[DownloadError],
    *,
    accept: str | None = None,
    stream: bool = False,
    token: bool = True,
) -> requests.Response:
    """GET `url`, following redirects by hand and retrying 5xx/429; the last response is returned.

    Rate limits and exhausted retries raise `error`; other statuses are the caller's to judge.
    `token=False` leaves `$GITHUB_TOKEN` out even on the API host.
    """
    for attempt in range(RETRIES + 1):
        resp = _follow(s, url, error, accept=accept, stream=stream, token=token)
        limited = _rate_limit_message(resp)
        retryable = resp.status_code >= 500 or (resp.status_code == 429 and not limited)
        if limited and not retryable:
            resp.close()
            raise error(limited, url=safe_url(url), status=resp.status_code)
        if not retryable:
            return resp
        resp.close()
        delay = max(BACKOFF_S * 2**attempt, retry_after(resp.headers.get("Retry-After")) or 0.0)
        if attempt == RETRIES or delay > MAX_RETRY_AFTER_S:
            detail = limited or f"HTTP {resp.status_code} {resp.reason}"
            raise error(
                f"{safe_url(resp.url)} failed after {attempt + 1} attempts: {detail}",
                url=safe_url(resp.url),
                status=resp.status_code,
            )
        time.sleep(delay)
    raise AssertionError("unreachable")


def _follow(
    s: requests.Session,
    url: str,
    error: type[ResolveError] | type[DownloadError],
    *,
    accept: str | None,
    stream: bool,
    token: bool = True,
) -> requests.Response:
    api = _origin(_config.github_api())
    secret = _config.github_token() if token else None

    def credentials(hop: str) -> dict[str, str]:
        return {"Authorization": f"token {secret}"} if secret and _origin(hop) == api else {}

    def refused(detail: str) -> Exception:
        return error(f"{safe_url(url)}: {detail}", url=safe_url(url))

    def unreachable(reason: str, _retryable: bool) -> Exception:
        return error(f"could not reach {safe_url(url)}: {reason}", url=safe_url(url))

    with foreign_errors(unreachable, TIMEOUT):
        return follow(
            s,
            url,
            {"Accept": accept} if accept else {},
            timeout=TIMEOUT,
            fail=refused,
            per_hop=credentials,
            stream=stream,
        )


def _origin(url: str) -> tuple[str, int | None]:
    """(host, port) of `url`, the port made explicit, for the token's same-host rule."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return (parts.hostname or "").lower(), parts.port or default


def _rate_limit_message(resp: requests.Response) -> str | None:
    if resp.status_code not in (403, 429) or resp.headers.get("x-ratelimit-remaining") != "0":
        return None
    reset = resp.headers.get("x-ratelimit-reset", "")
    when = "an unknown time"
    if reset.isdigit():
        at = datetime.fromtimestamp(int(reset), tz=UTC)
        when = f"{at:%Y-%m-%d %H:%M:%S} UTC (in {max(0, int(reset) - int(time.time()))} s)"
    hint = (
        "GITHUB_TOKEN is set; wait for the reset or use another token"
        if _config.github_token()
        else "set GITHUB_TOKEN to a GitHub token for a higher limit"
    )
    return f"GitHub API rate limit exceeded ({safe_url(resp.url)}); it resets at {when}; {hint}"


def _raise_for_status(
    resp: requests.Response, error: type[ResolveError] | type[DownloadError]
) -> None:
    if resp.status_code == 200:
        return
    hint = " (check GITHUB_TOKEN)" if resp.status_code in (401, 403) else ""
    resp.close()
    raise error(
        f"{safe_url(resp.url)} answered HTTP {resp.status_code} {resp.reason}{hint}",
        url=safe_url(resp.url),
        status=resp.status_code,
    )


def _repo_not_found(owner: str, name: str, api: str) -> RefNotFoundError:
    return RefNotFoundError(
        f"GitHub repository {owner}/{name} not found at {safe_url(api)} "
        "(if it is private, set GITHUB_TOKEN)",
        repo=f"{owner}/{name}",
    )
