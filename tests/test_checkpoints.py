"""load_state_dict_from_url: torch 2.13's behaviour, on the hardened download, with a real server.

Case numbers refer to ../shared/reference/reliability-plan.md.
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.hub
from safetensors.torch import save as save_safetensors

import isolhub._config as config
from isolhub._errors import (
    CacheCorruptedError,
    CacheError,
    DownloadError,
    HashMismatchError,
    OfflineError,
)
from isolhub._weights.checkpoints import checkpoint_name, load_state_dict_from_url, load_url
from isolhub._weights.download import set_fetch_broker

from weights_server import Guard, WeightsServer, leftovers, sha256


@pytest.fixture(autouse=True)
def fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ISOLHUB_HTTP_BACKOFF": "0.01",
        "ISOLHUB_HTTP_TIMEOUT": "1",
        "ISOLHUB_HTTP_CONNECT_TIMEOUT": "1",
        "ISOLHUB_HTTP_RETRIES": "2",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def server() -> Iterator[WeightsServer]:
    with WeightsServer() as s:
        yield s


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(16, 8, generator=g), "bias": torch.arange(16.0)}


def saved(sd: dict[str, torch.Tensor] | None = None, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict() if sd is None else sd, buf, **kwargs)
    return buf.getvalue()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hashed_name(stem: str, data: bytes, ext: str = ".pth") -> str:
    return f"{stem}-{sha256(data)[:8]}{ext}"


# -- torch.hub's behaviour ---------------------------------------------------------------------


def test_the_signature_and_defaults_are_torch_hubs() -> None:
    ours = inspect.signature(load_state_dict_from_url).parameters
    theirs = inspect.signature(torch.hub.load_state_dict_from_url).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == [
        (p.name, p.default, p.kind) for p in theirs.values()
    ]
    assert load_url is load_state_dict_from_url


def test_a_checkpoint_lands_in_get_dir_checkpoints_and_is_then_loaded_without_network(
    server: WeightsServer, hub_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = saved()
    name = hashed_name("net", data)
    url = server.add(f"/models/{name}", body=data)
    sd = load_state_dict_from_url(url, progress=False)
    assert same(sd, state_dict())
    cached = hub_home / "checkpoints" / name
    assert cached.read_bytes() == data
    assert capsys.readouterr().out == f'Downloading: "{url}" to {cached}\n'
    again = load_state_dict_from_url(url, progress=False, check_hash=True)
    assert same(again, sd)
    assert server.count() == 1
    assert capsys.readouterr().out == ""


def test_the_hub_dir_follows_set_dir(
    server: WeightsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config, "_hub_dir_override", str(tmp_path / "elsewhere"))
    url = server.add("/w.pth", body=saved())
    load_state_dict_from_url(url, progress=False)
    assert (tmp_path / "elsewhere" / "checkpoints" / "w.pth").exists()


def test_check_hash_passes_with_the_right_prefix(server: WeightsServer, hub_home: Path) -> None:
    data = saved()
    url = server.add(f"/{hashed_name('net', data)}", body=data)
    assert same(load_state_dict_from_url(url, check_hash=True, progress=False), state_dict())


def test_check_hash_fails_with_a_wrong_prefix_and_stores_nothing(
    server: WeightsServer, hub_home: Path
) -> None:
    guard = Guard(hub_home)
    data = saved()
    url = server.add("/net-deadbeef.pth", body=data)
    with pytest.raises(HashMismatchError) as info:
        load_state_dict_from_url(url, check_hash=True, progress=False)
    assert isinstance(info.value, RuntimeError)
    assert f'invalid hash value (expected "deadbeef", got "{sha256(data)}")' in str(info.value)
    assert not (hub_home / "checkpoints" / "net-deadbeef.pth").exists()
    guard.check()


def test_check_hash_without_a_hash_in_the_name_checks_nothing(
    server: WeightsServer, hub_home: Path
) -> None:
    url = server.add("/plain.pth", body=saved())
    assert same(load_state_dict_from_url(url, check_hash=True, progress=False), state_dict())


def test_without_check_hash_a_wrong_prefix_in_the_name_is_not_checked(
    server: WeightsServer, hub_home: Path
) -> None:
    url = server.add("/net-deadbeef.pth", body=saved())
    assert same(load_state_dict_from_url(url, progress=False), state_dict())


def test_file_name_and_model_dir_choose_where_the_file_goes(
    server: WeightsServer, hub_home: Path, tmp_path: Path
) -> None:
    url = server.add("/download?id=1234", body=saved())
    model_dir = tmp_path / "models"
    sd = load_state_dict_from_url(url, model_dir=str(model_dir), file_name="mine.pt")
    assert same(sd, state_dict())
    assert sorted(p.name for p in model_dir.iterdir()) == ["mine.pt"]
    assert not (hub_home / "checkpoints").exists()


def test_map_location_and_weights_only_are_forwarded(server: WeightsServer, hub_home: Path) -> None:
    url = server.add("/w.pth", body=saved())
    meta = load_state_dict_from_url(url, map_location="meta", progress=False)
    assert {t.device.type for t in meta.values()} == {"meta"}
    moved = load_state_dict_from_url(
        url, map_location=lambda storage, loc: storage, weights_only=True, progress=False
    )
    assert same(moved, state_dict())
    as_dict = load_state_dict_from_url(url, map_location={"cpu": "meta"}, progress=False)
    assert {t.device.type for t in as_dict.values()} == {"meta"}


def test_a_legacy_zip_checkpoint_is_extracted_and_loaded_with_a_future_warning(
    server: WeightsServer, hub_home: Path, tmp_path: Path
) -> None:
    legacy = saved(_use_new_zipfile_serialization=False)
    archive = tmp_path / "legacy.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("net_legacy.pth", legacy)
    url = server.add("/net_legacy.zip", body=archive.read_bytes())
    with pytest.warns(FutureWarning, match="will be deprecated in favor of default zipfile"):
        sd = load_state_dict_from_url(url, progress=False, weights_only=True)
    assert same(sd, state_dict())
    assert (hub_home / "checkpoints" / "net_legacy.pth").read_bytes() == legacy
    assert leftovers(hub_home) == []


def test_a_legacy_zip_member_cannot_escape_the_model_dir(
    server: WeightsServer, hub_home: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escaped.pth", saved(_use_new_zipfile_serialization=False))
    url = server.add("/evil.zip", body=archive.read_bytes())
    from isolhub._errors import ArchiveError

    with pytest.raises(ArchiveError, match="outside"), pytest.warns(FutureWarning):
        load_state_dict_from_url(url, progress=False)
    assert not (hub_home.parent / "escaped.pth").exists()
    assert not (tmp_path / "escaped.pth").exists()


def test_a_modern_zip_checkpoint_is_not_mistaken_for_a_legacy_zip(
    server: WeightsServer, hub_home: Path
) -> None:
    data = saved()
    assert zipfile.is_zipfile(io.BytesIO(data))
    url = server.add("/modern.pth", body=data)
    # filterwarnings=error: a FutureWarning here would fail the test.
    assert same(load_state_dict_from_url(url, progress=False), state_dict())
    assert sorted(p.name for p in (hub_home / "checkpoints").iterdir()) == ["modern.pth"]


def test_torch_model_zoo_still_warns_as_in_torch(
    server: WeightsServer, hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_MODEL_ZOO", "/somewhere")
    url = server.add("/w.pth", body=saved())
    with pytest.warns(UserWarning, match="TORCH_MODEL_ZOO is deprecated"):
        load_state_dict_from_url(url, progress=False)
    assert (hub_home / "checkpoints" / "w.pth").exists()


# -- safetensors -------------------------------------------------------------------------------


def test_a_safetensors_url_loads_through_safetensors(server: WeightsServer, hub_home: Path) -> None:
    data = save_safetensors(state_dict())
    url = server.add(f"/x/{hashed_name('model', data, '.safetensors')}", body=data)
    sd = load_state_dict_from_url(url, check_hash=True, progress=False)
    assert same(sd, state_dict())
    again = load_state_dict_from_url(url, map_location=torch.device("cpu"), progress=False)
    assert same(again, state_dict())
    assert server.count() == 1


# -- case 29: hostile weights ------------------------------------------------------------------


class _Payload:
    marker = ""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_is_refused_with_weights_only_and_runs_nothing(
    server: WeightsServer, hub_home: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    url = server.add("/evil.pth", body=saved({"x": payload}))  # type: ignore[dict-item]
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_from_url(url, weights_only=True, progress=False)
    assert not marker.exists()


def _safetensors_with_header_length(n: int, rest: bytes = b"{}") -> bytes:
    return n.to_bytes(8, "little") + rest


@pytest.mark.parametrize("declared", [1 << 40, 200 * 1024 * 1024], ids=["past-eof", "200MB"])
def test_a_safetensors_file_with_a_lying_header_is_refused_cleanly(
    server: WeightsServer, hub_home: Path, declared: int
) -> None:
    url = server.add("/bad.safetensors", body=_safetensors_with_header_length(declared))
    with pytest.raises(
        CacheCorruptedError, match="bad.safetensors is corrupted: it is damaged or not safetensors"
    ):
        load_state_dict_from_url(url, progress=False)


# -- case 24: offline --------------------------------------------------------------------------


def test_offline_mode_loads_cached_checkpoints_with_zero_requests_and_refuses_misses(
    server: WeightsServer, hub_home: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    url = server.add("/w.pth", body=saved())
    load_state_dict_from_url(url, progress=False)
    capsys.readouterr()
    server.stop()
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    assert same(load_state_dict_from_url(url, progress=False), state_dict())
    missing = server.url("/other.pth")
    with pytest.raises(OfflineError) as info:
        load_state_dict_from_url(missing, progress=False)
    assert "offline" in str(info.value) and missing in str(info.value)
    assert "ISOLHUB_OFFLINE" in str(info.value)
    assert server.count() == 1
    assert capsys.readouterr().out == ""


# -- case 30: names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "file_name"),
    [("/x/..", None), ("/x/", None), ("/", None), ("/w.pth", "../../evil"), ("/w.pth", "")],
    ids=["dotdot", "trailing-slash", "query-only", "file_name-escape", "empty-file_name"],
)
def test_unsafe_file_names_are_rejected(
    server: WeightsServer, hub_home: Path, path: str, file_name: str | None
) -> None:
    guard = Guard(hub_home)
    server.add(path.split("?")[0], body=saved())
    url = server.url(path + ("?a=b" if path == "/" else ""))
    with pytest.raises(DownloadError, match="no safe file name"):
        load_state_dict_from_url(url, file_name=file_name, progress=False)
    assert server.count() == 0
    guard.check()


def test_an_encoded_dot_dot_stays_a_literal_name_inside_the_folder(
    server: WeightsServer, hub_home: Path
) -> None:
    guard = Guard(hub_home)
    server.add("/x/%2e%2e%2fevil.pth", body=saved())
    load_state_dict_from_url(server.url("/x/%2e%2e%2fevil.pth"), progress=False)
    assert (hub_home / "checkpoints" / "%2e%2e%2fevil.pth").is_file()
    guard.check()


def test_content_disposition_never_chooses_the_file_name(
    server: WeightsServer, hub_home: Path
) -> None:
    guard = Guard(hub_home)
    headers = {"Content-Disposition": 'attachment; filename="../../x.pth"'}
    url = server.add("/w.pth", body=saved(), headers=headers)
    load_state_dict_from_url(url, progress=False)
    assert (hub_home / "checkpoints" / "w.pth").is_file()
    assert not (hub_home.parent / "x.pth").exists()
    guard.check()


def test_checkpoint_name_is_the_url_basename() -> None:
    assert checkpoint_name("https://h/a/b/resnet18-f37072fd.pth?x=1") == "resnet18-f37072fd.pth"
    assert checkpoint_name("https://h/a/b", "given.pt") == "given.pt"


# -- the broker seam ---------------------------------------------------------------------------


def test_a_broker_serves_load_state_dict_from_url_without_network(
    server: WeightsServer, hub_home: Path, tmp_path: Path
) -> None:
    data = saved()
    served = tmp_path / "from-parent.pth"
    served.write_bytes(data)
    served.chmod(0o444)
    asked: list[tuple[str, str | None]] = []

    def broker(url: str, hash_prefix: str | None) -> str:
        asked.append((url, hash_prefix))
        return str(served)

    url = server.add(f"/{hashed_name('net', data)}", body=b"never fetched")
    set_fetch_broker(broker)
    try:
        sd = load_state_dict_from_url(url, check_hash=True, progress=False)
    finally:
        set_fetch_broker(None)
    assert same(sd, state_dict())
    assert asked == [(url, sha256(data)[:8])]
    assert server.count() == 0
    assert not (hub_home / "checkpoints").exists()


# -- cases 21 and 23: full and read-only caches (tmpfs; root only) -----------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_cache_disk_fails_clearly_and_leaves_no_partial(
    server: WeightsServer, tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmpfs / "hub"
    monkeypatch.setenv("ISOLHUB_HOME", str(hub))
    guard = Guard(hub)
    (hub / ".locks").write_text("a file where the lock folder should be\n")
    data = os.urandom(256 * 1024)
    url = server.add("/big.pth", body=data)
    with pytest.raises(CacheError) as info:
        load_state_dict_from_url(url, progress=False)
    message = str(info.value)
    assert "no space left" in message and f"needed {len(data)} bytes" in message
    assert "bytes free in" in message and str(hub / "checkpoints") in message and url in message
    assert not (hub / "checkpoints" / "big.pth").exists()
    guard.check()


def test_a_read_only_cache_serves_hits_with_no_writes_and_refuses_misses_clearly(
    server: WeightsServer, tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmpfs / "hub"
    monkeypatch.setenv("ISOLHUB_HOME", str(hub))
    url = server.add("/w.pth", body=saved())
    load_state_dict_from_url(url, progress=False)
    files_before = [p.relative_to(hub) for p in hub.rglob("*")]
    remount = subprocess.run(
        ["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, text=True
    )
    if remount.returncode != 0:
        pytest.skip(f"cannot remount read-only ({remount.stderr.strip()})")
    assert same(load_state_dict_from_url(url, progress=False), state_dict())
    assert server.count() == 1
    missing = server.add("/missing.pth", body=saved())
    with pytest.raises(CacheError) as info:
        load_state_dict_from_url(missing, progress=False)
    message = str(info.value)
    assert f"cache not writable: {hub / 'checkpoints'}" in message and "ISOLHUB_HOME" in message
    assert server.count() == 1  # the miss failed before any request
    assert [p.relative_to(hub) for p in hub.rglob("*")] == files_before
