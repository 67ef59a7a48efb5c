"""State dicts cross through one sealed memfd: bit-identical, ties kept, no fd left behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import isolhub as hub

from hubrepos import make_repo, spec_of
from procs import open_fds

HUBCONF = """
    import hashlib
    import torch
    import torch.nn as nn


    def many(n=500, seed=0):
        gen = torch.Generator().manual_seed(seed)
        dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                  torch.uint8, torch.bool]
        out = {}
        for i in range(n):
            t = torch.randn(i % 7 + 1, 3, generator=gen) * 100
            out[f"t{i}"] = t.to(dtypes[i % len(dtypes)])
        return out


    def digests(n=500, seed=0):
        return {k: hashlib.sha256(_bytes(v)).hexdigest() for k, v in many(n, seed).items()}


    def _bytes(t):
        return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


    def tied():
        class Tied(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(10, 4)
                self.out = nn.Linear(4, 10, bias=False)
                self.out.weight = self.embed.weight
                self.register_buffer("view_of_embed", self.embed.weight.data[2:5])
        return Tied()


    def mixed():
        return {"w": torch.ones(2), "step": 7, "note": "warm-up", "b": torch.zeros(1)}


    def odd_layouts():
        base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
        return {"transposed": base.t(), "sliced": base[1:3, ::2], "empty": torch.empty(0, 3),
                "scalar": torch.tensor(3.5), "grad": nn.Parameter(torch.ones(2))}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "sd", {"hubconf.py": HUBCONF})


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_values_are_bit_identical_to_the_workers(repo: Path) -> None:
    sd = hub.load_state_dict(spec_of(repo), "many", n=500)
    expected = hub.load(spec_of(repo), "digests", n=500)
    assert list(sd) == list(expected)
    assert {k: _digest(v) for k, v in sd.items()} == expected


def test_shared_storages_stay_shared(repo: Path) -> None:
    sd = hub.load_state_dict(spec_of(repo), "tied")
    assert sd["embed.weight"].untyped_storage().data_ptr() == (
        sd["out.weight"].untyped_storage().data_ptr()
    )
    assert torch.equal(sd["view_of_embed"], sd["embed.weight"][2:5])
    assert sd["view_of_embed"].untyped_storage().data_ptr() == (
        sd["embed.weight"].untyped_storage().data_ptr()
    )


def test_module_mode_keeps_tied_weights_tied(repo: Path) -> None:
    m = hub.load(spec_of(repo), "tied")
    assert m.out.weight is m.embed.weight
    with torch.no_grad():
        m.embed.weight.add_(1)
    assert torch.equal(m.out.weight, m.embed.weight)


def test_odd_layouts_scalars_and_empty_tensors_survive_detached(repo: Path) -> None:
    sd = hub.load_state_dict(spec_of(repo), "odd_layouts")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert torch.equal(sd["transposed"], base.t())
    assert sd["transposed"].stride() == (1, 6)
    assert torch.equal(sd["sliced"], base[1:3, ::2])
    assert sd["empty"].shape == (0, 3)
    assert sd["scalar"].item() == 3.5 and sd["scalar"].dim() == 0
    # As torch's own state_dict(): values are detached data, never autograd leaves.
    assert not sd["grad"].requires_grad


def test_a_state_dict_with_plain_values_among_its_tensors_arrives_whole_in_order(
    repo: Path,
) -> None:
    sd = hub.load_state_dict(spec_of(repo), "mixed")
    assert list(sd) == ["w", "step", "note", "b"]
    assert torch.equal(sd["w"], torch.ones(2)) and torch.equal(sd["b"], torch.zeros(1))
    assert (sd["step"], sd["note"]) == (7, "warm-up")


def test_tensors_are_private_writable_copies_on_write(repo: Path) -> None:
    a = hub.load_state_dict(spec_of(repo), "odd_layouts")
    a["transposed"].zero_()
    b = hub.load_state_dict(spec_of(repo), "odd_layouts")
    assert b["transposed"].sum() > 0


def test_a_500_tensor_transfer_leaves_the_parent_fd_count_unchanged(repo: Path) -> None:
    hub.load_state_dict(spec_of(repo), "many", n=5)  # warm the zygote and the cache
    before = len(open_fds())
    sd = hub.load_state_dict(spec_of(repo), "many", n=500)
    assert len(sd) == 500
    assert len(open_fds()) == before
    del sd
