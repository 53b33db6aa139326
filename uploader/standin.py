"""
The stand-in: a strict local imitation of the coreplus File and Client list API.

The test suite and the demo point the uploader at it instead of coreplus. It
checks every request at least as strictly as the vendor documentation describes
(one HS256 token per request bound to the URL and method, the rate limit, the
exact two-part multipart body), stores what it accepts on disk, and can inject
faults (error responses, dropped connections, slow or malformed responses) through
control endpoints under ``/_standin/``. It is a test double that contains fake
patient data, so it listens on loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from uploader._standin_multipart import (
    GUID_PATTERN,
    FilePart,
    JsonPart,
    MultipartError,
    UploadBodyReader,
    UploadFields,
    parse_boundary,
    parse_upload_fields,
)

logger = logging.getLogger(__name__)

#: Claims every coreplus token must carry.
REQUIRED_CLAIMS = ("iss", "aud", "nbf", "exp", "consumerId", "accessToken", "url", "httpMethod")

#: Maximum token lifetime (exp - nbf) in seconds. coreplus expects one minute.
MAX_TOKEN_LIFETIME_S = 60

#: coreplus documents up to 50 characters for consumerId and accessToken.
MAX_CREDENTIAL_CHARS = 50

#: Fault kinds that act before the body is read, so they cannot use ``match_name``.
PRE_BODY_FAULT_KINDS = frozenset({"refuse_early", "reset_before_body"})

#: Every fault kind that ``POST /_standin/faults`` accepts.
FAULT_KINDS = PRE_BODY_FAULT_KINDS | {
    "status",
    "reset_after_body",
    "reset_after_store",
    "slow",
    "bad_json_200",
    "wrong_size_200",
}

_FILE_ROUTE = re.compile(r"/(?i:api/core)/(?P<version>[^/]+)/File/")
_CLIENT_LIST_ROUTE = re.compile(r"/(?i:api/core)/(?P<version>[^/]+)/Client/")
# The signature segment may be empty so that an alg "none" token reaches the alg check
# and is rejected with that reason.
_JWT_PATTERN = re.compile(r"JwToken ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)")

#: Ten fictional clients with fixed GUIDs, for the demo and the tests.
DEMO_CLIENTS: list[dict[str, Any]] = [
    {
        "clientId": client_id,
        "firstName": first_name,
        "middleName": "",
        "lastName": "Democlient",
        "preferredName": first_name,
        "dateOfBirth": f"19{70 + index}-0{1 + index % 9}-1{index}",
        "title": "",
        "gender": "",
        "practitionerId": "00000000-0000-4000-8000-000000000001",
    }
    for index, (client_id, first_name) in enumerate(
        [
            ("54c8f0b4-632b-49af-99e8-cf729198846d", "Alpha"),
            ("0ed45329-5157-40a6-b055-8d5ccf67fc9e", "Bravo"),
            ("ea531246-5e35-4e32-bd38-ce7cfaf7fa6f", "Charlie"),
            ("9a64543a-354b-455e-96b6-0a717b847c14", "Delta"),
            ("b780aa53-cdfd-4111-8495-3f49e0ab8e70", "Echo"),
            ("9286e110-faec-443e-9942-e1f9787cd403", "Foxtrot"),
            ("c9cce558-20e7-4ff8-99ae-566ae078918d", "Golf"),
            ("8f2716ec-6d77-4f38-ae2d-782f574918c3", "Hotel"),
            ("1c8d21c7-bb08-430b-93cd-495ca862a928", "India"),
            ("87c74a9c-9da9-4c1a-ae8b-e960b78073e7", "Juliett"),
        ]
    )
]


@dataclass(frozen=True, kw_only=True)
class StandInSettings:
    """
    What the stand-in accepts and how it behaves.

    Attributes:
        consumer_id: The only consumerId claim accepted.
        secret: The HS256 key tokens must be signed with.
        access_token: The only accessToken claim accepted.
        storage_dir: Where received files are written, one folder per client.
        audience: The only aud claim accepted.
        clients: The client records; each needs a ``clientId`` GUID.
        rate_limit_per_s: Requests allowed in any one-second window; 0 turns it off.
        leeway_s: Seconds of clock difference forgiven on nbf and exp.
        latency_s: Delay in seconds added before every API response.
        clock_offset_s: Shift of the stand-in's clock, for token checks and the
            Date header, to imitate a service whose clock differs from ours.
        max_page_size: Largest pageSize the Client list accepts.
    """

    consumer_id: str
    secret: str = field(repr=False)
    access_token: str = field(repr=False)
    storage_dir: Path
    audience: str = "https://coreplus.com.au"
    clients: list[dict[str, Any]] = field(default_factory=lambda: list(DEMO_CLIENTS))
    rate_limit_per_s: int = 10
    leeway_s: int = 0
    latency_s: float = 0.0
    clock_offset_s: float = 0.0
    max_page_size: int = 100


@dataclass(eq=False)
class Fault:
    """
    One injected fault waiting in the queue. ``FAULT_KINDS`` lists the kinds.
    """

    kind: str
    times: int = 1
    match_name: str | None = None
    status: int | None = None
    retry_after: str | None = None
    body: str | None = None
    content_type: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class DownMode:
    """
    The response every API request gets while the stand-in is marked down.
    """

    status: int = 503
    retry_after: str | None = None


@dataclass(frozen=True)
class ReceivedUpload:
    """
    One stored upload, as ``GET /_standin/received`` lists it.
    """

    id: str
    client_id: str
    name: str
    size: int
    sha256: str
    json: dict[str, Any]
    part_headers: list[str]
    claims: dict[str, Any]
    received_at: float
    stored_path: Path

    def to_json(self) -> dict[str, Any]:
        """Return the record with JSON-ready values and the contract's key names."""
        record = asdict(self)
        record["clientId"] = record.pop("client_id")
        record["stored_path"] = str(self.stored_path)
        return record


