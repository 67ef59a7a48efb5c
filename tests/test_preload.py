"""Installed packages that workers import are learned and preloaded by the zygote.

Each test runs a fresh parent in its own Python environment: a venv made by the test whose
site-packages holds the packages under test (and a `.pth` line that reaches this venv's torch and
isolhub), so what is "installed" is known exactly and nothing else in the suite preloads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

import isolhub

from hubrepos import CHANNEL

ROOT = Path(isolhub.__file__).resolve().parent.parent

PACKAGES = {
    # `pkga` imports `pkgb`: one preloaded group.
    "pkga/__init__.py": "import pkgb\nWHO = 'installed pkga'\n",
    "pkgb/__init__.py": "WHO = 'installed pkgb'\n",
    "pkgthread/__init__.py": (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
        "WHO = 'installed pkgthread'\n"
    ),
}

HUBCONF = """
import sys

BEFORE = sorted(n for n in ("pkga", "pkgb", "pkgthread") if n in sys.modules)

def imports(*names):
    import importlib
    return {"before": BEFORE, "who": [importlib.import_module(n).WHO for n in names]}
"""


@pytest.fixture(scope="module")
def python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv's interpreter that has PACKAGES installed and reaches torch and isolhub."""
    env = tmp_path_factory.mktemp("env") / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    site = next(env.glob("lib/python*/site-packages"))
    for name, text in PACKAGES.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    here = [p for p in sys.path if p.endswith("site-packages")]
    (site / "outer.pth").write_text("\n".join([str(ROOT), *here]) + "\n")
    return env / "bin" / "python"


