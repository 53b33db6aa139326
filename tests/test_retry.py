"""
Tests for uploader.retry: Retry-After parsing, deferral delays, and the inline retry
rules of upload_with_retry, driven by a scripted stand-in for the client object.
"""

from __future__ import annotations

import email.utils
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from uploader.client import UploadRequest, UploadResult
from uploader.constants import INLINE_RETRY_MAX_WAIT_S
from uploader.exceptions import (
    FileChangedError,
    FileVanishedError,
    PermanentUploadError,
    RetryableUploadError,
    ServicePausedError,
    UncertainUploadError,
)
from uploader.retry import deferral_delay_s, parse_retry_after, upload_with_retry

NOW_S = 1_700_000_000.0

REQUEST = UploadRequest(
    path=Path("/nonexistent/file.pdf"),
    client_id="0f8fad5b-d9cb-469f-a165-70867728950e",
    name="file.pdf",
    size=3,
    sha256="0" * 64,
    mtime_ns=1,
    ctime_ns=1,
)

RESULT = UploadResult(remote_id="remote-1", size=3, elapsed_s=0.1, server_date=None)


class ScriptedClient:
    """
    A client whose upload() returns or raises the scripted outcomes in order.
    """

    def __init__(self, *outcomes: object) -> None:
        self._outcomes = list(outcomes)
        self.events: list[str] = []

    async def upload(self, request: UploadRequest, *,
                     before_send: Callable[[], Awaitable[None]] | None = None) -> UploadResult:
        assert request is REQUEST
        if before_send is not None:
            await before_send()
        self.events.append("upload")
        outcome = self._outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        assert isinstance(outcome, UploadResult)
        return outcome

    @property
    def calls(self) -> int:
        return self.events.count("upload")


class RecordedSleep:
    """
    Records each wait instead of waiting.
    """

    def __init__(self) -> None:
        self.waits_s: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits_s.append(seconds)


async def _upload(client: ScriptedClient, **options: Any) -> UploadResult:
    """Run upload_with_retry on the scripted client with defaults for unset options."""
    arguments: dict[str, Any] = {
        "max_attempts": 5,
        "backoff_max_s": 300.0,
        "sleep": RecordedSleep(),
    }
    arguments.update(options)
    return await upload_with_retry(cast(Any, client), REQUEST, **arguments)


def _http_date(unix_s: float) -> str:
    return email.utils.formatdate(unix_s, usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("5", 5.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        (_http_date(NOW_S + 30), 30.0),
        (_http_date(NOW_S - 30), 0.0),
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("5 seconds", None),
        ("Tue, 99 Nov 2023 22:13:50 GMT", None),
    ],
)
def test_parse_retry_after_table(value: str | None, expected: float | None) -> None:
    """Delta-seconds and HTTP dates become seconds from now; past is 0; junk is None."""
    assert parse_retry_after(value, NOW_S) == expected


@pytest.mark.parametrize(
    ("deferrals", "random_value", "expected"),
    [
        (0, 0.0, 15.0),
        (0, 1.0, 30.0),
        (1, 0.0, 30.0),
        (2, 0.5, 90.0),
        (3, 0.0, 120.0),
        (4, 1.0, 300.0),
        (10_000, 0.0, 300.0),
    ],
)
def test_deferral_delay_exponential(
    deferrals: int, random_value: float, expected: float
) -> None:
    """Delays double per deferral with equal jitter and are capped at backoff_max_s."""
    delay_s = deferral_delay_s(
        deferrals, retry_after_s=None, backoff_max_s=300.0, random=lambda: random_value
    )
    assert delay_s == pytest.approx(expected)


def test_deferral_delay_retry_after_wins() -> None:
    """A Retry-After longer than the backoff is honoured."""
    delay_s = deferral_delay_s(
        0, retry_after_s=120.0, backoff_max_s=300.0, random=lambda: 0.0
    )
    assert delay_s == 120.0


def test_deferral_delay_retry_after_capped() -> None:
    """A Retry-After longer than backoff_max_s is capped too."""
    delay_s = deferral_delay_s(
        0, retry_after_s=3600.0, backoff_max_s=300.0, random=lambda: 0.0
    )
    assert delay_s == 300.0


def test_deferral_delay_short_retry_after_ignored() -> None:
    """A Retry-After shorter than the backoff does not shorten it."""
    delay_s = deferral_delay_s(
        2, retry_after_s=1.0, backoff_max_s=300.0, random=lambda: 0.0
    )
    assert delay_s == 60.0


async def test_retry_first_try_succeeds() -> None:
    """A success on the first try returns attempts=1 and never sleeps."""
    client = ScriptedClient(RESULT)
    sleep = RecordedSleep()

    result = await _upload(client, sleep=sleep)

    assert result.remote_id == "remote-1"
    assert result.attempts == 1
    assert sleep.waits_s == []


async def test_retry_then_success() -> None:
    """Two retryable failures then a success: three tries, two growing waits of at most 10 s."""
    client = ScriptedClient(RetryableUploadError("503"), RetryableUploadError("502"), RESULT)
    sleep = RecordedSleep()

    result = await _upload(client, sleep=sleep)

    assert result.attempts == 3
    assert client.calls == 3
    assert len(sleep.waits_s) == 2
    assert 1.0 <= sleep.waits_s[0] <= 2.0
    assert 2.0 <= sleep.waits_s[1] <= 3.0
    assert all(wait_s <= INLINE_RETRY_MAX_WAIT_S for wait_s in sleep.waits_s)


