from pathlib import Path

import pytest
import torch.hub

import isolhub


def test_set_dir_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOLHUB_HOME", str(tmp_path / "env"))
    isolhub.set_dir(tmp_path / "explicit")
    assert isolhub.get_dir() == str(tmp_path / "explicit")


def test_isolhub_home_wins_over_every_torch_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_HOME", str(tmp_path / "env"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_set_dir"))
    assert isolhub.get_dir() == str(tmp_path / "env")


TORCH_SETTINGS = [
    {},
    {"XDG_CACHE_HOME": "{tmp}/xdg"},
    {"XDG_CACHE_HOME": "~/xdg"},
    {"TORCH_HOME": "{tmp}/th", "XDG_CACHE_HOME": "{tmp}/xdg"},
    {"TORCH_HOME": "~/th"},
    {"TORCH_HOME": "{tmp}/th", "set_dir": "{tmp}/chosen"},
    {"set_dir": "~/chosen"},
]


@pytest.mark.parametrize("setting", TORCH_SETTINGS, ids=lambda s: ",".join(s) or "defaults")
def test_without_isolhubs_own_settings_get_dir_is_what_torch_hub_answers(
    setting: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ISOLHUB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("TORCH_HOME", "XDG_CACHE_HOME", "TORCH_HUB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    for name, value in setting.items():
        value = value.format(tmp=tmp_path)
        if name == "set_dir":
            torch.hub.set_dir(value)
        else:
            monkeypatch.setenv(name, value)
    assert isolhub.get_dir() == torch.hub.get_dir()
    if not setting:
        assert isolhub.get_dir() == str(tmp_path / "home" / ".cache" / "torch" / "hub")


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
