"""
Tests for uploader.standin: the local imitation of the coreplus API.

Requests are built by hand (PyJWT tokens and hand-written multipart bytes) and
sent over loopback, so these tests check the stand-in's wire-level strictness
independently of the project's own client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import hashlib
import hmac
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from standin_helpers import (
    add_faults,
    received,
    received_content,
    replace_clients,
    reset,
    set_down,
    set_up,
    stats,
)
from yarl import URL

from uploader._standin_multipart import MultipartError, UploadBodyReader
from uploader.standin import DEMO_CLIENTS, StandIn, StandInSettings, main, start_standin

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FILE_PATH = "/API/Core/v2.1/File/"
CLIENT_LIST_PATH = "/API/Core/v2/Client/"
ISSUER = "https://clinic.example.com.au"
BOUNDARY = b"standin-test-boundary-7f3a"
MULTIPART = "multipart/form-data; boundary=" + BOUNDARY.decode()
CLIENT_ID = DEMO_CLIENTS[0]["clientId"]
JSON_HEADERS = [b'Content-Disposition: form-data; name="json"', b"Content-Type: text/plain"]
DISPOSITION_FILE = b'Content-Disposition: form-data; name="file"'
TEXT_PLAIN = b"Content-Type: text/plain"
MISSING = object()

# Bytes that look like parts of the multipart framing, so a parser that stops at a
# partial delimiter or a bare "--" would store the wrong bytes. A full CRLF, "--" and
# boundary never appears, because a client must pick a boundary absent from the data.
TRICKY_BYTES = (
    bytes(range(256)) * 3
    + b"\r\n--" + BOUNDARY[:-1] + b"\r\n--\r\n"
    + b"x--" + BOUNDARY + b"\r\n--"
)


# --- request builders -------------------------------------------------------


def make_claims(
    settings: StandInSettings, url: str, method: str = "POST", **overrides: Any
) -> dict[str, Any]:
    """Return valid claims for one request, with ``overrides`` applied."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": settings.audience,
        "nbf": now - 5,
        "exp": now + 55,
        "consumerId": settings.consumer_id,
        "accessToken": settings.access_token,
        "url": url,
        "httpMethod": method,
    }
    claims.update(overrides)
    return claims


def sign(settings: StandInSettings, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, settings.secret, algorithm="HS256")


def hand_token(
    header: dict[str, Any], claims: dict[str, Any], key: bytes | None, digest: Any = None
) -> str:
    """Build a JWT by hand, for values and algorithms that PyJWT refuses or warns about."""

    def segment(value: Any) -> str:
        encoded = base64.urlsafe_b64encode(json.dumps(value).encode())
        return encoded.rstrip(b"=").decode("ascii")

    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def file_headers(name: str) -> list[bytes]:
    escaped = name.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return [DISPOSITION_FILE + b'; filename="' + escaped + b'"', TEXT_PLAIN]


def json_value(name: str, data: bytes, /, client_id: str = CLIENT_ID, **overrides: Any) -> bytes:
    """Return a json part value for ``data``. An override of MISSING deletes that key."""
    document: dict[str, Any] = {
        "name": name,
        "primaryDomainKey": client_id,
        "size": str(len(data)),
        "entity": "Client",
    }
    document.update(overrides)
    return json.dumps({k: v for k, v in document.items() if v is not MISSING}).encode()


def build_body(
    parts: list[tuple[list[bytes], bytes]], boundary: bytes = BOUNDARY, ending: bytes = b"--\r\n"
) -> bytes:
    """Join parts (header lines, value) into a multipart body that ends with ``ending``."""
    body = b""
    for headers, value in parts:
        head = b"".join(line + b"\r\n" for line in headers)
        body += b"--" + boundary + b"\r\n" + head + b"\r\n" + value + b"\r\n"
    return body + b"--" + boundary + ending


def valid_body(
    name: str = "referral.pdf", data: bytes = b"%PDF-1.4 test\n", client_id: str = CLIENT_ID
) -> bytes:
    json_part = (JSON_HEADERS, json_value(name, data, client_id))
    return build_body([json_part, (file_headers(name), data)])


DATA = b"file bytes\n"
GOOD_JSON = json_value("a.txt", DATA)
GOOD_FILE_HEADERS = file_headers("a.txt")


def two_parts(
    json_headers: list[bytes] = JSON_HEADERS,
    value: bytes = GOOD_JSON,
    headers: list[bytes] = GOOD_FILE_HEADERS,
    data: bytes = DATA,
    **build_options: Any,
) -> bytes:
    """Return a json-then-file body with one piece replaced."""
    return build_body([(json_headers, value), (headers, data)], **build_options)


@dataclasses.dataclass
class ApiResponse:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send(
    http: aiohttp.ClientSession,
    standin: StandIn,
    body: Any = b"",
    *,
    method: str = "POST",
    path: str = FILE_PATH,
    claims: dict[str, Any] | None = None,
    authorization: str | None = None,
    content_type: str | None = MULTIPART,
    **kwargs: Any,
) -> ApiResponse:
    """Send one API request, with a token for exactly this URL unless one is passed."""
    settings = standin.state.settings
    if authorization is None:
        claims = claims or make_claims(settings, standin.url + path, method)
        authorization = "JwToken " + sign(settings, claims)
    headers = {"Authorization": authorization}
    if content_type is None:
        kwargs["skip_auto_headers"] = ["Content-Type"]
    else:
        headers["Content-Type"] = content_type
    url = URL(standin.url + path, encoded=True)
    async with http.request(method, url, data=body, headers=headers, **kwargs) as response:
        return ApiResponse(response.status, response.headers, await response.read())


async def list_clients(
    http: aiohttp.ClientSession, standin: StandIn, query: str = "", **kwargs: Any
) -> ApiResponse:
    """Send a Client list request with Content-Type application/json."""
    kwargs.setdefault("content_type", "application/json")
    kwargs.setdefault("method", "GET")
    return await send(http, standin, path=CLIENT_LIST_PATH + query, **kwargs)


def host_port(standin: StandIn) -> tuple[str, int]:
    host, port = standin.url.split("://")[1].rsplit(":", 1)
    return host, int(port)


def file_head(standin: StandIn, extra: str) -> str:
    """Return the head of a File request with a valid token and the given extra header lines."""
    settings = standin.state.settings
    token = sign(settings, make_claims(settings, standin.url + FILE_PATH))
    host, port = host_port(standin)
    return (
        f"POST {FILE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: JwToken {token}\r\n{extra}\r\n"
    )


