"""
Strict, streaming checks of the File upload body for the stand-in.

The stand-in parses the multipart body from raw bytes rather than through a
multipart library, so that every header byte the client sends is compared with
the known-good wire format. The file part is copied to an open file as it
arrives, so memory stays bounded by the read size whatever the upload's size.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

#: Maximum length of one part header line in bytes. An escaped 255-byte name fits.
MAX_HEADER_LINE_BYTES = 8192

#: Maximum header lines in one part. Only two are valid, but the extra room lets the
#: error message show what was sent.
MAX_PART_HEADER_LINES = 8

#: Maximum size of the json part in bytes. The object has six short fields.
MAX_JSON_PART_BYTES = 64 * 1024

#: The json part's header lines, byte for byte, as the vendor's Python sample sends them.
JSON_PART_HEADER_LINES = (
    b'Content-Disposition: form-data; name="json"',
    b"Content-Type: text/plain",
)

FILE_DISPOSITION_PREFIX = b'Content-Disposition: form-data; name="file"; filename="'
FILE_CONTENT_TYPE_LINE = b"Content-Type: text/plain"

ALLOWED_JSON_KEYS = frozenset(
    {"name", "primaryDomainKey", "size", "entity", "parentFolderId", "isFolder"}
)
REQUIRED_JSON_KEYS = ("name", "primaryDomainKey", "size", "entity")

GUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")

# RFC 2046 section 5.1.1: 1 to 70 characters from bchars, and a space may not be last.
_BOUNDARY_PATTERN = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")

# More digits than this cannot be a real file size, and int() of a huge digit
# string is slow and raises past 4300 digits.
_MAX_SIZE_DIGITS = 19


class MultipartError(ValueError):
    """
    A structural problem in the upload body. The message names it for a 400 response.
    """


class ByteSource(Protocol):
    """
    A stream of body bytes, such as aiohttp's ``request.content``.
    """

    async def readany(self) -> bytes:
        """Return the next bytes available, or ``b""`` at the end of the body."""
        ...


@dataclass(frozen=True)
class UploadFields:
    """
    The validated json part of a File upload.
    """

    name: str
    primary_domain_key: str
    """The client GUID exactly as sent (either case)."""
    size_bytes: int
    document: dict[str, Any]
    """The whole parsed json object, for the stand-in's record of what arrived."""


@dataclass(frozen=True)
class JsonPart:
    """
    The json part as received: its header lines and the raw value.
    """

    header_lines: list[str]
    raw: bytes


@dataclass(frozen=True)
class FilePart:
    """
    The file part as received. Its bytes went to the caller's open file.
    """

    header_lines: list[str]
    filename: str
    """The filename parameter with its backslash escapes removed."""
    size_bytes: int
    sha256: str


def parse_boundary(content_type: str | None) -> bytes:
    """
    Return the boundary from a request ``Content-Type`` header.

    Args:
        content_type: The header value, or None when the header is missing.

    Raises:
        MultipartError: Unless the value is ``multipart/form-data; boundary=...``
            with one valid RFC 2046 boundary (quoted or not) and no other parameter.
    """
    expected = "Content-Type must be multipart/form-data; boundary=<boundary>"
    if content_type is None:
        raise MultipartError(f"{expected}, but the header is missing")
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        raise MultipartError(f"{expected}, got {content_type!r}")
    key, equals, value = params.strip().partition("=")
    if key.strip().lower() != "boundary" or not equals or ";" in value:
        raise MultipartError(f"{expected} and no other parameter, got {content_type!r}")
    if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
        value = value[1:-1]
    if not _BOUNDARY_PATTERN.fullmatch(value):
        raise MultipartError(
            f"invalid multipart boundary {value!r}: use 1 to 70 RFC 2046 characters"
        )
    return value.encode("ascii")


