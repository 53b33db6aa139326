"""
Tests for uploader.multipart: display names, filename escaping, the exact body bytes,
and the checks that stop a body before its closing boundary.

The body is written into a small collecting writer that replaces aiohttp's connection
writer, which is the boundary of this module. test_client.py covers the real HTTP path.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from uploader.exceptions import FileChangedError, FileVanishedError
from uploader.multipart import (
    FileUploadBody,
    content_disposition_filename,
    display_name,
    json_part_value,
)

CLIENT_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


class CollectingWriter:
    """
    Collects what a body writes, in the shape of aiohttp's stream writer.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, chunk: bytes) -> None:
        self.chunks.append(bytes(chunk))

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class HookedWriter(CollectingWriter):
    """
    Calls a hook after the given number of writes, to change the file mid-stream.
    """

    def __init__(self, after_writes: int, hook: object) -> None:
        super().__init__()
        self._after_writes = after_writes
        self._hook = hook

    async def write(self, chunk: bytes) -> None:
        await super().write(chunk)
        if len(self.chunks) == self._after_writes:
            self._hook()  # type: ignore[operator]


class StalledWriter:
    """
    A connection that never accepts data.
    """

    async def write(self, chunk: bytes) -> None:
        await asyncio.Event().wait()


def _body_for(path: Path | bytes, name: str = "report.pdf", **overrides: object) -> FileUploadBody:
    """
    Build a body whose expected values are the file's current ones.

    The file is read for its hash only when ``sha256`` is not given, so a FIFO
    can be passed with a ``sha256`` without blocking the test.
    """
    file_stat = os.stat(path)
    if "sha256" in overrides:
        digest = overrides.pop("sha256")
    else:
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
    options: dict[str, object] = dict(
        client_id=CLIENT_ID,
        name=name,
        size=file_stat.st_size,
        sha256=digest,
        mtime_ns=file_stat.st_mtime_ns,
        ctime_ns=file_stat.st_ctime_ns,
        idle_timeout_s=5.0,
    )
    options.update(overrides)
    return FileUploadBody(path, **options)  # type: ignore[arg-type]


def _write_file(tmp_path: Path, content: bytes, name: str = "f.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"plain.pdf", "plain.pdf"),
        ('Zoë O\'Brien – referral.pdf'.encode(), 'Zoë O\'Brien – referral.pdf'),
        ("紹介状.pdf".encode(), "紹介状.pdf"),
        (b"line\r\nbreak.txt", "line  break.txt"),
        (b"cr\rlf\n.txt", "cr lf .txt"),
        (b"bad\xff.pdf", "bad\ufffd.pdf"),
        # A truncated three-byte sequence is two bad bytes, so two replacements.
        (b"cut\xe2\x82.pdf", "cut\ufffd\ufffd.pdf"),
        (b"latin1 caf\xe9.doc", "latin1 caf\ufffd.doc"),
        (b'quote".txt', 'quote".txt'),
    ],
)
def test_display_name_table(raw: bytes, expected: str) -> None:
    """Bad UTF-8 bytes become one U+FFFD each, CR and LF spaces, the rest is kept."""
    assert display_name(raw) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain.pdf", "plain.pdf"),
        ('say "hi".txt', 'say \\"hi\\".txt'),
        ("back\\slash.txt", "back\\\\slash.txt"),
        ('both\\".txt', 'both\\\\\\".txt'),
        ("Zoë O'Brien – referral.pdf", "Zoë O'Brien – referral.pdf"),
        ("紹介状.pdf", "紹介状.pdf"),
        ("100% sure.pdf", "100% sure.pdf"),
    ],
)
def test_filename_escaping_table(name: str, expected: str) -> None:
    """Only backslash and double quote are escaped; UTF-8 and % stay raw."""
    assert content_disposition_filename(name) == expected


def test_json_part_compact_fields() -> None:
    """The json part is compact JSON with size as a digit string and raw UTF-8."""
    value = json_part_value(name="Zoë.pdf", client_id=CLIENT_ID, size=38)
    assert value == (
        '{"name":"Zoë.pdf","primaryDomainKey":"' + CLIENT_ID + '","size":"38",'
        '"entity":"Client","isFolder":false}'
    ).encode("utf-8")


async def test_body_exact_bytes(tmp_path: Path) -> None:
    """A small file with a quoted non-ASCII name produces exactly the hand-written body."""
    path = _write_file(tmp_path, b"hello world")
    body = _body_for(path, name='Zoë "Q".txt', boundary="testboundary")
    writer = CollectingWriter()

    await body.write_with_length(writer, None)

    expected = (
        b"--testboundary\r\n"
        b'Content-Disposition: form-data; name="json"\r\n'
        b"Content-Type: text/plain\r\n"
        b"\r\n"
        b'{"name":"Zo\xc3\xab \\"Q\\".txt","primaryDomainKey":"' + CLIENT_ID.encode() + b'",'
        b'"size":"11","entity":"Client","isFolder":false}\r\n'
        b"--testboundary\r\n"
        b'Content-Disposition: form-data; name="file"; filename="Zo\xc3\xab \\"Q\\".txt"\r\n'
        b"Content-Type: text/plain\r\n"
        b"\r\n"
        b"hello world\r\n"
        b"--testboundary--\r\n"
    )
    assert writer.data == expected
    assert body.size == len(expected)
    assert body.body_complete is True
    assert body.file_bytes_sent == 11


