"""
Space request starts so that every worker together stays under coreplus's rate limit.

coreplus allows 10 requests per second per consumer and returns 429 beyond that. One
``RateLimiter`` is shared by every request the daemon makes. It enforces two rules at
once: starts follow a plan spaced ``1 / rate`` seconds apart, and no sliding one-second
window holds more than ``floor(rate)`` starts (at least one). After a 429 or 503 it
pauses every caller and halves the rate, then recovers step by step on success.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from uploader.constants import INLINE_RETRY_MAX_WAIT_S

#: Pause after a 429 or 503 that carried no usable Retry-After.
DEFAULT_PAUSE_S = 1.0

#: The effective rate never drops below this many starts per second after slow_down.
MIN_RATE_PER_S = 1.0

#: Each success raises the effective rate by this factor, up to the configured rate.
RECOVERY_FACTOR = 1.1

_WINDOW_S = 1.0

# Float rounding can leave "now + wait" a hair short of the target, so a start this
# close to its time counts as due instead of sleeping again for nothing.
_TOLERANCE_S = 1e-6

# A sleep wakes up to about a millisecond late, because the event loop's epoll selector
# rounds every timeout up to whole milliseconds. A start at most this late keeps its
# planned time as the base for the next one, so the lag does not add up. The window
# rule still uses real times.
_LAG_ALLOWANCE_S = 0.005


class RateLimiter:
    """
    Fair (first come, first served) pacing of request starts across all callers.

    Args:
        max_per_second: The configured rate; zero or less means unlimited, although
            a pause from ``slow_down`` still applies.
        clock: Monotonic time source in seconds.
        sleep: Coroutine that waits a number of seconds.
        max_pause_s: The maximum pause in seconds that one ``slow_down`` imposes. A longer
            Retry-After is handled by deferring the file, not by parking every worker.
    """

    def __init__(
        self,
        max_per_second: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        max_pause_s: float = INLINE_RETRY_MAX_WAIT_S,
    ) -> None:
        self._configured_rate = max_per_second
        self._rate = max_per_second
        self._clock = clock
        self._sleep = sleep
        self._max_pause_s = max_pause_s
        self._starts: deque[float] = deque()
        self._planned_s = -math.inf
        self._paused_until = -math.inf
        # asyncio.Lock wakes its waiters in FIFO order, and a caller keeps it while it
        # sleeps, so callers start in the order they arrived.
        self._lock = asyncio.Lock()

    @property
    def rate_per_s(self) -> float:
        """
        The effective rate now: the configured rate, or less after ``slow_down``.
        """
        return self._rate

    @property
    def limited(self) -> bool:
        """
        Whether a rate applies at all.
        """
        return self._configured_rate > 0

    async def acquire(self) -> None:
        """
        Wait until the caller may start one request, then record the start.
        """
        async with self._lock:
            while True:
                now_s = self._clock()
                ready_s = self._next_start_s(now_s)
                if ready_s <= now_s + _TOLERANCE_S:
                    break
                # Loop rather than trust one sleep: slow_down may move the time on.
                await self._sleep(ready_s - now_s)
            self._starts.append(now_s)
            self._planned_s = ready_s if now_s - ready_s <= _LAG_ALLOWANCE_S else now_s

    def slow_down(self, retry_after_s: float | None) -> None:
        """
        Pause every caller and halve the rate after a 429 or 503.

        Args:
            retry_after_s: The service's Retry-After in seconds, or None to use
                ``DEFAULT_PAUSE_S``. The pause is capped at ``max_pause_s``.
        """
        pause_s = DEFAULT_PAUSE_S if retry_after_s is None else max(0.0, retry_after_s)
        pause_s = min(pause_s, self._max_pause_s)
        self._paused_until = max(self._paused_until, self._clock() + pause_s)
        if self.limited:
            floor_rate = min(MIN_RATE_PER_S, self._configured_rate)
            self._rate = max(self._rate / 2, floor_rate)

    def record_success(self) -> None:
        """
        Raise the rate one step back towards the configured rate after a success.
        """
        if self.limited:
            self._rate = min(self._rate * RECOVERY_FACTOR, self._configured_rate)

    def _next_start_s(self, now_s: float) -> float:
        # Starts at or before now - 1 s can no longer share a one-second window with
        # a start now.
        while self._starts and self._starts[0] <= now_s - _WINDOW_S:
            self._starts.popleft()
        ready_s = self._paused_until
        if not self.limited or not self._starts:
            return ready_s
        ready_s = max(ready_s, self._planned_s + 1.0 / self._rate)
        max_in_window = max(1, math.floor(self._rate))
        if len(self._starts) >= max_in_window:
            ready_s = max(ready_s, self._starts[-max_in_window] + _WINDOW_S)
        return ready_s
