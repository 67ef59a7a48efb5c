"""The one mapper of foreign errors: what `requests` and `urllib3` raise, in isolhub's words.

Both HTTP users (`_http`'s downloads, `_source.github`'s API calls) wrap each exchange in
`foreign_errors(fail)`; every `requests.RequestException` and `urllib3` `HTTPError` raised
inside leaves it as `fail(reason, retryable)`, an isolhub error (or `_http`'s retry signal),
with the foreign exception as its `__cause__`. So one failure reads, and is classed, the same
whichever stack met it (httpx's `map_httpcore_exceptions` is the model):

    TLS error (...); check the system clock and certificates (REQUESTS_CA_BUNDLE)   final
    invalid request (...); check the URL and headers                              final
    proxy error (...); check HTTP(S)_PROXY and NO_PROXY                           retryable
    connect timeout after 10 s (...)                                              retryable
    connection refused (the host is unreachable), no data for 30 s (read timeout),
    the host name could not be resolved, connection reset by the server,
    connection closed before the end of the body, or the error's own text        retryable

Example (port 9 of the loopback address: nothing listens there):
    >>> import requests
    >>> from isolhub import ResolveError
    >>> with foreign_errors(lambda reason, retryable: ResolveError(f"no: {reason}")):
    ...     requests.get("http://127.0.0.1:9/")
    Traceback (most recent call last):
    isolhub.ResolveError: no: connection refused (the host is unreachable)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["describe", "foreign_errors"]


def describe(e: BaseException, timeouts: tuple[float, float] = (10.0, 30.0)) -> tuple[str, bool]:
    """`(reason, retryable)` for a foreign exception `e`; `timeouts` is (connect, read) in s."""
    import requests
    import urllib3

    exc = requests.exceptions
    if isinstance(e, exc.SSLError):
        reason = f"TLS error ({_short(e)}); check the system clock and certificates"
        return reason + " (REQUESTS_CA_BUNDLE)", False
    if isinstance(e, (exc.InvalidURL, exc.InvalidSchema, exc.MissingSchema, exc.InvalidHeader)):
        return f"invalid request ({_short(e)}); check the URL and headers", False
    if isinstance(e, exc.ProxyError):
        return f"proxy error ({_short(e)}); check HTTP(S)_PROXY and NO_PROXY", True
    if isinstance(e, exc.ConnectTimeout):
        return f"connect timeout after {timeouts[0]:g} s ({_short(e)})", True
    if isinstance(e, (exc.ConnectionError, exc.Timeout, urllib3.exceptions.HTTPError)):
        # urllib3's own errors are raised while reading a body: a cut, a reset, a read timeout.
        return _network(e, timeouts[1]), True
    return _short(e), True


@contextlib.contextmanager
def foreign_errors(
    fail: Callable[[str, bool], BaseException], timeouts: tuple[float, float] = (10.0, 30.0)
) -> Iterator[None]:
    """Raise `fail(reason, retryable)` (from `describe`) for a requests/urllib3 error inside."""
    import requests
    import urllib3

    try:
        yield
    except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
        reason, retryable = describe(e, timeouts)
        raise fail(reason, retryable) from e


def _network(e: BaseException, read_timeout: float) -> str:
    text = _short(e)
    low = text.lower()
    if "read timed out" in low or "timed out" in low:
        return f"no data for {read_timeout:g} s (read timeout)"
    if "incompleteread" in low or "incomplete" in low:
        return "connection closed before the end of the body"
    if "refused" in low:
        return "connection refused (the host is unreachable)"
    if "name or service not known" in low or "name resolution" in low:
        return "the host name could not be resolved"
    if "reset" in low:
        return "connection reset by the server"
    return text


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    # requests nests urllib3's reasons into long texts: bound them.
    return text if len(text) <= 300 else text[:300] + "..."
