import inspect
import subprocess
import sys
import types

import torch.hub

import isolhub


def test_all_lists_exactly_the_public_names() -> None:
    # Submodules (e.g. `isolhub.run`, for `python -m isolhub.run`) are not names of the API.
    public = {
        n
        for n in dir(isolhub)
        if not n.startswith("_") and not isinstance(getattr(isolhub, n), types.ModuleType)
    }
    public |= {"__version__"}
    assert sorted(isolhub.__all__, key=str.lower) == sorted(public, key=str.lower)


def test_every_error_is_under_isolhub_error() -> None:
    for name in isolhub.__all__:
        obj = getattr(isolhub, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, isolhub.IsolhubError), name


def test_errors_pickle_with_their_attributes() -> None:
    import pickle

    e = isolhub.WorkerCrashedError("died", spec="a/b", pid=3, returncode=-11)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is isolhub.WorkerCrashedError
    assert (str(back), back.spec, back.pid, back.returncode) == ("died", "a/b", 3, -11)


def test_signatures_match_torch_hub_with_additions_keyword_only() -> None:
    for name in ("list", "help", "load"):
        ours = inspect.signature(getattr(isolhub, name)).parameters
        theirs = inspect.signature(getattr(torch.hub, name)).parameters
        for pname, p in theirs.items():
            assert pname in ours, (name, pname)
            assert ours[pname].default == p.default, (name, pname)
            assert ours[pname].kind == p.kind, (name, pname)
        for pname in set(ours) - set(theirs):
            assert ours[pname].kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD), (name, pname)


def test_importing_isolhub_does_not_import_torch() -> None:
    code = "import sys, isolhub; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_worker_runtime_does_not_pull_in_the_parent_layers() -> None:
    code = (
        "import sys, isolhub._process.runtime, isolhub._process.zygote; "
        "print(sorted(m for m in ('isolhub._api', 'isolhub._source.snapshot', 'isolhub._cli.main', "
        "'isolhub._source.github', 'isolhub._source.git') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
