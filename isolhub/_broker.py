"""The parent's side of weights for sandboxed code: it downloads, the worker only reads.

A confined worker has no network. When its hubconf calls `torch.hub.load_state_dict_from_url`
(or `download_url_to_file`), the worker asks the parent; the parent checks the host against the
policy's allow-list, downloads into the shared cache (hash-checked, with the usual locks and
resume), checks the size cap, and passes back a read-only fd of the file.

Example:
    >>> serve = weights_broker(Sandbox(weight_hosts=("127.0.0.1",)))
    >>> serve({"broker": {"url": "http://127.0.0.1:8000/w.pt", "hash_prefix": None}})
    ({'ok': True, 'name': 'w.pt'}, [7])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ._cache import hub_dir
from ._errors import IsolhubError
from ._sandbox import Sandbox

Broker = Callable[[dict[str, Any]], tuple[dict[str, Any], list[int]]]


def weights_broker(policy: Sandbox) -> Broker:
    """A request handler serving a sandboxed worker's downloads under `policy`."""

    def serve(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        ask = request.get("broker")
        if not isinstance(ask, dict) or not isinstance(ask.get("url"), str):
            return {"ok": False, "error": "malformed download request"}, []
        url, hash_prefix = ask["url"], ask.get("hash_prefix")
        if hash_prefix is not None and not isinstance(hash_prefix, str):
            return {"ok": False, "error": "malformed hash prefix"}, []
        try:
            return _fetch(policy, url, hash_prefix)
        except IsolhubError as e:
            return {"ok": False, "error": str(e)}, []

    return serve


def _fetch(policy: Sandbox, url: str, hash_prefix: str | None) -> tuple[dict[str, Any], list[int]]:
    from ._checkpoints import checkpoint_name
    from ._download import download_url_to_file, safe_url

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in policy.weight_hosts:
        return {
            "ok": False,
            "error": f"the sandbox may not download {safe_url(url)}: host {parts.hostname!r} is not "
            f"in its weight_hosts {list(policy.weight_hosts)}; add it with "
            "Sandbox(weight_hosts=(...)) if you trust it",
        }, []
    name = checkpoint_name(url)
    dest = hub_dir(create=True) / "checkpoints" / name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        download_url_to_file(url, str(dest), hash_prefix, progress=True)
    size = dest.stat().st_size
    if policy.max_download_bytes is not None and size > policy.max_download_bytes:
        return {
            "ok": False,
            "error": f"{safe_url(url)} is {size} bytes, over the sandbox's max_download_bytes "
            f"({policy.max_download_bytes})",
        }, []
    fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return {"ok": True, "name": name}, [fd]