@dataclass
class StandInStats:
    """
    Counters for ``GET /_standin/stats``.

    ``by_status`` counts responses by status code, plus ``"dropped"`` for
    connections the stand-in aborted and ``"disconnected"`` for clients that went
    away while sending the body.
    """

    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    auth_failures: list[str] = field(default_factory=list)
    rate_limited: int = 0
    max_window: int = 0

    def to_json(self) -> dict[str, Any]:
        """Return the counters as a JSON-ready dict."""
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "auth_failures": list(self.auth_failures),
            "rate_limited": self.rate_limited,
            "max_window": self.max_window,
        }


class StandInState:
    """
    Everything the stand-in has received and been configured with, readable by
    in-process tests.

    Attributes:
        settings: The settings the stand-in was started with.
        clients: The current client list, with lower-case ``clientId`` values.
        received: Stored uploads in arrival order.
        stats: Request counters.
        faults: Injected faults, consumed first in, first out.
        down: The response every API request gets, or None when up.
    """

    def __init__(self, settings: StandInSettings) -> None:
        self.settings = settings
        self.clients = normalise_clients(settings.clients)
        self.received: list[ReceivedUpload] = []
        self.stats = StandInStats()
        self.faults: deque[Fault] = deque()
        self.down: DownMode | None = None
        self._arrivals_s: deque[float] = deque()

    def now_s(self) -> float:
        """Return the stand-in's unix time, shifted by ``clock_offset_s``."""
        return time.time() + self.settings.clock_offset_s

    def record_arrival(self, now_s: float) -> int:
        """
        Count one API request arriving at monotonic time ``now_s``.

        Returns:
            How many requests arrived in the last second, this one included.
        """
        self._arrivals_s.append(now_s)
        while self._arrivals_s[0] <= now_s - 1.0:
            self._arrivals_s.popleft()
        window = len(self._arrivals_s)
        self.stats.max_window = max(self.stats.max_window, window)
        return window

    def take_fault(self, name: str | None) -> Fault | None:
        """
        Consume one use of the fault that applies to a File request.

        Before the body is read (``name`` None) only the first fault without
        ``match_name`` is considered, and it applies only when it is a pre-body
        kind. Once the name is known, the first fault of another kind whose
        ``match_name`` is unset or equal to ``name`` applies.
        """
        fault = self._find_fault(name)
        if fault is None:
            return None
        fault.times -= 1
        if fault.times == 0:
            self.faults.remove(fault)
        return fault

    def _find_fault(self, name: str | None) -> Fault | None:
        if name is None:
            first = next((f for f in self.faults if f.match_name is None), None)
            return first if first is not None and first.kind in PRE_BODY_FAULT_KINDS else None
        for fault in self.faults:
            if fault.kind not in PRE_BODY_FAULT_KINDS and fault.match_name in (None, name):
                return fault
        return None

    def find_client(self, client_id: str) -> dict[str, Any] | None:
        """Return the client whose GUID equals ``client_id``, ignoring case."""
        expected_id = client_id.lower()
        return next((c for c in self.clients if c["clientId"] == expected_id), None)

    def find_received(self, upload_id: str) -> ReceivedUpload | None:
        """Return the stored upload with this id, if any."""
        return next((r for r in self.received if r.id == upload_id), None)

    def reset(self) -> None:
        """Forget received uploads, counters, faults and down mode. Files on disk stay."""
        self.received.clear()
        self.stats = StandInStats()
        self.faults.clear()
        self.down = None
        self._arrivals_s.clear()


