"""
Tests for uploader.watcher's pure parts: scan_tree on a real folder tree, relative_path,
kind_of and is_watch_limit_error.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from uploader.folders import IgnoreRules
from uploader.watcher import is_watch_limit_error, kind_of, relative_path, scan_tree

SMITH = "Smith, John [1b4e28ba-2fa1-11d2-883f-0016d3cca427]"
JONES = "Jones"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A drop root with regular files, nested folders and ignored names."""
    drop = tmp_path / "drop"
    for rel in (f"{SMITH}/referral.pdf", f"{SMITH}/2026/letters/report.docx",
                f"{JONES}/scan.pdf", "loose.pdf",
                f"{SMITH}/.hidden.pdf", f"{SMITH}/~$report.docx", f"{SMITH}/upload.part",
                f"{SMITH}/Thumbs.db", f"{SMITH}/@eaDir/referral.pdf@SynoEAStream",
                f"{JONES}/private/notes.pdf"):
        path = drop / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (drop / "Empty").mkdir()
    return drop


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the drop root with one file, the target of links."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.pdf").write_bytes(b"not for upload")
    return folder


@pytest.fixture
def unix_socket(root: Path) -> Iterator[Path]:
    """A listening Unix socket inside a drop folder."""
    path = root / JONES / "daemon.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    try:
        yield path
    finally:
        server.close()


class TestScanTree:
    def test_scan_regular_files(self, root: Path) -> None:
        """Regular files in every folder depth are found, sorted, with "/" separators."""
        result = scan_tree(root, IgnoreRules())
        assert result.files == sorted([
            f"{JONES}/private/notes.pdf",
            f"{JONES}/scan.pdf",
            "loose.pdf",
            f"{SMITH}/2026/letters/report.docx",
            f"{SMITH}/referral.pdf",
        ])
        assert result.skipped == []

    def test_scan_drop_folders(self, root: Path) -> None:
        """Only folders directly under the root are drop folders, empty ones included."""
        result = scan_tree(root, IgnoreRules())
        assert sorted(result.folders) == ["Empty", JONES, SMITH]

    def test_scan_ignored_names(self, root: Path) -> None:
        """Built-in ignored names and everything inside an ignored folder are left out."""
        files = scan_tree(root, IgnoreRules()).files
        for name in (".hidden.pdf", "~$report.docx", "upload.part", "Thumbs.db", "@eaDir"):
            assert not any(name in f for f in files), name

    def test_scan_user_ignore(self, root: Path) -> None:
        """A user pattern with "/" leaves out that folder, one without leaves out names."""
        result = scan_tree(root, IgnoreRules([f"{JONES}/private", "*.docx"]))
        assert result.files == sorted([f"{JONES}/scan.pdf", "loose.pdf",
                                       f"{SMITH}/referral.pdf"])

    def test_scan_ignored_drop_folder(self, root: Path) -> None:
        """An ignored folder under the root is not reported as a drop folder."""
        (root / "#recycle").mkdir()
        (root / "#recycle" / "old.pdf").write_bytes(b"x")
        result = scan_tree(root, IgnoreRules())
        assert "#recycle" not in result.folders
        assert not any(f.startswith("#recycle") for f in result.files)

    def test_scan_symlinks_skipped(self, root: Path, outside: Path) -> None:
        """Links to a file and to a folder are reported as skipped and never followed."""
        (root / SMITH / "link.pdf").symlink_to(outside / "secret.pdf")
        (root / SMITH / "linked-folder").symlink_to(outside)
        (root / "Linked client").symlink_to(outside)
        (root / JONES / "dangling.pdf").symlink_to(outside / "missing.pdf")
        result = scan_tree(root, IgnoreRules())
        assert sorted(result.skipped) == [
            (f"{JONES}/dangling.pdf", "symbolic link"),
            ("Linked client", "symbolic link"),
            (f"{SMITH}/link.pdf", "symbolic link"),
            (f"{SMITH}/linked-folder", "symbolic link"),
        ]
        assert not any("secret.pdf" in f for f in result.files)
        assert "Linked client" not in result.folders

    def test_scan_fifo_skipped(self, root: Path) -> None:
        """A FIFO is reported as skipped, and the scan does not block on it."""
        os.mkfifo(root / SMITH / "pipe.pdf")
        result = scan_tree(root, IgnoreRules())
        assert result.skipped == [(f"{SMITH}/pipe.pdf", "FIFO")]
        assert f"{SMITH}/pipe.pdf" not in result.files

    def test_scan_socket_skipped(self, root: Path, unix_socket: Path) -> None:
        """A Unix socket is reported as skipped."""
        result = scan_tree(root, IgnoreRules())
        assert result.skipped == [(f"{JONES}/daemon.sock", "socket")]

    def test_scan_root_missing(self, tmp_path: Path) -> None:
        """A missing root raises FileNotFoundError."""
        with pytest.raises(FileNotFoundError):
            scan_tree(tmp_path / "absent", IgnoreRules())

    def test_scan_root_is_file(self, tmp_path: Path) -> None:
        """A root that is a file raises NotADirectoryError."""
        (tmp_path / "file").write_bytes(b"x")
        with pytest.raises(NotADirectoryError):
            scan_tree(tmp_path / "file", IgnoreRules())

    def test_scan_subtree(self, root: Path) -> None:
        """A scan from a subfolder returns paths relative to the root and no drop folders."""
        result = scan_tree(root, IgnoreRules(), start=SMITH)
        assert result.files == [f"{SMITH}/2026/letters/report.docx", f"{SMITH}/referral.pdf"]
        assert result.folders == []

    def test_scan_subtree_missing(self, root: Path) -> None:
        """A subtree that vanished raises FileNotFoundError like a missing root."""
        with pytest.raises(FileNotFoundError):
            scan_tree(root, IgnoreRules(), start=f"{SMITH}/gone")

    def test_scan_non_utf8_name(self, root: Path) -> None:
        """A name that is not UTF-8 is returned with surrogate escapes that round-trip."""
        raw = os.fsencode(root / JONES) + b"/caf\xe9.pdf"
        with open(raw, "wb") as f:
            f.write(b"x")
        files = scan_tree(root, IgnoreRules()).files
        assert f"{JONES}/caf\udce9.pdf" in files
        assert os.fsencode(f"{JONES}/caf\udce9.pdf") == b"Jones/caf\xe9.pdf"

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
    def test_scan_unreadable_subfolder(self, root: Path) -> None:
        """A subfolder that cannot be listed is passed over, and the rest is still found."""
        locked = root / JONES / "private"
        locked.chmod(0)
        try:
            files = scan_tree(root, IgnoreRules()).files
        finally:
            locked.chmod(stat.S_IRWXU)
        assert f"{JONES}/scan.pdf" in files
        assert f"{JONES}/private/notes.pdf" not in files


