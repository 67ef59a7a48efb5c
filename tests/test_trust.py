"""Trust decisions match the installed torch.hub's `_check_repo_is_trusted`, case by case.

Each case runs torch.hub's own check and isolhub's on two fresh hub dirs prepared alike, with the
same answer fed to `builtins.input`, and compares what was asked, what was printed, what was
raised and what `trusted_list` holds afterwards.
"""

from __future__ import annotations

import builtins
import io
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.hub

import isolhub
from isolhub._errors import TrustResponseError, UntrustedRepoError
from isolhub._source.trust import check_trust
from isolhub._spec import parse_spec

EOF = object()  # input() meets the end of stdin
STATES = ("untrusted", "listed", "legacy_folder", "builtin_owner", "no_file")
ANSWERS = ("y", "YES", "no", "", "maybe", EOF)


def _prepare(hub: Path, state: str) -> str:
    """Lay out `hub` for `state`; return the spec to check."""
    hub.mkdir(parents=True)
    if state != "no_file":
        (hub / "trusted_list").write_text("other_repo\n" + ("someone_net\n" * (state == "listed")))
    if state == "legacy_folder":
        (hub / "someone_net_v1").mkdir()
    return "pytorch/vision:v1" if state == "builtin_owner" else "someone/net:v1"


def _run(
    monkeypatch: pytest.MonkeyPatch, answer: Any, fn: Any, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        if answer is EOF:
            raise EOFError
        return answer

    monkeypatch.setattr(builtins, "input", fake_input)
    capsys.readouterr()
    try:
        fn()
        outcome: tuple[str, ...] = ("ok",)
    except EOFError:
        outcome = ("no one to ask",)
    except UntrustedRepoError as e:
        if "there is no one to ask" in str(e):
            outcome = ("no one to ask",)
        elif isinstance(e, ValueError):
            outcome = ("ValueError", str(e).split(" (to trust")[0])
        else:
            outcome = ("refused", str(e).split(" ")[0:2] == ["Untrusted", "repository"])
    except ValueError as e:
        outcome = ("ValueError", str(e))
    except Exception as e:  # torch.hub: Exception("Untrusted repository.")
        outcome = ("refused", str(e).startswith("Untrusted repository"))
    return {"asked": asked, "printed": capsys.readouterr().out, "outcome": outcome}


@pytest.mark.parametrize("answer", ANSWERS, ids=lambda a: "EOF" if a is EOF else repr(a))
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("trust_repo", [None, "check", True, False], ids=repr)
def test_trust_decisions_prompts_and_trusted_list_match_torch_hub(
    trust_repo: Any,
    state: str,
    answer: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch_hub, our_hub = tmp_path / "torch", tmp_path / "isolhub"
    spec = _prepare(torch_hub, state)
    _prepare(our_hub, state)
    owner, name = spec.split(":")[0].split("/")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(torch_hub))
    theirs = _run(
        monkeypatch,
        answer,
        lambda: torch.hub._check_repo_is_trusted(owner, name, f"{owner}_{name}_v1", trust_repo),
        capsys,
    )
    isolhub.set_dir(our_hub)
    ours = _run(monkeypatch, answer, lambda: check_trust(parse_spec(spec), trust_repo), capsys)

    assert ours == theirs
    assert (our_hub / "trusted_list").read_text() == (torch_hub / "trusted_list").read_text()


def test_no_one_to_ask_is_an_untrusted_repo_error_naming_the_fixes(
    hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # input() reads it and meets EOF
    with pytest.raises(UntrustedRepoError, match="^Untrusted repository someone/net:v1") as e:
        check_trust(parse_spec("someone/net:v1"), "check")
    assert "trust_repo=True" in str(e.value) and str(hub_home / "trusted_list") in str(e.value)
    assert (hub_home / "trusted_list").read_text() == ""  # created, as torch.hub does


def test_an_unrecognized_answer_is_a_value_error_and_pickles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(builtins, "input", lambda prompt="": "maybe")
    with pytest.raises(ValueError, match="^Unrecognized response maybe.") as e:
        check_trust(parse_spec("someone/net:v1"), False)
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is TrustResponseError and isinstance(back, isolhub.UntrustedRepoError)


def test_a_trust_repo_value_torch_hub_does_not_know_is_refused_without_asking(
    hub_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builtins, "input", lambda prompt="": pytest.fail("asked"))
    with pytest.raises(UntrustedRepoError, match="trust_repo must be None, 'check', True or False"):
        check_trust(parse_spec("someone/net:v1"), "yes")  # torch.hub would trust it silently
    assert not (hub_home / "trusted_list").exists()
