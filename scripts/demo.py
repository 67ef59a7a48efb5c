"""The isolhub demo: two tags of one hub repo, loaded side by side in one process, then diffed.

Builds `examples/tinynet` into a local git repository (tag v1, then tag v2), then loads both refs
with isolhub and prints, per ref, the commit, the entrypoints, the parameter count and the output
on one fixed input. torch.hub cannot do this: both refs have a `model/` package and a `utils.py`.
Then it runs `isolhub diff` on v1 and v2 and writes the HTML report into the work dir.

    $ scripts/demo [--workdir DIR] [--report FILE]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import isolhub as hub

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tinynet"


def build_example_repo(dest: Path) -> Path:
    """Commit examples/tinynet/v1 and v2 into a new git repo at `dest`, tagged v1 and v2."""
    git = ["git", "-c", "user.name=isolhub demo", "-c", "user.email=demo@isolhub.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(dest)], check=True)
    for tag in ("v1", "v2"):
        for child in dest.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        shutil.copytree(EXAMPLE / tag, dest, dirs_exist_ok=True)
        subprocess.run([*git, "-C", str(dest), "add", "-A"], check=True)
        subprocess.run([*git, "-C", str(dest), "commit", "-q", "-m", f"tinynet {tag}"], check=True)
        subprocess.run([*git, "-C", str(dest), "tag", tag], check=True)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, help="where to build the example repo and hub dir (kept)"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("out/tinynet-v1-v2.html"),
        help="where to write the HTML report (default: out/tinynet-v1-v2.html)",
    )
    args = parser.parse_args()
    if args.workdir is not None:
        return demo(args.workdir, args.report)
    # The example repo and its hub dir are scratch: removed when the demo ends, however it ends.
    with tempfile.TemporaryDirectory(prefix="isolhub-demo-") as work:
        return demo(Path(work), args.report)


def demo(work: Path, report: Path) -> int:
    """Build the example repo under `work`, load v1 and v2 side by side, then diff them."""
    print(f"building the example repo (tags v1, v2) in {work}", flush=True)
    repo = build_example_repo(work / "tinynet.git")
    hub.set_dir(work / "hub")
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    rows = []
    models = {}
    for tag in ("v1", "v2"):
        spec = f"git+file://{repo}@{tag}"
        sha = hub.fetch(spec).sha
        models[tag] = hub.load(spec, "tinynet", pretrained=True, verbose=False)
        with torch.no_grad():
            out = models[tag](x)
        rows.append(
            {
                "ref": tag,
                "sha": sha[:12],
                "entrypoints": ", ".join(hub.list(spec, verbose=False)),
                "parameters": f"{sum(p.numel() for p in models[tag].parameters()):,}",
                "class": f"{type(models[tag]).__name__} {type(models[tag]).version}",
                "output[0,:4]": " ".join(f"{v:+.4f}" for v in out[0, :4].tolist()),
            }
        )
    width = max(len(k) for k in rows[0])
    print(f"\n{'':{width}}  " + "  ".join(f"{r['ref']:<30}" for r in rows))
    for key in rows[0]:
        if key != "ref":
            print(f"{key:{width}}  " + "  ".join(f"{r[key]:<30}" for r in rows))
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("model", "utils", "hubconf"))
    print(f"\nrepo modules in this process: {leaked or 'none'}")
    print(f"example repo: {repo}  (hub dir: {hub.get_dir()})")

    report.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        "diff", f"git+file://{repo}@v1", f"git+file://{repo}@v2", "tinynet",
        "--kw", "pretrained=true", "--input-shape", "2,3,8,8", "--seed", "0",
        "--html", str(report),
    ]  # fmt: skip
    print(f"\n$ isolhub {shlex.join(argv)}\n", flush=True)
    code = run_isolhub(argv)
    print(f"\nisolhub diff exited {code} (0 equivalent, 1 different, 2 error); open the report:")
    print(f"  {report.resolve().as_uri()}")
    return 0 if code in (0, 1) else code


def run_isolhub(argv: list[str]) -> int:
    """Run an `isolhub` command line in this process."""
    from isolhub._cli import main as _cli

    return _cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
