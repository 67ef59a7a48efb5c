"""Random state: a worker starts from the caller's generators and hands their end state back.

torch.hub runs hubconf and the entrypoint in the caller, so they draw from the caller's torch CPU
generator, `random` and numpy's global state, and advance them. isolhub's workers fork from one
zygote; without the handoff every worker would draw the same "random" weights. Each test compares
against the installed torch.hub on the same local repo, or against the draws hubconf makes.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.hub

import isolhub as hub
from isolhub._errors import ProtocolError, RemoteError

from hubrepos import CHANNEL, commit, make_repo, spec_of

HUBCONF = """
import random
import subprocess
import sys

import numpy as np
import torch
import torch.nn as nn

AT_IMPORT = [torch.rand(1).item(), random.random(), float(np.random.rand())]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        drawn = AT_IMPORT + [random.random(), float(np.random.rand())]
        self.register_buffer("drawn", torch.tensor(drawn, dtype=torch.float64))

    def forward(self, x):
        return self.fc(x)

    def noise(self):
        return torch.rand(2)


def net():
    \"\"\"A net with random weights.\"\"\"
    return Net()


def draw():
    return torch.rand(1).item()


def boom():
    torch.rand(3)
    random.random()
    raise ValueError("boom after drawing")
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rng") / "repo"
    root.mkdir()
    (root / "hubconf.py").write_text(textwrap.dedent(HUBCONF))
    return root


def seed_all(s: int) -> None:
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


