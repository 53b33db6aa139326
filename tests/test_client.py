"""
Tests for uploader.client against the real stand-in over loopback: what arrives, and
how every response and connection failure is classified.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import hashlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import aiohttp
import jwt
import pytest
from harness import DaemonRunner, make_setup, wait_until
from standin_helpers import add_faults, received, received_content, stats

from uploader.client import (
    ApiSettings,
    CoreplusClient,
    UploadRequest,
    create_session,
    environment_proxy,
)
from uploader.credentials import Credentials
from uploader.exceptions import (
    ConfigError,
    FileChangedError,
    FileVanishedError,
    PermanentUploadError,
    RetryableUploadError,
    ServicePausedError,
    UncertainUploadError,
    UploadError,
)
from uploader.multipart import display_name
from uploader.ratelimit import RateLimiter
from uploader.retry import upload_with_retry
from uploader.standin import DEMO_CLIENTS, StandIn, StandInSettings, start_standin

CLIENT_ID = DEMO_CLIENTS[0]["clientId"]
ISSUER = "https://clinic.example.com.au"

# Large enough that the socket buffers on loopback cannot take the whole body before
# the stand-in drops the connection.
LARGE_BYTES = 24 * 1024 * 1024


@dataclasses.dataclass
class Api:
    """
    A client wired to one stand-in, plus what the tests inspect.
    """

    client: CoreplusClient
    limiter: RateLimiter
    session: aiohttp.ClientSession
    settings: ApiSettings
    authorization_headers: list[str]


ApiFactory = Callable[..., Awaitable[Api]]
ErrorT = TypeVar("ErrorT", bound=Exception)


def _credentials(settings: StandInSettings, **overrides: str) -> Credentials:
    values = dict(
        consumer_id=settings.consumer_id,
        secret=settings.secret,
        access_token=settings.access_token,
    )
    values.update(overrides)
    return Credentials(**values)


@pytest.fixture
async def make_api(
    standin: StandIn, standin_settings: StandInSettings
) -> AsyncIterator[ApiFactory]:
    """Factory for clients pointed at the stand-in; every session is closed at teardown."""
    sessions: list[aiohttp.ClientSession] = []

    async def factory(
        *,
        base_url: str | None = None,
        rate_per_s: float = 0,
        credentials: Credentials | None = None,
        **setting_overrides: Any,
    ) -> Api:
        settings = ApiSettings(
            base_url=base_url or standin.url,
            issuer=ISSUER,
            audience=standin_settings.audience,
            idle_timeout_s=setting_overrides.pop("idle_timeout_s", 10.0),
            connect_timeout_s=5.0,
            **setting_overrides,
        )
        session = create_session(settings, connection_limit=4)
        sessions.append(session)
        headers_seen: list[str] = []

        async def record_headers(
            _session: object, _context: object, params: aiohttp.TraceRequestHeadersSentParams
        ) -> None:
            headers_seen.append(params.headers.get("Authorization", ""))

        # Tracing is aiohttp's own hook for observing requests; it changes nothing sent.
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(record_headers)
        trace.freeze()
        session.trace_configs.append(trace)
        limiter = RateLimiter(rate_per_s)
        client = CoreplusClient(
            session, settings, credentials or _credentials(standin_settings), limiter
        )
        return Api(client, limiter, session, settings, headers_seen)

    yield factory
    for session in sessions:
        await session.close()


def _upload_request(
    path: Path | bytes, name: str | None = None, client_id: str = CLIENT_ID
) -> UploadRequest:
    file_stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if name is None:
        name = display_name(os.path.basename(os.fsencode(path)))
    return UploadRequest(
        path=path,
        client_id=client_id,
        name=name,
        size=file_stat.st_size,
        sha256=digest.hexdigest(),
        mtime_ns=file_stat.st_mtime_ns,
        ctime_ns=file_stat.st_ctime_ns,
    )


def _write(tmp_path: Path, content: bytes, name: str = "referral.pdf") -> Path:
    path = tmp_path / "drop" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def _write_large(tmp_path: Path, size: int = LARGE_BYTES, name: str = "large.bin") -> Path:
    # A repeating pattern is as good as random data here and much faster to make.
    pattern = bytes(range(256)) * 4096
    path = tmp_path / "drop" / name
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as handle:
        handle.writelines(pattern[: size - offset] for offset in range(0, size, len(pattern)))
    return path


def _assert_secrets_absent(error: BaseException, credentials: Credentials) -> None:
    text = f"{error} {getattr(error, 'body', '')}"
    assert credentials.secret not in text
    assert credentials.access_token not in text
    assert "JwToken" not in text


async def _upload_error(api: Api, path: Path, error_class: type[ErrorT]) -> ErrorT:
    """Upload ``path`` and return the ``error_class`` error the upload must raise."""
    with pytest.raises(error_class) as caught:
        await api.client.upload(_upload_request(path))
    return caught.value


async def test_upload_small_file_arrives(
    make_api: ApiFactory, standin: StandIn, standin_settings: StandInSettings, tmp_path: Path
) -> None:
    """A small file arrives byte for byte with exact claims and part headers; its id is returned."""
    content = b"%PDF-1.4 referral letter\n%%EOF\n"
    path = _write(tmp_path, content)
    api = await make_api()

    result = await api.client.upload(_upload_request(path))

    uploads = await received(standin.url)
    assert len(uploads) == 1
    upload = uploads[0]
    assert result.remote_id == upload["id"]
    assert result.size == len(content)
    assert result.attempts == 1
    assert await received_content(standin.url, upload["id"]) == content
    assert upload["sha256"] == hashlib.sha256(content).hexdigest()
    assert upload["json"] == {
        "name": "referral.pdf",
        "primaryDomainKey": CLIENT_ID,
        "size": str(len(content)),
        "entity": "Client",
        "isFolder": False,
    }
    assert upload["part_headers"] == [
        'Content-Disposition: form-data; name="json"',
        "Content-Type: text/plain",
        'Content-Disposition: form-data; name="file"; filename="referral.pdf"',
        "Content-Type: text/plain",
    ]
    claims = upload["claims"]
    assert claims["url"] == f"{standin.url}/API/Core/v2.1/File/"
    assert claims["httpMethod"] == "POST"
    assert claims["iss"] == ISSUER
    assert claims["aud"] == standin_settings.audience
    assert claims["consumerId"] == standin_settings.consumer_id
    assert claims["accessToken"] == standin_settings.access_token
    assert claims["exp"] - claims["nbf"] == 60
    assert result.server_date is not None
    assert api.client.last_server_date == result.server_date


@pytest.mark.parametrize(
    "raw_name",
    [
        "Zoë O'Brien – referral.pdf".encode(),
        b'say "hi" please.pdf',
        b"back\\slash.pdf",
        "紹介状 山田.pdf".encode(),
        b"bad \xff byte.pdf",
        b"line\nbreak.pdf",
    ],
    ids=["accents", "quotes", "backslash", "cjk", "not-utf8", "newline"],
)
async def test_upload_names_arrive_decoded(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path, raw_name: bytes
) -> None:
    """Names with quotes, backslashes, non-ASCII and bad bytes arrive as the display name."""
    folder = tmp_path / "drop"
    folder.mkdir()
    path = os.path.join(os.fsencode(folder), raw_name)
    with open(path, "wb") as handle:
        handle.write(b"content")
    api = await make_api()

    await api.client.upload(_upload_request(path))

    uploads = await received(standin.url)
    assert [upload["name"] for upload in uploads] == [display_name(raw_name)]
    assert uploads[0]["json"]["name"] == display_name(raw_name)
    assert await received_content(standin.url, uploads[0]["id"]) == b"content"


async def test_upload_large_file_content_length(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A 20 MB file streams with Content-Length (chunked is rejected) and arrives intact."""
    path = _write_large(tmp_path, size=20 * 1024 * 1024)
    request = _upload_request(path)
    api = await make_api()

    result = await api.client.upload(request)

    uploads = await received(standin.url)
    assert len(uploads) == 1
    assert uploads[0]["size"] == 20 * 1024 * 1024
    assert uploads[0]["sha256"] == request.sha256
    assert result.size == 20 * 1024 * 1024
    assert (await stats(standin.url))["by_status"] == {"200": 1}


