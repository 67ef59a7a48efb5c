"""Shared fixtures: every test gets its own hub dir and a clean environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import isolhub._config as config


@pytest.fixture(autouse=True)
def hub_home(_clean_environment: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private hub dir (`$ISOLHUB_HOME`) in an environment without tokens or proxies (the root
    conftest.py's `_clean_environment` scrubs them)."""
    home = tmp_path / "hub"
    monkeypatch.setenv("ISOLHUB_HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,127.0.0.2,localhost")
    monkeypatch.setattr(config, "_hub_dir_override", None)
    return home


def pytest_report_header() -> str:
    return f"isolhub tests: pid {os.getpid()}, cpus {os.cpu_count()}"
