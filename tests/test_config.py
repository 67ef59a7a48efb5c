from pathlib import Path

import pytest

import isolhub


def test_set_dir_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOLHUB_HOME", str(tmp_path / "env"))
    isolhub.set_dir(tmp_path / "explicit")
    assert isolhub.get_dir() == str(tmp_path / "explicit")


def test_isolhub_home_wins_over_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOLHUB_HOME", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert isolhub.get_dir() == str(tmp_path / "env")


def test_xdg_cache_home_is_used_without_isolhub_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ISOLHUB_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert isolhub.get_dir() == str(tmp_path / "xdg" / "isolhub")


def test_platform_cache_dir_is_the_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISOLHUB_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert isolhub.get_dir().endswith("isolhub")


def test_set_dir_expands_the_user_and_accepts_pathlike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    isolhub.set_dir(Path("~/hub"))
    assert isolhub.get_dir() == "/home/someone/hub"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 200e-6), ("0", 0.0), ("50", 50e-6), ("-3", 0.0), ("1e9", 0.01), ("soon", 200e-6)],
)
def test_spin_time_comes_from_the_environment_bounded(
    value: str | None, seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from isolhub import _config

    if value is None:
        monkeypatch.delenv("ISOLHUB_SPIN_US", raising=False)
    else:
        monkeypatch.setenv("ISOLHUB_SPIN_US", value)
    assert _config.spin_seconds() == pytest.approx(seconds)