@pytest.mark.parametrize(
    ("retry_after", "expected_s"),
    [("7", 7.0), (None, None)],
)
async def test_status_503_retryable(
    make_api: ApiFactory,
    standin: StandIn,
    tmp_path: Path,
    retry_after: str | None,
    expected_s: float | None,
) -> None:
    """A 503 is retryable with Retry-After seconds parsed, slows the limiter, stores nothing."""
    await add_faults(standin.url, {"kind": "status", "status": 503, "retry_after": retry_after})
    api = await make_api(rate_per_s=8)

    error = await _upload_error(api, _write(tmp_path, b"abc"), RetryableUploadError)

    assert error.status == 503
    assert error.retry_after_s == expected_s
    assert api.limiter.rate_per_s == 4
    assert await received(standin.url) == []


async def test_status_503_http_date(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A 503 whose Retry-After is an HTTP date two minutes ahead gives about 120 s."""
    retry_at = email.utils.formatdate(time.time() + 120, usegmt=True)
    await add_faults(standin.url, {"kind": "status", "status": 503, "retry_after": retry_at})
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"abc"), RetryableUploadError)

    assert error.retry_after_s is not None
    assert 100 < error.retry_after_s <= 121


@pytest.mark.parametrize("status", [500, 502, 504, 408])
async def test_status_server_errors_retryable(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path, status: int
) -> None:
    """500, 502, 504 and 408 are retryable and leave the limiter's rate alone."""
    await add_faults(
        standin.url,
        {
            "kind": "status",
            "status": status,
            "body": "<html>Bad Gateway</html>",
            "content_type": "text/html",
        },
    )
    api = await make_api(rate_per_s=8)

    error = await _upload_error(api, _write(tmp_path, b"abc"), RetryableUploadError)

    assert error.status == status
    assert error.body == "<html>Bad Gateway</html>"
    assert error.retry_after_s is None
    assert api.limiter.rate_per_s == 8
    assert await received(standin.url) == []


async def test_status_429_slows_limiter(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A 429 is retryable and halves the shared limiter's rate."""
    await add_faults(standin.url, {"kind": "status", "status": 429, "retry_after": "0"})
    api = await make_api(rate_per_s=9)

    error = await _upload_error(api, _write(tmp_path, b"abc"), RetryableUploadError)

    assert error.status == 429
    assert error.retry_after_s == 0.0
    assert api.limiter.rate_per_s == 4.5


async def test_status_400_permanent_with_body(
    make_api: ApiFactory, standin: StandIn, standin_settings: StandInSettings, tmp_path: Path
) -> None:
    """A 400 is permanent and carries the service's body for the reason file."""
    body = '{"statusMessages":[{"message":"Invalid file name"}]}'
    await add_faults(
        standin.url,
        {"kind": "status", "status": 400, "body": body, "content_type": "application/json"},
    )
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"abc"), PermanentUploadError)

    assert error.status == 400
    assert error.body == body
    assert "Invalid file name" in str(error)
    _assert_secrets_absent(error, _credentials(standin_settings))


