import pytest

from isolhub import RepoSpec, SpecError, parse_spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("owner/repo", RepoSpec("github", "owner/repo", None)),
        ("owner/repo:v2", RepoSpec("github", "owner/repo", "v2")),
        ("o/r:ci/test_slash", RepoSpec("github", "o/r", "ci/test_slash")),
        ("o/r:refs/tags/v1", RepoSpec("github", "o/r", "refs/tags/v1")),
        ("git+file:///srv/net.git@v1", RepoSpec("git", "file:///srv/net.git", "v1")),
        ("git+file:///srv/net.git", RepoSpec("git", "file:///srv/net.git", None)),
        ("git+https://host/x/y.git@main", RepoSpec("git", "https://host/x/y.git", "main")),
        ("git+ssh://git@host/x.git@dev", RepoSpec("git", "ssh://git@host/x.git", "dev")),
    ],
)
def test_spec_parses_and_round_trips(text: str, expected: RepoSpec) -> None:
    spec = parse_spec(text)
    assert spec == expected
    assert str(spec) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "justname",
        "a/b/c",
        "a/b:c:d",
        "a/b:",
        "/b",
        "a/b:bad..ref",
        "git+ext::sh -c evil",
        "git+http://host/x.git",
        "git+file://relative/x",
        "git+file:///x.git@",
        "git+https:///nohost.git",
        "git+https://host/x.git?q=1",
    ],
)
def test_malformed_spec_is_a_spec_error_naming_the_accepted_forms(text: str) -> None:
    with pytest.raises(SpecError, match="accepted forms") as info:
        parse_spec(text)
    assert isinstance(info.value, ValueError)


def test_local_source_takes_any_directory_and_is_case_insensitive(tmp_path) -> None:
    spec = parse_spec(str(tmp_path), source="LOCAL")
    assert spec == RepoSpec("local", str(tmp_path))


def test_unknown_source_names_the_allowed_values() -> None:
    with pytest.raises(SpecError, match='"github" | "local"'):
        parse_spec("a/b", source="gitlab")


def test_spec_is_frozen() -> None:
    spec = parse_spec("a/b:c")
    with pytest.raises(AttributeError):
        spec.ref = "d"  # type: ignore[misc]
