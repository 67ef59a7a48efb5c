"""Adaptive spinning: a side that finds nothing when it spins sleeps at once for a while."""

from __future__ import annotations

import time

from isolhub._transport.codec import Spinner


class Poll:
    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self, timeout: int) -> list[tuple[int, int]]:
        assert timeout == 0  # spinning never sleeps in poll
        self.calls += 1
        return [(3, 1)] if self.answers else []


def spun(spin: Spinner, poll: Poll) -> bool:
    before = poll.calls
    spin(poll)
    return poll.calls > before


def test_a_spin_that_finds_nothing_makes_the_next_waits_sleep_at_once_doubling_up_to_64() -> None:
    spin, idle = Spinner(0.0002), Poll(answers=False)
    pattern = [spun(spin, idle) for _ in range(1 + 1 + 1 + 2 + 1 + 4 + 1)]
    assert pattern == [True, False, True, False, False, True, False, False, False, False, True]
    for _ in range(2000):
        spin(idle)
    spins = [spun(spin, idle) for _ in range(65 * 3)]
    assert sum(spins) == 3  # one spin in 65 waits once backed off fully


def test_a_spin_that_finds_the_answer_spins_again_next_time() -> None:
    spin = Spinner(0.0002)
    spin(Poll(answers=False))  # backs off once
    assert not spun(spin, Poll(answers=True))  # skipped
    busy = Poll(answers=True)
    assert all(spun(spin, busy) for _ in range(10))


def test_no_spin_budget_never_polls() -> None:
    poll = Poll(answers=True)
    assert Spinner(0)(poll) == [] and poll.calls == 0


class Yield:
    """A `sched_yield` that another process kept: it returns a millisecond later."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        time.sleep(0.001)


def test_a_spin_whose_yield_ran_another_process_stops_and_the_next_waits_sleep_at_once() -> None:
    # The core is contended: spinning would hand it to other processes a time slice at a time.
    preempted = Yield()
    spin, idle = Spinner(10.0, yield_=preempted), Poll(answers=False)
    assert spin(idle) == [] and preempted.calls == 1 and idle.calls == 2
    assert [spun(spin, idle) for _ in range(2)] == [False, True]


def test_an_answer_found_after_a_preempted_yield_is_returned_and_the_next_wait_sleeps() -> None:
    class Late(Poll):
        def __call__(self, timeout: int) -> list[tuple[int, int]]:
            super().__call__(timeout)
            return [(3, 1)] if self.calls > 1 else []

    spin = Spinner(10.0, yield_=Yield())
    assert spin(Late(answers=True)) == [(3, 1)]
    assert not spun(spin, Poll(answers=True))