async def test_error_body_truncated(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A long error page is kept to its first 2000 characters."""
    await add_faults(standin.url, {"kind": "status", "status": 422, "body": "x" * 5000})
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"abc"), PermanentUploadError)

    assert error.body == "x" * 2000


async def test_unknown_client_permanent(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """The stand-in's 404 for an unknown client is a permanent failure naming the client."""
    api = await make_api()
    request = _upload_request(
        _write(tmp_path, b"abc"), client_id="00000000-0000-4000-8000-00000000dead"
    )

    with pytest.raises(PermanentUploadError) as caught:
        await api.client.upload(request)

    assert caught.value.status == 404
    assert "00000000-0000-4000-8000-00000000dead" in caught.value.body


@pytest.mark.parametrize("status", [401, 403])
async def test_status_auth_paused(
    make_api: ApiFactory,
    standin: StandIn,
    standin_settings: StandInSettings,
    tmp_path: Path,
    status: int,
) -> None:
    """401 and 403 pause the service, and the message names the credentials to check."""
    await add_faults(standin.url, {"kind": "status", "status": status})
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"abc"), ServicePausedError)

    assert error.status == status
    assert "access token" in str(error)
    _assert_secrets_absent(error, _credentials(standin_settings))


async def test_wrong_secret_paused(
    make_api: ApiFactory, standin: StandIn, standin_settings: StandInSettings, tmp_path: Path
) -> None:
    """A token signed with the wrong secret gets a real 401 from the stand-in: paused."""
    wrong = _credentials(standin_settings, secret="wrong-secret-0123456789abcdefghijklmnop")
    api = await make_api(credentials=wrong)

    error = await _upload_error(api, _write(tmp_path, b"abc"), ServicePausedError)

    assert error.status == 401
    assert len((await stats(standin.url))["auth_failures"]) == 1
    _assert_secrets_absent(error, wrong)