async def raw_exchange(
    standin: StandIn, head: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """Write a hand-made HTTP/1.1 request and read one response. Status 0 means none came."""
    reader, writer = await asyncio.open_connection(*host_port(standin))
    try:
        writer.write(head.encode("utf-8") + body)
        await writer.drain()
        try:
            raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        except asyncio.IncompleteReadError:
            return 0, {}, b""
        lines = raw_head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        payload = await reader.readexactly(int(headers.get("Content-Length", "0")))
        return int(lines[0].split()[1]), headers, payload
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def stored_files(standin: StandIn) -> list[Path]:
    root = standin.state.settings.storage_dir
    return sorted(p for p in root.rglob("*") if p.is_file())


async def assert_nothing_stored(standin: StandIn) -> None:
    assert await received(standin.url) == []
    assert stored_files(standin) == []


def messages(answer: ApiResponse) -> str:
    return " ".join(m["message"] for m in answer.json()["statusMessages"])


async def assert_bad_request(standin: StandIn, answer: ApiResponse, fragment: str) -> None:
    """Check that ``answer`` is a 400 whose messages contain ``fragment``, with nothing stored."""
    assert answer.status == 400
    assert fragment in messages(answer)
    await assert_nothing_stored(standin)


@pytest.fixture
async def start_custom(
    standin_settings: StandInSettings,
) -> AsyncIterator[Callable[..., Any]]:
    """Return a function that starts a stand-in with some settings replaced.

    Every stand-in it starts is closed at teardown.
    """
    started: list[StandIn] = []

    async def start(**changes: Any) -> StandIn:
        running = await start_standin(dataclasses.replace(standin_settings, **changes))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.close()


# --- uploads that succeed ---------------------------------------------------


class TestUpload:
    async def test_valid_upload_stored_exactly(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A valid upload with framing-like bytes gets 200 and stores every byte unchanged."""
        data = TRICKY_BYTES + os.urandom(300_000)
        answer = await send(http, standin, valid_body("referral.pdf", data))

        assert answer.status == 200
        document = answer.json()
        assert document["name"] == "referral.pdf"
        assert document["size"] == len(data)
        assert document["isFolder"] is False
        assert document["entity"] == "Client"
        assert document["primaryDomainKey"] == CLIENT_ID
        [record] = await received(standin.url)
        assert record["id"] == document["id"]
        assert record["clientId"] == CLIENT_ID
        assert record["size"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["json"] == json.loads(json_value("referral.pdf", data))
        assert record["claims"]["url"] == standin.url + FILE_PATH
        expected_headers = JSON_HEADERS + file_headers("referral.pdf")
        assert record["part_headers"] == [line.decode() for line in expected_headers]
        assert await received_content(standin.url, record["id"]) == data
        storage_dir = standin.state.settings.storage_dir
        expected_path = storage_dir / CLIENT_ID / document["id"] / "referral.pdf"
        assert record["stored_path"] == str(expected_path)
        assert expected_path.read_bytes() == data

    async def test_uppercase_guid_matches_client(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """An upper-case primaryDomainKey finds the client and is echoed back as sent."""
        answer = await send(http, standin, valid_body(client_id=CLIENT_ID.upper()))

        assert answer.status == 200
        assert answer.json()["primaryDomainKey"] == CLIENT_ID.upper()
        [record] = await received(standin.url)
        assert record["clientId"] == CLIENT_ID

    async def test_lowercase_path_other_version(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """The lower-case /api/core/ path with version v2 is accepted like the documented one."""
        answer = await send(http, standin, valid_body(), path="/api/core/v2/File/")

        assert answer.status == 200
        assert len(await received(standin.url)) == 1

    async def test_repeated_name_kept_twice(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """Two uploads with one name for one client are both kept, under different ids."""
        first = await send(http, standin, valid_body("same.txt", b"first"))
        second = await send(http, standin, valid_body("same.txt", b"second"))

        assert first.status == second.status == 200
        assert first.json()["id"] != second.json()["id"]
        records = await received(standin.url)
        contents = [await received_content(standin.url, r["id"]) for r in records]
        assert contents == [b"first", b"second"]
        assert len(stored_files(standin)) == 2

    async def test_unicode_name_with_escapes(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A non-ASCII name with an escaped quote and backslash round-trips to record and disk."""
        name = 'Überweisung "Dr. Nguyễn" \\ 2024 – ü.pdf'
        answer = await send(http, standin, valid_body(name, b"data"))

        assert answer.status == 200
        assert answer.json()["name"] == name
        [record] = await received(standin.url)
        assert record["name"] == name
        assert Path(record["stored_path"]).name == name
        raw_parameter = 'filename="Überweisung \\"Dr. Nguyễn\\" \\\\ 2024 – ü.pdf"'
        assert record["part_headers"][2].endswith(raw_parameter)

    @pytest.mark.parametrize(
        "extra",
        [
            {"parentFolderId": None, "isFolder": False},
            {"parentFolderId": ""},
            {"parentFolderId": "935BBFC6-2845-43F4-B513-8A3B12703851"},
        ],
        ids=["null-parent", "empty-parent", "guid-parent"],
    )
    async def test_optional_fields_accepted(
        self, standin: StandIn, http: aiohttp.ClientSession, extra: dict[str, Any]
    ) -> None:
        """The documented optional json fields are accepted and kept in the record."""
        answer = await send(http, standin, two_parts(value=json_value("a.txt", DATA, **extra)))

        assert answer.status == 200
        [record] = await received(standin.url)
        for key, value in extra.items():
            assert record["json"][key] == value

    async def test_slash_in_name_stays_inside(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A name with slashes is stored inside its upload folder, and the record keeps it."""
        name = "../escape/attempt.txt"
        answer = await send(http, standin, valid_body(name, b"x"))

        assert answer.status == 200
        [record] = await received(standin.url)
        assert record["name"] == name
        stored = Path(record["stored_path"])
        assert stored.parent.name == record["id"]
        assert stored.read_bytes() == b"x"


# --- authentication -----------------------------------------------------------

CLAIM_NAMES = ("iss", "aud", "nbf", "exp", "consumerId", "accessToken", "url", "httpMethod")


def _without(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda claims: {**claims, name: MISSING}


def _wrong_claim_cases() -> Iterable[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str]]:
    for name in CLAIM_NAMES:
        yield f"missing-{name}", _without(name), f"missing claims: {name}"
    yield "iss-not-url", lambda c: {**c, "iss": "clinic.example.com.au"}, "iss must be"
    yield "iss-ftp", lambda c: {**c, "iss": "ftp://clinic.example.com.au"}, "iss must be"
    yield "iss-empty", lambda c: {**c, "iss": ""}, "iss must be"
    yield "iss-number", lambda c: {**c, "iss": 7}, "iss must be"
    yield "aud-other", lambda c: {**c, "aud": "https://coreplus.com"}, "aud must be"
    yield "consumer-other", lambda c: {**c, "consumerId": "other"}, "consumerId does not match"
    yield "consumer-too-long", lambda c: {**c, "consumerId": "c" * 51}, "at most 50"
    yield "token-other", lambda c: {**c, "accessToken": "other"}, "accessToken does not match"
    yield "token-too-long", lambda c: {**c, "accessToken": "t" * 51}, "at most 50"
    yield "method-lower", lambda c: {**c, "httpMethod": "post"}, "httpMethod claim"
    yield "method-get", lambda c: {**c, "httpMethod": "GET"}, "httpMethod claim"
    yield "url-no-slash", lambda c: {**c, "url": c["url"].rstrip("/")}, "url claim"
    yield "url-https", lambda c: {**c, "url": c["url"].replace("http:", "https:")}, "url claim"
    yield (
        "url-localhost",
        lambda c: {**c, "url": c["url"].replace("127.0.0.1", "localhost")},
        "url claim",
    )
    yield "url-extra-query", lambda c: {**c, "url": c["url"] + "?a=1"}, "url claim"
    yield "nbf-float", lambda c: {**c, "nbf": c["nbf"] + 0.5}, "nbf must be an integer"
    yield "nbf-string", lambda c: {**c, "nbf": str(c["nbf"])}, "nbf must be an integer"
    yield "exp-float", lambda c: {**c, "exp": float(c["exp"])}, "exp must be an integer"
    yield "exp-bool", lambda c: {**c, "exp": True}, "exp must be an integer"
    yield "lifetime-61", lambda c: {**c, "exp": c["nbf"] + 61}, "exp - nbf is 61"
    yield "lifetime-zero", lambda c: {**c, "exp": c["nbf"]}, "exp - nbf is 0"
    yield (
        "expired",
        lambda c: {**c, "nbf": c["nbf"] - 120, "exp": c["exp"] - 120},
        "token expired",
    )
    yield (
        "not-yet-valid",
        lambda c: {**c, "nbf": c["nbf"] + 60, "exp": c["exp"] + 60},
        "not valid yet",
    )


WRONG_CLAIMS = [pytest.param(change, why, id=case) for case, change, why in _wrong_claim_cases()]

BAD_HEADERS = {
    "bearer": "Bearer {t}",
    "two-spaces": "JwToken  {t}",
    "lower-case": "jwtoken {t}",
    "no-space": "JwToken{t}",
    "no-token": "JwToken",
    "bare-token": "{t}",
    "trailing-text": "JwToken {t} extra",
}


class TestAuth:
    async def _expect_rejected(self, standin: StandIn, answer: ApiResponse, reason: str) -> None:
        assert answer.status == 401
        assert answer.json() == {"statusMessages": [{"message": "Invalid token"}]}
        failures = (await stats(standin.url))["auth_failures"]
        assert len(failures) == 1
        assert reason in failures[0]
        await assert_nothing_stored(standin)

    @pytest.mark.parametrize("change, reason", WRONG_CLAIMS)
    async def test_claim_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, change: Any, reason: str
    ) -> None:
        """Each missing or wrong claim gets 401 Invalid token, records why, stores nothing."""
        settings = standin.state.settings
        claims = change(make_claims(settings, standin.url + FILE_PATH))
        claims = {key: value for key, value in claims.items() if value is not MISSING}
        # Built by hand because PyJWT refuses to encode some of these wrong values.
        token = hand_token({"alg": "HS256"}, claims, settings.secret.encode(), hashlib.sha256)
        answer = await send(http, standin, valid_body(), authorization=f"JwToken {token}")

        await self._expect_rejected(standin, answer, reason)

    @pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
    async def test_header_format_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, header: str
    ) -> None:
        """An Authorization header other than exactly 'JwToken <token>' gets 401."""
        settings = standin.state.settings
        token = sign(settings, make_claims(settings, standin.url + FILE_PATH))
        answer = await send(http, standin, valid_body(), authorization=header.format(t=token))

        await self._expect_rejected(standin, answer, "must be 'JwToken <token>' with one space")

    async def test_missing_header_rejected(self, standin: StandIn) -> None:
        """A request without an Authorization header gets 401."""
        body = valid_body()
        host, port = host_port(standin)
        head = (
            f"POST {FILE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: {MULTIPART}\r\n\r\n"
        )
        status, _, payload = await raw_exchange(standin, head, body)

        assert status == 401
        assert json.loads(payload)["statusMessages"][0]["message"] == "Invalid token"
        failures = (await stats(standin.url))["auth_failures"]
        assert failures == ["expected one Authorization header, got 0"]
        await assert_nothing_stored(standin)

    @pytest.mark.parametrize(
        "alg, digest",
        [("none", None), ("HS512", hashlib.sha512), ("RS256", hashlib.sha256)],
        ids=["none", "hs512", "rs256-label"],
    )
    async def test_wrong_alg_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, alg: str, digest: Any
    ) -> None:
        """A token with any alg but HS256 gets 401, even when signed with the secret."""
        settings = standin.state.settings
        key = settings.secret.encode() if digest else None
        claims = make_claims(settings, standin.url + FILE_PATH)
        token = hand_token({"alg": alg, "typ": "JWT"}, claims, key, digest)
        answer = await send(http, standin, valid_body(), authorization=f"JwToken {token}")

        await self._expect_rejected(standin, answer, f"alg must be HS256, got {alg!r}")

    async def test_bad_signature_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A token signed with another secret gets 401."""
        claims = make_claims(standin.state.settings, standin.url + FILE_PATH)
        token = jwt.encode(claims, "another-secret-that-is-long-enough-32b", algorithm="HS256")
        answer = await send(http, standin, valid_body(), authorization=f"JwToken {token}")

        await self._expect_rejected(standin, answer, "signature does not match")

    async def test_hand_built_hs256_accepted(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A correct HS256 token built without PyJWT is accepted and its claims recorded."""
        settings = standin.state.settings
        claims = make_claims(settings, standin.url + FILE_PATH)
        token = hand_token({"alg": "HS256"}, claims, settings.secret.encode(), hashlib.sha256)
        answer = await send(http, standin, valid_body(), authorization=f"JwToken {token}")

        assert answer.status == 200
        assert (await received(standin.url))[0]["claims"] == claims

    async def test_query_string_in_url_claim(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A File request with a query string needs it in the url claim: 401 without, 200 with."""
        settings = standin.state.settings
        path = FILE_PATH + "?trace=1"
        claims_without = make_claims(settings, standin.url + FILE_PATH)
        without = await send(http, standin, valid_body(), path=path, claims=claims_without)
        with_query = await send(http, standin, valid_body(), path=path)

        assert without.status == 401
        assert with_query.status == 200
        assert (await received(standin.url))[0]["claims"]["url"] == standin.url + path

    async def test_leeway_accepts_early_token(
        self, start_custom: Any, http: aiohttp.ClientSession
    ) -> None:
        """A token whose nbf is 5 s ahead gets 401 without leeway and 200 with leeway_s=15."""
        strict = await start_custom()
        lenient = await start_custom(leeway_s=15)
        statuses = []
        for standin in (strict, lenient):
            claims = make_claims(standin.state.settings, standin.url + FILE_PATH)
            claims.update(nbf=claims["nbf"] + 10, exp=claims["exp"] + 10)
            statuses.append((await send(http, standin, valid_body(), claims=claims)).status)

        assert statuses == [401, 200]
        assert len(lenient.state.received) == 1

    async def test_clock_offset_shifts_checks_and_date(
        self, start_custom: Any, http: aiohttp.ClientSession
    ) -> None:
        """A stand-in an hour ahead rejects a fresh token as expired and dates responses ahead."""
        standin = await start_custom(clock_offset_s=3600.0)
        answer = await send(http, standin, valid_body())

        assert answer.status == 401
        assert "token expired" in standin.state.stats.auth_failures[0]
        served_s = email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp()
        assert 3600 - 300 < served_s - time.time() < 3600 + 300

    async def test_auth_checked_before_body(self, standin: StandIn) -> None:
        """A bad token gets 401 from the headers alone, before any body byte is sent."""
        host, port = host_port(standin)
        head = (
            f"POST {FILE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: JwToken a.b.c\r\nContent-Type: {MULTIPART}\r\n"
            "Content-Length: 1000000\r\n\r\n"
        )
        status, _, payload = await raw_exchange(standin, head)

        assert status == 401
        assert json.loads(payload)["statusMessages"][0]["message"] == "Invalid token"

    async def test_reasons_hide_access_token(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A wrong access token is reported without the token's value."""
        settings = standin.state.settings
        claims = make_claims(settings, standin.url + FILE_PATH, accessToken="leaky-value-123")
        await send(http, standin, valid_body(), claims=claims)

        [reason] = standin.state.stats.auth_failures
        assert "accessToken does not match" in reason
        assert "leaky-value-123" not in reason
        assert settings.access_token not in reason


# --- rate limit -------------------------------------------------------------


class TestRateLimit:
    async def test_burst_over_limit_gets_429(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """Fifteen requests at once get at least one 429 without Retry-After, counted in stats."""
        answers = await asyncio.gather(*(list_clients(http, standin) for _ in range(15)))
        limited = [a for a in answers if a.status == 429]

        assert {a.status for a in answers} <= {200, 429}
        assert limited
        assert all("Retry-After" not in a.headers for a in limited)
        counters = await stats(standin.url)
        assert counters["rate_limited"] == len(limited)
        assert counters["by_status"]["429"] == len(limited)
        assert counters["max_window"] >= 11

    async def test_rate_checked_before_auth(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """Requests with bad tokens count toward the limit, so the excess gets 429, not 401."""
        bad = "JwToken x.y.z"
        answers = await asyncio.gather(
            *(send(http, standin, valid_body(), authorization=bad) for _ in range(15))
        )

        assert {a.status for a in answers} <= {401, 429}
        assert any(a.status == 429 for a in answers)
        counters = await stats(standin.url)
        assert counters["requests"] == 15
        assert len(counters["auth_failures"]) == 15 - counters["rate_limited"]

    async def test_limit_zero_turns_it_off(
        self, start_custom: Any, http: aiohttp.ClientSession
    ) -> None:
        """With rate_limit_per_s=0 a burst of fifteen gets 200 every time."""
        standin = await start_custom(rate_limit_per_s=0)
        answers = await asyncio.gather(*(list_clients(http, standin) for _ in range(15)))

        assert [a.status for a in answers] == [200] * 15
        assert standin.state.stats.rate_limited == 0
        assert standin.state.stats.max_window >= 2


# --- request framing ----------------------------------------------------------

BAD_CONTENT_TYPES = {
    "missing": (None, "the header is missing"),
    "octet-stream": ("application/octet-stream", "must be multipart/form-data"),
    "mixed": (MULTIPART.replace("form-data", "mixed"), "must be multipart/form-data"),
    "no-boundary": ("multipart/form-data", "no other parameter"),
    "extra-param": (MULTIPART + "; charset=utf-8", "no other parameter"),
    "long-boundary": ("multipart/form-data; boundary=" + "b" * 71, "invalid multipart boundary"),
}


class TestFraming:
    async def test_chunked_body_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A body sent with Transfer-Encoding: chunked gets 411 naming the header."""
        answer = await send(http, standin, valid_body(), chunked=True)

        assert answer.status == 411
        assert "Transfer-Encoding 'chunked' is not accepted" in messages(answer)
        await assert_nothing_stored(standin)

    async def test_missing_content_length_rejected(self, standin: StandIn) -> None:
        """A POST with neither Content-Length nor chunked encoding gets 411."""
        extra = f"Content-Type: {MULTIPART}\r\nConnection: close\r\n"
        status, _, payload = await raw_exchange(standin, file_head(standin, extra))

        assert status == 411
        message = json.loads(payload)["statusMessages"][0]["message"]
        assert "Content-Length header is missing" in message
        await assert_nothing_stored(standin)

    @pytest.mark.parametrize(
        "content_type, fragment", BAD_CONTENT_TYPES.values(), ids=BAD_CONTENT_TYPES.keys()
    )
    async def test_content_type_rejected(
        self,
        standin: StandIn,
        http: aiohttp.ClientSession,
        content_type: str | None,
        fragment: str,
    ) -> None:
        """A Content-Type other than multipart/form-data with one boundary gets 400."""
        answer = await send(http, standin, valid_body(), content_type=content_type)

        await assert_bad_request(standin, answer, fragment)

    async def test_quoted_boundary_accepted(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A quoted boundary parameter is accepted, as RFC 2046 allows."""
        quoted = f'multipart/form-data; boundary="{BOUNDARY.decode()}"'
        answer = await send(http, standin, valid_body(), content_type=quoted)

        assert answer.status == 200
        assert len(await received(standin.url)) == 1


# --- multipart body -----------------------------------------------------------


def _structure_cases() -> Iterable[tuple[str, bytes, str]]:
    json_part = (JSON_HEADERS, GOOD_JSON)
    file_part = (GOOD_FILE_HEADERS, DATA)
    yield "wrong-order", build_body([file_part, json_part]), "wrong order"
    yield "json-part-only", build_body([json_part]), "only the json part"
    yield "three-parts", build_body([json_part, file_part, file_part]), "more than two parts"
    yield "two-json-parts", build_body([json_part, json_part]), "two json parts"
    yield "preamble", b"preamble\r\n" + two_parts(), "no preamble"
    yield "no-closing", two_parts(ending=b""), "ended before the closing boundary"
    yield "epilogue", two_parts(ending=b"--\r\nextra"), "after the closing boundary"
    yield "other-boundary", two_parts(boundary=b"zzz"), "must start with --<boundary>"
    json_header_cases = {
        "json-no-content-type": [JSON_HEADERS[0]],
        "json-type-json": [JSON_HEADERS[0], b"Content-Type: application/json"],
        "json-lower-case-names": [line.lower() for line in JSON_HEADERS],
        "json-reversed": list(reversed(JSON_HEADERS)),
        "json-extra-header": JSON_HEADERS + [b"Content-Length: 90"],
        "json-with-filename": [JSON_HEADERS[0] + b'; filename="x"', JSON_HEADERS[1]],
        "json-charset": [JSON_HEADERS[0], TEXT_PLAIN + b"; charset=utf-8"],
    }
    for case_id, headers in json_header_cases.items():
        yield case_id, two_parts(json_headers=headers), "json part's headers"
    file_header_cases = {
        "file-no-filename": [DISPOSITION_FILE, TEXT_PLAIN],
        "file-unquoted": [DISPOSITION_FILE + b"; filename=a.txt", TEXT_PLAIN],
        "file-star-param": [DISPOSITION_FILE + b"; filename*=UTF-8''a.txt", TEXT_PLAIN],
        "file-capital-name": [
            b'Content-Disposition: form-data; name="File"; filename="a.txt"',
            TEXT_PLAIN,
        ],
        "file-pdf-type": [GOOD_FILE_HEADERS[0], b"Content-Type: application/pdf"],
        "file-no-type": [GOOD_FILE_HEADERS[0]],
        "file-empty-name": [DISPOSITION_FILE + b'; filename=""', TEXT_PLAIN],
    }
    for case_id, headers in file_header_cases.items():
        yield case_id, two_parts(headers=headers), "file part's headers"


def _json_cases() -> Iterable[tuple[str, bytes, str]]:
    missing = "missing keys in the json part: "
    yield "size-number", json_value("a.txt", DATA, size=len(DATA)), "got the number 11"
    yield "size-negative", json_value("a.txt", DATA, size="-11"), "decimal digits"
    yield "size-decimal-point", json_value("a.txt", DATA, size="11.0"), "decimal digits"
    yield "size-missing", json_value("a.txt", DATA, size=MISSING), missing + "size"
    yield "name-missing", json_value("a.txt", DATA, name=MISSING), missing + "name"
    yield "name-empty", json_value("", DATA), "non-empty string"
    yield "entity-missing", json_value("a.txt", DATA, entity=MISSING), missing + "entity"
    yield "entity-lower", json_value("a.txt", DATA, entity="client"), '"entity" must be "Client"'
    yield "key-missing", json_value("a.txt", DATA, primaryDomainKey=MISSING), "primaryDomainKey"
    yield "key-not-guid", json_value("a.txt", DATA, client_id="12345"), "client GUID"
    yield "key-braces", json_value("a.txt", DATA, client_id=f"{{{CLIENT_ID}}}"), "client GUID"
    yield (
        "unknown-key",
        json_value("a.txt", DATA, description="x"),
        "unknown keys in the json part: description",
    )
    yield "folder-true", json_value("a.txt", DATA, isFolder=True), '"isFolder" must be false'
    yield "folder-zero", json_value("a.txt", DATA, isFolder=0), '"isFolder" must be false'
    yield "parent-not-guid", json_value("a.txt", DATA, parentFolderId="root"), "parentFolderId"
    yield "not-object", b'["a.txt"]', "must be a JSON object"
    yield "not-json", b"{name: a.txt}", "not valid JSON"
    yield "duplicate-key", b'{"name": "a.txt", "name": "b.txt"}', "duplicate key"
    yield "not-utf8", GOOD_JSON.replace(b"a.txt", b"\xff.txt"), "not valid UTF-8"


STRUCTURE_CASES = [pytest.param(b, f, id=case) for case, b, f in _structure_cases()]
JSON_CASES = [pytest.param(v, f, id=case) for case, v, f in _json_cases()]
BAD_FILENAMES = {
    "percent-encoded-quote": (b"a%22b.txt", "differs from the json name"),
    "bare-quote": (b'a"b.txt', "invalid byte 0x22"),
    "unknown-escape": (b"a\\nb.txt", "invalid escape"),
    "invalid-utf8": (b"a\xffb.txt", "not valid UTF-8"),
}


class TestMultipart:
    @pytest.mark.parametrize("body, fragment", STRUCTURE_CASES)
    async def test_structure_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, body: bytes, fragment: str
    ) -> None:
        """A body whose parts or part headers differ from the known-good format gets 400."""
        answer = await send(http, standin, body)

        await assert_bad_request(standin, answer, fragment)

    @pytest.mark.parametrize("value, fragment", JSON_CASES)
    async def test_json_part_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, value: bytes, fragment: str
    ) -> None:
        """A json part with a missing, unknown or mistyped field gets 400 naming it."""
        answer = await send(http, standin, two_parts(value=value))

        await assert_bad_request(standin, answer, fragment)

    @pytest.mark.parametrize(
        "declared, fragment",
        [
            (12, "has 11 bytes but the json size is 12"),
            (10, "has 11 bytes but the json size is 10"),
        ],
        ids=["size-larger", "size-smaller"],
    )
    async def test_size_mismatch_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, declared: int, fragment: str
    ) -> None:
        """A file part whose length differs from the json size gets 400 and is not kept."""
        value = json_value("a.txt", DATA, size=str(declared))
        answer = await send(http, standin, two_parts(value=value))

        await assert_bad_request(standin, answer, fragment)

    @pytest.mark.parametrize("raw_name, fragment", BAD_FILENAMES.values(), ids=BAD_FILENAMES.keys())
    async def test_filename_encoding_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, raw_name: bytes, fragment: str
    ) -> None:
        """A filename not written as raw UTF-8 with backslash escapes gets 400."""
        headers = [DISPOSITION_FILE + b'; filename="' + raw_name + b'"', TEXT_PLAIN]
        body = two_parts(value=json_value('a"b.txt', DATA), headers=headers)
        answer = await send(http, standin, body)

        await assert_bad_request(standin, answer, fragment)

    async def test_filename_differs_from_name(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A filename that differs from the json name gets 400."""
        answer = await send(http, standin, two_parts(headers=file_headers("b.txt")))

        await assert_bad_request(standin, answer, "differs from the json name 'a.txt'")

    async def test_unknown_client_gets_404(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A primaryDomainKey outside the client list gets 404 with a statusMessages body."""
        stranger = "00000000-1111-4222-8333-444444444444"
        answer = await send(http, standin, valid_body(client_id=stranger))

        assert answer.status == 404
        assert f"no client with primaryDomainKey {stranger}" in messages(answer)
        await assert_nothing_stored(standin)

    async def test_client_disconnect_stores_nothing(self, standin: StandIn) -> None:
        """A client that drops the connection before the closing boundary leaves nothing stored."""
        body = valid_body("cut.txt", b"x" * 5000)
        extra = f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n"
        _, writer = await asyncio.open_connection(*host_port(standin))
        writer.write(file_head(standin, extra).encode() + body[:-20])
        await writer.drain()
        writer.close()
        await writer.wait_closed()

        # Poll until the handler has seen the closed connection (up to 5 s).
        for _ in range(250):
            if standin.state.stats.by_status.get("disconnected"):
                break
            await asyncio.sleep(0.02)
        assert standin.state.stats.by_status["disconnected"] == 1
        await assert_nothing_stored(standin)
        assert list((standin.state.settings.storage_dir / ".incoming").iterdir()) == []


# --- the body reader on its own ---------------------------------------------------


class _ChunkSource:
    """Yields a body in given chunks, like aiohttp's request.content."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)

    async def readany(self) -> bytes:
        return next(self._chunks, b"")


class _HashingSink:
    """A binary sink that keeps only a hash and a count, so its memory use stays constant."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


class TestBodyReader:
    async def test_one_byte_chunks(self) -> None:
        """A body read one byte at a time yields the same file bytes, whatever the splits."""
        body = valid_body("a.txt", TRICKY_BYTES)
        reader = UploadBodyReader(_ChunkSource(body[i : i + 1] for i in range(len(body))), BOUNDARY)
        sink = _HashingSink()

        await reader.read_json_part()
        part = await reader.read_file_part(sink)  # type: ignore[arg-type]

        assert part.size_bytes == sink.size == len(TRICKY_BYTES)
        assert part.sha256 == sink.digest.hexdigest() == hashlib.sha256(TRICKY_BYTES).hexdigest()
        assert part.filename == "a.txt"

    async def test_large_body_bounded_memory(self) -> None:
        """Streaming a 64 MiB file part allocates under 2 MiB at peak."""
        chunk = os.urandom(64 * 1024)
        count = 1024
        size = len(chunk) * count
        head = build_body([(JSON_HEADERS, json_value("big.bin", b"x" * size))], ending=b"\r\n")
        head += b"".join(line + b"\r\n" for line in file_headers("big.bin")) + b"\r\n"
        tail = b"\r\n--" + BOUNDARY + b"--\r\n"
        reader = UploadBodyReader(_ChunkSource([head, *[chunk] * count, tail]), BOUNDARY)
        sink = _HashingSink()

        tracemalloc.start()
        try:
            json_part = await reader.read_json_part()
            part = await reader.read_file_part(sink)  # type: ignore[arg-type]
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        assert json.loads(json_part.raw)["size"] == str(size)
        assert part.size_bytes == sink.size == size
        assert peak_bytes < 2 * 1024 * 1024

    async def test_truncated_body_raises(self) -> None:
        """A body that stops inside the file part raises MultipartError naming the boundary."""
        body = valid_body("a.txt", b"abc")[:-10]
        reader = UploadBodyReader(_ChunkSource([body]), BOUNDARY)
        await reader.read_json_part()

        with pytest.raises(MultipartError, match="ended before the closing boundary"):
            await reader.read_file_part(_HashingSink())  # type: ignore[arg-type]


# --- faults -------------------------------------------------------------------

INVALID_FAULTS = {
    "unknown-kind": {"kind": "explode"},
    "no-status": {"kind": "status"},
    "status-200": {"kind": "status", "status": 200},
    "pre-body-match": {"kind": "refuse_early", "status": 503, "match_name": "a.txt"},
    "times-zero": {"kind": "status", "status": 500, "times": 0},
    "negative-seconds": {"kind": "slow", "seconds": -1},
    "unknown-key": {"kind": "status", "status": 500, "colour": "red"},
    "negative-retry-after": {"kind": "status", "status": 503, "retry_after": -3},
    "fractional-retry-after": {"kind": "status", "status": 503, "retry_after": 1.5},
}


class TestFaults:
    async def test_status_fault_then_normal(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A status fault gets 503 with Retry-After once and stores nothing; then 200."""
        await add_faults(standin.url, {"kind": "status", "status": 503, "retry_after": "7"})
        faulted = await send(http, standin, valid_body("a.txt", b"1"))

        assert faulted.status == 503
        assert faulted.headers["Retry-After"] == "7"
        assert faulted.json()["statusMessages"]
        await assert_nothing_stored(standin)
        assert (await send(http, standin, valid_body("a.txt", b"1"))).status == 200
        assert len(await received(standin.url)) == 1

    async def test_status_fault_numeric_retry_after(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A Retry-After given as a whole number of seconds is sent as that header text."""
        await add_faults(standin.url, {"kind": "status", "status": 429, "retry_after": 3})
        faulted = await send(http, standin, valid_body("a.txt", b"1"))

        assert faulted.status == 429
        assert faulted.headers["Retry-After"] == "3"
        await assert_nothing_stored(standin)

    async def test_status_fault_custom_body(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A status fault with body and content_type sends them verbatim, e.g. an HTML page."""
        page = "<html><body>502 Bad Gateway</body></html>"
        fault = {"kind": "status", "status": 502, "body": page, "content_type": "text/html"}
        await add_faults(standin.url, fault)
        answer = await send(http, standin, valid_body())

        assert answer.status == 502
        assert answer.body.decode() == page
        assert answer.headers["Content-Type"].startswith("text/html")
        assert "Retry-After" not in answer.headers

    async def test_fault_times_and_match_name(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A fault with times=2 and match_name hits only that name, twice, then stops."""
        fault = {"kind": "status", "status": 401, "times": 2, "match_name": "target.pdf"}
        await add_faults(standin.url, fault)
        statuses = []
        for name in ("other.pdf", "target.pdf", "target.pdf", "target.pdf"):
            statuses.append((await send(http, standin, valid_body(name, b"x"))).status)

        assert statuses == [200, 401, 401, 200]
        assert [r["name"] for r in await received(standin.url)] == ["other.pdf", "target.pdf"]

    async def test_faults_fifo_order(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """Queued faults are used in order, one per request."""
        faults = [{"kind": "status", "status": 500}, {"kind": "status", "status": 504}]
        await add_faults(standin.url, *faults)
        statuses = [(await send(http, standin, valid_body())).status for _ in range(3)]

        assert statuses == [500, 504, 200]

    async def test_refuse_early_before_body(self, standin: StandIn) -> None:
        """refuse_early returns its status from the headers alone and closes the connection."""
        await add_faults(standin.url, {"kind": "refuse_early", "status": 413})
        extra = f"Content-Type: {MULTIPART}\r\nContent-Length: 5000000\r\n"
        status, headers, _ = await raw_exchange(standin, file_head(standin, extra))

        assert status == 413
        assert headers.get("Connection") == "close"
        await assert_nothing_stored(standin)

    async def test_reset_before_body(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """reset_before_body drops the connection with no response and stores nothing."""
        await add_faults(standin.url, {"kind": "reset_before_body"})
        with pytest.raises(aiohttp.ClientConnectionError):
            await send(http, standin, valid_body())

        await assert_nothing_stored(standin)
        assert (await stats(standin.url))["by_status"] == {"dropped": 1}

    async def test_reset_after_body(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """reset_after_body reads the body, drops the connection and stores nothing."""
        await add_faults(standin.url, {"kind": "reset_after_body"})
        with pytest.raises(aiohttp.ClientConnectionError):
            await send(http, standin, valid_body())

        await assert_nothing_stored(standin)
        assert list((standin.state.settings.storage_dir / ".incoming").iterdir()) == []

    async def test_reset_after_store(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """reset_after_store keeps the file as received but drops the connection unanswered."""
        await add_faults(standin.url, {"kind": "reset_after_store"})
        with pytest.raises(aiohttp.ClientConnectionError):
            await send(http, standin, valid_body("kept.txt", b"kept bytes"))

        [record] = await received(standin.url)
        assert record["name"] == "kept.txt"
        assert await received_content(standin.url, record["id"]) == b"kept bytes"

    async def test_slow_answers_late(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """slow stores the file and gets 200 no sooner than the given seconds."""
        await add_faults(standin.url, {"kind": "slow", "seconds": 0.3})
        started_s = time.monotonic()
        answer = await send(http, standin, valid_body())

        assert time.monotonic() - started_s >= 0.3
        assert answer.status == 200
        assert len(await received(standin.url)) == 1

    async def test_bad_json_200(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """bad_json_200 stores the file and gets 200 with a body that is not JSON."""
        await add_faults(standin.url, {"kind": "bad_json_200"})
        answer = await send(http, standin, valid_body())

        assert answer.status == 200
        with pytest.raises(json.JSONDecodeError):
            answer.json()
        assert len(await received(standin.url)) == 1

    async def test_wrong_size_200(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """wrong_size_200 stores the real bytes but returns a size one larger."""
        await add_faults(standin.url, {"kind": "wrong_size_200"})
        answer = await send(http, standin, valid_body("a.txt", b"12345"))

        assert answer.status == 200
        assert answer.json()["size"] == 6
        [record] = await received(standin.url)
        assert record["size"] == 5

    async def test_rejected_request_keeps_fault(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A request rejected for its token does not use up a queued fault."""
        await add_faults(standin.url, {"kind": "status", "status": 500})
        rejected = await send(http, standin, valid_body(), authorization="JwToken a.b.c")
        faulted = await send(http, standin, valid_body())

        assert (rejected.status, faulted.status) == (401, 500)

    @pytest.mark.parametrize("fault", INVALID_FAULTS.values(), ids=INVALID_FAULTS.keys())
    async def test_invalid_fault_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, fault: dict[str, Any]
    ) -> None:
        """An invalid fault is rejected with 400 and nothing is queued."""
        url = standin.url + "/_standin/faults"
        async with http.post(url, json={"faults": [fault]}) as response:
            assert response.status == 400
            assert "fault" in await response.text()
        assert list(standin.state.faults) == []

    async def test_down_and_up(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """While down every API request gets 503 with Retry-After; after up, uploads work."""
        await set_down(standin.url, 503, "5")
        upload = await send(http, standin, valid_body())
        listing = await list_clients(http, standin)

        assert (upload.status, listing.status) == (503, 503)
        assert upload.headers["Retry-After"] == listing.headers["Retry-After"] == "5"
        await assert_nothing_stored(standin)
        await set_up(standin.url)
        assert (await send(http, standin, valid_body())).status == 200

    async def test_reset_clears_state(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """POST /_standin/reset empties received, stats and faults but keeps files on disk."""
        await send(http, standin, valid_body())
        await add_faults(standin.url, {"kind": "status", "status": 500})
        await reset(standin.url)

        assert await received(standin.url) == []
        assert (await stats(standin.url))["requests"] == 0
        assert list(standin.state.faults) == []
        assert len(stored_files(standin)) == 1


# --- client list --------------------------------------------------------------

BAD_PAGING = {
    "size-101": ("?pageSize=101", "pageSize 101 is above the maximum 100"),
    "size-zero": ("?pageSize=0", "pageSize must be a positive integer"),
    "number-text": ("?pageNumber=x", "pageNumber must be a positive integer"),
}


class TestClientList:
    async def test_default_paging(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """Without query parameters the list returns every demo client on page 1 of size 50."""
        answer = await list_clients(http, standin)

        assert answer.status == 200
        document = answer.json()
        expected_ids = [c["clientId"] for c in DEMO_CLIENTS]
        assert [c["clientId"] for c in document["clients"]] == expected_ids
        assert document["paging"] == {"totalRows": 10, "pageNumber": 1, "pageSize": 50}
        assert document["statusMessages"] == []

    async def test_page_with_query_in_url_claim(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """pageNumber=2&pageSize=3 returns clients 4 to 6 when the url claim has the query."""
        answer = await list_clients(http, standin, "?pageNumber=2&pageSize=3")

        assert answer.status == 200
        expected_ids = [c["clientId"] for c in DEMO_CLIENTS[3:6]]
        assert [c["clientId"] for c in answer.json()["clients"]] == expected_ids
        assert answer.json()["paging"] == {"totalRows": 10, "pageNumber": 2, "pageSize": 3}
        assert standin.state.stats.auth_failures == []

    async def test_query_missing_from_url_claim(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A url claim without the request's query string gets 401."""
        claims = make_claims(standin.state.settings, standin.url + CLIENT_LIST_PATH, "GET")
        answer = await list_clients(http, standin, "?pageSize=5", claims=claims)

        assert answer.status == 401
        assert "url claim" in standin.state.stats.auth_failures[0]

    @pytest.mark.parametrize("query, fragment", BAD_PAGING.values(), ids=BAD_PAGING.keys())
    async def test_bad_paging_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession, query: str, fragment: str
    ) -> None:
        """A pageSize above 100 or a paging value that is not a positive integer gets 400."""
        answer = await list_clients(http, standin, query)

        assert answer.status == 400
        assert fragment in messages(answer)

    async def test_json_content_type_required(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A Client list request without Content-Type application/json gets 400."""
        answer = await list_clients(http, standin, content_type=None)

        assert answer.status == 400
        assert "Content-Type must be application/json" in messages(answer)

    async def test_post_not_allowed(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """POST to the Client list gets 405 with Allow: GET."""
        answer = await list_clients(http, standin, method="POST")

        assert answer.status == 405
        assert answer.headers["Allow"] == "GET"

    async def test_replace_clients(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """PUT /_standin/clients replaces the list with lower-case GUIDs, and uploads follow it."""
        new_id = "ABCDEF01-2345-4678-9ABC-DEF012345678"
        new_client = {"clientId": new_id, "firstName": "Zulu", "lastName": "Democlient"}
        await replace_clients(standin.url, [new_client])
        listing = await list_clients(http, standin)
        old = await send(http, standin, valid_body(client_id=CLIENT_ID))
        new = await send(http, standin, valid_body(client_id=new_id))

        assert [c["clientId"] for c in listing.json()["clients"]] == [new_id.lower()]
        assert (old.status, new.status) == (404, 200)

    async def test_bad_client_list_rejected(
        self, standin: StandIn, http: aiohttp.ClientSession
    ) -> None:
        """A client list entry without a GUID clientId is rejected with 400."""
        url = standin.url + "/_standin/clients"
        async with http.put(url, json=[{"clientId": "nope"}]) as response:
            assert response.status == 400
            assert "needs a GUID clientId" in await response.text()
        assert len(standin.state.clients) == 10


# --- starting and the command line -------------------------------------------


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key with the openssl command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"]
    command += ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


class TestStart:
    async def test_non_loopback_host_rejected(self, standin_settings: StandInSettings) -> None:
        """start_standin rejects an address that is not loopback."""
        with pytest.raises(ValueError, match="loopback addresses only"):
            await start_standin(standin_settings, host="0.0.0.0")

    async def test_unknown_path_404(self, standin: StandIn, http: aiohttp.ClientSession) -> None:
        """An unknown API path gets 404 with a statusMessages body."""
        answer = await send(http, standin, valid_body(), path="/API/Core/v2.1/Files/")

        assert answer.status == 404
        assert "no API endpoint" in messages(answer)

    async def test_latency_added(self, start_custom: Any, http: aiohttp.ClientSession) -> None:
        """latency_s delays each API response by at least that long."""
        standin = await start_custom(latency_s=0.2)
        started_s = time.monotonic()
        answer = await list_clients(http, standin)

        assert time.monotonic() - started_s >= 0.2
        assert answer.status == 200

    @pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
    async def test_https_url_claim(self, standin_settings: StandInSettings, tmp_path: Path) -> None:
        """Over HTTPS the url claim must start with https:// and a valid upload is stored."""
        cert, key = make_certificate(tmp_path)
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(cert, key)
        client_context = ssl.create_default_context(cafile=str(cert))
        async with await start_standin(standin_settings, ssl_context=server_context) as standin:
            connector = aiohttp.TCPConnector(ssl=client_context)
            async with aiohttp.ClientSession(connector=connector) as http:
                answer = await send(http, standin, valid_body())

            assert standin.url.startswith("https://127.0.0.1:")
            assert answer.status == 200
            assert standin.state.received[0].claims["url"].startswith("https://127.0.0.1:")


class TestCli:
    def test_non_loopback_host_exit_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """stand-in --host 0.0.0.0 exits 2 with a message about loopback."""
        secret = tmp_path / "secret"
        secret.write_text("s" * 40)
        files = ["--secret-file", str(secret), "--access-token-file", str(secret)]
        code = main(["--host", "0.0.0.0", *files])

        assert code == 2
        assert "loopback addresses only" in capsys.readouterr().err

    def test_missing_secret_exit_2(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without --secret-file or COREPLUS_SECRET the command exits 2 naming both."""
        monkeypatch.delenv("COREPLUS_SECRET", raising=False)
        monkeypatch.delenv("COREPLUS_ACCESS_TOKEN", raising=False)
        code = main([])

        assert code == 2
        assert "--secret-file is required unless COREPLUS_SECRET is set" in capsys.readouterr().err

    async def test_serves_logs_and_stops(self, tmp_path: Path, http: aiohttp.ClientSession) -> None:
        """The command serves, logs each request without the token, and exits 0 on SIGTERM."""
        secret, access_token = "cli-secret-" + "x" * 32, "cli-access-token"
        env = {**os.environ, "COREPLUS_SECRET": secret, "COREPLUS_ACCESS_TOKEN": access_token}
        script = "import sys; from uploader.standin import main; sys.exit(main(sys.argv[1:]))"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, "--port", "0", "--storage", str(tmp_path / "store"),
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            first_line = await asyncio.wait_for(process.stdout.readline(), timeout=15)
            base_url = first_line.decode().split()[-1]
            settings = StandInSettings(
                consumer_id="demo-consumer", secret=secret, access_token=access_token,
                storage_dir=tmp_path,
            )
            token = sign(settings, make_claims(settings, base_url + CLIENT_LIST_PATH, "GET"))
            headers = {"Authorization": f"JwToken {token}", "Content-Type": "application/json"}
            async with http.get(base_url + CLIENT_LIST_PATH, headers=headers) as response:
                status = response.status
                document = await response.json()
            headers["Authorization"] = f"JwToken {token}x"
            async with http.get(base_url + CLIENT_LIST_PATH, headers=headers) as response:
                bad_token_status = response.status
        finally:
            process.send_signal(signal.SIGTERM)
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=15)

        assert status == 200
        assert len(document["clients"]) == 10
        assert bad_token_status == 401
        assert process.returncode == 0
        log = stderr.decode()
        assert f"GET {CLIENT_LIST_PATH} 200" in log
        assert f"GET {CLIENT_LIST_PATH} 401" in log
        assert "reason='token signature does not match the consumer secret'" in log
        assert token not in log
        assert secret not in log
        assert str(tmp_path / "store") in stdout.decode()
