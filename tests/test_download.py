"""download_url_to_file against a loopback server that misbehaves on demand.

Invariant for every case: the target appears only complete and verified, a failure leaves the
target as it was and no temp file behind, and the error names the URL and the cause. Case numbers
refer to ../shared/reference/reliability-plan.md.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from email.utils import formatdate
from pathlib import Path

import filelock
import pytest

from isolhub._cache.store import host_tag
from isolhub._errors import DownloadError, HashMismatchError, OfflineError
from isolhub._weights import download as _download
from isolhub._weights.download import download_url_to_file, set_fetch_broker

from weights_server import Guard, WeightsServer, sha256

DATA = os.urandom(256 * 1024)
DIGEST = sha256(DATA)


@pytest.fixture(autouse=True)
def fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """Millisecond backoff and one-second timeouts, so that every fault costs little time."""
    for name, value in {
        "ISOLHUB_HTTP_BACKOFF": "0.01",
        "ISOLHUB_HTTP_BACKOFF_MAX": "0.05",
        "ISOLHUB_HTTP_TIMEOUT": "1",
        "ISOLHUB_HTTP_CONNECT_TIMEOUT": "1",
        "ISOLHUB_HTTP_RETRIES": "3",
        "ISOLHUB_HTTP_MIN_RATE": "1000",
        "ISOLHUB_LOCK_TIMEOUT": "60",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def server() -> WeightsServer:
    with WeightsServer() as s:
        yield s


@pytest.fixture
def other_host() -> WeightsServer:
    with WeightsServer("127.0.0.2") as s:
        yield s


@pytest.fixture
def guard(hub_home: Path) -> Guard:
    return Guard(hub_home)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def no_broker() -> None:
    yield
    set_fetch_broker(None)


# -- the plain path ----------------------------------------------------------------------------


def test_a_download_writes_the_file_with_normal_permissions_and_leaves_no_temp(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA)
    dst = out / "w.pt"
    download_url_to_file(url, str(dst), progress=False)
    assert dst.read_bytes() == DATA
    reference = out / "normal"
    reference.write_bytes(b"")
    assert dst.stat().st_mode == reference.stat().st_mode
    assert "torch.hub" in server.log("/w.pt")[0].headers["user-agent"]
    guard.check(out)


def test_the_signature_is_torch_hubs() -> None:
    import inspect

    import torch.hub

    ours = inspect.signature(download_url_to_file).parameters
    theirs = inspect.signature(torch.hub.download_url_to_file).parameters
    positional = [p for p in ours.values() if p.kind is not p.KEYWORD_ONLY]
    assert [(p.name, p.default) for p in positional] == [
        (p.name, p.default) for p in theirs.values()
    ]


def test_progress_goes_to_stderr_as_plain_lines_off_a_terminal_and_progress_false_silences_it(
    server: WeightsServer, out: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    url = server.add("/w.pt", body=DATA)
    download_url_to_file(url, str(out / "a.pt"), progress=True)
    shown = capfd.readouterr()
    assert shown.err.startswith("isolhub: downloaded a.pt: 256.0 KiB of 256.0 KiB (100%)")
    assert shown.out == ""
    download_url_to_file(url, str(out / "b.pt"), progress=False)
    assert capfd.readouterr() == ("", "")


def test_a_tilde_in_dst_is_expanded(
    server: WeightsServer, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(out))
    download_url_to_file(server.add("/w.pt", body=DATA), "~/w.pt", progress=False)
    assert (out / "w.pt").read_bytes() == DATA


# -- case 7: wrong bytes -----------------------------------------------------------------------


def test_a_hash_mismatch_raises_torchs_message_and_keeps_the_existing_file(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    dst = out / "w.pt"
    good = server.add("/good.pt", body=DATA)
    download_url_to_file(good, str(dst), hash_prefix=DIGEST[:10], progress=False)
    assert dst.read_bytes() == DATA
    bad = server.add("/bad.pt", body=DATA, corrupt_at=1000, fault_times=None)
    for prefix in (DIGEST[:8], DIGEST):
        with pytest.raises(HashMismatchError) as info:
            download_url_to_file(bad, str(dst), hash_prefix=prefix, progress=False)
        assert isinstance(info.value, RuntimeError)
        message = str(info.value)
        assert f'invalid hash value (expected "{prefix}", got "' in message
        assert bad in message
        assert dst.read_bytes() == DATA
    guard.check(out)


def test_an_empty_hash_prefix_always_passes_as_in_torch(server: WeightsServer, out: Path) -> None:
    download_url_to_file(server.add("/w.pt", body=DATA), str(out / "w"), "", progress=False)
    assert (out / "w").read_bytes() == DATA


# -- cases 1, 2, 8, 9: cuts and resumes --------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {"cut_after": 0.01},
        {"cut_after": 0.5},
        {"cut_after": 0.99},
        {"reset_after": 0.5},
    ],
    ids=["FIN-at-1%", "FIN-at-50%", "FIN-at-99%", "RST-at-50%"],
)
def test_a_cut_connection_resumes_with_range_and_if_range(
    server: WeightsServer, out: Path, guard: Guard, fault: dict[str, float]
) -> None:
    url = server.add("/w.pt", body=DATA, **fault)
    dst = out / "w.pt"
    download_url_to_file(url, str(dst), hash_prefix=DIGEST, progress=False)
    assert sha256(dst.read_bytes()) == DIGEST
    first, second = server.log("/w.pt")
    assert [first.status, second.status] == [200, 206]
    assert second.headers["range"].startswith("bytes=")
    assert int(second.headers["range"][6:-1]) > 0
    assert second.headers["if-range"] == '"' + DIGEST[:16] + '"'
    assert sorted(p.name for p in out.iterdir()) == ["w.pt"]
    guard.check(out)


def test_a_cut_connection_without_a_validator_restarts_from_zero(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    # No ETag and no Last-Modified: a resume could join two versions, so it restarts.
    url = server.add("/w.pt", body=DATA, etag=None, cut_after=0.5)
    dst = out / "w.pt"
    download_url_to_file(url, str(dst), progress=False)
    assert dst.read_bytes() == DATA
    assert server.statuses("/w.pt") == [200, 200]
    assert "range" not in server.log("/w.pt")[1].headers
    guard.check(out)


def test_a_resume_answered_with_200_restarts_and_the_file_is_not_doubled(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, cut_after=0.5, ranges=False)
    dst = out / "w.pt"
    download_url_to_file(url, str(dst), progress=False)
    assert dst.stat().st_size == len(DATA)
    assert dst.read_bytes() == DATA
    assert server.statuses("/w.pt") == [200, 200]
    assert "range" in server.log("/w.pt")[1].headers
    guard.check(out)


def test_retries_are_bounded_when_every_response_is_cut(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, cut_after=0.5, ranges=False, fault_times=None)
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert "gave up after 4 attempts" in str(info.value)
    assert url in str(info.value)
    assert server.count("/w.pt") == 4
    assert not (out / "w.pt").exists()
    guard.check(out)


def test_a_bad_content_range_restarts_instead_of_joining(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, cut_after=0.5, bad_content_range=True)
    dst = out / "w.pt"
    download_url_to_file(url, str(dst), progress=False)
    assert dst.read_bytes() == DATA
    assert server.statuses("/w.pt") == [200, 206, 200]
    guard.check(out)


def test_a_file_changed_mid_download_is_restarted_not_joined(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    v2 = os.urandom(len(DATA))
    url = server.add("/w.pt", body=DATA, cut_after=0.5, new_body=v2)
    dst = out / "w.pt"
    download_url_to_file(url, str(dst), progress=False)
    assert dst.read_bytes() == v2
    first, second = server.log("/w.pt")
    assert second.headers["if-range"] != '"' + sha256(v2)[:16] + '"'
    assert second.status == 200
    guard.check(out)


# -- cases 3, 4, 5: stalls and slow servers ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)  # a hang (or a long sleep) where none belongs fails here
def test_a_stall_after_headers_times_out_after_the_retries_within_budget(
    server: WeightsServer, out: Path, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_HTTP_RETRIES", "2")
    url = server.add("/w.pt", body=DATA, stall_after=0, fault_times=None)
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    message = str(info.value)
    assert "read timeout" in message and url in message
    assert f"received 0 of {len(DATA)} bytes" in message
    assert "gave up after 3 attempts" in message
    assert server.count("/w.pt") == 3
    guard.check(out)


@pytest.mark.slow
@pytest.mark.timeout(60)  # a hang (or a long sleep) where none belongs fails here
def test_a_trickle_trips_the_stall_detector(
    server: WeightsServer, out: Path, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_HTTP_RETRIES", "1")
    url = server.add("/w.pt", body=DATA, throttle=20, fault_times=None)
    with pytest.raises(DownloadError, match="stalled") as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert url in str(info.value) and "ISOLHUB_HTTP_MIN_RATE" in str(info.value)
    guard.check(out)


def test_an_endless_body_trips_the_size_cap(
    server: WeightsServer, out: Path, guard: Guard, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_HTTP_MAX_BYTES", str(1 << 20))
    url = server.add("/w.pt", endless=True)
    with pytest.raises(DownloadError, match="ISOLHUB_HTTP_MAX_BYTES"):
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert server.count("/w.pt") == 1
    guard.check(out)


@pytest.mark.slow
def test_a_slow_but_steady_download_succeeds_without_retries(
    server: WeightsServer, out: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    body = os.urandom(600_000)
    url = server.add("/w.pt", body=body, throttle=400_000)
    download_url_to_file(url, str(out / "w.pt"), progress=True)
    assert (out / "w.pt").read_bytes() == body
    assert server.count("/w.pt") == 1
    err = capfd.readouterr().err
    assert "585.9 KiB of 585.9 KiB (100%)" in err


# -- case 6: a lying Content-Length ------------------------------------------------------------


def test_a_content_length_larger_than_the_body_fails_with_expected_and_got(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    announced = len(DATA) + 1000
    url = server.add("/w.pt", body=DATA, content_length=announced, fault_times=None)
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    message = str(info.value)
    assert f"announced {announced} bytes but has only {len(DATA)}" in message
    assert url in message
    assert not (out / "w.pt").exists()
    guard.check(out)


def test_a_content_length_smaller_than_the_body_is_caught_by_the_hash(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, content_length=len(DATA) // 2)
    with pytest.raises(HashMismatchError):
        download_url_to_file(url, str(out / "w.pt"), hash_prefix=DIGEST[:12], progress=False)
    assert not (out / "w.pt").exists()
    guard.check(out)


# -- cases 10, 11: statuses --------------------------------------------------------------------


@pytest.mark.parametrize("code", [404, 410, 403, 401])
def test_client_errors_fail_at_once_without_retry(
    server: WeightsServer, out: Path, guard: Guard, code: int
) -> None:
    url = server.add("/w.pt", body=DATA, status=[code] * 5)
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert f"HTTP {code}" in str(info.value) and url in str(info.value)
    assert info.value.status == code
    assert server.count("/w.pt") == 1
    assert list(out.iterdir()) == []
    guard.check(out)


def test_a_persistent_500_is_retried_then_reported_with_the_attempts(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, status=[500] * 10)
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert "HTTP 500" in str(info.value) and "gave up after 4 attempts" in str(info.value)
    assert info.value.attempts == 4
    assert server.count("/w.pt") == 4
    guard.check(out)


def test_500_three_times_then_200_succeeds(server: WeightsServer, out: Path, guard: Guard) -> None:
    url = server.add("/w.pt", body=DATA, status=[500, 502, 503])
    download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert (out / "w.pt").read_bytes() == DATA
    assert server.statuses("/w.pt") == [500, 502, 503, 200]
    guard.check(out)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_a_429_retry_after_is_waited_out(server: WeightsServer, out: Path, form: str) -> None:
    value = "1" if form == "seconds" else formatdate(time.time() + 2, usegmt=True)
    url = server.add("/w.pt", body=DATA, status=[429], retry_after=value)
    download_url_to_file(url, str(out / "w.pt"), progress=False)
    waited = server.log("/w.pt")[1].at - server.log("/w.pt")[0].at
    assert waited >= 0.9
    assert server.statuses("/w.pt") == [429, 200]


@pytest.mark.timeout(60)  # a hang (or a long sleep) where none belongs fails here
def test_a_huge_retry_after_is_refused_without_sleeping(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, status=[503] * 3, retry_after="86400")
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)  # no sleep: one request
    assert "86400 s" in str(info.value) and "try again later" in str(info.value)
    assert server.count("/w.pt") == 1
    guard.check(out)


# -- case 12: HTML instead of weights ----------------------------------------------------------


def test_an_html_page_served_with_200_is_not_stored(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, html_200=True)
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert "HTML page" in str(info.value) and "not a checkpoint" in str(info.value)
    assert server.count("/w.pt") == 1
    assert list(out.iterdir()) == []
    guard.check(out)


# -- case 13: redirects ------------------------------------------------------------------------


def test_authorization_is_not_forwarded_to_another_host_on_redirect(
    server: WeightsServer, other_host: WeightsServer, out: Path
) -> None:
    target = other_host.add("/w.pt", body=DATA)
    url = server.add("/start", redirect_to=target)
    headers = {"Authorization": "Bearer s3cret"}
    download_url_to_file(url, str(out / "w.pt"), progress=False, headers=headers)
    assert (out / "w.pt").read_bytes() == DATA
    assert server.log("/start")[0].headers["authorization"] == "Bearer s3cret"
    assert other_host.count() == 1
    assert all("authorization" not in r.headers for r in other_host.log())


def test_authorization_is_kept_on_a_same_host_redirect(server: WeightsServer, out: Path) -> None:
    url = server.add("/a", redirect_to="/w.pt", redirect_status=301)
    server.add("/w.pt", body=DATA)
    download_url_to_file(url, str(out / "w.pt"), progress=False, headers={"Authorization": "t"})
    assert server.log("/w.pt")[0].headers["authorization"] == "t"


def test_a_redirect_chain_is_followed(server: WeightsServer, out: Path) -> None:
    server.add("/a", redirect_to=server.url("/b"), redirect_status=301)
    server.add("/b", redirect_to="/c", redirect_status=307)
    server.add("/c", redirect_to=server.url("/w.pt"), redirect_status=308)
    server.add("/w.pt", body=DATA)
    download_url_to_file(server.url("/a"), str(out / "w.pt"), progress=False)
    assert (out / "w.pt").read_bytes() == DATA
    assert [r.path for r in server.log()] == ["/a", "/b", "/c", "/w.pt"]


def test_a_redirect_loop_ends_with_a_clear_error(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    server.add("/a", redirect_to=server.url("/b"))
    server.add("/b", redirect_to=server.url("/a"))
    with pytest.raises(DownloadError, match="redirect loop") as info:
        download_url_to_file(server.url("/a"), str(out / "w.pt"), progress=False)
    assert f"{server.url('/a')} -> {server.url('/b')} -> {server.url('/a')}" in str(info.value)
    assert server.count() == 2
    guard.check(out)


def test_an_endless_redirect_chain_stops_after_ten_hops(server: WeightsServer, out: Path) -> None:
    for i in range(20):
        server.add(f"/r{i}", redirect_to=f"/r{i + 1}")
    with pytest.raises(DownloadError, match="more than 10 redirects"):
        download_url_to_file(server.url("/r0"), str(out / "w.pt"), progress=False)
    assert server.count() == 11


def test_a_redirect_to_another_scheme_is_refused(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/a", redirect_to="file:///etc/passwd")
    with pytest.raises(DownloadError, match="non-http"):
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert list(out.iterdir()) == []
    guard.check(out)


def test_credentials_in_the_url_never_appear_in_errors(server: WeightsServer, out: Path) -> None:
    url = f"http://alice:hunter2@127.0.0.1:{server.port}/missing.pt?token=abc123&v=1"
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    message = str(info.value)
    assert "hunter2" not in message and "abc123" not in message and "alice" not in message
    assert f"127.0.0.1:{server.port}/missing.pt" in message and "v=1" in message


# -- case 14: gzip -----------------------------------------------------------------------------


def test_gzip_content_encoding_stores_the_decoded_bytes(server: WeightsServer, out: Path) -> None:
    url = server.add("/w.pt", body=DATA, gzip=True)
    download_url_to_file(url, str(out / "w.pt"), hash_prefix=DIGEST, progress=False)
    assert (out / "w.pt").read_bytes() == DATA
    assert server.log("/w.pt")[0].headers["accept-encoding"] == "identity"


def test_a_cut_gzip_body_restarts_rather_than_resuming(server: WeightsServer, out: Path) -> None:
    url = server.add("/w.pt", body=DATA, gzip=True, cut_after=100_000)
    download_url_to_file(url, str(out / "w.pt"), hash_prefix=DIGEST, progress=False)
    assert (out / "w.pt").read_bytes() == DATA
    assert server.statuses("/w.pt") == [200, 200]
    assert "range" not in server.log("/w.pt")[1].headers


# -- cases 15-18: many processes, locks and kills ----------------------------------------------


def _child_download(
    url: str, dst: str, barrier, results, break_flock: bool = False, checkpoint: bool = False
) -> None:
    if break_flock:
        import fcntl

        fcntl.flock = lambda *args, **kwargs: None  # every process "gets" the lock
    from isolhub._weights.checkpoints import load_state_dict_from_url
    from isolhub._weights.download import download_url_to_file

    if checkpoint:
        import torch  # noqa: F401  (imported before the barrier so the downloads overlap)
    barrier.wait(timeout=120)
    try:
        if checkpoint:
            sd = load_state_dict_from_url(url, check_hash=True, progress=False)
            results.put(("ok", float(sd["w"].sum()), os.getpid()))
        else:
            download_url_to_file(url, dst, progress=False)
            results.put(("ok", dst, os.getpid()))
    except Exception as e:
        results.put(("error", f"{type(e).__name__}: {e}", os.getpid()))


def _run_children(
    n: int, url: str, dst: str, break_flock: bool = False, checkpoint: bool = False
) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child_download, args=(url, dst, barrier, results, break_flock, checkpoint)
        )
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return got


@pytest.mark.slow
def test_eight_processes_load_one_checkpoint_into_an_empty_cache_with_one_download(
    server: WeightsServer, hub_home: Path, guard: Guard
) -> None:
    import io

    import torch

    weights = torch.arange(196_608, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save({"w": weights}, buf)
    body = buf.getvalue()
    name = f"net-{sha256(body)[:8]}.pth"
    url = server.add(f"/{name}", body=body, throttle=512 * 1024)
    results = _run_children(8, url, "", checkpoint=True)
    assert [r[0] for r in results] == ["ok"] * 8, results
    assert {r[1] for r in results} == {float(weights.sum())}
    cached = hub_home / "checkpoints" / name
    assert cached.read_bytes() == body
    assert server.count() == 1
    assert sorted(p.name for p in cached.parent.iterdir()) == sorted([name, guard.seed.name])
    guard.check()


@pytest.mark.slow
def test_a_lock_that_lies_still_gives_one_correct_file(
    server: WeightsServer, hub_home: Path, guard: Guard
) -> None:
    body = os.urandom(512 * 1024)
    url = server.add("/lied.pth", body=body, throttle=1024 * 1024)
    dst = hub_home / "checkpoints" / "lied.pth"
    results = _run_children(4, url, str(dst), break_flock=True)
    assert [r[0] for r in results] == ["ok"] * 4, results
    assert dst.read_bytes() == body
    assert 1 <= server.count("/lied.pth") <= 4
    guard.check()


def _child_slow(url: str, dst: str) -> None:
    from isolhub._weights.download import download_url_to_file

    download_url_to_file(url, dst, progress=False)


def _start_and_wait_for_bytes(server: WeightsServer, path: str, url: str, dst: str, at_least: int):
    proc = multiprocessing.get_context("spawn").Process(target=_child_slow, args=(url, dst))
    proc.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(r.sent >= at_least for r in server.log(path)):
            return proc
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the child never started downloading")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_download_killed_mid_way_leaves_no_target_and_the_next_run_resumes_it(
    server: WeightsServer, out: Path, guard: Guard, sig: int
) -> None:
    url = server.add("/w.pt", body=DATA, throttle=64 * 1024)
    dst = out / "w.pt"
    proc = _start_and_wait_for_bytes(server, "/w.pt", url, str(dst), len(DATA) // 2)
    os.kill(proc.pid, sig)
    proc.join(10)
    assert not dst.exists()
    # The partial stays, with its validator beside it, as huggingface_hub keeps `.incomplete`.
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 2 and all(n.endswith(".partial") for n in left), left
    (data,) = [out / n for n in left if not n.endswith(".meta.partial")]
    kept = data.stat().st_size
    assert 0 < kept < len(DATA)
    download_url_to_file(url, str(dst), hash_prefix=DIGEST, progress=False)
    assert dst.read_bytes() == DATA
    resumed = server.log("/w.pt")[-1]
    assert resumed.status == 206
    assert resumed.headers["range"] == f"bytes={kept}-"
    assert resumed.headers["if-range"]  # the ETag of the first response
    assert resumed.sent == len(DATA) - kept
    assert sorted(p.name for p in out.iterdir()) == ["w.pt"]
    guard.check(out)


@pytest.mark.slow
def test_a_kept_partial_of_a_changed_file_is_started_again_not_joined(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    new = os.urandom(len(DATA))
    url = server.add("/w.pt", body=DATA, throttle=64 * 1024, new_body=new)
    dst = out / "w.pt"
    proc = _start_and_wait_for_bytes(server, "/w.pt", url, str(dst), len(DATA) // 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    download_url_to_file(url, str(dst), progress=False)
    assert dst.read_bytes() == new
    assert server.statuses("/w.pt")[-1] == 200  # If-Range saw the new ETag
    assert sorted(p.name for p in out.iterdir()) == ["w.pt"]
    guard.check(out)


@pytest.mark.slow
def test_a_kept_partial_is_resumed_only_for_its_own_url(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, throttle=64 * 1024)
    other = server.add("/other/w.pt", body=DATA[::-1])
    dst = out / "w.pt"
    proc = _start_and_wait_for_bytes(server, "/w.pt", url, str(dst), len(DATA) // 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    download_url_to_file(other, str(dst), progress=False)
    assert dst.read_bytes() == DATA[::-1]
    assert "range" not in server.log("/other/w.pt")[-1].headers
    assert sorted(p.name for p in out.iterdir()) == ["w.pt"]
    guard.check(out)


@pytest.mark.slow
def test_a_killed_lock_holder_frees_the_lock_for_the_waiter(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA, throttle=32 * 1024)
    dst = out / "w.pt"
    holder = _start_and_wait_for_bytes(server, "/w.pt", url, str(dst), 1)
    done = threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            download_url_to_file(url, str(dst), hash_prefix=DIGEST, progress=False)
        except BaseException as e:
            errors.append(e)
        done.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    assert server.count("/w.pt") == 1  # the waiter is waiting on the lock, not downloading
    killed = time.monotonic()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    assert done.wait(30)
    thread.join()
    assert not errors
    # The waiter's download is the fast second response; it started at once.
    assert server.log("/w.pt")[1].at - killed < 2
    assert dst.read_bytes() == DATA
    guard.check(out)


_HOLD_SOFT_LOCK = """
import sys, time, filelock
lock = filelock.SoftFileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.timeout(60)  # the lock's 0.5 s, then on with a warning; never a wait for it
def test_a_soft_lock_held_elsewhere_delays_the_download_only_boundedly(
    server: WeightsServer,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(filelock, "FileLock", filelock.SoftFileLock)
    monkeypatch.setenv("ISOLHUB_LOCK_TIMEOUT", "0.5")
    dst = out / "w.pt"
    lock_path = _download._lock_path(str(dst))
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SOFT_LOCK, lock_path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        url = server.add("/w.pt", body=DATA)
        with caplog.at_level(logging.WARNING, logger="isolhub.download"):
            download_url_to_file(url, str(dst), progress=False)
        assert dst.read_bytes() == DATA
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert lock_path in warning and f"rm {lock_path}" in warning
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_stale_soft_lock_of_a_dead_process_is_broken_at_once(
    server: WeightsServer,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(filelock, "FileLock", filelock.SoftFileLock)
    monkeypatch.setenv("ISOLHUB_LOCK_TIMEOUT", "20")
    dst = out / "w.pt"
    lock_path = _download._lock_path(str(dst))
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SOFT_LOCK, lock_path], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    holder.stdout.close()
    assert os.path.exists(lock_path)
    with caplog.at_level(logging.WARNING, logger="isolhub.download"):
        download_url_to_file(server.add("/w.pt", body=DATA), str(dst), progress=False)
    assert dst.read_bytes() == DATA
    assert not caplog.records  # broken at once, not waited out (which warns, naming the lock)


# -- case 21: full disk ------------------------------------------------------------------------


def _child_with_file_size_limit(url: str, dst: str, limit: int, results) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from isolhub._weights.download import download_url_to_file

    try:
        download_url_to_file(url, dst, progress=False)
        results.put(("ok", ""))
    except Exception as e:
        results.put((type(e).__name__, str(e)))


def test_a_full_disk_fails_with_a_clear_error_and_leaves_nothing(
    server: WeightsServer, out: Path, guard: Guard
) -> None:
    url = server.add("/w.pt", body=DATA)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(
        target=_child_with_file_size_limit, args=(url, str(out / "w.pt"), 64 * 1024, results)
    )
    proc.start()
    kind, message = results.get(timeout=120)
    proc.join(30)
    assert kind == "DownloadError", message
    assert "no space left" in message and "File too large" in message
    assert f"needed {len(DATA)} bytes" in message and url in message
    assert server.count("/w.pt") == 1
    assert list(out.iterdir()) == []
    guard.check(out)


# -- case 24: offline and unreachable ----------------------------------------------------------


def test_offline_mode_serves_an_existing_file_with_zero_requests_and_a_miss_is_an_error(
    server: WeightsServer, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/w.pt", body=DATA)
    download_url_to_file(url, str(out / "w.pt"), progress=False)
    server.stop()
    monkeypatch.setenv("ISOLHUB_OFFLINE", "1")
    download_url_to_file(url, str(out / "w.pt"), hash_prefix=DIGEST[:8], progress=False)
    with pytest.raises(OfflineError) as info:
        download_url_to_file(url, str(out / "other.pt"), progress=False)
    assert isinstance(info.value, ConnectionError)
    assert "offline" in str(info.value) and url in str(info.value)
    assert server.count() == 1
    assert sorted(p.name for p in out.iterdir()) == ["w.pt"]


@pytest.mark.timeout(60)  # a hang (or a long sleep) where none belongs fails here
def test_an_unreachable_host_fails_quickly_with_a_clear_error(out: Path, guard: Guard) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pt"
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    assert "unreachable" in str(info.value) and "ISOLHUB_OFFLINE" in str(info.value)
    assert url in str(info.value)
    guard.check(out)


def test_an_unresolvable_host_name_fails_with_a_clear_error(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_HTTP_RETRIES", "0")
    with pytest.raises(DownloadError, match="could not be resolved"):
        download_url_to_file("http://weights.invalid/w.pt", str(out / "w.pt"), progress=False)
    assert list(out.iterdir()) == []


# -- case 25: proxies --------------------------------------------------------------------------


def test_traffic_goes_through_the_proxy_and_no_proxy_bypasses_it(
    server: WeightsServer, other_host: WeightsServer, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = server
    proxy.add("/w.pt", body=DATA)
    url = other_host.add("/w.pt", body=DATA)
    monkeypatch.setenv("HTTP_PROXY", proxy.base)
    monkeypatch.setenv("NO_PROXY", "localhost")
    download_url_to_file(url, str(out / "a.pt"), progress=False)
    assert [r.proxied for r in proxy.log()] == [True]
    assert other_host.count() == 0
    monkeypatch.setenv("NO_PROXY", "127.0.0.2")
    download_url_to_file(url, str(out / "b.pt"), progress=False)
    assert proxy.count() == 1 and other_host.count() == 1
    assert (out / "a.pt").read_bytes() == (out / "b.pt").read_bytes() == DATA


def test_a_proxy_asking_for_credentials_gives_a_proxy_error(
    server: WeightsServer, other_host: WeightsServer, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.proxy_status = 407
    monkeypatch.setenv("HTTP_PROXY", server.base)
    monkeypatch.setenv("NO_PROXY", "localhost")
    url = other_host.add("/w.pt", body=DATA)
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    message = str(info.value)
    assert "HTTP 407" in message and "proxy" in message
    assert "not there" not in message and "offline" not in message.lower()
    assert server.count() == 1 and other_host.count() == 0


# -- case 30: planted symlinks -----------------------------------------------------------------


def test_a_symlink_planted_at_the_target_is_replaced_not_written_through(
    server: WeightsServer, out: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (out / "w.pt").symlink_to(victim)
    download_url_to_file(server.add("/w.pt", body=DATA), str(out / "w.pt"), progress=False)
    assert not (out / "w.pt").is_symlink()
    assert (out / "w.pt").read_bytes() == DATA
    assert victim.read_bytes() == b"precious"


def test_a_symlink_planted_at_the_temp_name_is_never_followed(
    server: WeightsServer, out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    fixed = uuid.UUID(int=7)
    planted = out / f"w.pt.{fixed.hex}.{host_tag()}-{os.getpid()}.partial"
    planted.symlink_to(victim)
    names = iter([fixed])
    real_uuid4 = uuid.uuid4
    monkeypatch.setattr(_download.uuid, "uuid4", lambda: next(names, None) or real_uuid4())
    download_url_to_file(server.add("/w.pt", body=DATA), str(out / "w.pt"), progress=False)
    assert (out / "w.pt").read_bytes() == DATA
    assert victim.read_bytes() == b"precious"
    # the leftover sweep may unlink the planted link (our own pid, no download using it); it is
    # never followed, so the victim stays as it was
    assert planted.is_symlink() or not os.path.lexists(planted)


def test_a_directory_as_dst_is_an_error(server: WeightsServer, out: Path) -> None:
    with pytest.raises(DownloadError, match="is a directory"):
        download_url_to_file(server.add("/w.pt", body=DATA), str(out), progress=False)
    assert server.count() == 0


def test_a_missing_destination_folder_is_a_clear_error(server: WeightsServer, out: Path) -> None:
    with pytest.raises(DownloadError, match="does not exist"):
        download_url_to_file(server.add("/w.pt", body=DATA), str(out / "no" / "w"), progress=False)


# -- file URLs, the broker seam, settings ------------------------------------------------------


def test_a_file_url_is_copied_and_hash_checked(out: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    download_url_to_file(src.as_uri(), str(out / "w.pt"), hash_prefix=DIGEST[:8], progress=False)
    assert (out / "w.pt").read_bytes() == DATA
    with pytest.raises(HashMismatchError):
        download_url_to_file(src.as_uri(), str(out / "x.pt"), hash_prefix="ffff0000")
    assert sorted(p.name for p in out.iterdir()) == ["w.pt"]


def test_a_fetch_broker_serves_downloads_without_touching_the_network(
    server: WeightsServer, out: Path, tmp_path: Path, no_broker: None
) -> None:
    served = tmp_path / "brokered.bin"
    served.write_bytes(DATA)
    served.chmod(0o444)
    asked: list[tuple[str, str | None]] = []

    def broker(url: str, hash_prefix: str | None) -> str:
        asked.append((url, hash_prefix))
        return str(served)

    set_fetch_broker(broker)
    url = server.add("/w.pt", body=b"not these bytes")
    download_url_to_file(url, str(out / "w.pt"), hash_prefix=DIGEST[:8], progress=False)
    assert (out / "w.pt").read_bytes() == DATA
    assert asked == [(url, DIGEST[:8])]
    assert server.count() == 0
    with pytest.raises(HashMismatchError):
        download_url_to_file(url, str(out / "x.pt"), hash_prefix="0000ffff", progress=False)
    set_fetch_broker(None)
    download_url_to_file(url, str(out / "direct.pt"), progress=False)
    assert server.count() == 1


def test_a_malformed_setting_is_a_clear_error(
    server: WeightsServer, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOLHUB_HTTP_TIMEOUT", "soon")
    with pytest.raises(DownloadError, match="ISOLHUB_HTTP_TIMEOUT='soon'"):
        download_url_to_file(server.add("/w.pt", body=DATA), str(out / "w.pt"), progress=False)


def test_errors_pickle_with_their_attributes(server: WeightsServer, out: Path) -> None:
    import pickle

    url = server.add("/w.pt", body=DATA, status=[404])
    with pytest.raises(DownloadError) as info:
        download_url_to_file(url, str(out / "w.pt"), progress=False)
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is DownloadError and again.status == 404 and str(again) == str(info.value)


def test_importing_the_download_modules_stays_cheap() -> None:
    code = (
        "import sys, isolhub._weights.checkpoints, isolhub._weights.download, isolhub._cli.cache\n"
        "heavy = {'torch', 'requests', 'urllib3', 'tqdm', 'safetensors'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert not {'isolhub._api', 'isolhub._cli.main'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