async def test_reset_before_body_retryable(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A connection dropped before a large body was written is retryable."""
    await add_faults(standin.url, {"kind": "reset_before_body"})
    api = await make_api()

    error = await _upload_error(api, _write_large(tmp_path), RetryableUploadError)

    assert error.status is None
    assert await received(standin.url) == []


async def test_reset_after_store_uncertain(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A connection dropped after the stand-in stored the file is uncertain; the file is there."""
    await add_faults(standin.url, {"kind": "reset_after_store"})
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"stored anyway"), UncertainUploadError)

    assert error.status is None
    uploads = await received(standin.url)
    assert len(uploads) == 1
    assert await received_content(standin.url, uploads[0]["id"]) == b"stored anyway"


async def test_reset_after_body_uncertain(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A connection dropped after the whole body was read is uncertain, though nothing is stored."""
    await add_faults(standin.url, {"kind": "reset_after_body"})
    api = await make_api()

    await _upload_error(api, _write(tmp_path, b"abc"), UncertainUploadError)
    assert await received(standin.url) == []


async def test_slow_answer_uncertain(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """No response within the idle timeout after the body was sent is uncertain."""
    await add_faults(standin.url, {"kind": "slow", "seconds": 3})
    api = await make_api(idle_timeout_s=0.3)

    error = await _upload_error(api, _write(tmp_path, b"abc"), UncertainUploadError)

    assert "api.idle_timeout_seconds (0.3 s)" in str(error)
    assert len(await received(standin.url)) == 1


async def test_bad_json_200_uncertain(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A 200 whose body is not JSON is uncertain and keeps the body."""
    await add_faults(standin.url, {"kind": "bad_json_200"})
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"abc"), UncertainUploadError)

    assert error.status == 200
    assert "Upload complete" in error.body
    assert len(await received(standin.url)) == 1


async def test_wrong_size_200_uncertain(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A 200 whose size differs from the file's is uncertain, and the message gives both sizes."""
    await add_faults(standin.url, {"kind": "wrong_size_200"})
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"abc"), UncertainUploadError)

    assert "size 4" in str(error)
    assert "expected 3" in str(error)