async def test_retry_stops_after_max_attempts() -> None:
    """Three retryable failures with max_attempts=3 re-raise the last error itself."""
    last = RetryableUploadError("third", status=500)
    client = ScriptedClient(RetryableUploadError("first"), RetryableUploadError("second"), last)
    sleep = RecordedSleep()

    with pytest.raises(RetryableUploadError) as caught:
        await _upload(client, max_attempts=3, backoff_max_s=300, sleep=sleep)

    assert caught.value is last
    assert client.calls == 3
    assert len(sleep.waits_s) == 2


async def test_retry_waits_capped() -> None:
    """Many retries never wait longer than INLINE_RETRY_MAX_WAIT_S."""
    failures = [RetryableUploadError(f"try {number}") for number in range(8)]
    client = ScriptedClient(*failures, RESULT)
    sleep = RecordedSleep()

    result = await _upload(client, max_attempts=9, backoff_max_s=300, sleep=sleep)

    assert result.attempts == 9
    assert max(sleep.waits_s) == INLINE_RETRY_MAX_WAIT_S


async def test_retry_backoff_max_caps_waits() -> None:
    """A backoff_max_s below the inline cap caps the inline waits as well."""
    client = ScriptedClient(
        RetryableUploadError("a", retry_after_s=8), RetryableUploadError("b"), RESULT
    )
    sleep = RecordedSleep()

    await _upload(client, max_attempts=5, backoff_max_s=0.5, sleep=sleep)

    assert sleep.waits_s == [0.5, 0.5]


async def test_retry_honours_short_retry_after() -> None:
    """A Retry-After of 7 s, longer than the first backoff, sets the wait."""
    client = ScriptedClient(RetryableUploadError("429", status=429, retry_after_s=7.0), RESULT)
    sleep = RecordedSleep()

    result = await _upload(client, sleep=sleep)

    assert result.attempts == 2
    assert sleep.waits_s == [7.0]


async def test_retry_long_retry_after_stops() -> None:
    """A Retry-After above the inline cap re-raises at once, so the daemon defers the file."""
    error = RetryableUploadError("503", status=503, retry_after_s=INLINE_RETRY_MAX_WAIT_S + 1)
    client = ScriptedClient(error, RESULT)
    sleep = RecordedSleep()

    with pytest.raises(RetryableUploadError) as caught:
        await _upload(client, sleep=sleep)

    assert caught.value is error
    assert client.calls == 1
    assert sleep.waits_s == []


@pytest.mark.parametrize(
    "error",
    [
        UncertainUploadError("lost after body"),
        ServicePausedError("401", status=401),
        PermanentUploadError("400", status=400, body="bad"),
        FileChangedError("changed"),
        FileVanishedError("gone"),
        PermissionError(13, "Permission denied"),
        OSError(5, "Input/output error"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_retry_never_retries_others(error: Exception) -> None:
    """Every error but RetryableUploadError is raised after one try, unchanged."""
    client = ScriptedClient(error, RESULT)
    sleep = RecordedSleep()

    with pytest.raises(type(error)) as caught:
        await _upload(client, sleep=sleep)

    assert caught.value is error
    assert client.calls == 1
    assert sleep.waits_s == []


async def test_retry_before_attempt_each_try() -> None:
    """before_attempt runs with 1, 2, 3 before each upload call."""
    client = ScriptedClient(RetryableUploadError("a"), RetryableUploadError("b"), RESULT)

    async def before_attempt(number: int) -> None:
        client.events.append(f"before {number}")

    await _upload(client, before_attempt=before_attempt)

    assert client.events == ["before 1", "upload", "before 2", "upload", "before 3", "upload"]


async def test_retry_on_retry_sync_and_async() -> None:
    """on_retry gets the failed attempt number, its error and the wait, sync or async."""
    first = RetryableUploadError("a")
    second = RetryableUploadError("b", retry_after_s=4.0)
    sync_calls: list[tuple[int, Exception, float]] = []
    async_calls: list[tuple[int, Exception, float]] = []

    def on_retry_sync(number: int, error: Exception, wait_s: float) -> None:
        sync_calls.append((number, error, wait_s))

    async def on_retry_async(number: int, error: Exception, wait_s: float) -> None:
        async_calls.append((number, error, wait_s))

    for on_retry, calls in ((on_retry_sync, sync_calls), (on_retry_async, async_calls)):
        sleep = RecordedSleep()
        await _upload(ScriptedClient(first, second, RESULT), on_retry=on_retry, sleep=sleep)
        assert [(number, error) for number, error, _ in calls] == [(1, first), (2, second)]
        assert [wait_s for _, _, wait_s in calls] == sleep.waits_s
        assert calls[1][2] >= 4.0


async def test_retry_invalid_max_attempts() -> None:
    """max_attempts below 1 is rejected before any upload."""
    client = ScriptedClient(RESULT)

    with pytest.raises(ValueError, match="max_attempts"):
        await _upload(client, max_attempts=0)
    assert client.calls == 0