class TestRelativePath:
    def test_relative_inside(self, tmp_path: Path) -> None:
        """A path under the root becomes relative with "/" separators."""
        assert relative_path(tmp_path, tmp_path / "A" / "b.pdf") == "A/b.pdf"
        assert relative_path(tmp_path, str(tmp_path / "c.pdf")) == "c.pdf"

    def test_relative_root_itself(self, tmp_path: Path) -> None:
        """The root itself has no relative path."""
        assert relative_path(tmp_path, tmp_path) is None

    def test_relative_outside(self, tmp_path: Path) -> None:
        """Paths outside the root, siblings with a shared prefix included, give None."""
        root = tmp_path / "drop"
        assert relative_path(root, tmp_path / "archive" / "a.pdf") is None
        assert relative_path(root, tmp_path / "drop-old" / "a.pdf") is None
        assert relative_path(root, tmp_path) is None

    def test_relative_dotted_name(self, tmp_path: Path) -> None:
        """A name that starts with two dots inside the root is still inside."""
        assert relative_path(tmp_path, tmp_path / "..draft.pdf") == "..draft.pdf"


class TestKinds:
    def test_kind_of(self) -> None:
        """Each file type is named in plain words."""
        assert kind_of(stat.S_IFLNK | 0o777) == "symbolic link"
        assert kind_of(stat.S_IFIFO | 0o644) == "FIFO"
        assert kind_of(stat.S_IFSOCK | 0o755) == "socket"
        assert kind_of(stat.S_IFCHR | 0o666) == "device"
        assert kind_of(stat.S_IFBLK | 0o660) == "device"
        assert kind_of(stat.S_IFDIR | 0o755) == "folder"
        assert kind_of(stat.S_IFREG | 0o644) == "regular file"


class TestWatchLimit:
    def test_watch_limit_enospc(self) -> None:
        """An OSError with ENOSPC is the inotify watch limit."""
        assert is_watch_limit_error(OSError(errno.ENOSPC, "No space left on device")) is True

    def test_watch_limit_watchfiles_text(self) -> None:
        """The error text watchfiles uses for a used-up watch limit is recognised."""
        exc = OSError('OS file watch limit reached. about ["/srv/drop"]')
        assert is_watch_limit_error(exc) is True

    def test_watch_limit_other_errors(self) -> None:
        """Permission errors, other OSErrors and unrelated exceptions are not the limit."""
        assert is_watch_limit_error(PermissionError(errno.EACCES, "Permission denied")) is False
        assert is_watch_limit_error(OSError(errno.EIO, "Input/output error")) is False
        assert is_watch_limit_error(FileNotFoundError(errno.ENOENT, "gone")) is False
        assert is_watch_limit_error(RuntimeError("watcher stopped")) is False
