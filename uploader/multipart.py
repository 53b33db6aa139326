"""
Build the multipart/form-data body of a coreplus File upload and stream it.

The body has two parts, ``json`` then ``file``, both with ``Content-Type: text/plain``.
Its length is known before anything is sent, so aiohttp sends ``Content-Length`` and
never chunked transfer encoding. The file is read in ``CHUNK_BYTES`` pieces from a
descriptor opened without following symbolic links, and hashed while it streams.
Just before its last chunk goes out, it is checked against the values recorded when
it settled. A file that changed makes the body raise before the closing boundary, so
the service receives a truncated request and stores nothing.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from uploader.constants import CHUNK_BYTES, ENTITY_CLIENT
from uploader.exceptions import FileChangedError, FileVanishedError

_T = TypeVar("_T")

_CRLF = b"\r\n"

#: Content type of both parts; coreplus accepts text/plain for every kind of file.
PART_CONTENT_TYPE = "text/plain"

# U+FFFD REPLACEMENT CHARACTER replaces each byte that is not valid UTF-8.
_REPLACEMENT = "\ufffd"

# surrogateescape decodes each invalid byte to one lone surrogate in this range,
# which gives exactly one replacement character per bad byte.
_ESCAPED_BYTE_TABLE = {code: _REPLACEMENT for code in range(0xDC80, 0xDD00)}

# O_NONBLOCK keeps open() from hanging if the path was swapped for a FIFO; it has no
# effect on reads from a regular file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

FilePath = str | bytes | Path


def display_name(raw_name: bytes) -> str:
    """
    Convert a file name as stored on disk into the name coreplus shows.

    Each byte that is not valid UTF-8 becomes U+FFFD, and CR and LF become spaces,
    because a part header cannot carry a line break.

    Args:
        raw_name: The file name bytes, without any folder.

    Returns:
        The display name.
    """
    text = raw_name.decode("utf-8", errors="surrogateescape").translate(_ESCAPED_BYTE_TABLE)
    return text.replace("\r", " ").replace("\n", " ")


def content_disposition_filename(name: str) -> str:
    """
    Escape a display name for use between the quotes of ``filename="..."``.

    A backslash and a double quote each get a backslash in front. Everything else
    stays raw UTF-8, as browsers send it, because the .NET service does not decode
    RFC 5987 ``filename*`` parameters or percent-encoding.
    """
    return name.replace("\\", "\\\\").replace('"', '\\"')


def json_part_value(*, name: str, client_id: str, size: int) -> bytes:
    """
    Build the compact JSON value of the ``json`` part.

    ``size`` goes out as a string of digits, as coreplus requires, and
    ``parentFolderId`` is left out so the file lands in the client's top folder.
    """
    fields = {
        "name": name,
        "primaryDomainKey": client_id,
        "size": str(size),
        "entity": ENTITY_CLIENT,
        "isFolder": False,
    }
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _form_head(boundary: bytes, *, name: str, client_id: str, size: int) -> bytes:
    """
    Build every byte of the body that comes before the file's content.
    """
    file_disposition = f'form-data; name="file"; filename="{content_disposition_filename(name)}"'
    lines = [
        b"--" + boundary,
        b'Content-Disposition: form-data; name="json"',
        f"Content-Type: {PART_CONTENT_TYPE}".encode("ascii"),
        b"",
        json_part_value(name=name, client_id=client_id, size=size),
        b"--" + boundary,
        f"Content-Disposition: {file_disposition}".encode(),
        f"Content-Type: {PART_CONTENT_TYPE}".encode("ascii"),
        b"",
        b"",
    ]
    return _CRLF.join(lines)


class FileUploadBody(Payload):
    """
    One streamed File upload body, good for a single request.

    Build a new instance for every try. Await ``open()`` before the request, so that
    a file that vanished or changed is detected before any connection is made. If it
    was not called, the first write opens the file.

    Attributes:
        boundary: The multipart boundary, random unless given.
        body_complete: True once every byte, the closing boundary included, has been
            handed to the connection. The client uses it to separate a failure before
            the body was sent, which is safe to retry, from one after it, when the
            service may have stored the file.
        file_bytes_sent: How many bytes of the file have been handed to the connection.
        local_error: The error from reading or checking the file, if that is what
            stopped the body. aiohttp wraps errors raised while writing a body, so
            the client reads the original from here.
    """

    def __init__(
        self,
        path: FilePath,
        *,
        client_id: str,
        name: str,
        size: int,
        sha256: str,
        mtime_ns: int,
        ctime_ns: int,
        idle_timeout_s: float,
        chunk_bytes: int = CHUNK_BYTES,
        boundary: str | None = None,
    ) -> None:
        """
        Prepare the body; nothing is opened or read yet.

        Args:
            path: The file to send.
            client_id: The client GUID for ``primaryDomainKey``.
            name: The display name (see ``display_name``); it must not contain CR or LF.
            size: The size in bytes recorded when the file settled.
            sha256: The hex SHA-256 recorded when the file settled.
            mtime_ns: The modification time recorded when the file settled.
            ctime_ns: The status change time recorded when the file settled.
            idle_timeout_s: The maximum wait in seconds for the connection to accept
                one chunk.
            chunk_bytes: Bytes read from disk and written per step.
            boundary: The multipart boundary; a random one when None.

        Raises:
            ValueError: ``name`` contains CR or LF, or ``size`` or ``chunk_bytes`` is
                out of range.
        """
        if "\r" in name or "\n" in name:
            raise ValueError("The display name contains CR or LF; pass it through display_name().")
        if size < 0 or chunk_bytes < 1:
            raise ValueError(f"Invalid size {size} or chunk_bytes {chunk_bytes}.")
        self.boundary = boundary or secrets.token_hex(16)
        boundary_bytes = self.boundary.encode("ascii")
        self._head = _form_head(boundary_bytes, name=name, client_id=client_id, size=size)
        self._tail = _CRLF + b"--" + boundary_bytes + b"--" + _CRLF
        super().__init__(path, content_type=f"multipart/form-data; boundary={self.boundary}")
        self._size = len(self._head) + size + len(self._tail)
        self._path = path
        self._expected_size = size
        self._expected_sha256 = sha256.lower()
        self._expected_times_ns = (mtime_ns, ctime_ns)
        self._idle_timeout_s = idle_timeout_s
        self._chunk_bytes = chunk_bytes
        self._fd: int | None = None
        self._hasher = hashlib.sha256()
        self.body_complete = False
        self.file_bytes_sent = 0
        self.local_error: BaseException | None = None

    async def open(self) -> None:
        """
        Open the file and check that it still matches the settled size and times.

        Raises:
            FileVanishedError: The file is gone.
            FileChangedError: The file changed, or the path is now a symbolic link or
                not a regular file.
            PermissionError: The daemon's user may not read the file.
            OSError: Any other failure to open it.
        """
        if self._fd is None:
            self._fd = await self._file_step(self._open_checked)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        """
        Write the whole body to ``writer``; aiohttp calls this once per request.

        ``content_length`` is ignored because aiohttp derives it from ``size``.

        Raises:
            FileChangedError, FileVanishedError, OSError: The file could not be read
                or changed; the closing boundary has not been written.
            TimeoutError: The connection accepted no data for ``idle_timeout_s``.
            RuntimeError: The body was already sent once.
        """
        if self._consumed:
            raise RuntimeError("This upload body was already sent; build a new one per request.")
        self._consumed = True
        try:
            await self.open()
            await self._send(writer, self._head)
            await self._stream_file(writer)
            await self._send(writer, self._tail)
        finally:
            self._close_fd()
        self.body_complete = True

    async def write(self, writer: AbstractStreamWriter) -> None:
        """
        Write the whole body; the form of the call that aiohttp used before 3.12.
        """
        await self.write_with_length(writer, None)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """
        Refuse to turn the body into text, because it is streamed from disk.

        Raises:
            TypeError: Always.
        """
        raise TypeError("A streamed upload body cannot be decoded to text.")

    def _close(self) -> None:
        self._consumed = True
        self._close_fd()

    async def close(self) -> None:
        """
        Close the file descriptor, if it is open.
        """
        self._close()

    async def _stream_file(self, writer: AbstractStreamWriter) -> None:
        # Read one chunk ahead of writing, so the last chunk is known before it goes
        # out and the file can be checked while the request can still be aborted.
        while True:
            chunk = await self._file_step(self._read_and_hash)
            total_read = self.file_bytes_sent + len(chunk)
            if not chunk or total_read >= self._expected_size:
                break
            await self._send(writer, chunk)
            self.file_bytes_sent = total_read
        await self._file_step(self._check_unchanged, total_read)
        if chunk:
            await self._send(writer, chunk)
            self.file_bytes_sent = total_read

    async def _send(self, writer: AbstractStreamWriter, data: bytes) -> None:
        # aiohttp has no write timeout; a peer that stops reading would otherwise
        # hold this upload for ever.
        try:
            await asyncio.wait_for(writer.write(data), timeout=self._idle_timeout_s)
        except TimeoutError as exc:
            raise TimeoutError(
                f"The connection accepted no data for {self._idle_timeout_s} s."
            ) from exc

    async def _file_step(self, function: Callable[..., _T], *args: Any) -> _T:
        # Reads and stats run in a thread, so a slow share does not block the event loop.
        try:
            return await asyncio.to_thread(function, *args)
        except (FileChangedError, FileVanishedError, OSError) as exc:
            self.local_error = exc
            raise

    def _open_checked(self) -> int:
        fd = _open_no_follow(self._path)
        try:
            file_stat = os.fstat(fd)
            if not stat.S_ISREG(file_stat.st_mode):
                raise FileChangedError("The path is no longer a regular file.")
            self._check_stat(file_stat, "opened file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _read_and_hash(self) -> bytes:
        assert self._fd is not None
        chunk = os.read(self._fd, self._chunk_bytes)
        self._hasher.update(chunk)
        return chunk

    def _check_unchanged(self, total_read: int) -> None:
        assert self._fd is not None
        if total_read != self._expected_size:
            raise FileChangedError(
                f"The file's size changed while it was sent: read {total_read} bytes, "
                f"expected {self._expected_size}."
            )
        if os.read(self._fd, 1):
            raise FileChangedError(
                f"The file grew past its settled size of {self._expected_size} bytes while "
                "it was sent."
            )
        if self._hasher.hexdigest() != self._expected_sha256:
            raise FileChangedError("The file's content changed after it was hashed.")
        fd_stat = os.fstat(self._fd)
        path_stat = _stat_no_follow(self._path)
        if (path_stat.st_dev, path_stat.st_ino) != (fd_stat.st_dev, fd_stat.st_ino):
            raise FileChangedError("The file was replaced by another file while it was sent.")
        self._check_stat(fd_stat, "open file")
        self._check_stat(path_stat, "path")

    def _check_stat(self, file_stat: os.stat_result, source: str) -> None:
        found = (file_stat.st_size, file_stat.st_mtime_ns, file_stat.st_ctime_ns)
        expected = (self._expected_size, *self._expected_times_ns)
        if found != expected:
            raise FileChangedError(
                f"The {source} no longer matches the settled file: (size, mtime_ns, ctime_ns) "
                f"is {found}, expected {expected}."
            )

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _open_no_follow(path: FilePath) -> int:
    try:
        return os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanishedError("The file is gone.") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileChangedError(
                "The path is now a symbolic link, which is never followed."
            ) from exc
        raise


def _stat_no_follow(path: FilePath) -> os.stat_result:
    try:
        return os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FileVanishedError("The file was removed while it was sent.") from exc