def unescape_filename(raw: bytes) -> str:
    """
    Decode the bytes between the quotes of ``filename="..."``.

    Inside the quotes, ``\\"`` is a quote and ``\\\\`` is a backslash. Any other
    backslash, a bare quote, CR, LF or NUL is an error, and so is invalid UTF-8.

    Raises:
        MultipartError: Naming the offending byte.
    """
    out = bytearray()
    index = 0
    while index < len(raw):
        byte = raw[index]
        if byte == 0x5C:
            escaped = raw[index + 1 : index + 2]
            if escaped not in (b'"', b"\\"):
                raise MultipartError(
                    f"invalid escape in filename at byte {index}: only \\\" and \\\\ are allowed"
                )
            out += escaped
            index += 2
            continue
        if byte in (0x22, 0x0D, 0x0A, 0x00):
            raise MultipartError(
                f"invalid byte 0x{byte:02x} in filename at byte {index}: "
                'a quote must be written \\" and CR, LF or NUL cannot appear'
            )
        out.append(byte)
        index += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MultipartError(
            f"filename is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from exc


def parse_upload_fields(raw: bytes) -> UploadFields:
    """
    Validate the json part's value and return its fields.

    Raises:
        MultipartError: When the value is not a JSON object with exactly the
            documented keys and types. The message names the key and the fix.
    """
    document = _load_json_object(raw)
    unknown = sorted(set(document) - ALLOWED_JSON_KEYS)
    if unknown:
        raise MultipartError(
            f"unknown keys in the json part: {', '.join(unknown)}; "
            f"allowed keys are {', '.join(sorted(ALLOWED_JSON_KEYS))}"
        )
    missing = [key for key in REQUIRED_JSON_KEYS if key not in document]
    if missing:
        raise MultipartError(f"missing keys in the json part: {', '.join(missing)}")
    _check_name(document["name"])
    _check_primary_domain_key(document["primaryDomainKey"])
    size_bytes = _parse_size(document["size"])
    _check_optional_fields(document)
    if document["entity"] != "Client":
        raise MultipartError(f'json "entity" must be "Client", got {document["entity"]!r}')
    return UploadFields(
        name=document["name"],
        primary_domain_key=document["primaryDomainKey"],
        size_bytes=size_bytes,
        document=document,
    )


def _load_json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        document = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except UnicodeDecodeError as exc:
        raise MultipartError(f"the json part is not valid UTF-8: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise MultipartError(f"the json part is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MultipartError(f"the json part must be a JSON object, got {type(document).__name__}")
    return document


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise MultipartError(f"duplicate key {key!r} in the json part")
        document[key] = value
    return document


def _reject_constant(name: str) -> Any:
    raise MultipartError(f"invalid JSON constant {name} in the json part")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise MultipartError(f'json "name" must be a non-empty string, got {name!r}')


def _check_primary_domain_key(key: Any) -> None:
    if not isinstance(key, str) or not GUID_PATTERN.fullmatch(key):
        raise MultipartError(
            f'json "primaryDomainKey" must be a client GUID string '
            f"such as 88e372b5-e985-4084-8f69-c888f995fbcc, got {key!r}"
        )


def _parse_size(size: Any) -> int:
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        raise MultipartError(
            f'json "size" must be a string of decimal digits such as "{size}", '
            f"got the number {size}"
        )
    if not isinstance(size, str) or not re.fullmatch(rf"[0-9]{{1,{_MAX_SIZE_DIGITS}}}", size):
        raise MultipartError(f'json "size" must be a string of decimal digits, got {size!r}')
    return int(size)


def _check_optional_fields(document: dict[str, Any]) -> None:
    parent = document.get("parentFolderId")
    parent_is_guid = isinstance(parent, str) and GUID_PATTERN.fullmatch(parent)
    if parent not in (None, "") and not parent_is_guid:
        raise MultipartError(
            f'json "parentFolderId" must be null, "" or a folder GUID, got {parent!r}'
        )
    is_folder = document.get("isFolder", False)
    if is_folder is not False:
        raise MultipartError(f'json "isFolder" must be false for a file upload, got {is_folder!r}')


class _Buffer:
    """
    Bytes read ahead from a ByteSource, consumed from the front.
    """

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._data = bytearray()

    async def _fill(self) -> None:
        chunk = await self._source.readany()
        if not chunk:
            raise MultipartError("the body ended before the closing boundary --<boundary>--")
        self._data += chunk

    async def read_exact(self, count: int) -> bytes:
        while len(self._data) < count:
            await self._fill()
        return self._take(count, skip=0)

    async def read_until(self, delimiter: bytes, limit: int, what: str) -> bytes:
        """Return the bytes before ``delimiter`` and consume both."""
        searched = 0
        while (index := self._data.find(delimiter, searched)) < 0:
            if len(self._data) > limit + len(delimiter):
                raise MultipartError(f"{what} is longer than {limit} bytes")
            searched = max(0, len(self._data) - len(delimiter) + 1)
            await self._fill()
        if index > limit:
            raise MultipartError(f"{what} is longer than {limit} bytes")
        return self._take(index, skip=len(delimiter))

    async def copy_until(self, delimiter: bytes, write: Callable[[bytes], None]) -> None:
        """Pass every byte before ``delimiter`` to ``write`` and consume the delimiter."""
        # Bytes that could be the start of a delimiter split across reads stay in
        # the buffer, so everything before them can be written out at once.
        keep = len(delimiter) - 1
        while (index := self._data.find(delimiter)) < 0:
            if len(self._data) > keep:
                write(self._take(len(self._data) - keep, skip=0))
            await self._fill()
        write(self._take(index, skip=len(delimiter)))

    async def read_rest(self, limit: int) -> bytes:
        """Return what is left of the body, raising past ``limit`` bytes."""
        while len(self._data) <= limit:
            chunk = await self._source.readany()
            if not chunk:
                return self._take(len(self._data), skip=0)
            self._data += chunk
        raise MultipartError("unexpected data after the closing boundary")

    def _take(self, count: int, skip: int) -> bytes:
        taken = bytes(self._data[:count])
        del self._data[: count + skip]
        return taken


class UploadBodyReader:
    """
    Read a File upload body part by part, checking its structure exactly.

    Call :meth:`read_json_part` then :meth:`read_file_part`, once each. Every
    method raises :class:`MultipartError` on the first structural problem.
    """

    def __init__(self, source: ByteSource, boundary: bytes) -> None:
        self._buffer = _Buffer(source)
        self._boundary = boundary
        self._delimiter = b"\r\n--" + boundary

    async def read_json_part(self) -> JsonPart:
        """
        Check the opening boundary and the json part's headers, and return the part.
        """
        opening = b"--" + self._boundary + b"\r\n"
        if await self._buffer.read_exact(len(opening)) != opening:
            raise MultipartError(
                "the body must start with --<boundary> and CRLF, with no preamble, "
                "using the boundary from Content-Type"
            )
        lines = await self._read_header_lines()
        _check_json_headers(lines)
        raw = await self._buffer.read_until(self._delimiter, MAX_JSON_PART_BYTES, "the json part")
        after = await self._buffer.read_exact(2)
        if after == b"--":
            raise MultipartError("the body has only the json part; the file part must follow it")
        if after != b"\r\n":
            raise MultipartError("a boundary line must end with CRLF right after the boundary")
        return JsonPart(header_lines=_decode_lines(lines), raw=raw)

    async def read_file_part(self, out: BinaryIO) -> FilePart:
        """
        Check the file part's headers, copy its bytes to ``out`` and check the end.

        Args:
            out: An open binary file that receives the file bytes as they arrive.
        """
        lines = await self._read_header_lines()
        filename = _check_file_headers(lines)
        digest = hashlib.sha256()
        size_bytes = 0

        def write(chunk: bytes) -> None:
            nonlocal size_bytes
            out.write(chunk)
            digest.update(chunk)
            size_bytes += len(chunk)

        await self._buffer.copy_until(self._delimiter, write)
        await self._check_closing()
        return FilePart(
            header_lines=_decode_lines(lines),
            filename=filename,
            size_bytes=size_bytes,
            sha256=digest.hexdigest(),
        )

    async def _check_closing(self) -> None:
        after = await self._buffer.read_exact(2)
        if after == b"\r\n":
            raise MultipartError("the body has more than two parts; send only json then file")
        if after != b"--":
            raise MultipartError(
                "the file part must be followed by the closing boundary --<boundary>--"
            )
        if await self._buffer.read_rest(limit=2) not in (b"", b"\r\n"):
            raise MultipartError("unexpected data after the closing boundary")

    async def _read_header_line(self) -> bytes:
        return await self._buffer.read_until(b"\r\n", MAX_HEADER_LINE_BYTES, "a part header line")

    async def _read_header_lines(self) -> list[bytes]:
        lines: list[bytes] = []
        while line := await self._read_header_line():
            if len(lines) == MAX_PART_HEADER_LINES:
                raise MultipartError(f"a part has more than {MAX_PART_HEADER_LINES} header lines")
            lines.append(line)
        return lines


def _check_json_headers(lines: list[bytes]) -> None:
    if tuple(lines) == JSON_PART_HEADER_LINES:
        return
    if lines and lines[0].startswith(b'Content-Disposition: form-data; name="file"'):
        raise MultipartError(
            "the parts are in the wrong order: the json part must come before the file part"
        )
    raise MultipartError(
        "the json part's headers must be exactly "
        f"{_show(list(JSON_PART_HEADER_LINES))}, got {_show(lines)}"
    )


def _check_file_headers(lines: list[bytes]) -> str:
    """Return the unescaped filename when the file part's headers are exact."""
    if lines and lines[0] == JSON_PART_HEADER_LINES[0]:
        raise MultipartError("the body has two json parts; the second part must be the file part")
    disposition = lines[0] if lines else b""
    exact = (
        len(lines) == 2
        and lines[1] == FILE_CONTENT_TYPE_LINE
        and disposition.startswith(FILE_DISPOSITION_PREFIX)
        and disposition.endswith(b'"')
        and len(disposition) > len(FILE_DISPOSITION_PREFIX) + 1
    )
    if not exact:
        template = [FILE_DISPOSITION_PREFIX + b'<name>"', FILE_CONTENT_TYPE_LINE]
        raise MultipartError(
            f"the file part's headers must be exactly {_show(template)} "
            f"with a non-empty name, got {_show(lines)}"
        )
    return unescape_filename(disposition[len(FILE_DISPOSITION_PREFIX) : -1])


def _decode_lines(lines: list[bytes]) -> list[str]:
    return [line.decode("utf-8", "surrogateescape") for line in lines]


def _show(lines: list[bytes]) -> str:
    return repr(_decode_lines(lines))
