"""The prune clock: the wall clock, never ahead of the time that really passed."""

from __future__ import annotations

from agentid_server.domain.pruning import PruneClock

from tests.conftest import FakeClock


def test_it_follows_the_wall_clock_while_time_passes() -> None:
    clock = FakeClock()
    prune = PruneClock(clock)
    clock.advance(90)
    assert prune.now() == clock.now()


def test_a_step_ahead_is_not_followed_only_the_time_that_passes() -> None:
    clock = FakeClock()
    start = clock.now()
    prune = PruneClock(clock)
    clock.step(7200)
    assert prune.now() == start
    clock.advance(60)
    assert prune.now() == start + 60
    clock.step(-7200)  # put right: the two agree again
    assert prune.now() == clock.now() == start + 60


def test_a_step_back_is_followed_at_once() -> None:
    clock = FakeClock()
    prune = PruneClock(clock)
    clock.step(-300)
    assert prune.now() == clock.now()
    clock.advance(10)
    assert prune.now() == clock.now()
