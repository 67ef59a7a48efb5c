"""`load_state_dict_from_url` as in torch 2.13, on top of isolhub's hardened download.

Checkpoints live in `get_dir()/checkpoints/<file>` (torch.hub's layout). The file name comes from
the URL path's basename or `file_name=`, and must be one plain name (no `/`, not `.` or `..`).
An existing file is loaded with no network access. `.safetensors` files load through safetensors;
everything else through `torch.load` (legacy one-member zip checkpoints included).

Example:
    >>> from isolhub._checkpoints import load_state_dict_from_url
    >>> sd = load_state_dict_from_url("https://host/resnet18-f37072fd.pth", check_hash=True)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
import zipfile
from typing import Any
from urllib.parse import urlparse

from ._config import get_dir, is_offline
from ._download import _download, fetch_broker, safe_url
from ._errors import ArchiveError, CacheCorruptedError, CacheError, DownloadError, OfflineError

__all__ = ["HASH_REGEX", "load_state_dict_from_url", "load_url"]

# torch.hub's convention: `name-<sha256 prefix>.ext`; the first match wins, as in torch.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

_LEGACY_ZIP_MESSAGE = (
    "Falling back to the old format < 1.6. This support will be "
    "deprecated in favor of default zipfile format introduced in 1.6. "
    "Please redo torch.save() to save it in the new zipfile format."
)


def load_state_dict_from_url(
    url: str,
    model_dir: str | None = None,
    map_location: Any = None,
    progress: bool = True,
    check_hash: bool = False,
    file_name: str | None = None,
    weights_only: bool = False,
) -> dict[str, Any]:
    """Load the checkpoint at `url`, downloading it into `model_dir` first if it is not there.

    Same signature, defaults and behaviour as `torch.hub.load_state_dict_from_url` in torch 2.13.

    Args:
        url: where the checkpoint is.
        model_dir: where to keep it; default `get_dir()/checkpoints`.
        map_location: passed to `torch.load` (for `.safetensors`, a device or device string).
        progress: show a progress bar on stderr while downloading.
        check_hash: verify the SHA-256 prefix in the file name (`name-<hex>.ext`), if any.
        file_name: the name to store it under, instead of the URL's basename.
        weights_only: passed to `torch.load`; use True for files you do not trust.

    Example:
        >>> sd = load_state_dict_from_url("https://host/x/model.safetensors", map_location="cpu")

    Raises:
        HashMismatchError: `check_hash` and the bytes do not match the prefix in the name.
        DownloadError: the download failed, or no safe file name can be derived from the URL.
        CacheError: the checkpoint folder cannot be created or written.
        CacheCorruptedError: a `.safetensors` file cannot be parsed.
        OfflineError: offline mode is on and the checkpoint is not cached.
        pickle.UnpicklingError: `weights_only=True` and the file holds more than weights.
    """
    if os.getenv("TORCH_MODEL_ZOO"):
        warnings.warn(
            "TORCH_MODEL_ZOO is deprecated, please use env TORCH_HOME instead",
            stacklevel=2,
        )
    if model_dir is None:
        model_dir = os.path.join(get_dir(), "checkpoints")
    model_dir = os.path.expanduser(os.fspath(model_dir))
    filename = checkpoint_name(url, file_name)
    cached_file = os.path.join(model_dir, filename)
    safetensors = filename.endswith(".safetensors")
    hash_prefix = None
    if check_hash:
        m = HASH_REGEX.search(filename)
        hash_prefix = m.group(1) if m else None

    broker = fetch_broker()
    if broker is not None and not os.path.exists(cached_file):
        # Inside a sandboxed worker: the parent fetches, the file may be read-only.
        return _load(broker(url, hash_prefix), model_dir, map_location, weights_only, safetensors)

    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise CacheError(
            f"cache not writable: cannot create {model_dir} ({e.strerror}); set ISOLHUB_HOME, "
            "call set_dir() or pass model_dir=",
            path=model_dir,
        ) from e
    if not os.path.exists(cached_file):
        if is_offline():
            raise OfflineError(
                f"offline (ISOLHUB_OFFLINE is set) and {safe_url(url)} is not cached at "
                f"{cached_file}; unset ISOLHUB_OFFLINE to download it",
                url=safe_url(url),
                path=cached_file,
            )
        sys.stdout.write(f'Downloading: "{url}" to {cached_file}\n')
        _download(url, cached_file, hash_prefix, progress)
    return _load(cached_file, model_dir, map_location, weights_only, safetensors)


load_url = load_state_dict_from_url


def checkpoint_name(url: str, file_name: str | None = None) -> str:
    """The file name a checkpoint of `url` is stored under: `file_name`, else the URL's basename.

    Raises:
        DownloadError: the name is empty, `.`, `..`, or not a single path component.
    """
    name = file_name if file_name is not None else os.path.basename(urlparse(url).path)
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        what = "file_name" if file_name is not None else "the URL's path"
        raise DownloadError(
            f"cannot store {safe_url(url)}: {what} gives no safe file name ({name!r}); "
            "pass file_name= with a plain file name",
            url=safe_url(url),
        )
    return name


def _load(
    path: str, model_dir: str, map_location: Any, weights_only: bool, safetensors: bool
) -> dict[str, Any]:
    if safetensors:
        return _load_safetensors(path, map_location)
    import torch

    if _is_legacy_zip_format(path):
        return _legacy_zip_load(path, model_dir, map_location, weights_only)
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def _load_safetensors(path: str, map_location: Any) -> dict[str, Any]:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device: str = "cpu"
    if isinstance(map_location, str | torch.device):
        device = str(map_location)
    elif isinstance(map_location, dict):
        device = str(map_location.get("cpu", "cpu"))
    try:
        return load_file(path, device=device)
    except SafetensorError as e:
        raise CacheCorruptedError(
            f"cannot load {path} as safetensors: {e}; the file is damaged or not safetensors. "
            "Delete it (isolhub cache rm) and download it again",
            path=path,
        ) from e


def _is_legacy_zip_format(filename: str) -> bool:
    if zipfile.is_zipfile(filename):
        with zipfile.ZipFile(filename) as zf:
            infolist = zf.infolist()
        return len(infolist) == 1 and not infolist[0].is_dir()
    return False


def _legacy_zip_load(
    filename: str, model_dir: str, map_location: Any, weights_only: bool
) -> dict[str, Any]:
    """Extract a pre-1.6 checkpoint zipped alone into `model_dir` and load it, as torch does."""
    import torch

    warnings.warn(_LEGACY_ZIP_MESSAGE, FutureWarning, stacklevel=4)
    with zipfile.ZipFile(filename) as zf:
        members = zf.infolist()
        if len(members) != 1:
            raise RuntimeError("Only one file(not dir) is allowed in the zipfile")
        member = members[0]
        try:
            extracted = _extract_member(zf, member, model_dir, filename)
            scratch = None
        except CacheError:
            # A read-only cache (or a sandbox): extract somewhere private instead.
            scratch = tempfile.mkdtemp(prefix="isolhub-legacy-")
            extracted = _extract_member(zf, member, scratch, filename)
    try:
        return torch.load(extracted, map_location=map_location, weights_only=weights_only)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _extract_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, into: str, archive: str) -> str:
    name = member.filename
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise ArchiveError(
            f"refusing to extract {name!r} from {archive}: it would land outside {into}; "
            "the checkpoint is malformed or hostile",
            path=archive,
            member=name,
        )
    target = os.path.join(into, *[p for p in parts if p not in ("", ".")])
    tmp = f"{target}.{uuid.uuid4().hex}.extract.partial"
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "wb") as out, zf.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        # Replace atomically: another process may be loading the extracted file right now.
        os.replace(tmp, target)
    except OSError as e:
        raise CacheError(
            f"cannot extract {name!r} from {archive} into {into} ({e.strerror or e}); "
            "make it writable, or set ISOLHUB_HOME",
            path=archive,
        ) from e
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return target
