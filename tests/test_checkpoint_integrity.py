"""A cached checkpoint that is truncated, has flipped bytes or is no checkpoint is never loaded.

Faults are made for real, on the file in the cache: a truncation, a byte XORed in place (same
size), a foreign file. Each is first shown to get through (or to fail untyped) with torch.hub's own
loader or torch.load, then to be a `CacheCorruptedError` naming the file and the fix in isolhub.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

import isolhub as hub
from isolhub._weights.checkpoints import load_state_dict_from_url

from weights_server import WeightsServer


@pytest.fixture
def server() -> Iterator[WeightsServer]:
    with WeightsServer() as s:
        yield s


def _state() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(4096.0), "bias": torch.ones(8)}


def _saved(**kwargs: object) -> bytes:
    buf = io.BytesIO()
    torch.save(_state(), buf, **kwargs)
    return buf.getvalue()


def _flip(path: Path, offset: int) -> None:
    """XOR one byte in place: the size stays, the mtime moves as any write moves it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _data_offset(data: bytes) -> int:
    """An offset inside the `weight` tensor's bytes of a torch zip checkpoint."""
    return data.index(torch.arange(4096.0).numpy().tobytes()[4000:4016]) + 8


def _assert_names_file_and_fix(error: BaseException, path: Path) -> None:
    assert str(path) in str(error)
    assert "delete it" in str(error) and "rm " in str(error)


def test_unconfined_torch_load_takes_a_flipped_zip_checkpoint_silently(tmp_path: Path) -> None:
    data = _saved()
    path = tmp_path / "w.pt"
    path.write_bytes(data)
    _flip(path, _data_offset(data))
    loaded = torch.load(path)
    assert not torch.equal(loaded["weight"], _state()["weight"])


def test_unconfined_a_truncated_checkpoint_is_an_untyped_torch_error(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(_saved()[:-100])
    with pytest.raises(Exception) as info:  # noqa: PT011 - the point is that it is untyped
        torch.load(path)
    assert not isinstance(info.value, hub.IsolhubError)
    assert type(info.value) in (RuntimeError, OSError, EOFError)


def test_a_flipped_byte_in_a_downloaded_checkpoint_is_cache_corrupted(
    server: WeightsServer, hub_home: Path
) -> None:
    data = _saved()
    url = server.add("/w.pt", body=data)
    load_state_dict_from_url(url, progress=False)
    cached = hub_home / "checkpoints" / "w.pt"
    _flip(cached, _data_offset(data))
    with pytest.raises(hub.CacheCorruptedError, match="changed on disk since") as info:
        load_state_dict_from_url(url, progress=False)
    _assert_names_file_and_fix(info.value, cached)
    assert server.count() == 1


def test_a_flipped_byte_in_a_zip_checkpoint_isolhub_did_not_download_fails_its_crc(
    hub_home: Path,
) -> None:
    data = _saved()
    cached = hub_home / "checkpoints" / "w.pt"  # as torch.hub itself left it: no record
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data)
    _flip(cached, _data_offset(data))
    with pytest.raises(hub.CacheCorruptedError, match="CRC-32 of its member") as info:
        load_state_dict_from_url("http://127.0.0.1:9/w.pt", progress=False)
    _assert_names_file_and_fix(info.value, cached)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_truncated_checkpoint_is_cache_corrupted(hub_home: Path, legacy: bool) -> None:
    data = _saved(_use_new_zipfile_serialization=not legacy)
    cached = hub_home / "checkpoints" / "w.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(data[: len(data) // 2])
    with pytest.raises(hub.CacheCorruptedError, match="is corrupted") as info:
        load_state_dict_from_url("http://127.0.0.1:9/w.pt", progress=False)
    _assert_names_file_and_fix(info.value, cached)


def test_a_file_that_is_no_checkpoint_is_cache_corrupted(hub_home: Path) -> None:
    cached = hub_home / "checkpoints" / "w.pt"
    cached.parent.mkdir(parents=True)
    cached.write_text("not a checkpoint\n")
    with pytest.raises(hub.CacheCorruptedError, match="not a checkpoint"):
        load_state_dict_from_url("http://127.0.0.1:9/w.pt", progress=False)


def test_an_unreadable_cached_checkpoint_is_cache_corrupted(hub_home: Path) -> None:
    cached = hub_home / "checkpoints" / "w.pt"
    cached.mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(hub.CacheCorruptedError, match="cannot be read|is corrupted"):
        load_state_dict_from_url("http://127.0.0.1:9/w.pt", progress=False)


def test_unconfined_safetensors_takes_flipped_tensor_data_silently(tmp_path: Path) -> None:
    data = save_safetensors(_state())
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    _flip(path, len(data) - 10)
    assert not torch.equal(load_file(path)["weight"], _state()["weight"])


def test_flipped_safetensors_data_is_caught_not_only_a_bad_header(
    server: WeightsServer, hub_home: Path
) -> None:
    data = save_safetensors(_state())
    url = server.add("/w.safetensors", body=data)
    assert torch.equal(load_state_dict_from_url(url, progress=False)["weight"], _state()["weight"])
    cached = hub_home / "checkpoints" / "w.safetensors"
    _flip(cached, len(data) - 10)
    with pytest.raises(hub.CacheCorruptedError, match="changed on disk since") as info:
        load_state_dict_from_url(url, progress=False)
    _assert_names_file_and_fix(info.value, cached)


def test_a_corrupted_error_is_a_cache_error_and_keeps_the_file(hub_home: Path) -> None:
    assert issubclass(hub.CacheCorruptedError, hub.CacheError)
    cached = hub_home / "checkpoints" / "w.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(_saved()[:100])
    with pytest.raises(hub.CacheError):
        load_state_dict_from_url("http://127.0.0.1:9/w.pt", progress=False)
    assert cached.stat().st_size == 100
    assert os.path.isfile(cached)
