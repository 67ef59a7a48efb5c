"""A real PEP 503 package index on 127.0.0.1 for tests, serving wheels and sdists built here.

    with PackageIndex(tmp_path / "index") as index:
        index.add_wheel("tinypkg", "1.0", {"tinypkg/__init__.py": "VERSION = '1.0'\\n"})
        index.add_sdist("onlysrc", "1.0")
        env = index.installer_env()      # UV_DEFAULT_INDEX / PIP_INDEX_URL -> this index only
        index.count("/files/")           # requests seen, by path prefix

Wheels are written with zipfile and are complete (METADATA, WHEEL, RECORD with hashes), so uv
and pip install them as they would any wheel. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import tarfile
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode()


def build_wheel(
    dest: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()
) -> Path:
    """Write `<name>-<version>-py3-none-any.whl` holding `files` into `dest`."""
    dist = f"{name.replace('-', '_')}-{version}"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    contents = dict(files)
    contents[f"{dist}.dist-info/METADATA"] = "\n".join(meta) + "\n"
    contents[f"{dist}.dist-info/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: isolhub-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [
        f"{path},{_record_hash(text.encode())},{len(text.encode())}"
        for path, text in contents.items()
    ]
    record.append(f"{dist}.dist-info/RECORD,,")
    contents[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = dest / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for member, text in contents.items():
            z.writestr(member, text)
    return path


def build_sdist(dest: Path, name: str, version: str) -> Path:
    """Write `<name>-<version>.tar.gz`, a source distribution (building it runs its setup.py)."""
    base = f"{name}-{version}"
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        "setup.py": f"from setuptools import setup\nsetup(name={name!r}, version={version!r})\n",
    }
    path = dest / f"{base}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{base}/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


class PackageIndex:
    """A "simple" index over a folder: `/simple/<name>/` pages linking to `/files/<file>`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "files").mkdir(parents=True, exist_ok=True)
        (root / "simple").mkdir(exist_ok=True)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PackageIndex:
        handler = partial(_Handler, directory=str(self.root))
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.seen = []  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/simple/"

    @property
    def seen(self) -> list[str]:
        assert self._httpd is not None
        return list(self._httpd.seen)  # type: ignore[attr-defined]

    def count(self, prefix: str = "/") -> int:
        """Requests seen whose path starts with `prefix`."""
        return sum(1 for p in self.seen if p.startswith(prefix))

    def add_wheel(
        self, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = ()
    ) -> Path:
        path = build_wheel(self.root / "files", name, version, files, requires)
        self._index(name)
        return path

    def add_sdist(self, name: str, version: str) -> Path:
        path = build_sdist(self.root / "files", name, version)
        self._index(name)
        return path

    def _index(self, name: str) -> None:
        norm = name.lower().replace("_", "-")
        prefix = name.replace("-", "_").lower()
        links = []
        for f in sorted((self.root / "files").iterdir()):
            if f.name.lower().startswith((prefix + "-", norm + "-")):
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
                href = html.escape(f"../../files/{f.name}#sha256={digest}")
                links.append(f'<a href="{href}">{html.escape(f.name)}</a><br/>')
        page = self.root / "simple" / norm
        page.mkdir(exist_ok=True)
        (page / "index.html").write_text(
            "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n"
        )
        names = sorted(p.name for p in (self.root / "simple").iterdir() if p.is_dir())
        (self.root / "simple" / "index.html").write_text(
            "<!DOCTYPE html><html><body>\n"
            + "\n".join(f'<a href="{n}/">{n}</a>' for n in names)
            + "\n</body></html>\n"
        )

    def installer_env(self, cache: Path) -> dict[str, str]:
        """Environment for uv and pip: this index and nothing else, no user config, `cache`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
        env.update(
            UV_DEFAULT_INDEX=self.url,
            UV_NO_CONFIG="1",
            UV_CACHE_DIR=str(cache / "uv"),
            UV_PYTHON_DOWNLOADS="never",
            PIP_INDEX_URL=self.url,
            PIP_CONFIG_FILE=os.devnull,
            PIP_CACHE_DIR=str(cache / "pip"),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            PIP_NO_INPUT="1",
        )
        return env
