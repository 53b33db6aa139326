"""
Send requests to the coreplus API and classify every outcome into a result or one of
the exceptions in ``uploader.exceptions``.

This module does not deal with drop folders or the ledger. ``CoreplusClient.upload``
makes exactly one try; ``uploader.retry.upload_with_retry`` repeats it. How each
response and each connection failure is classified:

- 2xx with a JSON object holding an ``id`` and the expected ``size``: ``UploadResult``.
- 2xx that is not such JSON: ``UncertainUploadError``.
- 401 or 403, or a TLS certificate that is not trusted: ``ServicePausedError``.
- 408, 429 and 5xx: ``RetryableUploadError``; 429 and 503 also slow the rate limiter.
- Any other 3xx or 4xx: ``PermanentUploadError``.
- A connection that fails before the whole body was written: ``RetryableUploadError``.
- A connection lost, or no response within the idle timeout, after the whole body was
  written: ``UncertainUploadError``, because the service may have stored the file.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from uploader import __version__ as _package_version
from uploader.auth import authorization_header, mint_token
from uploader.constants import CLIENT_LIST_PATH_TEMPLATE, FILE_PATH_TEMPLATE
from uploader.credentials import Credentials
from uploader.exceptions import (
    ConfigError,
    PermanentUploadError,
    RetryableUploadError,
    ServicePausedError,
    UncertainUploadError,
    UploadError,
)
from uploader.multipart import FileUploadBody
from uploader.ratelimit import RateLimiter
from uploader.retry import parse_retry_after

#: How much of an error response's body is kept for the reason file and logs.
ERROR_BODY_MAX_CHARS = 2000

# How much of the body goes into an exception's one-line message.
_MESSAGE_BODY_MAX_CHARS = 200

_USER_AGENT = f"coreplus-uploader/{_package_version}"

_LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True, kw_only=True)
class ApiSettings:
    """
    The ``[api]`` settings the client needs; the daemon maps its configuration onto it.
    """

    base_url: str
    """The service's base URL, e.g. ``https://api.coreplus.com.au``."""
    issuer: str
    """The ``iss`` claim: the clinic's or integrator's web site URL."""
    version: str = "v2.1"
    """The File endpoint version."""
    client_list_version: str = "v2"
    """The Client list endpoint version."""
    audience: str = "https://coreplus.com.au"
    """The ``aud`` claim."""
    clock_leeway_s: int = 5
    """Seconds by which ``nbf`` is set in the past."""
    connect_timeout_s: float = 15.0
    """The maximum wait in seconds for a connection."""
    idle_timeout_s: float = 60.0
    """The maximum silence in seconds while sending the body or waiting for the response."""
    ca_file: Path | None = None
    """An extra CA bundle (PEM) trusted besides the system store."""
    proxy: str | None = None
    """An HTTPS proxy URL; when None, ``HTTPS_PROXY`` from the environment is used."""


@dataclass(frozen=True)
class UploadRequest:
    """
    One file to upload and the values recorded when it settled.
    """

    path: str | bytes | Path
    """The file; bytes keep a name that is not valid UTF-8 intact."""
    client_id: str
    """The client GUID in lower case."""
    name: str
    """The display name (see ``uploader.multipart.display_name``)."""
    size: int
    """The size in bytes."""
    sha256: str
    """The SHA-256 in hex."""
    mtime_ns: int
    """The modification time in nanoseconds."""
    ctime_ns: int
    """The status change time in nanoseconds."""


@dataclass(frozen=True)
class UploadResult:
    """
    A file the service accepted.
    """

    remote_id: str
    """The id coreplus gave the stored file."""
    size: int
    """The size the service reported, equal to the request's size."""
    elapsed_s: float
    """Seconds from sending the request to reading the response, for the last try."""
    server_date: datetime | None
    """The response's Date header, for the clock check."""
    attempts: int = field(default=1)
    """How many tries it took; set by ``upload_with_retry``."""