def test_body_content_type_header(tmp_path: Path) -> None:
    """The body's content type names multipart/form-data and its random boundary."""
    path = _write_file(tmp_path, b"x")
    first = _body_for(path)
    second = _body_for(path)
    assert first.content_type == f"multipart/form-data; boundary={first.boundary}"
    assert first.boundary != second.boundary
    assert len(first.boundary) >= 32


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096])
async def test_body_size_equals_bytes_written(tmp_path: Path, size: int) -> None:
    """For sizes around the chunk size, size (the Content-Length) equals the bytes written."""
    content = os.urandom(size)
    path = _write_file(tmp_path, content)
    body = _body_for(path, chunk_bytes=4096)
    writer = CollectingWriter()

    await body.write_with_length(writer, None)

    assert len(writer.data) == body.size
    assert writer.data.endswith(content + b"\r\n--" + body.boundary.encode() + b"--\r\n")


async def test_body_streams_in_chunks(tmp_path: Path) -> None:
    """A file four chunks long goes out in chunk-sized writes, never as one block."""
    path = _write_file(tmp_path, os.urandom(4 * 1024))
    body = _body_for(path, chunk_bytes=1024)
    writer = CollectingWriter()

    await body.write_with_length(writer, None)

    file_writes = writer.chunks[1:-1]
    assert [len(chunk) for chunk in file_writes] == [1024, 1024, 1024, 1024]


async def test_body_bytes_path_not_utf8(tmp_path: Path) -> None:
    """A path given as bytes that are not UTF-8 is opened and sent."""
    raw_path = os.fsencode(tmp_path) + b"/caf\xe9.txt"
    with open(raw_path, "wb") as handle:
        handle.write(b"content")
    body = _body_for(raw_path, name=display_name(b"caf\xe9.txt"))
    writer = CollectingWriter()

    await body.write_with_length(writer, None)

    assert b'filename="caf\xef\xbf\xbd.txt"' in writer.data
    assert b"\r\n\r\ncontent\r\n" in writer.data


async def test_body_modified_midstream(tmp_path: Path) -> None:
    """A write to the file during streaming raises FileChangedError before the closing boundary."""
    path = _write_file(tmp_path, b"A" * 4096)
    body = _body_for(path, chunk_bytes=1024)

    def modify() -> None:
        with open(path, "r+b") as handle:
            handle.seek(3000)
            handle.write(b"B")

    writer = HookedWriter(after_writes=2, hook=modify)

    with pytest.raises(FileChangedError):
        await body.write_with_length(writer, None)

    assert body.boundary.encode() + b"--" not in writer.data
    assert len(writer.data) < body.size
    assert body.body_complete is False
    assert isinstance(body.local_error, FileChangedError)


async def test_body_same_size_touch_detected(tmp_path: Path) -> None:
    """Rewriting identical bytes changes mtime and ctime, which stops the body too."""
    path = _write_file(tmp_path, b"A" * 4096)
    body = _body_for(path, chunk_bytes=1024)

    def rewrite_same_bytes() -> None:
        stat_before = os.stat(path)
        path.write_bytes(b"A" * 4096)
        os.utime(path, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 1_000_000))

    writer = HookedWriter(after_writes=2, hook=rewrite_same_bytes)

    with pytest.raises(FileChangedError, match="no longer matches"):
        await body.write_with_length(writer, None)
    assert body.body_complete is False


@pytest.mark.parametrize(
    ("settled_size", "message"),
    [
        # The growth lands inside the last chunk, so more bytes are read than expected.
        (3000, "read 3004 bytes, expected 3000"),
        # The settled size ends on a chunk boundary, so only the extra read detects growth.
        (2048, "grew past its settled size of 2048 bytes"),
    ],
)
async def test_body_grown_file(tmp_path: Path, settled_size: int, message: str) -> None:
    """A file that grew after it settled is rejected before its last chunk."""
    path = _write_file(tmp_path, b"A" * settled_size)
    body = _body_for(path, chunk_bytes=1024)

    def append() -> None:
        with open(path, "ab") as handle:
            handle.write(b"more")

    writer = HookedWriter(after_writes=1, hook=append)

    with pytest.raises(FileChangedError, match=message):
        await body.write_with_length(writer, None)
    assert b"\r\n--" + body.boundary.encode() + b"--" not in writer.data


async def test_body_shrunk_file(tmp_path: Path) -> None:
    """A file truncated mid-stream is rejected with the bytes read and expected."""
    path = _write_file(tmp_path, b"A" * 3000)
    body = _body_for(path, chunk_bytes=1024)
    writer = HookedWriter(after_writes=2, hook=lambda: os.truncate(path, 1500))

    with pytest.raises(FileChangedError, match="read 1500 bytes, expected 3000"):
        await body.write_with_length(writer, None)