def normalise_clients(clients: Any) -> list[dict[str, Any]]:
    """
    Copy a client list, storing each ``clientId`` in lower case.

    Raises:
        ValueError: When ``clients`` is not a list of objects with a GUID ``clientId``.
    """
    if not isinstance(clients, list):
        raise ValueError(
            f"the client list must be a JSON list of objects, got {type(clients).__name__}"
        )
    normalised = []
    for index, client in enumerate(clients):
        client_id = client.get("clientId") if isinstance(client, dict) else None
        if not isinstance(client_id, str) or not GUID_PATTERN.fullmatch(client_id):
            raise ValueError(f"client {index} needs a GUID clientId, got {client!r}")
        normalised.append({**client, "clientId": client_id.lower()})
    return normalised


def parse_fault(data: Any) -> Fault:
    """
    Build a Fault from one entry of ``POST /_standin/faults``.

    Raises:
        ValueError: Naming the bad key or value.
    """
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f'each fault must be a JSON object with a "kind" key, got {data!r}')
    unknown = sorted(set(data) - {f.name for f in Fault.__dataclass_fields__.values()})
    if unknown:
        raise ValueError(f"unknown fault keys: {', '.join(unknown)}")
    fault = Fault(**{**data, "retry_after": _header_text(data.get("retry_after"))})
    if fault.kind not in FAULT_KINDS:
        raise ValueError(
            f"unknown fault kind {fault.kind!r}; use one of {', '.join(sorted(FAULT_KINDS))}"
        )
    _check_fault_values(fault)
    return fault


def _check_fault_values(fault: Fault) -> None:
    if type(fault.times) is not int or fault.times < 1:
        raise ValueError(f"fault times must be a positive integer, got {fault.times!r}")
    if fault.kind in ("status", "refuse_early") and not _is_error_status(fault.status):
        raise ValueError(
            f"fault {fault.kind!r} needs a status from 400 to 599, got {fault.status!r}"
        )
    if fault.match_name is not None and fault.kind in PRE_BODY_FAULT_KINDS:
        raise ValueError(
            f"fault {fault.kind!r} acts before the body, where the name is unknown, "
            "so it cannot use match_name"
        )
    if not isinstance(fault.seconds, (int, float)) or fault.seconds < 0:
        raise ValueError(f"fault seconds must be a non-negative number, got {fault.seconds!r}")
    if not isinstance(fault.retry_after, (str, type(None))):
        raise ValueError("fault retry_after must be header text or a whole number of seconds "
                         f"from 0, got {fault.retry_after!r}")
    for key in ("match_name", "body", "content_type"):
        if not isinstance(getattr(fault, key), (str, type(None))):
            raise ValueError(f"fault {key} must be a string, got {getattr(fault, key)!r}")


def _header_text(retry_after: Any) -> Any:
    """Accept a Retry-After given as a whole number of seconds as well as header text."""
    if type(retry_after) is int and retry_after >= 0:
        return str(retry_after)
    return retry_after


def _is_error_status(status: Any) -> bool:
    return type(status) is int and 400 <= status <= 599


# Token checks ---------------------------------------------------------------


class TokenRejectedError(Exception):
    """
    The request's token is invalid. The message is the reason kept for tests.
    """


@dataclass(frozen=True)
class TokenExpectations:
    """
    The claim values a valid token must carry for one request.
    """

    secret: str = field(repr=False)
    audience: str
    consumer_id: str
    access_token: str = field(repr=False)
    url: str
    method: str
    now_s: float
    leeway_s: int


def verify_authorization(header_values: list[str], expected: TokenExpectations) -> dict[str, Any]:
    """
    Verify the Authorization header of one request and return the token's claims.

    Args:
        header_values: Every Authorization header the request carried.
        expected: The values the claims must match.

    Raises:
        TokenRejectedError: On the first problem found, naming it.
    """
    token = _token_from_header(header_values)
    claims = _decode_hs256(token, expected.secret)
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise TokenRejectedError(f"missing claims: {', '.join(missing)}")
    _check_identity_claims(claims, expected)
    _check_time_claims(claims, expected)
    _check_request_claims(claims, expected)
    return claims


def _token_from_header(header_values: list[str]) -> str:
    if len(header_values) != 1:
        raise TokenRejectedError(f"expected one Authorization header, got {len(header_values)}")
    match = _JWT_PATTERN.fullmatch(header_values[0])
    if match is None:
        raise TokenRejectedError("Authorization header must be 'JwToken <token>' with one space")
    return match.group(1)


def _decode_hs256(token: str, secret: str) -> dict[str, Any]:
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = _decode_segment(header_b64, "header")
    if header.get("alg") != "HS256":
        raise TokenRejectedError(f"token alg must be HS256, got {header.get('alg')!r}")
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    expected = hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64url_decode(signature_b64, "signature")):
        raise TokenRejectedError("token signature does not match the consumer secret")
    return _decode_segment(payload_b64, "payload")


