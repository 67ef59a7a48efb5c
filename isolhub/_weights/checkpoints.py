"""`load_state_dict_from_url` as in torch 2.13, on top of isolhub's hardened download.

Checkpoints live in `get_dir()/checkpoints/<file>` (torch.hub's layout). The file name comes from
the URL path's basename or `file_name=`, and must be one plain name (no `/`, not `.` or `..`).
An existing file is loaded with no network access. `.safetensors` files load through safetensors;
everything else through `torch.load` (legacy one-member zip checkpoints included).

Example (a file:// URL, so no network; an https URL is fetched the same way):
    >>> import os, torch
    >>> from isolhub._weights.checkpoints import load_state_dict_from_url
    >>> torch.save({"w": torch.ones(2)}, "w.pt")
    >>> load_state_dict_from_url(f"file://{os.path.abspath('w.pt')}", progress=False)
    Downloading: "file://.../w.pt" to .../checkpoints/w.pt
    {'w': tensor([1., 1.])}
    >>> os.listdir(os.path.join(get_dir(), "checkpoints"))   # cached under its file name
    ['w.pt']
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shlex
import shutil
import stat
import struct
import sys
import uuid
import warnings
import zipfile
from typing import Any
from urllib.parse import urlparse

from .._cache.store import temp_dir
from .._cache.verified import recorded, remember, sha256_fd
from .._config import get_dir, is_offline
from .._errors import (
    ArchiveError,
    CacheCorruptedError,
    CacheError,
    DownloadError,
    IsolhubError,
    OfflineError,
    Option,
)
from .._http import safe_url
from .download import download, fetch_broker

__all__ = ["HASH_REGEX", "checkpoint_name", "load_state_dict_from_url", "load_url"]

# torch.hub's convention: `name-<sha256 prefix>.ext`; the first match wins, as in torch.
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")

# torch's messages for a file it cannot parse (other RuntimeErrors are not the file's fault).
_TORCH_DAMAGE = re.compile(r"PytorchStreamReader|unexpected EOF|might be corrupted")

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

    Example (`check_hash`: the name's `-<hex>` suffix must start the file's SHA-256):
        >>> import hashlib, os, torch
        >>> from pathlib import Path
        >>> torch.save({"w": torch.zeros(1)}, "tmp.pt")
        >>> prefix = hashlib.sha256(Path("tmp.pt").read_bytes()).hexdigest()[:8]
        >>> os.rename("tmp.pt", f"net-{prefix}.pt")
        >>> url = f"file://{os.path.abspath(f'net-{prefix}.pt')}"
        >>> load_state_dict_from_url(url, check_hash=True, progress=False)
        Downloading: "file://.../net-....pt" to .../checkpoints/net-....pt
        {'w': tensor([0.])}

    Raises:
        HashMismatchError: `check_hash` and the bytes do not match the prefix in the name.
        DownloadError: the download failed, or no safe file name can be derived from the URL.
        CacheError: the checkpoint folder cannot be created or written.
        CacheCorruptedError: the cached file is damaged (truncated, flipped bytes, changed since
            it was downloaded, not a checkpoint) or, with `check_hash`, does not match the hash
            in its name; it is not loaded (see `verify_cached`).
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
        download(url, cached_file, hash_prefix, progress)
    verify_cached(cached_file, hash_prefix)
    return _load(cached_file, model_dir, map_location, weights_only, safetensors)


load_url = load_state_dict_from_url


def checkpoint_name(url: str, file_name: str | None = None) -> str:
    """The file name a checkpoint of `url` is stored under: `file_name`, else the URL's basename.

    Raises:
        DownloadError: the name is empty, `.`, `..`, or not a single path component.
    """
    name = file_name if file_name is not None else os.path.basename(urlparse(url).path)
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        what: str | Option = Option.of("file_name") if file_name is not None else "the URL's path"
        raise DownloadError(
            (
                f"cannot store {safe_url(url)}: ",
                what,
                f" gives no safe file name ({name!r}); pass ",
                Option.of("file_name"),
                " with a plain file name",
            ),
            url=safe_url(url),
        )
    return name


def verify_cached(path: str, hash_prefix: str | None) -> None:
    """Check the cached checkpoint `path` before it is loaded; cheap once it has been checked.

    What is checked, each time the file's identity (size, mtime, ctime, inode) is new to
    `_cache.verified`'s record of it: a file isolhub downloaded still has the SHA-256 it was downloaded
    with; with `hash_prefix` (`check_hash=True`) the full SHA-256 starts with it; a zip
    checkpoint's members pass their CRC-32 check (torch.load does not check them).

    Raises:
        CacheCorruptedError: the file cannot be read, changed since it was downloaded, does not
            match `hash_prefix`, or is a damaged zip; it is never loaded.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _corrupted(path, f"it cannot be read ({e.strerror})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _corrupted(path, "it is not a regular file")
        rec = recorded(path)
        known = rec if rec is not None and rec.same_file(st) else None
        digest = known.sha256 if known is not None else None
        downloaded = known is not None and known.downloaded
        reference = rec.sha256 if rec is not None and rec.downloaded else None
        if digest is None and (hash_prefix is not None or reference is not None):
            digest = sha256_fd(fd)
            if reference is not None:
                if digest != reference:
                    raise _corrupted(
                        path,
                        f"its SHA-256 is {digest}, not the {reference} it had when isolhub "
                        "downloaded it (changed on disk since)",
                    )
                downloaded = True
        zip_ok = known.zip_ok if known is not None else None
        if zip_ok is None and os.pread(fd, 4, 0) == b"PK\x03\x04":
            _check_zip(path)
            zip_ok = True
        if hash_prefix is not None and digest is not None and not digest.startswith(hash_prefix):
            raise _corrupted(
                path,
                f"its SHA-256 is {digest}, which does not start with {hash_prefix!r}, the hash "
                "in its name (check_hash=True)",
            )
        learned = (digest, zip_ok) != (None, None)
        if learned and (known is None or (known.sha256, known.zip_ok) != (digest, zip_ok)):
            remember(path, st, sha256=digest, downloaded=downloaded, zip_ok=zip_ok)
    finally:
        os.close(fd)


def _check_zip(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise _corrupted(path, f"it is a damaged zip archive (truncated?): {e}") from e
    if bad is not None:
        raise _corrupted(path, f"the CRC-32 of its member {bad!r} does not match (flipped bytes)")


def _corrupted(path: str, why: str) -> CacheCorruptedError:
    return CacheCorruptedError(
        f"the cached checkpoint {path} is corrupted: {why}. It was not loaded; delete it "
        f"(rm {shlex.quote(path)}) and load again to download it afresh",
        path=path,
    )


def _load(
    path: str, model_dir: str, map_location: Any, weights_only: bool, safetensors: bool
) -> dict[str, Any]:
    if safetensors:
        return _load_safetensors(path, map_location)
    import torch

    try:
        if _is_legacy_zip_format(path):
            return _legacy_zip_load(path, model_dir, map_location, weights_only)
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except IsolhubError:
        raise  # already typed (a hostile legacy zip's ArchiveError is also a ValueError)
    except pickle.UnpicklingError as e:
        if str(e).startswith("Weights only load failed"):
            raise  # torch's refusal of a file that holds more than weights, as torch raises it
        raise _corrupted(path, f"it is damaged or not a checkpoint ({e})") from e
    except (EOFError, zipfile.BadZipFile) as e:
        raise _corrupted(path, f"it is truncated or damaged ({type(e).__name__}: {e})") from e
    except (ValueError, OverflowError, struct.error) as e:
        # What unpickling garbage raises past its first opcodes ("invalid literal for int()").
        raise _corrupted(
            path, f"it is damaged or not a checkpoint ({type(e).__name__}: {e})"
        ) from e
    except RuntimeError as e:
        if not _TORCH_DAMAGE.search(str(e)):
            raise  # e.g. a CUDA map_location on a machine without CUDA: not the file's fault
        raise _corrupted(path, f"torch cannot read it ({str(e).splitlines()[0]})") from e


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
        raise _corrupted(path, f"it is damaged or not safetensors ({e})") from e


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
            scratch = temp_dir("legacy")
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