def repo(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    root = tmp_path / "repo"
    for name, text in {"hubconf.py": HUBCONF, **(files or {})}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def run(python: Path, hub: Path, script: str, **env: str) -> list:
    code = "import json, isolhub as hub\nout = []\n" + textwrap.dedent(script)
    code += "\nprint(json.dumps(out))\n"
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(python), "-c", code],
        env={**base, "ISOLHUB_HOME": str(hub), **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def load(repo: Path, *names: str) -> str:
    return f"hub.load({str(repo)!r}, 'imports', *{names!r}, source='local', verbose=False)"


UNTIL_PRELOADED = """
for _ in range(50):  # the zygote imports them off the load's path: soon, not at once
    r = {load}
    if r["before"]:
        break
out.append(r)
"""


@pytest.mark.slow
def test_a_package_a_worker_imported_is_preloaded_for_later_workers_and_the_next_process(
    python: Path, tmp_path: Path
) -> None:
    r = repo(tmp_path)
    first, later = run(
        python,
        tmp_path / "hub",
        f"out.append({load(r, 'pkga')})\n" + UNTIL_PRELOADED.format(load=load(r, "pkga")),
    )
    assert first == {"before": [], "who": ["installed pkga"]}
    assert later == {"before": ["pkga", "pkgb"], "who": ["installed pkga"]}
    (learned,) = (tmp_path / "hub" / "preload").glob("*.json")
    assert sorted(json.loads(learned.read_text())["used"]) == ["pkga", "pkgb"]
    # A new process's zygote imports them as it starts: its very first worker has them.
    (again,) = run(python, tmp_path / "hub", f"out.append({load(r, 'pkga')})")
    assert again["before"] == ["pkga", "pkgb"]


@pytest.mark.slow
def test_a_repo_shipping_a_package_named_like_a_preloaded_one_gets_its_own_and_its_importers_go(
    python: Path, tmp_path: Path
) -> None:
    plain = repo(tmp_path / "plain")
    own = repo(tmp_path / "own", {"pkgb/__init__.py": "WHO = 'the repo pkgb'\n"})
    preloaded, mine = run(
        python,
        tmp_path / "hub",
        UNTIL_PRELOADED.format(load=load(plain, "pkga"))
        + f"out.append({load(own, 'pkgb', 'pkga')})",
    )
    assert preloaded["before"] == ["pkga", "pkgb"]
    # pkga imported pkgb: both are dropped, and pkga, imported again, sees the repo's pkgb.
    assert mine == {"before": [], "who": ["the repo pkgb", "installed pkga"]}


@pytest.mark.slow
def test_a_package_whose_import_starts_a_thread_is_never_preloaded_and_loads_go_on(
    python: Path, tmp_path: Path
) -> None:
    r = repo(tmp_path)
    out = run(
        python,
        tmp_path / "hub",
        f"out.append({load(r, 'pkgthread', 'pkga')})\n"
        + UNTIL_PRELOADED.format(load=load(r, "pkgthread", "pkga")),
    )
    assert out[0]["who"] == ["installed pkgthread", "installed pkga"]
    assert out[1]["before"] == ["pkga", "pkgb"]  # a new zygote, without pkgthread
    (learned,) = (tmp_path / "hub" / "preload").glob("*.json")
    data = json.loads(learned.read_text())
    assert data["never"] == ["pkgthread"] and "pkgthread" not in data["used"]
    (again,) = run(python, tmp_path / "hub", f"out.append({load(r, 'pkga')})")
    assert again["before"] == ["pkga", "pkgb"]


@pytest.mark.slow
def test_preloading_is_off_with_isolhub_preload_0(python: Path, tmp_path: Path) -> None:
    r = repo(tmp_path)
    out = run(
        python,
        tmp_path / "hub",
        f"for _ in range(3):\n    out.append({load(r, 'pkga')})",
        ISOLHUB_PRELOAD="0",
    )
    assert [o["before"] for o in out] == [[], [], []]
    assert not (tmp_path / "hub" / "preload").exists()


FORGE = (
    CHANNEL
    + """
from isolhub._transport.codec import encode, send_frame

def forge(names):
    # A side-effects frame of its own, ahead of the worker's real reply.
    with channel() as s:
        send_frame(s, encode({"effects": {"imported": names}}))
"""
)


def forged(tmp_path: Path, names: list[str]) -> Path:
    return repo(
        tmp_path,
        {"hubconf.py": FORGE + f"\n\ndef evil():\n    forge({names!r})\n    return {{'w': 1}}\n"},
    )


def learned_names() -> list[str]:
    files = list((Path(os.environ["ISOLHUB_HOME"]) / "preload").glob("*.json"))
    return sorted(json.loads(files[0].read_text())["used"]) if files else []


def test_an_unconfined_workers_list_of_imported_packages_is_learned(tmp_path: Path) -> None:
    # The twin of the confined case below: the same report, from a trusted worker, is taken.
    r = forged(tmp_path, ["nosuchpkg_isolhub_test"])
    assert hub_load(r, "evil", mode="state_dict") == {"w": 1}
    assert learned_names() == ["nosuchpkg_isolhub_test"]


@pytest.mark.parametrize("names", [["os; rm -rf /"], ["x"] * 1000, "numpy", [b"numpy"]])
def test_a_malformed_list_of_imported_packages_is_a_protocol_error(
    tmp_path: Path, names: object
) -> None:
    with pytest.raises(isolhub.ProtocolError):
        hub_load(forged(tmp_path, names), "evil", mode="state_dict")  # type: ignore[arg-type]
    assert learned_names() == []


@pytest.mark.sandbox
def test_a_confined_workers_list_of_imported_packages_is_refused_never_learned(
    tmp_path: Path,
) -> None:
    with pytest.raises(isolhub.ProtocolError):
        hub_load(
            forged(tmp_path, ["nosuchpkg_isolhub_test"]),
            "evil",
            mode="state_dict",
            sandbox="strict",
        )
    assert learned_names() == []


def hub_load(r: Path, entry: str, **kw: object) -> object:
    return isolhub.load(str(r), entry, source="local", verbose=False, **kw)


RETIRED_RACE = """
import threading, time
from isolhub._process import worker as _process

results = []
for _ in range(3):
    z = _process._Zygote.get()
    z.lock.acquire()  # both the preload and the load's fork request queue up behind this
    preload = threading.Thread(target=z.preload, args=(["pkgthread"],))
    preload.start()
    load = threading.Thread(target=lambda: results.append({load}))
    load.start()
    time.sleep(2)  # let the load reach the zygote's lock (the order either way must work)
    z.lock.release()
    preload.join()
    load.join()
out.append(len(results))
"""


@pytest.mark.slow
def test_a_load_queued_behind_a_preload_that_retires_the_zygote_forks_from_a_new_one(
    python: Path, tmp_path: Path
) -> None:
    # The preload's reply ("it started a thread") and the zygote's retirement are one step: a
    # fork request waiting meanwhile never reaches the zygote that now has a thread.
    r = repo(tmp_path)
    (count,) = run(python, tmp_path / "hub", RETIRED_RACE.format(load=load(r, "pkga")))
    assert count == 3
