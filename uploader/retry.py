"""
Decide how long to wait before trying an upload again, short term and long term.

Short waits, inside one attempt cycle, go through tenacity in ``upload_with_retry``:
only ``RetryableUploadError`` is retried, and no single wait exceeds
``INLINE_RETRY_MAX_WAIT_S``. A longer wait (a long Retry-After, an outage) ends the
cycle at once and the daemon defers the file through the ledger, using
``deferral_delay_s`` for ``next_attempt_at``, so a worker is never parked on one file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import functools
import inspect
import random as random_module
import re
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import TYPE_CHECKING

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.stop import stop_after_attempt, stop_any
from tenacity.wait import wait_exponential_jitter

from uploader.constants import INLINE_RETRY_MAX_WAIT_S
from uploader.exceptions import RetryableUploadError

if TYPE_CHECKING:
    from uploader.client import CoreplusClient, UploadRequest, UploadResult

#: The first deferral waits about this long; each further deferral doubles it.
DEFERRAL_BASE_S = 30.0

#: The first inline retry waits about this long; each further retry doubles it.
INLINE_RETRY_BASE_S = 1.0

# Delta-seconds is digits only in HTTP, but a signed or decimal value is clear
# enough to honour rather than ignore.
_DELTA_SECONDS = re.compile(r"[+-]?\d+(\.\d+)?")

# 2**40 times the base is far beyond any cap and keeps the float finite.
_MAX_EXPONENT = 40

BeforeAttempt = Callable[[int], Awaitable[None]]
OnRetry = Callable[[int, Exception, float], Awaitable[None] | None]


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """
    Parse a Retry-After header into seconds from now.

    Args:
        value: The header value: delta-seconds or an HTTP date; None when absent.
        now_s: The current UTC unix time, used for an HTTP date.

    Returns:
        Seconds to wait, never negative (a past date or negative number gives 0), or
        None when the header is absent or cannot be parsed.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return max(0.0, float(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    # An HTTP date is always GMT; a date without a zone is read as UTC too.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_s)


def deferral_delay_s(
    deferrals: int,
    *,
    retry_after_s: float | None,
    backoff_max_s: float,
    random: Callable[[], float] = random_module.random,
) -> float:
    """
    Compute how long a deferred file waits before its next attempt cycle.

    The delay is exponential with equal jitter: ``DEFERRAL_BASE_S * 2**deferrals``,
    of which a random half is taken off, so files deferred together spread out. A
    longer Retry-After wins, and the result never exceeds ``backoff_max_s`` (a longer
    Retry-After is capped too).

    Args:
        deferrals: How many times this file was deferred before; 0 for the first time.
        retry_after_s: Seconds the service asked for, if it did.
        backoff_max_s: The cap, ``upload.backoff_max_seconds``.
        random: Source of uniform numbers in [0, 1).

    Returns:
        The delay in seconds, between 0 and ``backoff_max_s``.
    """
    exponent = min(max(deferrals, 0), _MAX_EXPONENT)
    full_s = DEFERRAL_BASE_S * 2**exponent
    delay_s = full_s / 2 + random() * full_s / 2
    if retry_after_s is not None:
        delay_s = max(delay_s, retry_after_s)
    return max(0.0, min(delay_s, backoff_max_s))


async def upload_with_retry(
    client: CoreplusClient,
    request: UploadRequest,
    *,
    max_attempts: int,
    backoff_max_s: float,
    before_attempt: BeforeAttempt | None = None,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> UploadResult:
    """
    Upload one file, retrying transient failures with short waits.

    Each try calls ``client.upload``, which waits for the rate limiter, awaits
    ``before_attempt(attempt_number)``, and then sends with a new token. Only
    ``RetryableUploadError`` is retried. The wait before a retry is the longer of the
    service's Retry-After and an exponential wait with jitter (about 1 s, 2 s, 4 s, ...),
    capped at ``INLINE_RETRY_MAX_WAIT_S`` and at ``backoff_max_s``.

    Args:
        client: The client that makes one try per call.
        request: What to upload.
        max_attempts: Tries before giving up; at least 1.
        backoff_max_s: The backoff cap, which also caps inline waits.
        before_attempt: Called with the attempt number (from 1) just before each try
            sends its first byte, for example to record the ``uploading`` state.
        on_retry: Called with the attempt number that failed, its error and the wait
            in seconds before the next try; it may be a coroutine function.
        sleep: Coroutine that waits a number of seconds.

    Returns:
        The result of the successful try, with ``attempts`` set.

    Raises:
        RetryableUploadError: The last try failed transiently, either after
            ``max_attempts`` tries or at once when the service asked for a wait longer
            than ``INLINE_RETRY_MAX_WAIT_S``. The caller defers the file.
        UploadError, FileChangedError, FileVanishedError, OSError: Raised by a try;
            these are never retried.
    """
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}.")
    retrying = AsyncRetrying(
        sleep=sleep,
        retry=retry_if_exception_type(RetryableUploadError),
        stop=stop_any(stop_after_attempt(max_attempts), _long_wait_requested),
        wait=_InlineWait(min(INLINE_RETRY_MAX_WAIT_S, backoff_max_s)),
        before_sleep=_before_sleep_hook(on_retry),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            attempt_number = attempt.retry_state.attempt_number
            before_send = (None if before_attempt is None
                           else functools.partial(before_attempt, attempt_number))
            result = await client.upload(request, before_send=before_send)
    return dataclasses.replace(result, attempts=attempt_number)


def _long_wait_requested(retry_state: RetryCallState) -> bool:
    """
    Stop at once when the service asked for a wait longer than an inline retry may be.
    """
    error = _retryable_error(retry_state)
    return error is not None and (error.retry_after_s or 0.0) > INLINE_RETRY_MAX_WAIT_S


class _InlineWait:
    """
    Wait the longer of Retry-After and exponential backoff with jitter, up to a cap.
    """

    def __init__(self, cap_s: float) -> None:
        self._cap_s = max(0.0, cap_s)
        self._backoff = wait_exponential_jitter(multiplier=INLINE_RETRY_BASE_S, max=self._cap_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        wait_s = self._backoff(retry_state)
        error = _retryable_error(retry_state)
        if error is not None and error.retry_after_s is not None:
            wait_s = max(wait_s, error.retry_after_s)
        return min(wait_s, self._cap_s)


def _retryable_error(retry_state: RetryCallState) -> RetryableUploadError | None:
    outcome = retry_state.outcome
    if outcome is None or not outcome.failed:
        return None
    error = outcome.exception()
    return error if isinstance(error, RetryableUploadError) else None


def _before_sleep_hook(
    on_retry: OnRetry | None,
) -> Callable[[RetryCallState], Awaitable[None]] | None:
    if on_retry is None:
        return None

    async def hook(retry_state: RetryCallState) -> None:
        assert retry_state.outcome is not None and retry_state.next_action is not None
        error = retry_state.outcome.exception()
        assert isinstance(error, Exception)
        outcome = on_retry(retry_state.attempt_number, error, retry_state.next_action.sleep)
        if inspect.isawaitable(outcome):
            await outcome

    return hook