async def test_body_hash_mismatch(tmp_path: Path) -> None:
    """Bytes that differ from the settled SHA-256 stop the body before the last chunk."""
    path = _write_file(tmp_path, b"actual content")
    body = _body_for(path, sha256=hashlib.sha256(b"other content!").hexdigest())
    writer = CollectingWriter()

    with pytest.raises(FileChangedError, match="content changed"):
        await body.write_with_length(writer, None)

    assert b"actual content" not in writer.data
    assert body.file_bytes_sent == 0


async def test_body_changed_before_open(tmp_path: Path) -> None:
    """open() compares the settled size and times, so nothing is written for a changed file."""
    path = _write_file(tmp_path, b"abc")
    body = _body_for(path, size=2)

    with pytest.raises(FileChangedError):
        await body.open()


async def test_body_missing_file(tmp_path: Path) -> None:
    """A file that is gone raises FileVanishedError from open()."""
    path = _write_file(tmp_path, b"abc")
    body = _body_for(path)
    path.unlink()

    with pytest.raises(FileVanishedError):
        await body.open()
    assert isinstance(body.local_error, FileVanishedError)


async def test_body_deleted_midstream(tmp_path: Path) -> None:
    """A file unlinked while it streams raises FileVanishedError at the final check."""
    path = _write_file(tmp_path, b"A" * 3000)
    body = _body_for(path, chunk_bytes=1024)
    writer = HookedWriter(after_writes=2, hook=path.unlink)

    with pytest.raises(FileVanishedError):
        await body.write_with_length(writer, None)
    assert body.body_complete is False


async def test_body_replaced_midstream(tmp_path: Path) -> None:
    """A file replaced by rename while it streams is detected through its inode."""
    path = _write_file(tmp_path, b"A" * 3000)
    body = _body_for(path, chunk_bytes=1024)
    other = _write_file(tmp_path, b"A" * 3000, name="other.bin")
    writer = HookedWriter(after_writes=2, hook=lambda: os.replace(other, path))

    with pytest.raises(FileChangedError, match="replaced"):
        await body.write_with_length(writer, None)


async def test_body_symlink_not_followed(tmp_path: Path) -> None:
    """A symbolic link is never followed, even to a file with the expected values."""
    target = _write_file(tmp_path, b"secret")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    # os.stat and open follow the link, so the expected values are the target's.
    body_via_link = _body_for(link, name="link.txt")
    writer = CollectingWriter()

    with pytest.raises(FileChangedError, match="symbolic link"):
        await body_via_link.write_with_length(writer, None)

    assert writer.data == b""


async def test_body_fifo_not_opened(tmp_path: Path) -> None:
    """A FIFO at the path is rejected at once instead of blocking the open."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    body = _body_for(fifo, name="pipe", sha256=hashlib.sha256(b"").hexdigest())

    with pytest.raises(FileChangedError, match="regular file"):
        await body.open()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
async def test_body_permission_denied(tmp_path: Path) -> None:
    """A file the user cannot read raises PermissionError unchanged."""
    path = _write_file(tmp_path, b"abc")
    body = _body_for(path)
    path.chmod(0)

    with pytest.raises(PermissionError):
        await body.open()


async def test_body_write_timeout(tmp_path: Path) -> None:
    """A connection that accepts nothing for idle_timeout_s raises TimeoutError, body incomplete."""
    path = _write_file(tmp_path, b"abc")
    body = _body_for(path, idle_timeout_s=0.05)

    with pytest.raises(TimeoutError, match="accepted no data"):
        await body.write_with_length(StalledWriter(), None)  # type: ignore[arg-type]

    assert body.body_complete is False
    assert body.local_error is None


async def test_body_single_use(tmp_path: Path) -> None:
    """A body that was sent once refuses a second write, so every try builds a new one."""
    path = _write_file(tmp_path, b"abc")
    body = _body_for(path)
    await body.write_with_length(CollectingWriter(), None)

    with pytest.raises(RuntimeError, match="already sent"):
        await body.write_with_length(CollectingWriter(), None)


def test_body_rejects_line_break_name(tmp_path: Path) -> None:
    """A display name with CR or LF is a programming error, raised before any I/O."""
    path = _write_file(tmp_path, b"abc")
    with pytest.raises(ValueError, match="CR or LF"):
        _body_for(path, name="a\r\nContent-Type: x")


async def test_body_closes_descriptor(tmp_path: Path) -> None:
    """The file descriptor is closed after sending and after close() on an unsent body."""
    path = _write_file(tmp_path, b"abc")
    fd_dir = Path("/proc/self/fd")
    before = len(list(fd_dir.iterdir()))

    sent = _body_for(path)
    await sent.write_with_length(CollectingWriter(), None)
    unsent = _body_for(path)
    await unsent.open()
    await unsent.close()

    assert len(list(fd_dir.iterdir())) == before