def states() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_same_states(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert torch.equal(a[0], b[0]), "torch's CPU generator differs"
    assert a[1] == b[1], "random's state differs"
    assert a[2][0] == b[2][0] and np.array_equal(a[2][1], b[2][1]), "numpy's state differs"
    assert a[2][2:] == b[2][2:], "numpy's state differs"


def assert_same_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def torch_hub_load(repo: Path, entry: str) -> Any:
    return torch.hub.load(str(repo), entry, source="local", verbose=False)


def test_a_seeded_load_is_bit_identical_to_torch_hub_and_advances_the_callers_generators_alike(
    repo: Path,
) -> None:
    seed_all(7)
    want = torch_hub_load(repo, "net").state_dict()
    want_end = states()
    for mode in ("module", "state_dict"):
        seed_all(7)
        got = hub.load(str(repo), "net", source="local", mode=mode, verbose=False)
        assert_same_dicts(got if mode == "state_dict" else got.state_dict(), want)
        assert_same_states(states(), want_end)
    seed_all(7)
    got = hub.load_state_dict(str(repo), "net", source="local", verbose=False)
    assert_same_dicts(got, want)
    assert_same_states(states(), want_end)


def test_two_unseeded_loads_draw_different_weights_as_torch_hub_does(repo: Path) -> None:
    a = hub.load(str(repo), "net", source="local", verbose=False)
    b = hub.load(str(repo), "net", source="local", verbose=False)
    assert not torch.equal(a.fc.weight, b.fc.weight)
    assert len(set(a.drawn.tolist()) | set(b.drawn.tolist())) == 10  # every draw its own


def test_list_and_help_advance_the_callers_generators_by_what_importing_hubconf_draws(
    repo: Path,
) -> None:
    seed_all(3)
    torch.rand(1), random.random(), np.random.rand()  # what hubconf draws at import
    want = states()
    seed_all(3)
    assert "net" in hub.list(str(repo), source="local", verbose=False)
    assert_same_states(states(), want)
    seed_all(3)
    assert hub.help(str(repo), "net", source="local", verbose=False) == "A net with random weights."
    assert_same_states(states(), want)


def test_seed_overrides_the_callers_state_and_leaves_the_callers_generators_untouched(
    repo: Path,
) -> None:
    seed_all(1)
    before = states()
    a = hub.load(str(repo), "net", source="local", seed=5, verbose=False)
    assert_same_states(states(), before)
    seed_all(2)
    b = hub.load(str(repo), "net", source="local", seed=5, verbose=False)
    assert_same_dicts(a.state_dict(), b.state_dict())
    torch.manual_seed(5)
    assert torch.equal(a.fc.weight, torch.nn.Linear(4, 8).weight)  # seeded right before the call


def test_an_entrypoint_that_raises_still_advances_the_callers_generators(repo: Path) -> None:
    seed_all(11)
    with pytest.raises(ValueError, match="boom after drawing"):
        torch_hub_load(repo, "boom")
    want = states()
    seed_all(11)
    with pytest.raises(RemoteError, match="boom after drawing"):
        hub.load(str(repo), "boom", source="local", verbose=False)
    assert_same_states(states(), want)


def test_remote_mode_hands_the_state_in_with_the_call_and_back_with_its_result(repo: Path) -> None:
    seed_all(4)
    want = torch_hub_load(repo, "net").state_dict()
    want_end = states()
    seed_all(4)
    with hub.load(str(repo), "net", source="local", mode="remote", verbose=False) as m:
        assert_same_states(states(), want_end)
        assert_same_dicts(m.state_dict(), want)
        # After the entrypoint call the worker's generators are its own (documented).
        m.noise()
        assert_same_states(states(), want_end)


def test_a_sandboxed_worker_hands_its_state_back_through_the_restricted_codec(repo: Path) -> None:
    seed_all(8)
    want = torch_hub_load(repo, "net").state_dict()
    want_end = states()
    seed_all(8)
    got = hub.load_state_dict(str(repo), "net", source="local", sandbox="strict", verbose=False)
    assert_same_dicts(got, want)
    assert_same_states(states(), want_end)


FORGE = (
    CHANNEL
    + """
import time
from isolhub._transport.codec import encode, send_frame

def forge(rng):
    send_frame(channel(), encode({"effects": {"rng": rng}}))
    send_frame(channel(), encode({"ok": True, "kind": "value", "body": encode(1), "layout": []}))
    time.sleep(30)
"""
)

FORGED = {
    "short_torch_state": "{'torch': b'x' * 10}",
    "invalid_mt19937": "{'torch': bytes(5056)}",
    "random_not_ints": "{'random': [3, ['a'] * 625, None]}",
    "numpy_wrong_length": "{'numpy': ['MT19937', b'x', 0, 0, 0.0]}",
    "not_a_dict": "[1, 2, 3]",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_rng_state_is_a_protocol_error_and_leaves_the_callers_generators(
    tmp_path: Path, case: str
) -> None:
    repo = make_repo(
        tmp_path / "forge",
        {"hubconf.py": FORGE + f"\n\ndef evil():\n    forge({FORGED[case]})\n"},
    )
    seed_all(5)
    before = states()
    with pytest.raises(ProtocolError):
        hub.load(spec_of(repo), "evil", mode="state_dict", trust_repo=True, verbose=False)
    assert_same_states(states(), before)


def test_an_rng_state_sent_unasked_is_a_protocol_error(tmp_path: Path) -> None:
    good = "{'torch': bytes(torch.get_rng_state().numpy())}"
    repo = make_repo(
        tmp_path / "forge",
        {"hubconf.py": FORGE + f"\nimport torch\n\ndef evil():\n    forge({good})\n"},
    )
    seed_all(5)
    before = states()
    with pytest.raises(ProtocolError):
        hub.load(spec_of(repo), "evil", mode="state_dict", trust_repo=True, seed=0, verbose=False)
    assert_same_states(states(), before)


# -- the pool and compare ------------------------------------------------------------------


def test_a_hub_load_hands_the_callers_state_like_isolhub_load(repo: Path) -> None:
    seed_all(9)
    want = hub.load_state_dict(str(repo), "net", source="local", verbose=False)
    want_end = states()
    with hub.Hub(source="local") as h:
        seed_all(9)
        assert_same_dicts(h.load(str(repo), "net").state_dict(), want)
        assert_same_states(states(), want_end)
        # Its worker stays up for the next call; hubconf is not imported again (documented).
        assert "net" in h.list(str(repo))


def test_hub_map_without_a_seed_gives_each_task_its_own_state_reproducibly(repo: Path) -> None:
    specs = [str(repo)] * 3

    def weights() -> list[torch.Tensor]:
        with hub.Hub(source="local", max_workers=2) as h:
            results = list(h.map(lambda m: m.fc.weight, specs, "net", ordered=True))
        assert all(r.ok for r in results), [r.summary() for r in results]
        return [r.value for r in results]

    torch.manual_seed(0)
    first = weights()
    torch.manual_seed(0)
    again = weights()
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    with hub.Hub(source="local", max_workers=2, seed=3) as h:
        seeded = [r.value for r in h.map(lambda m: m.fc.weight, specs, "net", ordered=True)]
    assert all(torch.equal(seeded[0], w) for w in seeded)


def test_compare_without_a_seed_starts_both_sides_from_the_callers_state(tmp_path: Path) -> None:
    from isolhub._compare.compare import compare

    repo = make_repo(tmp_path / "same.git", {"hubconf.py": HUBCONF}, tag="v1")
    commit(repo, {"README": "v2\n"}, tag="v2")
    torch.manual_seed(21)
    torch.rand(1)  # what hubconf draws at import
    expected = torch.rand(1).item()
    torch.manual_seed(21)
    before = states()
    rep = compare(spec_of(repo, "v1"), spec_of(repo, "v2"), "draw", verbose=False)
    assert_same_states(states(), before)  # compare leaves the caller's generators as they were
    value = {v.name: v for v in rep.values}["result"]
    assert value.a == value.b == repr(expected)
    assert rep.equivalent
    assert any("same random state" in n for n in rep.notes), rep.notes


@pytest.mark.slow
def test_the_random_state_is_handed_over_where_torch_runs_without_numpy() -> None:
    # isolhub alone does not install numpy (scripts/demo): the hand-off must not need it.
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import torch\n"
        "from isolhub._process import rng as _rng\n"
        "torch.manual_seed(3); state = _rng.capture(); a = torch.rand(4)\n"
        "_rng.restore(state); assert torch.equal(torch.rand(4), a)\n"
        "print('numpy' in state, len(state['torch']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(torch.get_rng_state().numel())]