async def test_refuse_early_413_permanent(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A 413 sent before the body was read is classified by its status: permanent."""
    await add_faults(
        standin.url, {"kind": "refuse_early", "status": 413, "body": "Payload Too Large"}
    )
    api = await make_api()

    error = await _upload_error(api, _write(tmp_path, b"a" * 1000), PermanentUploadError)

    assert error.status == 413
    assert await received(standin.url) == []


async def test_connection_refused_retryable(make_api: ApiFactory, tmp_path: Path) -> None:
    """A closed port on loopback is retryable, with no status."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    api = await make_api(base_url=f"http://127.0.0.1:{closed_port}")

    error = await _upload_error(api, _write(tmp_path, b"abc"), RetryableUploadError)

    assert error.status is None
    assert "before the request was completely sent" in str(error)


async def test_stalled_server_write_timeout(make_api: ApiFactory, tmp_path: Path) -> None:
    """A server that accepts the connection but never reads makes the body time out: retryable."""
    release = asyncio.Event()
    received_headers = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received_headers.set()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        api = await make_api(base_url=f"http://127.0.0.1:{port}", idle_timeout_s=0.3)
        error = await _upload_error(api, _write_large(tmp_path), RetryableUploadError)
    finally:
        release.set()
        server.close()
        await server.wait_closed()

    assert received_headers.is_set()
    assert "accepted no data for 0.3 s" in str(error)


async def test_hash_mismatch_aborts_request(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """Bytes that differ from the settled hash abort the request before its end: nothing stored."""
    path = _write_large(tmp_path, size=2 * 1024 * 1024)
    request = dataclasses.replace(_upload_request(path), sha256="0" * 64)
    api = await make_api()

    with pytest.raises(FileChangedError, match="content changed"):
        await api.client.upload(request)

    assert await received(standin.url) == []
    standin_stats = await stats(standin.url)
    assert "200" not in standin_stats["by_status"]


async def test_file_modified_midstream(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A file written to while it streams raises FileChangedError; the stand-in stores nothing."""
    path = _write_large(tmp_path, size=64 * 1024 * 1024)
    request = _upload_request(path)
    incoming = standin.state.settings.storage_dir / ".incoming"
    api = await make_api()

    upload = asyncio.create_task(api.client.upload(request))
    # The stand-in creates its incoming file once the json part has arrived, so the
    # file part is streaming from then on.
    while not (incoming.is_dir() and any(incoming.iterdir())) and not upload.done():
        await asyncio.sleep(0.001)
    with open(path, "r+b") as handle:
        handle.write(b"changed")

    with pytest.raises(FileChangedError):
        await upload
    assert await received(standin.url) == []


async def test_vanished_file_sends_nothing(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A file deleted after it settled raises FileVanishedError and makes no request."""
    path = _write(tmp_path, b"abc")
    request = _upload_request(path)
    path.unlink()
    api = await make_api()

    with pytest.raises(FileVanishedError):
        await api.client.upload(request)
    assert (await stats(standin.url))["requests"] == 0


async def test_upload_with_retry_503_then_success(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """A real 503 then success stores the file exactly once, after two tries with two tokens."""
    await add_faults(standin.url, {"kind": "status", "status": 503, "retry_after": "0"})
    api = await make_api()
    path = _write(tmp_path, b"retry me")
    attempts_seen: list[int] = []

    async def before_attempt(number: int) -> None:
        attempts_seen.append(number)

    result = await upload_with_retry(
        api.client, _upload_request(path), max_attempts=3, backoff_max_s=300,
        before_attempt=before_attempt,
    )

    assert result.attempts == 2
    assert attempts_seen == [1, 2]
    uploads = await received(standin.url)
    assert len(uploads) == 1
    assert await received_content(standin.url, uploads[0]["id"]) == b"retry me"
    assert (await stats(standin.url))["by_status"] == {"503": 1, "200": 1}
    assert len(api.authorization_headers) == 2
    assert api.authorization_headers[0] != api.authorization_headers[1]
    last_token = api.authorization_headers[1].removeprefix("JwToken ")
    assert jwt.decode(last_token, options={"verify_signature": False}) == uploads[0]["claims"]


async def test_list_clients_query_in_claim(
    make_api: ApiFactory, standin: StandIn
) -> None:
    """The Client list with a query string passes the stand-in's exact url check."""
    api = await make_api()

    page = await api.client.list_clients(page_number=2, page_size=3)

    assert [client["clientId"] for client in page["clients"]] == [
        client["clientId"] for client in DEMO_CLIENTS[3:6]
    ]
    assert page["paging"] == {"totalRows": 10, "pageNumber": 2, "pageSize": 3}
    assert (await stats(standin.url))["auth_failures"] == []


async def test_probe_ok_and_paused(
    make_api: ApiFactory, standin: StandIn, standin_settings: StandInSettings
) -> None:
    """probe() passes with good credentials and pauses with an unknown access token."""
    good = await make_api()
    await good.client.probe()

    bad = await make_api(credentials=_credentials(standin_settings, access_token="expired-token"))
    with pytest.raises(ServicePausedError) as caught:
        await bad.client.probe()

    assert caught.value.status == 401
    assert (await stats(standin.url))["by_status"] == {"200": 1, "401": 1}


async def test_list_clients_page_too_big(make_api: ApiFactory) -> None:
    """A pageSize above the service's maximum is a permanent 400."""
    api = await make_api()

    with pytest.raises(PermanentUploadError) as caught:
        await api.client.list_clients(page_size=101)
    assert caught.value.status == 400


async def test_server_date_on_error(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """The Date header of an error response is exposed too, for the clock check."""
    await add_faults(standin.url, {"kind": "status", "status": 500})
    api = await make_api()

    await _upload_error(api, _write(tmp_path, b"abc"), RetryableUploadError)

    assert api.client.last_server_date is not None
    skew_s = abs((api.client.last_server_date - datetime.now(UTC)).total_seconds())
    assert skew_s < 60


async def test_server_date_shows_skew(
    standin_settings: StandInSettings, make_api: ApiFactory
) -> None:
    """A service clock 40 s ahead shows in last_server_date, so the daemon can warn."""
    skewed_settings = dataclasses.replace(
        standin_settings, clock_offset_s=40.0, storage_dir=standin_settings.storage_dir / "skewed"
    )
    skewed = await start_standin(skewed_settings)
    try:
        api = await make_api(base_url=skewed.url)
        await api.client.probe()
    finally:
        await skewed.close()

    assert api.client.last_server_date is not None
    skew_s = (api.client.last_server_date - datetime.now(UTC)).total_seconds()
    assert 30 < skew_s < 50


async def test_limiter_keeps_under_service_limit(
    make_api: ApiFactory, standin: StandIn, tmp_path: Path
) -> None:
    """Twelve concurrent uploads at 9 per second never exceed the stand-in's 10 per second."""
    api = await make_api(rate_per_s=9)
    requests = [
        _upload_request(_write(tmp_path, b"n%d" % number, f"f{number}.pdf"))
        for number in range(12)
    ]

    await asyncio.gather(*(api.client.upload(request) for request in requests))

    standin_stats = await stats(standin.url)
    assert standin_stats["by_status"] == {"200": 12}
    assert standin_stats["rate_limited"] == 0
    assert standin_stats["max_window"] <= 10
    assert len(await received(standin.url)) == 12


def test_session_rejects_plain_http_remote() -> None:
    """A plain http:// base URL to a host that is not loopback is a configuration error."""
    settings = ApiSettings(base_url="http://api.coreplus.com.au", issuer=ISSUER)

    with pytest.raises(ConfigError, match="http://api.coreplus.com.au") as caught:
        create_session(settings, connection_limit=1)
    assert "https://" in str(caught.value)


@pytest.mark.parametrize(
    "base_url",
    ["http://127.0.0.1:8765", "http://127.1.2.3", "http://localhost:1", "http://[::1]:8765"],
)
async def test_session_accepts_loopback_http(base_url: str) -> None:
    """Plain http:// is accepted for every loopback form."""
    session = create_session(ApiSettings(base_url=base_url, issuer=ISSUER), connection_limit=1)
    await session.close()


def test_session_missing_ca_file(tmp_path: Path) -> None:
    """A ca_file that does not exist is a configuration error naming the path."""
    missing = tmp_path / "missing-ca.pem"
    settings = ApiSettings(base_url="https://api.coreplus.com.au", issuer=ISSUER, ca_file=missing)

    with pytest.raises(ConfigError, match="missing-ca.pem"):
        create_session(settings, connection_limit=1)


async def test_tls_untrusted_paused(
    standin_settings: StandInSettings,
    make_api: ApiFactory,
    tls_files: SimpleNamespace,
    tmp_path: Path,
) -> None:
    """An untrusted certificate pauses the service; with api.ca_file the same upload succeeds."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tls_files.cert, tls_files.key)
    settings = dataclasses.replace(standin_settings, storage_dir=tmp_path / "tls-storage")
    secure = await start_standin(settings, ssl_context=server_context)
    try:
        untrusting = await make_api(base_url=secure.url)
        with pytest.raises(ServicePausedError, match="api.ca_file"):
            await untrusting.client.upload(_upload_request(_write(tmp_path, b"abc")))

        trusting = await make_api(base_url=secure.url, ca_file=tls_files.cert)
        result = await trusting.client.upload(_upload_request(_write(tmp_path, b"abc")))
    finally:
        await secure.close()

    assert result.size == 3
    assert len(secure.state.received) == 1
    assert secure.state.received[0].claims["url"] == f"{secure.url}/API/Core/v2.1/File/"


def test_errors_are_upload_errors() -> None:
    """Every classified service outcome shares the UploadError base the daemon catches."""
    for error_class in (
        RetryableUploadError, UncertainUploadError, ServicePausedError, PermanentUploadError
    ):
        assert issubclass(error_class, UploadError)


def test_environment_proxy_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTPS_PROXY applies to https URLs unless NO_PROXY names the host."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.clinic.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    for name in ("https_proxy", "no_proxy", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)

    assert environment_proxy("https://api.coreplus.com.au") == "http://proxy.clinic.example:3128"
    assert environment_proxy("https://internal.example") is None
    assert environment_proxy("http://127.0.0.1:8765") is None


async def test_netrc_entry_does_not_break_upload(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, standin: StandIn,
    standin_settings: StandInSettings,
) -> None:
    """A ~/.netrc with a default entry leaves the Authorization header and upload intact."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("default login someone password something\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    (tmp_path / "install").mkdir()
    setup = make_setup(tmp_path / "install", standin.url, standin_settings)
    setup.drop("Alpha Person", "n.txt", b"netrc")
    async with DaemonRunner(setup):
        await wait_until(lambda: [r.state for r in setup.rows()] == ["uploaded"], what="upload")

    assert len(standin.state.received) == 1