def _b64url_decode(segment: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenRejectedError(f"token {what} is not valid base64url") from exc


def _decode_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url_decode(segment, what))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenRejectedError(f"token {what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise TokenRejectedError(f"token {what} must be a JSON object")
    return value


def _check_identity_claims(claims: dict[str, Any], expected: TokenExpectations) -> None:
    iss = claims["iss"]
    parts = urlsplit(iss) if isinstance(iss, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise TokenRejectedError(
            f"iss must be an http(s) URL of the integrator's site, got {iss!r}"
        )
    if claims["aud"] != expected.audience:
        raise TokenRejectedError(f"aud must be {expected.audience!r}, got {claims['aud']!r}")
    _check_credential(claims, "consumerId", expected.consumer_id, show=True)
    _check_credential(claims, "accessToken", expected.access_token, show=False)


def _check_credential(claims: dict[str, Any], name: str, expected: str, show: bool) -> None:
    value = claims[name]
    if not isinstance(value, str) or len(value) > MAX_CREDENTIAL_CHARS:
        raise TokenRejectedError(
            f"{name} must be a string of at most {MAX_CREDENTIAL_CHARS} characters"
        )
    if value != expected:
        shown = f", got {value!r}" if show else ""
        raise TokenRejectedError(f"{name} does not match the configured value{shown}")


def _check_time_claims(claims: dict[str, Any], expected: TokenExpectations) -> None:
    nbf, exp = claims["nbf"], claims["exp"]
    for name, value in (("nbf", nbf), ("exp", exp)):
        if type(value) is not int:
            raise TokenRejectedError(f"{name} must be an integer of unix seconds, got {value!r}")
    if not 0 < exp - nbf <= MAX_TOKEN_LIFETIME_S:
        raise TokenRejectedError(
            f"exp - nbf is {exp - nbf} s; it must be more than 0 and at most {MAX_TOKEN_LIFETIME_S}"
        )
    now_s, leeway_s = expected.now_s, expected.leeway_s
    if now_s < nbf - leeway_s:
        raise TokenRejectedError(
            f"token not valid yet: nbf {nbf} is after now {now_s:.0f} (leeway {leeway_s} s)"
        )
    if now_s >= exp + leeway_s:
        raise TokenRejectedError(
            f"token expired: exp {exp} is not after now {now_s:.0f} (leeway {leeway_s} s)"
        )


def _check_request_claims(claims: dict[str, Any], expected: TokenExpectations) -> None:
    if claims["url"] != expected.url:
        raise TokenRejectedError(
            f"url claim {claims['url']!r} is not the requested URL {expected.url!r}"
        )
    if claims["httpMethod"] != expected.method:
        raise TokenRejectedError(
            f"httpMethod claim {claims['httpMethod']!r} is not {expected.method!r}"
        )


# Request handling ------------------------------------------------------------


@dataclass
class _Exchange:
    """The outcome of one API request, for the stats and the log line."""

    status: str = "?"
    client: str = "-"
    name: str = "-"
    size: str = "-"
    reason: str = ""
    """Why the token was rejected; only logged, because coreplus sends no reason."""


_ApiHandler = Callable[[web.Request, dict[str, Any], _Exchange], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _PendingUpload:
    """A fully received, valid upload waiting to be stored (or not, per a fault)."""

    fields: UploadFields
    json_part: JsonPart
    file_part: FilePart
    client_id: str
    claims: dict[str, Any]
    incoming_path: Path


def _status_messages(message: str) -> dict[str, Any]:
    return {"statusMessages": [{"message": message}]}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(_status_messages(message), status=status, headers=headers)


def _fault_response(fault: Fault | DownMode) -> web.Response:
    assert fault.status is not None  # parse_fault and the down endpoint guarantee it
    headers = {hdrs.RETRY_AFTER: fault.retry_after} if fault.retry_after is not None else None
    if isinstance(fault, Fault) and fault.body is not None:
        content_type = fault.content_type or "text/plain"
        return web.Response(
            status=fault.status, text=fault.body, content_type=content_type, headers=headers
        )
    message = f"the stand-in returned {fault.status} as an injected fault"
    return _error(fault.status, message, headers)


def _disk_name(name: str) -> str:
    """Return a safe single path component for ``name``. The record keeps the real name."""
    safe = name.replace("/", "_").replace("\x00", "_")
    if safe in (".", ".."):
        safe = "_" + safe
    encoded = safe.encode("utf-8", "surrogateescape")
    # Linux filesystems such as ext4 and XFS limit a name to 255 bytes, so cut whole
    # characters to fit.
    return encoded[:255].decode("utf-8", "ignore") if len(encoded) > 255 else safe


class _StandInHandlers:
    """
    The aiohttp handlers, bound to one StandInState.
    """

    def __init__(self, state: StandInState) -> None:
        self.state = state

    async def handle_api(self, request: web.Request) -> web.StreamResponse:
        """Handle one API request, then count and log it."""
        exchange = _Exchange()
        self.state.stats.requests += 1
        try:
            response = await self._route_api(request, exchange)
        except ConnectionError:
            # The client closed the connection while sending the body, so no response
            # can be delivered.
            exchange.status = "disconnected"
            response = web.Response(status=400)
        else:
            if exchange.status == "?":
                exchange.status = str(response.status)
                await asyncio.sleep(self.state.settings.latency_s)
        self.state.stats.by_status[exchange.status] += 1
        logger.info(
            "%s %s %s client=%s name=%r size=%s%s",
            request.method,
            request.path,
            exchange.status,
            exchange.client,
            exchange.name,
            exchange.size,
            f" reason={exchange.reason!r}" if exchange.reason else "",
        )
        return response

    async def _route_api(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        state = self.state
        window = state.record_arrival(time.monotonic())
        if state.down is not None:
            return _fault_response(state.down)
        limit = state.settings.rate_limit_per_s
        if limit and window > limit:
            state.stats.rate_limited += 1
            return _error(
                429, f"rate limit exceeded: {window} requests in one second, the limit is {limit}"
            )
        if _FILE_ROUTE.fullmatch(request.path):
            return await self._authorised(request, "POST", exchange, self._handle_file)
        if _CLIENT_LIST_ROUTE.fullmatch(request.path):
            return await self._authorised(request, "GET", exchange, self._handle_client_list)
        return _error(404, f"no API endpoint at {request.path}")

    async def _authorised(
        self, request: web.Request, method: str, exchange: _Exchange, handler: _ApiHandler
    ) -> web.StreamResponse:
        if request.method != method:
            return _error(
                405, f"{request.method} is not allowed here; use {method}", {hdrs.ALLOW: method}
            )
        header_values = request.headers.getall(hdrs.AUTHORIZATION, [])
        try:
            claims = verify_authorization(header_values, self._expectations(request))
        except TokenRejectedError as exc:
            exchange.reason = str(exc)
            self.state.stats.auth_failures.append(exchange.reason)
            return _error(401, "Invalid token")
        return await handler(request, claims, exchange)

    def _expectations(self, request: web.Request) -> TokenExpectations:
        settings = self.state.settings
        # The url claim must be the URL exactly as the client wrote it, so it is
        # rebuilt from the raw Host header and raw path, not from a parsed URL.
        url = f"{request.scheme}://{request.headers.get(hdrs.HOST, '')}{request.raw_path}"
        return TokenExpectations(
            secret=settings.secret,
            audience=settings.audience,
            consumer_id=settings.consumer_id,
            access_token=settings.access_token,
            url=url,
            method=request.method,
            now_s=self.state.now_s(),
            leeway_s=settings.leeway_s,
        )

    async def _handle_client_list(
        self, request: web.Request, claims: dict[str, Any], exchange: _Exchange
    ) -> web.StreamResponse:
        content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            return _error(400, f"Content-Type must be application/json, got {content_type!r}")
        try:
            page_number = _query_int(request, "pageNumber", default=1)
            page_size = _query_int(request, "pageSize", default=50)
        except ValueError as exc:
            return _error(400, str(exc))
        max_page_size = self.state.settings.max_page_size
        if page_size > max_page_size:
            return _error(400, f"pageSize {page_size} is above the maximum {max_page_size}")
        start = (page_number - 1) * page_size
        paging = {
            "totalRows": len(self.state.clients),
            "pageNumber": page_number,
            "pageSize": page_size,
        }
        clients = self.state.clients[start : start + page_size]
        return web.json_response({"clients": clients, "paging": paging, "statusMessages": []})

    async def _handle_file(
        self, request: web.Request, claims: dict[str, Any], exchange: _Exchange
    ) -> web.StreamResponse:
        problem = _check_framing(request)
        if problem is not None:
            return problem
        try:
            boundary = parse_boundary(request.headers.get(hdrs.CONTENT_TYPE))
        except MultipartError as exc:
            return _error(400, str(exc))
        fault = self.state.take_fault(name=None)
        if fault is not None:
            return self._apply_pre_body_fault(request, fault, exchange)
        incoming_dir = self.state.settings.storage_dir / ".incoming"
        incoming_dir.mkdir(parents=True, exist_ok=True)
        incoming_path = incoming_dir / f"{uuid.uuid4()}.part"
        try:
            return await self._receive_file(request, boundary, claims, incoming_path, exchange)
        finally:
            incoming_path.unlink(missing_ok=True)

    def _apply_pre_body_fault(
        self, request: web.Request, fault: Fault, exchange: _Exchange
    ) -> web.StreamResponse:
        if fault.kind == "reset_before_body":
            return _drop_connection(request, exchange)
        response = _fault_response(fault)
        # Closing the connection stops aiohttp from reading the unread body.
        response.force_close()
        return response

    async def _receive_file(
        self,
        request: web.Request,
        boundary: bytes,
        claims: dict[str, Any],
        incoming_path: Path,
        exchange: _Exchange,
    ) -> web.StreamResponse:
        reader = UploadBodyReader(request.content, boundary)
        try:
            json_part = await reader.read_json_part()
            fields = parse_upload_fields(json_part.raw)
            exchange.name, exchange.size = fields.name, str(fields.size_bytes)
            client = self.state.find_client(fields.primary_domain_key)
            if client is None:
                # coreplus does not document the status for an unknown client, so 404
                # is our choice.
                return _error(404, f"no client with primaryDomainKey {fields.primary_domain_key}")
            exchange.client = client["clientId"]
            with incoming_path.open("wb") as out:
                file_part = await reader.read_file_part(out)
            _check_file_matches(fields, file_part)
        except MultipartError as exc:
            return _error(400, str(exc))
        upload = _PendingUpload(
            fields, json_part, file_part, client["clientId"], claims, incoming_path
        )
        return await self._finish_upload(request, upload, exchange)

    async def _finish_upload(
        self, request: web.Request, upload: _PendingUpload, exchange: _Exchange
    ) -> web.StreamResponse:
        fault = self.state.take_fault(name=upload.fields.name)
        kind = fault.kind if fault is not None else None
        if fault is not None and kind == "status":
            return _fault_response(fault)
        if kind == "reset_after_body":
            return _drop_connection(request, exchange)
        stored = self._store(upload)
        if kind == "reset_after_store":
            return _drop_connection(request, exchange)
        if fault is not None and kind == "slow":
            await asyncio.sleep(fault.seconds)
        if kind == "bad_json_200":
            page = "<html><body>Upload complete</body></html>"
            return web.Response(status=200, text=page, content_type="text/html")
        size_delta = 1 if kind == "wrong_size_200" else 0
        return web.json_response(
            {
                "id": stored.id,
                "name": stored.name,
                "size": stored.size + size_delta,
                "isFolder": False,
                "entity": "Client",
                "primaryDomainKey": upload.fields.primary_domain_key,
            }
        )

    def _store(self, upload: _PendingUpload) -> ReceivedUpload:
        upload_id = str(uuid.uuid4())
        folder = self.state.settings.storage_dir / upload.client_id / upload_id
        folder.mkdir(parents=True)
        stored_path = folder / _disk_name(upload.fields.name)
        os.replace(upload.incoming_path, stored_path)
        received = ReceivedUpload(
            id=upload_id,
            client_id=upload.client_id,
            name=upload.fields.name,
            size=upload.file_part.size_bytes,
            sha256=upload.file_part.sha256,
            json=upload.fields.document,
            part_headers=upload.json_part.header_lines + upload.file_part.header_lines,
            claims=upload.claims,
            received_at=time.time(),
            stored_path=stored_path,
        )
        self.state.received.append(received)
        return received


def _check_framing(request: web.Request) -> web.Response | None:
    if hdrs.TRANSFER_ENCODING in request.headers:
        return _error(
            411,
            f"Transfer-Encoding {request.headers[hdrs.TRANSFER_ENCODING]!r} is not accepted "
            "(411 Length Required): send the body with a Content-Length header",
        )
    if hdrs.CONTENT_LENGTH not in request.headers:
        return _error(411, "the Content-Length header is missing (411 Length Required)")
    return None


def _check_file_matches(fields: UploadFields, file_part: FilePart) -> None:
    if file_part.filename != fields.name:
        raise MultipartError(
            f"the file part's filename {file_part.filename!r} "
            f"differs from the json name {fields.name!r}"
        )
    if file_part.size_bytes != fields.size_bytes:
        raise MultipartError(
            f"the file part has {file_part.size_bytes} bytes "
            f"but the json size is {fields.size_bytes}"
        )


def _drop_connection(request: web.Request, exchange: _Exchange) -> web.Response:
    """Abort the TCP connection so the client sees a reset and no HTTP response."""
    exchange.status = "dropped"
    if request.transport is not None:
        request.transport.abort()
    # aiohttp fails to write this to the aborted transport and treats it as a
    # client disconnect, so nothing reaches the client.
    return web.Response(status=500)


def _query_int(request: web.Request, key: str, default: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) < 1:
        raise ValueError(f"{key} must be a positive integer, got {text!r}")
    return int(text)


# Control endpoints -------------------------------------------------------------


class _ControlHandlers:
    """
    The ``/_standin/`` endpoints: no auth, no rate limit, no latency.
    """

    def __init__(self, state: StandInState) -> None:
        self.state = state

    async def add_faults(self, request: web.Request) -> web.Response:
        """Append the posted faults to the queue."""
        document = await _read_control_json(request)
        entries = document.get("faults") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise web.HTTPBadRequest(text='send a JSON object {"faults": [fault, ...]}')
        try:
            faults = [parse_fault(entry) for entry in entries]
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"invalid fault: {exc}") from exc
        self.state.faults.extend(faults)
        return web.json_response({"queued": len(self.state.faults)})

    async def go_down(self, request: web.Request) -> web.Response:
        """Make every API request return one status until ``/_standin/up``."""
        document = await _read_control_json(request, default={})
        status = document.get("status", 503) if isinstance(document, dict) else None
        retry_after = document.get("retry_after") if isinstance(document, dict) else None
        retry_after = _header_text(retry_after)
        if not _is_error_status(status) or not isinstance(retry_after, (str, type(None))):
            raise web.HTTPBadRequest(
                text='send {"status": 400-599, "retry_after": "<header text or seconds>"}')
        self.state.down = DownMode(status=status, retry_after=retry_after)
        return web.json_response({"down": True})

    async def go_up(self, request: web.Request) -> web.Response:
        """End down mode."""
        self.state.down = None
        return web.json_response({"down": False})

    async def list_received(self, request: web.Request) -> web.Response:
        """List stored uploads in arrival order."""
        return web.json_response([record.to_json() for record in self.state.received])

    async def received_content(self, request: web.Request) -> web.StreamResponse:
        """Send the stored bytes of one upload."""
        upload_id = request.match_info["upload_id"]
        record = self.state.find_received(upload_id)
        if record is None or not record.stored_path.is_file():
            raise web.HTTPNotFound(text=f"no stored upload with id {upload_id}")
        headers = {hdrs.CONTENT_TYPE: "application/octet-stream"}
        return web.FileResponse(record.stored_path, headers=headers)

    async def stats(self, request: web.Request) -> web.Response:
        """Return the request counters."""
        return web.json_response(self.state.stats.to_json())

    async def reset(self, request: web.Request) -> web.Response:
        """Clear received uploads, counters, faults and down mode."""
        self.state.reset()
        return web.json_response({"reset": True})

    async def replace_clients(self, request: web.Request) -> web.Response:
        """Replace the client list."""
        try:
            self.state.clients = normalise_clients(await _read_control_json(request))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        return web.json_response({"clients": len(self.state.clients)})


async def _read_control_json(request: web.Request, default: Any = None) -> Any:
    text = await request.text()
    if not text.strip() and default is not None:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"the body is not valid JSON: {exc}") from exc


def build_app(state: StandInState) -> web.Application:
    """
    Build the aiohttp application serving the API and the control endpoints.
    """
    app = web.Application()
    control = _ControlHandlers(state)
    app.router.add_post("/_standin/faults", control.add_faults)
    app.router.add_post("/_standin/down", control.go_down)
    app.router.add_post("/_standin/up", control.go_up)
    app.router.add_get("/_standin/received", control.list_received)
    app.router.add_get("/_standin/received/{upload_id}/content", control.received_content)
    app.router.add_get("/_standin/stats", control.stats)
    app.router.add_post("/_standin/reset", control.reset)
    app.router.add_put("/_standin/clients", control.replace_clients)
    app.router.add_route("*", "/{path:.*}", _StandInHandlers(state).handle_api)

    async def set_date_header(request: web.Request, response: web.StreamResponse) -> None:
        # The Date header follows the shifted clock so clock-skew checks can be tested.
        response.headers[hdrs.DATE] = email.utils.formatdate(state.now_s(), usegmt=True)

    app.on_response_prepare.append(set_date_header)
    return app


# Running it --------------------------------------------------------------------


class StandIn:
    """
    A running stand-in.

    Attributes:
        url: The base URL, such as ``http://127.0.0.1:8765``.
        state: The live state; in-process tests may read it directly.
    """

    def __init__(self, runner: web.AppRunner, url: str, state: StandInState) -> None:
        self._runner = runner
        self.url = url
        self.state = state

    async def close(self) -> None:
        """Stop listening and close open connections."""
        await self._runner.cleanup()

    async def __aenter__(self) -> StandIn:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def check_loopback_host(host: str) -> None:
    """
    Raise ValueError unless ``host`` is ``localhost`` or a loopback address.
    """
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the stand-in listens on loopback addresses only, got host {host!r}: "
            "it is a test double holding fake patient data; use 127.0.0.1 or ::1"
        )


async def start_standin(
    settings: StandInSettings,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> StandIn:
    """
    Start a stand-in and return it once it accepts connections.

    Args:
        settings: The stand-in's settings. ``storage_dir`` is created if missing.
        host: A loopback address or ``localhost``.
        port: The TCP port; 0 picks a free one, shown in the returned ``url``.
        ssl_context: A server context to serve HTTPS, or None for plain HTTP.

    Raises:
        ValueError: When ``host`` is not loopback or the client list is invalid.
        OSError: When the port cannot be bound.
    """
    check_loopback_host(host)
    state = StandInState(settings)
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    # A short shutdown timeout keeps close() fast when a test leaves a slow fault running.
    runner = web.AppRunner(build_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    scheme = "https" if ssl_context is not None else "http"
    return StandIn(runner, f"{scheme}://{url_host}:{bound_port}", state)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Add the ``stand-in`` command's options to ``parser``.
    """
    listening = parser.add_argument_group("listening")
    listening.add_argument(
        "--port",
        type=int,
        default=8765,
        help="TCP port to listen on; 0 picks a free one (default 8765)",
    )
    listening.add_argument(
        "--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)"
    )
    listening.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain; serve HTTPS (needs --tls-key)"
    )
    listening.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    _add_credential_arguments(parser)
    _add_behaviour_arguments(parser)


def _add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("credentials the tokens must match")
    group.add_argument(
        "--consumer-id",
        default="demo-consumer",
        help="consumerId the tokens must carry (default demo-consumer)",
    )
    group.add_argument(
        "--secret-file",
        type=Path,
        help="file that contains the consumer secret (default: $COREPLUS_SECRET)",
    )
    group.add_argument(
        "--access-token-file",
        type=Path,
        help="file that contains the access token (default: $COREPLUS_ACCESS_TOKEN)",
    )


def _add_behaviour_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and behaviour")
    group.add_argument(
        "--clients", type=Path, help="JSON file with the client list (default: ten demo clients)"
    )
    group.add_argument(
        "--storage", type=Path, help="folder for received files (default: a new temporary folder)"
    )
    group.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="delay added before every API response, in milliseconds (default 0)",
    )
    group.add_argument(
        "--rate-limit",
        type=int,
        default=10,
        help="requests allowed per second; 0 turns the limit off (default 10)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """
    Run the stand-in from parsed arguments until SIGINT or SIGTERM.

    Returns:
        0 after a clean stop, 2 for a usage or configuration error.
    """
    try:
        check_loopback_host(args.host)
        settings = _settings_from_args(args)
        ssl_context = _ssl_context_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"coreplus-uploader stand-in: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    return asyncio.run(_serve(settings, args.host, args.port, ssl_context))


def main(argv: list[str] | None = None) -> int:
    """
    Parse ``argv`` (default ``sys.argv[1:]``) and run the stand-in.
    """
    parser = argparse.ArgumentParser(
        prog="coreplus-uploader stand-in",
        description="Run the local imitation of the coreplus API.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def _settings_from_args(args: argparse.Namespace) -> StandInSettings:
    if args.rate_limit < 0 or args.latency_ms < 0:
        raise ValueError("--rate-limit and --latency-ms must not be negative")
    clients = json.loads(args.clients.read_text("utf-8")) if args.clients else list(DEMO_CLIENTS)
    storage_dir = args.storage or Path(tempfile.mkdtemp(prefix="coreplus-standin-"))
    settings = StandInSettings(
        consumer_id=args.consumer_id,
        secret=_read_credential(args.secret_file, "COREPLUS_SECRET", "--secret-file"),
        access_token=_read_credential(
            args.access_token_file, "COREPLUS_ACCESS_TOKEN", "--access-token-file"
        ),
        storage_dir=storage_dir,
        clients=clients,
        rate_limit_per_s=args.rate_limit,
        latency_s=args.latency_ms / 1000,
    )
    normalise_clients(settings.clients)
    return settings


def _read_credential(path: Path | None, env_name: str, option: str) -> str:
    value = path.read_text("utf-8").strip() if path is not None else os.environ.get(env_name, "")
    if not value:
        source = str(path) if path is not None else f"${env_name}"
        raise ValueError(
            f"{option} is required unless {env_name} is set, and {source} is empty or unset"
        )
    return value


def _ssl_context_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key must be given together")
    if args.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context


async def _serve(
    settings: StandInSettings, host: str, port: int, ssl_context: ssl.SSLContext | None
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        standin = await start_standin(settings, host, port, ssl_context)
    except OSError as exc:
        print(f"coreplus-uploader stand-in: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    print(f"stand-in listening on {standin.url}", flush=True)
    print(f"received files are stored in {settings.storage_dir}", flush=True)
    async with standin:
        await stop.wait()
    print("stand-in stopped", flush=True)
    return 0
