"""
Tests for uploader.ratelimit with a fake clock whose sleep moves time forward, so no
test depends on real timing.
"""

from __future__ import annotations

import asyncio

import pytest

from uploader.ratelimit import DEFAULT_PAUSE_S, RateLimiter

# Float sums of spacings such as 0.2 may land a hair short of the exact value.
EPSILON = 1e-6


class FakeClock:
    """
    Monotonic time that only moves when someone sleeps.
    """

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now_s += seconds
        # Let other tasks run, as a real sleep would.
        await asyncio.sleep(0)


def _limiter(rate: float, clock: FakeClock, **options: float) -> RateLimiter:
    return RateLimiter(rate, clock=clock, sleep=clock.sleep, **options)


async def _start_times(limiter: RateLimiter, clock: FakeClock, count: int) -> list[float]:
    starts = []
    for _ in range(count):
        await limiter.acquire()
        starts.append(clock())
    return starts


def _max_in_any_window(starts: list[float]) -> int:
    """The most starts in any half-open one-second window [t, t + 1)."""
    return max(
        sum(1 for other in starts if start <= other < start + 1.0 - EPSILON) for start in starts
    )


async def test_limiter_first_start_immediate() -> None:
    """The first start does not wait."""
    clock = FakeClock()
    limiter = _limiter(9, clock)

    await limiter.acquire()

    assert clock.sleeps == []


async def test_limiter_spacing() -> None:
    """At 4 per second, consecutive starts are at least 0.25 s apart."""
    clock = FakeClock()
    starts = await _start_times(_limiter(4, clock), clock, 12)

    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert min(gaps) >= 0.25 - EPSILON
    assert starts[-1] - starts[0] == pytest.approx(11 * 0.25)


async def test_limiter_window_fractional_rate() -> None:
    """At 2.5 per second no one-second window holds more than 2 starts, though spacing allows 3."""
    clock = FakeClock()
    starts = await _start_times(_limiter(2.5, clock), clock, 10)

    assert _max_in_any_window(starts) == 2
    for earlier, later in zip(starts, starts[2:]):
        assert later - earlier >= 1.0 - EPSILON
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert min(gaps) >= 0.4 - EPSILON


async def test_limiter_window_integer_rate() -> None:
    """At 9 per second any one-second window holds at most 9 starts."""
    clock = FakeClock()
    starts = await _start_times(_limiter(9, clock), clock, 40)

    assert _max_in_any_window(starts) == 9


class LaggingClock(FakeClock):
    """
    A fake clock whose sleeps wake late by a fixed lag, as real timers do.
    """

    def __init__(self, lag_s: float) -> None:
        super().__init__()
        self.lag_s = lag_s

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self.lag_s)


async def test_limiter_lag_does_not_accumulate() -> None:
    """Sleeps that wake 0.7 ms late cost one lag per window, not one per start."""
    clock = LaggingClock(0.0007)
    starts = await _start_times(_limiter(9, clock), clock, 91)

    assert _max_in_any_window(starts) == 9
    # 90 gaps on a 1/9 s plan take 10 s. Ten window limits add one lag each, whereas
    # lag added at every start would come to 63 ms.
    assert starts[-1] - starts[0] < 10.0 + 0.01


async def test_limiter_idle_restarts_plan() -> None:
    """After a quiet spell the plan starts again: no burst to make up for lost time."""
    clock = FakeClock()
    limiter = _limiter(4, clock)
    await _start_times(limiter, clock, 3)
    await clock.sleep(5.0)
    starts = await _start_times(limiter, clock, 3)

    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert gaps == [pytest.approx(0.25), pytest.approx(0.25)]


async def test_limiter_slow_rate_one_per_window() -> None:
    """Below 1 per second the spacing rule sets the pace: 0.5/s means 2 s apart."""
    clock = FakeClock()
    starts = await _start_times(_limiter(0.5, clock), clock, 4)

    assert [round(start - starts[0], 6) for start in starts] == [0.0, 2.0, 4.0, 6.0]


async def test_limiter_unlimited() -> None:
    """A rate of 0 never waits."""
    clock = FakeClock()
    limiter = _limiter(0, clock)

    await _start_times(limiter, clock, 100)

    assert clock.sleeps == []
    assert limiter.limited is False


