"""extract_tar: hostile tarballs are refused before anything is written; real ones round-trip."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from isolhub._errors import ArchiveError
from isolhub._source.archive import extract_tar

from github_server import commit, git, init_repo

Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info, None


def make_tar(path: Path, members: list[Member], *, gz: bool = False, comment: str | None = None):
    """Write `members` in order (tarfile itself checks nothing when writing)."""
    headers = {"comment": comment} if comment else None
    with tarfile.open(
        path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT, pax_headers=headers
    ) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def snapshot(root: Path) -> dict[str, object]:
    """Every path under `root` with its bytes, link target or 'dir', for before/after checks."""
    out: dict[str, object] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = (p.read_bytes(), stat.S_IMODE(p.lstat().st_mode))
    return out


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """tmp/work with an empty `dest` staging dir and a `sentinel` dir beside it."""
    work = tmp_path / "work"
    (work / "dest").mkdir(parents=True)
    (work / "sentinel").mkdir()
    (work / "sentinel" / "keep.txt").write_text("keep")
    return work


OUTSIDE = f"/tmp/isolhub-test-abs-{uuid.uuid4().hex}"
BIG = b"\0" * (3 * 1024 * 1024)

# id -> (members, extract_tar keywords, the member the error must name, the reason)
HOSTILE: dict[str, tuple[list[Member], dict[str, object], str, str]] = {
    "dotdot": ([reg("ok.txt"), reg("../x")], {}, "../x", "'..'"),
    "nested dotdot": ([reg("a/../../x")], {}, "a/../../x", "'..'"),
    "absolute": ([reg(f"{OUTSIDE}/x")], {}, f"{OUTSIDE}/x", "absolute"),
    "drive letter": ([reg("C:/x")], {}, "C:/x", "absolute"),
    "backslash": ([reg("a\\..\\..\\x")], {}, "a\\..\\..\\x", "backslash"),
    "symlink to /etc": ([special("etc", tarfile.SYMTYPE, "/etc")], {}, "etc", "absolute"),
    "symlink up out of tree": (
        [special("a/up", tarfile.SYMTYPE, "../../x")],
        {},
        "a/up",
        "leaves the tree",
    ),
    "symlink then write through": (
        [reg("real/f"), special("sub", tarfile.SYMTYPE, "real"), reg("sub/evil")],
        {},
        "sub/evil",
        "goes through the symlink",
    ),
    "file then write under it": ([reg("f"), reg("f/x")], {}, "f/x", "goes through the file"),
    "dir member then a file of the same path": ([reg("d/x"), reg("d")], {}, "d", "as a directory"),
    "hardlink outside": ([special("h", tarfile.LNKTYPE, "/etc/passwd")], {}, "h", "absolute"),
    "hardlink up": ([special("h", tarfile.LNKTYPE, "../x")], {}, "h", "'..'"),
    "hardlink to a later member": (
        [special("h", tarfile.LNKTYPE, "later"), reg("later")],
        {},
        "h",
        "not an earlier file",
    ),
    "hardlink to a symlink": (
        [special("s", tarfile.SYMTYPE, "f"), special("h", tarfile.LNKTYPE, "s")],
        {},
        "h",
        "not an earlier file",
    ),
    "char device": ([special("null", tarfile.CHRTYPE)], {}, "null", "device"),
    "block device": ([special("sda", tarfile.BLKTYPE)], {}, "sda", "device"),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], {}, "pipe", "fifo"),
    "too many members": (
        [reg(f"f{i}") for i in range(11)],
        {"max_members": 10},
        "f10",
        "more than 10 members",
    ),
    "declared size over cap": (
        [reg("small"), reg("big", BIG)],
        {"max_bytes": 1024**2},
        "big",
        "more than 1048576 bytes",
    ),
    "hard-link bomb (written size over cap)": (
        [reg("f", b"y" * 600)] + [special(f"h{i}", tarfile.LNKTYPE, "f") for i in range(3)],
        {"max_bytes": 1000},
        "h0",
        "more than 1000 bytes",
    ),
    "duplicate names": ([reg("a.py", b"1"), reg("a.py", b"2")], {}, "a.py", "duplicate"),
    "case duplicates": ([reg("Hub.py"), reg("hub.py")], {}, "hub.py", "only in case"),
    "case duplicate of a parent dir": ([reg("Pkg/a"), reg("pkg/b")], {}, "pkg/b", "only in case"),
    "two top-level dirs": (
        [reg("top1/a"), reg("top2/b")],
        {"strip_top_dir": True},
        "top2/b",
        "second top-level",
    ),
    "a file at top level when stripping": (
        [reg("top")],
        {"strip_top_dir": True},
        "top",
        "not a directory",
    ),
}


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_a_hostile_member_is_refused_by_name_and_nothing_is_written(
    work: Path, case: str, gz: bool
) -> None:
    members, kwargs, culprit, reason = HOSTILE[case]
    archive = make_tar(work / "a.tar", members, gz=gz)
    before = snapshot(work)

    with pytest.raises(ArchiveError) as err:
        extract_tar(archive, work / "dest", **kwargs)  # type: ignore[arg-type]

    assert repr(culprit) in str(err.value)
    assert reason in str(err.value)
    assert snapshot(work) == before, "something was written, inside or outside dest"
    assert (work / "sentinel" / "keep.txt").read_text() == "keep"
    assert not os.path.lexists(OUTSIDE)


def test_a_nul_in_a_pax_name_is_refused(work: Path) -> None:
    info = tarfile.TarInfo("placeholder")
    info.pax_headers = {"path": "a\x00b"}
    archive = make_tar(work / "a.tar", [(info, b"")])
    with pytest.raises(ArchiveError, match="NUL"):
        extract_tar(archive, work / "dest")
    assert os.listdir(work / "dest") == []


@pytest.mark.parametrize("content", [b"not a tar at all" * 100, b""], ids=["garbage", "empty"])
def test_something_that_is_not_a_tar_is_an_archive_error(work: Path, content: bytes) -> None:
    (work / "x.tar").write_bytes(content)
    with pytest.raises(ArchiveError, match="x.tar"):
        extract_tar(work / "x.tar", work / "dest")


def test_a_truncated_gzip_tarball_is_an_archive_error(work: Path) -> None:
    whole = make_tar(
        work / "a.tar.gz", [reg(f"f{i}", os.urandom(5000)) for i in range(20)], gz=True
    )
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ArchiveError):
        extract_tar(whole, work / "dest")


def test_a_hard_link_inside_the_tree_is_written_as_an_independent_copy(work: Path) -> None:
    archive = make_tar(
        work / "a.tar",
        [
            reg("pkg/run.sh", b"#!/bin/sh\n", 0o755),
            special("bin/run", tarfile.LNKTYPE, "pkg/run.sh"),
        ],
    )
    extract_tar(archive, work / "dest")
    src, copy = work / "dest/pkg/run.sh", work / "dest/bin/run"
    assert copy.read_bytes() == b"#!/bin/sh\n"
    assert src.stat().st_ino != copy.stat().st_ino
    assert stat.S_IMODE(copy.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(0o4755, 0o755), (0o2711, 0o755), (0o1777, 0o755), (0o600, 0o644), (0o666, 0o644)],
)
def test_modes_are_normalised_and_setuid_setgid_sticky_are_dropped(
    work: Path, mode: int, expected: int
) -> None:
    extract_tar(make_tar(work / "a.tar", [reg("f", b"1", mode)]), work / "dest")
    assert stat.S_IMODE((work / "dest/f").stat().st_mode) == expected


def test_in_tree_relative_symlinks_are_kept(work: Path) -> None:
    archive = make_tar(
        work / "a.tar",
        [
            reg("data/weights.txt", b"w"),
            special("pkg/link", tarfile.SYMTYPE, "../data/weights.txt"),
            special("pkg/here", tarfile.SYMTYPE, "."),
            special("self", tarfile.SYMTYPE, "./data/../data"),
        ],
    )
    extract_tar(archive, work / "dest")
    dest = work / "dest"
    assert os.readlink(dest / "pkg/link") == "../data/weights.txt"
    assert (dest / "pkg/link").read_bytes() == b"w"
    assert os.readlink(dest / "pkg/here") == "."
    assert os.readlink(dest / "self") == "data"


def test_a_symlink_chain_through_dot_cannot_escape_the_tree(work: Path) -> None:
    # Lexically "a/.." is the root, but the kernel would walk "." then ".." out of dest.
    archive = make_tar(
        work / "a.tar",
        [special("a", tarfile.SYMTYPE, "."), special("b", tarfile.SYMTYPE, "a/../a/..")],
    )
    extract_tar(archive, work / "dest")
    dest = (work / "dest").resolve()
    assert os.readlink(dest / "b") == "."
    assert (dest / "b").resolve() == dest


def test_the_top_dir_is_stripped_and_root_entries_are_skipped(work: Path) -> None:
    archive = make_tar(
        work / "a.tar",
        [special("o-r-abc1234", tarfile.DIRTYPE), reg("o-r-abc1234/hubconf.py", b"h")],
    )
    extract_tar(archive, work / "dest", strip_top_dir=True)
    assert snapshot(work / "dest") == {"hubconf.py": (b"h", 0o644)}


def _git_repo(tmp_path: Path) -> tuple[Path, str]:
    repo = init_repo(tmp_path / "repo")
    files = {
        "hubconf.py": "dependencies = ['torch']\ndef net():\n    return 1\n",
        "pkg/__init__.py": "",
        "pkg/deep/er/mod.py": "X = 1\n",
        "scripts/run.sh": "#!/bin/sh\necho hi\n",
        "data/blob.bin": os.urandom(70_000),
        "Unicode ñame.txt": "ü\n",
    }
    commit(repo, files, "first")
    (repo / "scripts/run.sh").chmod(0o755)
    os.symlink("../data/blob.bin", repo / "pkg/blob")
    return repo, commit(repo, {}, "second")


def test_a_real_git_archive_extracts_identically_with_its_commit_checked(
    tmp_path: Path, work: Path
) -> None:
    repo, sha = _git_repo(tmp_path)
    archive = work / "src.tar.gz"
    with archive.open("wb") as f:
        subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar.gz", f"--prefix=o-r-{sha[:7]}/", sha],
            stdout=f,
            check=True,
            timeout=60,
        )

    extract_tar(archive, work / "dest", expected_commit=sha, strip_top_dir=True)

    tracked = [p for p in git(repo, "ls-files", "-z").split("\0") if p]
    got = snapshot(work / "dest")
    assert sorted(k for k, v in got.items() if v != "dir") == sorted(tracked)
    for rel in tracked:
        src, out = repo / rel, work / "dest" / rel
        if src.is_symlink():
            assert os.readlink(out) == os.readlink(src)
        else:
            assert out.read_bytes() == src.read_bytes()
            assert bool(out.stat().st_mode & 0o111) == bool(src.stat().st_mode & 0o111)


def test_a_wrong_expected_commit_is_refused_before_writing(tmp_path: Path, work: Path) -> None:
    repo, sha = _git_repo(tmp_path)
    archive = work / "src.tar"
    archive.write_bytes(
        subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", "--prefix=t/", sha],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    )
    other = "0" * 40
    with pytest.raises(ArchiveError, match=f"is for commit {sha}, expected {other}"):
        extract_tar(archive, work / "dest", expected_commit=other, strip_top_dir=True)
    assert os.listdir(work / "dest") == []


def test_an_archive_with_no_embedded_commit_is_refused_when_one_is_expected(work: Path) -> None:
    archive = make_tar(work / "a.tar", [reg("f")])
    with pytest.raises(ArchiveError, match="none recorded"):
        extract_tar(archive, work / "dest", expected_commit="a" * 40)


def test_a_pax_global_header_is_not_a_member(work: Path) -> None:
    archive = make_tar(work / "a.tar", [reg("top/f")], comment="b" * 40)
    extract_tar(archive, work / "dest", expected_commit="b" * 40, strip_top_dir=True)
    assert os.listdir(work / "dest") == ["f"]


@pytest.mark.slow
def test_the_default_member_cap_counts_every_header_even_skipped_root_entries(work: Path) -> None:
    root = tarfile.TarInfo("./")
    root.type = tarfile.DIRTYPE
    header = root.tobuf(format=tarfile.USTAR_FORMAT)
    (work / "a.tar").write_bytes(header * 100_001 + b"\0" * 1024)
    with pytest.raises(ArchiveError, match="more than 100000 members"):
        extract_tar(work / "a.tar", work / "dest")
