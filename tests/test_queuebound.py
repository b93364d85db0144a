"""The queue bound's rule on its own, with time given: a burst keeps the deep queue, a queue that stands
full shrinks to one batch, and it grows back once refusals stop."""

from __future__ import annotations

from gateway.queuebound import STANDING_MIN_S, STANDING_RUNS, QueueBound

RUN_S = 0.002  # a batch run
WINDOW_S = STANDING_RUNS * RUN_S


def bound() -> QueueBound:
    b = QueueBound(deep=4, shallow=2)
    b.ran(RUN_S)
    return b


def test_requests_wait_up_to_the_deep_limit() -> None:
    b = bound()
    assert all(b.admits(waiting, 0.0) for waiting in range(4))
    assert not b.admits(4, 0.0)
    assert b.limit == 4 and not b.standing


def test_a_queue_that_stays_full_for_the_window_shrinks_to_one_batch() -> None:
    b = bound()
    t = 0.0
    while t < WINDOW_S:
        assert not b.admits(4, t)
        b.taken(3)  # a batch left, but more than a batch still waits: no slack
        t += RUN_S / 2
    assert not b.admits(4, t)
    assert b.standing and b.limit == 2
    assert b.admits(1, t) and not b.admits(2, t)


def test_a_burst_that_drains_keeps_the_deep_queue() -> None:
    b = bound()
    t = 0.0
    while t < 3 * WINDOW_S:
        assert not b.admits(4, t)
        b.taken(1)  # the queue fell below a batch: it drains, so it is not standing
        t += RUN_S / 2
    assert not b.standing and b.admits(3, t)


def test_the_deep_queue_returns_once_no_request_was_refused_for_the_window() -> None:
    b = bound()
    t = 0.0
    while not b.standing:
        b.admits(4, t)
        t += RUN_S / 2
    assert not b.admits(2, t)  # still refusing: still shallow
    assert not b.admits(2, t + WINDOW_S / 2) and b.standing
    calm = t + WINDOW_S / 2 + WINDOW_S * 1.01
    assert b.admits(3, calm)
    assert not b.standing and b.limit == 4


def test_the_window_follows_the_run_time_but_is_never_shorter_than_the_floor() -> None:
    fast = QueueBound(deep=2, shallow=1)
    fast.ran(1e-6)
    fast.admits(2, 0.0)
    fast.admits(2, STANDING_MIN_S / 2)
    assert not fast.standing  # 8 runs of 1 us have passed, the floor has not
    fast.admits(2, STANDING_MIN_S)
    assert fast.standing
    slow = QueueBound(deep=2, shallow=1)
    slow.ran(0.1)
    slow.admits(2, 0.0)
    slow.admits(2, STANDING_MIN_S * 10)
    assert not slow.standing  # 8 runs of 100 ms have not passed
    slow.admits(2, STANDING_RUNS * 0.1)
    assert slow.standing


def test_a_fixed_bound_never_changes() -> None:
    b = QueueBound(deep=3, shallow=3)
    for step in range(100):
        assert not b.admits(3, step * 0.01)
    assert b.limit == 3 and b.admits(2, 1.0)
