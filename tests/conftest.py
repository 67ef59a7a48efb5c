"""Shared fixtures: every test gets its own hub dir and a clean environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import isolhub._config as config

_SCRUBBED = (
    "GITHUB_TOKEN",
    "ISOLHUB_HOME",
    "ISOLHUB_OFFLINE",
    "ISOLHUB_QUIET",
    "ISOLHUB_GITHUB_API",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
)


@pytest.fixture(autouse=True)
def hub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private hub dir (`$ISOLHUB_HOME`) and an environment without tokens or proxies."""
    for name in _SCRUBBED:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hub"
    monkeypatch.setenv("ISOLHUB_HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,127.0.0.2,localhost")
    monkeypatch.setattr(config, "_hub_dir_override", None)
    return home


def pytest_report_header() -> str:
    return f"isolhub tests: pid {os.getpid()}, cpus {os.cpu_count()}"