def normalise_base_url(base_url: str) -> str:
    """
    Validate ``api.base_url`` and return it in the form that token URLs are built from.

    The scheme and host are lower case, a default port and a trailing slash are
    removed. Plain ``http://`` is accepted only for a loopback host (127.0.0.0/8, ::1,
    localhost), so tokens and patient files never cross a network unencrypted.

    Raises:
        ConfigError: The URL is invalid, has a query or fragment, or uses http://
            towards a host that is not loopback.
    """
    try:
        url = URL(base_url.strip())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"api.base_url {base_url!r} is not a valid URL: {exc}.") from exc
    if url.scheme not in ("https", "http") or not url.host:
        raise ConfigError(
            f"api.base_url {base_url!r} must be an https:// URL with a host, "
            "for example https://api.coreplus.com.au."
        )
    if url.query_string or url.fragment:
        raise ConfigError(
            f"api.base_url {base_url!r} must not contain a query or fragment; "
            "remove everything from '?' or '#'."
        )
    if url.scheme == "http" and not _is_loopback(url.host):
        raise ConfigError(
            f"api.base_url {base_url!r} uses plain http://, which would send tokens and "
            "patient files unencrypted. Use https://; http:// is accepted only for "
            "127.0.0.1, ::1 or localhost (the stand-in)."
        )
    default_port = 443 if url.scheme == "https" else 80
    port = f":{url.explicit_port}" if url.explicit_port not in (None, default_port) else ""
    return f"{url.scheme}://{url.host_subcomponent}{port}{url.raw_path.rstrip('/')}"


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """
    Build a verifying TLS context from the system store plus ``ca_file`` if given.

    Raises:
        ConfigError: ``ca_file`` cannot be read or contains no valid certificate.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"api.ca_file {str(ca_file)!r} could not be loaded ({exc}); "
                "point it at a readable PEM file of CA certificates."
            ) from exc
    return context


def create_session(settings: ApiSettings, *, connection_limit: int) -> aiohttp.ClientSession:
    """
    Create the one HTTP session the daemon uses for its whole life.

    There is no total timeout, so a large upload takes as long as it needs; only
    connecting and each silence while reading are bounded. When ``settings.proxy``
    is None the session honours ``HTTPS_PROXY`` and ``NO_PROXY`` from the environment.
    Call it inside a running event loop, and close the session on shutdown.

    Args:
        settings: The API settings.
        connection_limit: Open connections at most, normally the number of workers.

    Raises:
        ConfigError: ``base_url`` or ``ca_file`` is invalid.
    """
    normalise_base_url(settings.base_url)
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout_s, sock_read=settings.idle_timeout_s
    )
    connector = aiohttp.TCPConnector(
        limit=connection_limit, ssl=create_ssl_context(settings.ca_file)
    )
    # trust_env stays off: besides the proxy variables it makes aiohttp read ~/.netrc,
    # and a netrc entry for the service's host makes every request fail, because aiohttp
    # will not combine netrc credentials with our Authorization header. The proxy from
    # the environment is applied per request instead (see environment_proxy).
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,
        headers={"User-Agent": _USER_AGENT},
    )


def environment_proxy(url: str) -> str | None:
    """
    Return the proxy that HTTPS_PROXY (or HTTP_PROXY for http URLs) names for ``url``,
    or None when unset or when NO_PROXY excludes the URL's host.
    """
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return proxies.get(parts.scheme)


class CoreplusClient:
    """
    Make single requests to the coreplus API and classify their outcome.

    Every request waits for the shared ``RateLimiter`` and carries a token minted for
    its method and exact URL. No token, secret or Authorization header is logged or
    put in an exception message.

    Attributes:
        file_url: The File endpoint URL, as put in the token's ``url`` claim.
        last_server_date: The Date header of the last response of any kind, or None
            if it had none, so the daemon can check clock skew.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: ApiSettings,
        credentials: Credentials,
        limiter: RateLimiter,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        Wire the client to its session, settings, credentials and shared limiter.

        Args:
            session: The session from ``create_session`` (or any ClientSession).
            settings: The API settings.
            credentials: The consumer id, secret and access token.
            limiter: The rate limiter shared by every request.
            clock: UTC unix time source for token times and Retry-After dates.

        Raises:
            ConfigError: ``settings.base_url`` is invalid.
        """
        self._session = session
        self._settings = settings
        self._credentials = credentials
        self._limiter = limiter
        self._clock = clock
        base_url = normalise_base_url(settings.base_url)
        self.file_url = base_url + FILE_PATH_TEMPLATE.format(version=settings.version)
        self._client_list_url = base_url + CLIENT_LIST_PATH_TEMPLATE.format(
            version=settings.client_list_version
        )
        self.last_server_date: datetime | None = None
        # Read once, because the environment of a running service does not change. Parsing
        # it for every request took about 4 % of the event loop's busy time in a profile.
        self._proxy = settings.proxy or environment_proxy(settings.base_url)

    async def upload(
        self, request: UploadRequest, *, before_send: Callable[[], Awaitable[None]] | None = None
    ) -> UploadResult:
        """
        Upload one file in a single try.

        Args:
            request: What to upload.
            before_send: Awaited once the rate limiter admits the request and before
                any byte is sent, so the caller can record that the upload starts only
                when it really does. An exception from it ends the try unsent.

        Returns:
            The service's id for the stored file, with ``attempts`` = 1.

        Raises:
            RetryableUploadError, UncertainUploadError, ServicePausedError,
                PermanentUploadError: See the module docstring.
            FileChangedError: The file changed before or while it was sent; the
                request was cut off before its closing boundary.
            FileVanishedError: The file is gone.
            PermissionError: The file cannot be read by the daemon's user.
            OSError: Another error reading the file.
        """
        body = FileUploadBody(
            request.path,
            client_id=request.client_id,
            name=request.name,
            size=request.size,
            sha256=request.sha256,
            mtime_ns=request.mtime_ns,
            ctime_ns=request.ctime_ns,
            idle_timeout_s=self._settings.idle_timeout_s,
        )
        try:
            # Opening first means a vanished or changed file costs no request.
            await body.open()
            return await self._post_file(body, request, before_send)
        finally:
            await body.close()

    async def list_clients(self, page_number: int = 1, page_size: int = 50) -> dict[str, Any]:
        """
        Fetch one page of the Client list.

        Returns:
            The decoded JSON object: ``clients``, ``paging`` and ``statusMessages``.

        Raises:
            RetryableUploadError, ServicePausedError, PermanentUploadError: As for an
                upload. A lost connection is always retryable here, because a GET
                changes nothing.
            UncertainUploadError: A 2xx response that is not a JSON object.
        """
        if page_number < 1 or page_size < 1:
            raise ValueError(
                f"page_number ({page_number}) and page_size ({page_size}) must be at least 1."
            )
        # The url claim must match the request byte for byte, so the query is written
        # here and passed pre-encoded; aiohttp would otherwise normalise it.
        url = f"{self._client_list_url}?pageNumber={page_number}&pageSize={page_size}"
        await self._limiter.acquire()
        headers = self._headers("GET", url)
        # coreplus expects this header on its JSON endpoints even for a GET.
        headers["Content-Type"] = "application/json"
        try:
            async with self._session.get(
                URL(url, encoded=True), headers=headers, **self._request_options()
            ) as response:
                return await self._read_json_response(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _connection_error(
                exc, body_complete=False, idle_timeout_s=self._settings.idle_timeout_s
            ) from exc

    async def probe(self) -> None:
        """
        Check that the service accepts the credentials, with the smallest request.

        Raises:
            UploadError: The classified failure, as for ``list_clients``.
        """
        await self.list_clients(1, 1)

    async def _post_file(self, body: FileUploadBody, request: UploadRequest,
                         before_send: Callable[[], Awaitable[None]] | None) -> UploadResult:
        url = self.file_url
        await self._limiter.acquire()
        if before_send is not None:
            await before_send()
        started_s = time.monotonic()
        try:
            async with self._session.post(
                URL(url, encoded=True),
                data=body,
                headers=self._headers("POST", url),
                **self._request_options(),
            ) as response:
                return await self._read_upload_response(response, request, started_s)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if body.local_error is not None:
                raise body.local_error from exc
            raise _connection_error(
                exc, body_complete=body.body_complete, idle_timeout_s=self._settings.idle_timeout_s
            ) from exc

    def _headers(self, method: str, url: str) -> dict[str, str]:
        token = mint_token(
            credentials=self._credentials,
            issuer=self._settings.issuer,
            audience=self._settings.audience,
            method=method,
            url=url,
            leeway_s=self._settings.clock_leeway_s,
            now_s=self._clock(),
        )
        return {"Authorization": authorization_header(token), "Accept": "application/json"}

    def _request_options(self) -> dict[str, Any]:
        # A redirect would resend neither the body nor a token valid for the new URL.
        options: dict[str, Any] = {"allow_redirects": False}
        if self._proxy is not None:
            options["proxy"] = self._proxy
        return options

    async def _read_upload_response(
        self, response: aiohttp.ClientResponse, request: UploadRequest, started_s: float
    ) -> UploadResult:
        self.last_server_date = _server_date(response)
        if not 200 <= response.status < 300:
            raise await self._error_for_response(response)
        try:
            raw_body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UncertainUploadError(
                f"coreplus returned HTTP {response.status} but its body could not be read "
                f"({_describe(exc)}), so the file may or may not be stored.",
                status=response.status,
            ) from exc
        remote_id, size = _parse_upload_response(raw_body, response.status, request.size)
        self._limiter.record_success()
        return UploadResult(
            remote_id=remote_id,
            size=size,
            elapsed_s=time.monotonic() - started_s,
            server_date=self.last_server_date,
        )

    async def _read_json_response(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        self.last_server_date = _server_date(response)
        if not 200 <= response.status < 300:
            raise await self._error_for_response(response)
        raw_body = await response.read()
        data = _decode_json_object(raw_body)
        if data is None:
            raise UncertainUploadError(
                f"coreplus returned HTTP {response.status} with a body that is not a JSON "
                f"object: {_snippet(raw_body)}",
                status=response.status,
                body=_error_body(raw_body),
            )
        self._limiter.record_success()
        return data

    async def _error_for_response(self, response: aiohttp.ClientResponse) -> UploadError:
        raw_body = await _read_body_or_empty(response)
        retry_after_s = parse_retry_after(response.headers.get("Retry-After"), self._clock())
        if response.status in (429, 503):
            self._limiter.slow_down(retry_after_s)
        return classify_status(
            response.status,
            raw_body,
            retry_after_s=retry_after_s,
            location=response.headers.get("Location"),
        )


def classify_status(
    status: int,
    raw_body: bytes,
    *,
    retry_after_s: float | None = None,
    location: str | None = None,
) -> UploadError:
    """
    Turn a response that is not 2xx into the exception the daemon acts on.

    Args:
        status: The HTTP status.
        raw_body: The response's body; the first ``ERROR_BODY_MAX_CHARS`` are kept.
        retry_after_s: The parsed Retry-After, if any.
        location: The Location header of a redirect, if any.

    Returns:
        The exception to raise, carrying status, body and retry_after_s.
    """
    details = {"status": status, "body": _error_body(raw_body), "retry_after_s": retry_after_s}
    snippet = _snippet(raw_body)
    if status in (401, 403):
        return ServicePausedError(
            f"coreplus rejected the credentials with HTTP {status}: {snippet} Check "
            "api.consumer_id, the secret and the access token, and that the system clock "
            "is synchronised. An access token expires 12 or 24 months after it was "
            "granted; renew it in coreplus under Setup > Add-Ons.",
            **details,
        )
    if status in (408, 429) or status >= 500:
        wait = "" if retry_after_s is None else f" It asked for a wait of {retry_after_s:g} s."
        return RetryableUploadError(
            f"coreplus returned HTTP {status}, a temporary failure.{wait} {snippet}", **details
        )
    if 300 <= status < 400:
        return PermanentUploadError(
            f"coreplus returned HTTP {status}, a redirect to {location!r}, which is never "
            "followed. Check api.base_url and api.version.",
            **details,
        )
    if 400 <= status < 500:
        return PermanentUploadError(
            f"coreplus rejected the request with HTTP {status}: {snippet}", **details
        )
    return UncertainUploadError(f"coreplus returned an unexpected HTTP {status}.", **details)


def _parse_upload_response(raw_body: bytes, status: int, expected_size: int) -> tuple[str, int]:
    data = _decode_json_object(raw_body)
    details = {"status": status, "body": _error_body(raw_body)}
    if data is None:
        raise UncertainUploadError(
            f"coreplus returned HTTP {status} with a body that is not a JSON object, so "
            f"the file may or may not be stored: {_snippet(raw_body)}",
            **details,
        )
    size = _size_value(data.get("size"))
    if size != expected_size:
        raise UncertainUploadError(
            f"coreplus returned HTTP {status} with size {data.get('size')!r}, expected "
            f"{expected_size}; the stored file may be incomplete.",
            **details,
        )
    remote_id = data.get("id")
    if not isinstance(remote_id, str) or not remote_id:
        raise UncertainUploadError(
            f"coreplus returned HTTP {status} without a file id: {_snippet(raw_body)}",
            **details,
        )
    return remote_id, size


def _decode_json_object(raw_body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw_body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _size_value(value: object) -> int | None:
    # coreplus documents size as a number in responses, but a string of digits is
    # accepted too because the request sends it that way.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _connection_error(
    exc: BaseException, *, body_complete: bool, idle_timeout_s: float
) -> UploadError:
    if _is_certificate_error(exc):
        return ServicePausedError(
            f"The service's TLS certificate is not trusted ({_describe(exc)}). If the "
            "clinic's network inspects HTTPS, set api.ca_file to its CA bundle; otherwise "
            "check api.base_url and the system clock."
        )
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return ServicePausedError(
            f"The proxy refused the connection with HTTP {exc.status}; check api.proxy "
            "(or HTTPS_PROXY) and the proxy's credentials.",
            status=exc.status,
        )
    if body_complete and isinstance(exc, TimeoutError):
        return UncertainUploadError(
            f"No response arrived within api.idle_timeout_seconds ({idle_timeout_s:g} s) after "
            "the whole file was sent, so coreplus may have stored it."
        )
    if body_complete:
        return UncertainUploadError(
            "The whole file was sent but the connection failed before a response arrived "
            f"({_describe(exc)}), so coreplus may have stored it."
        )
    return RetryableUploadError(
        f"The connection failed before the request was completely sent ({_describe(exc)})."
    )


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(
            seen, (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _read_body_or_empty(response: aiohttp.ClientResponse) -> bytes:
    # An error response whose body breaks off is still classified by its status.
    try:
        return await response.read()
    except (aiohttp.ClientError, TimeoutError):
        return b""


def _server_date(response: aiohttp.ClientResponse) -> datetime | None:
    value = response.headers.get("Date")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _error_body(raw_body: bytes) -> str:
    return raw_body.decode("utf-8", errors="replace")[:ERROR_BODY_MAX_CHARS]


def _snippet(raw_body: bytes) -> str:
    text = " ".join(raw_body.decode("utf-8", errors="replace").split())
    if len(text) > _MESSAGE_BODY_MAX_CHARS:
        text = text[:_MESSAGE_BODY_MAX_CHARS] + "..."
    return text or "(empty body)"