async def test_limiter_fifo_order() -> None:
    """Concurrent callers start in the order they called acquire()."""
    clock = FakeClock()
    limiter = _limiter(5, clock)
    order: list[int] = []

    async def caller(number: int) -> None:
        await limiter.acquire()
        order.append(number)

    tasks = [asyncio.create_task(caller(number)) for number in range(8)]
    await asyncio.gather(*tasks)

    assert order == list(range(8))


async def test_limiter_concurrent_window() -> None:
    """Many concurrent callers together stay within the rate."""
    clock = FakeClock()
    limiter = _limiter(3, clock)
    starts: list[float] = []

    async def caller() -> None:
        await limiter.acquire()
        starts.append(clock())

    await asyncio.gather(*(caller() for _ in range(15)))

    assert _max_in_any_window(sorted(starts)) == 3


async def test_limiter_slow_down_pauses_and_halves() -> None:
    """slow_down(3) makes the next start wait 3 s, then halves the spacing rate from 8 to 4."""
    clock = FakeClock()
    limiter = _limiter(8, clock)
    await limiter.acquire()
    paused_at = clock()

    limiter.slow_down(3.0)
    starts = await _start_times(limiter, clock, 3)

    assert starts[0] == pytest.approx(paused_at + 3.0)
    assert limiter.rate_per_s == 4
    assert starts[1] - starts[0] == pytest.approx(0.25)
    assert starts[2] - starts[1] == pytest.approx(0.25)


async def test_limiter_slow_down_default_pause() -> None:
    """slow_down(None) pauses for the default second."""
    clock = FakeClock()
    limiter = _limiter(8, clock)
    paused_at = clock()

    limiter.slow_down(None)
    await limiter.acquire()

    assert clock() == pytest.approx(paused_at + DEFAULT_PAUSE_S)


async def test_limiter_slow_down_pause_capped() -> None:
    """A Retry-After of 300 s pauses the limiter only for max_pause_s."""
    clock = FakeClock()
    limiter = _limiter(8, clock, max_pause_s=10.0)
    paused_at = clock()

    limiter.slow_down(300.0)
    await limiter.acquire()

    assert clock() == pytest.approx(paused_at + 10.0)


def test_limiter_slow_down_floor() -> None:
    """Repeated slow_down halves 4 -> 2 -> 1 and never goes below 1 per second."""
    limiter = _limiter(4, FakeClock())
    rates = []
    for _ in range(4):
        limiter.slow_down(0)
        rates.append(limiter.rate_per_s)

    assert rates == [2, 1, 1, 1]


def test_limiter_slow_down_floor_below_one() -> None:
    """A configured rate under 1 per second is kept as the floor, not raised to 1."""
    limiter = _limiter(0.5, FakeClock())
    limiter.slow_down(0)

    assert limiter.rate_per_s == 0.5


def test_limiter_recovers_gradually() -> None:
    """After a halving, one success raises the rate a little; many restore it exactly."""
    limiter = _limiter(8, FakeClock())
    limiter.slow_down(0)

    limiter.record_success()
    after_one = limiter.rate_per_s
    for _ in range(50):
        limiter.record_success()

    assert 4 < after_one < 8
    assert limiter.rate_per_s == 8


async def test_limiter_unlimited_still_pauses() -> None:
    """With no rate limit, slow_down still pauses callers but sets no rate."""
    clock = FakeClock()
    limiter = _limiter(0, clock)
    paused_at = clock()

    limiter.slow_down(2.0)
    await limiter.acquire()

    assert clock() == pytest.approx(paused_at + 2.0)
    assert limiter.rate_per_s == 0


async def test_limiter_slow_down_while_waiting() -> None:
    """A caller already sleeping for its slot also honours a slow_down that arrives meanwhile."""
    clock = FakeClock()
    limiters: list[RateLimiter] = []

    async def sleep_during_429(seconds: float) -> None:
        # Another worker's request gets a 429 while this caller sleeps.
        if not clock.sleeps:
            limiters[0].slow_down(5.0)
        await clock.sleep(seconds)

    limiter = RateLimiter(4, clock=clock, sleep=sleep_during_429)
    limiters.append(limiter)
    await limiter.acquire()
    first_start = clock()

    await limiter.acquire()

    assert clock() == pytest.approx(first_start + 5.0)
