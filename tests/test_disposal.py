"""
Tests for uploader.disposal with real files: mirrored paths, no overwriting, reason
files, read-only and cross-filesystem targets, and symbolic links.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from uploader.disposal import archive_file, delete_file, move_to_failed

REL = "Smith, John [1b4e28ba-2fa1-11d2-883f-0016d3cca427]/letters/referral.pdf"


def drop_file(root: Path, rel_path: str, data: bytes) -> Path:
    path = root.joinpath(*rel_path.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def existing_group() -> tuple[str, int]:
    for name in ("nogroup", "daemon", "users"):
        try:
            return name, grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    pytest.skip("no well-known group other than root exists on this machine")


@contextlib.contextmanager
def mounted(args: list[str], target: Path) -> Iterator[None]:
    """Mount over ``target`` for the block, or skip the test when mounting is not allowed."""
    if shutil.which("mount") is None:
        pytest.skip("mount is not installed")
    result = subprocess.run(
        ["mount", *args, str(target)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"mount needs root with CAP_SYS_ADMIN: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """Set umask 077 for one test, so modes that survive it were set explicitly."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    root = tmp_path / "drop"
    root.mkdir()
    return root


class TestArchive:
    def test_archive_mirrors_path(self, tmp_path: Path, drop: Path) -> None:
        """The file lands at archive/drop-folder/relative/path with its bytes; the source goes."""
        src = drop_file(drop, REL, b"%PDF-1.7 referral\n%%EOF\n")
        archive = tmp_path / "archive"
        final = archive_file(src, REL, archive, staff_group=None)
        assert final == archive.joinpath(*REL.split("/"))
        assert final.read_bytes() == b"%PDF-1.7 referral\n%%EOF\n"
        assert not src.exists()
        assert src.parent.is_dir()

    def test_archive_folder_modes(self, tmp_path: Path, drop: Path) -> None:
        """Every folder the move creates, the archive root included, gets mode 0o700."""
        src = drop_file(drop, REL, b"x")
        archive = tmp_path / "archive"
        archive_file(src, REL, archive, staff_group=None)
        assert mode_of(archive) == 0o700
        assert mode_of(archive / REL.split("/")[0]) == 0o700
        assert mode_of(archive.joinpath(*REL.split("/")[:2])) == 0o700

    def test_archive_staff_group(self, tmp_path: Path, drop: Path, strict_umask: None) -> None:
        """With a staff group, new folders get mode 0o750 and that group despite umask 077."""
        name, gid = existing_group()
        src = drop_file(drop, REL, b"x")
        archive = tmp_path / "archive"
        archive_file(src, REL, archive, staff_group=name)
        for folder in (archive, archive / REL.split("/")[0]):
            assert mode_of(folder) == 0o750
            assert os.lstat(folder).st_gid == gid

    def test_archive_existing_folder_kept(self, tmp_path: Path, drop: Path) -> None:
        """An archive folder that already exists keeps its own mode."""
        archive = tmp_path / "archive"
        archive.mkdir()
        archive.chmod(0o755)
        archive_file(drop_file(drop, "Jones/a.pdf", b"x"), "Jones/a.pdf", archive, staff_group=None)
        assert mode_of(archive) == 0o755

    def test_archive_no_overwrite(self, tmp_path: Path, drop: Path) -> None:
        """Three files of one name end as name.pdf, name (2).pdf and name (3).pdf, bytes intact."""
        archive = tmp_path / "archive"
        finals = []
        for data in (b"first", b"second", b"third"):
            src = drop_file(drop, "Jones/name.pdf", data)
            finals.append(archive_file(src, "Jones/name.pdf", archive, staff_group=None))
        folder = archive / "Jones"
        assert finals == [folder / "name.pdf", folder / "name (2).pdf", folder / "name (3).pdf"]
        assert (folder / "name.pdf").read_bytes() == b"first"
        assert (folder / "name (2).pdf").read_bytes() == b"second"
        assert (folder / "name (3).pdf").read_bytes() == b"third"
        assert sorted(os.listdir(folder)) == ["name (2).pdf", "name (3).pdf", "name.pdf"]

    @pytest.mark.parametrize(
        ("name", "second"),
        [("notes", "notes (2)"), (".hidden", ".hidden (2)"), ("a.tar.gz", "a.tar (2).gz")],
    )
    def test_archive_numbered_names(
        self, tmp_path: Path, drop: Path, name: str, second: str
    ) -> None:
        """The number goes before the last extension; names without one get it at the end."""
        archive = tmp_path / "archive"
        (archive / "Jones").mkdir(parents=True)
        (archive / "Jones" / name).write_bytes(b"old")
        src = drop_file(drop, f"Jones/{name}", b"new")
        final = archive_file(src, f"Jones/{name}", archive, staff_group=None)
        assert final.name == second
        assert (archive / "Jones" / name).read_bytes() == b"old"
        assert final.read_bytes() == b"new"

    def test_archive_root_file(self, tmp_path: Path, drop: Path) -> None:
        """A path with no drop folder lands directly in the archive root."""
        src = drop_file(drop, "loose.pdf", b"x")
        final = archive_file(src, "loose.pdf", tmp_path / "archive", staff_group=None)
        assert final == tmp_path / "archive" / "loose.pdf"
        assert final.read_bytes() == b"x"

    @pytest.mark.parametrize("rel_path", ["../escape.pdf", "Jones/../../x.pdf", "/etc/x.pdf", ""])
    def test_archive_bad_rel_path(self, tmp_path: Path, drop: Path, rel_path: str) -> None:
        """A relative path that could leave the archive raises ValueError and moves nothing."""
        src = drop_file(drop, "Jones/x.pdf", b"x")
        with pytest.raises(ValueError):
            archive_file(src, rel_path, tmp_path / "archive", staff_group=None)
        assert src.read_bytes() == b"x"

    def test_archive_folder_source(self, tmp_path: Path, drop: Path) -> None:
        """A folder as the source raises IsADirectoryError and stays in place."""
        (drop / "Jones" / "sub").mkdir(parents=True)
        with pytest.raises(IsADirectoryError):
            archive_file(drop / "Jones" / "sub", "Jones/sub", tmp_path / "archive", staff_group=None)
        assert (drop / "Jones" / "sub").is_dir()

    def test_archive_missing_source(self, tmp_path: Path, drop: Path) -> None:
        """A source that has vanished raises FileNotFoundError and creates nothing."""
        archive = tmp_path / "archive"
        with pytest.raises(FileNotFoundError):
            archive_file(drop / "Jones" / "gone.pdf", "Jones/gone.pdf", archive, staff_group=None)
        assert not archive.exists()


class TestFailed:
    def test_failed_reason_file(self, tmp_path: Path, drop: Path) -> None:
        """The file moves to the failed folder with a UTF-8 reason file of mode 0o600 beside it."""
        src = drop_file(drop, REL, b"rejected bytes")
        failed = tmp_path / "failed"
        reason = "400 Bad Request: “size” must be a string — check the version\n"
        final = move_to_failed(src, REL, failed, reason, staff_group=None)
        assert final == failed.joinpath(*REL.split("/"))
        assert final.read_bytes() == b"rejected bytes"
        reason_file = final.with_name(final.name + ".reason.txt")
        assert reason_file.read_bytes() == reason.encode("utf-8")
        assert mode_of(reason_file) == 0o600
        assert not src.exists()

    def test_failed_staff_group(self, tmp_path: Path, drop: Path, strict_umask: None) -> None:
        """With a staff group, the reason file gets mode 0o640 and the folders 0o750, both in it."""
        name, gid = existing_group()
        src = drop_file(drop, "Jones/a.pdf", b"x")
        failed = tmp_path / "failed"
        final = move_to_failed(src, "Jones/a.pdf", failed, "why", staff_group=name)
        reason_file = final.with_name("a.pdf.reason.txt")
        assert mode_of(reason_file) == 0o640
        assert os.lstat(reason_file).st_gid == gid
        assert mode_of(failed / "Jones") == 0o750
        assert os.lstat(failed / "Jones").st_gid == gid

    def test_failed_numbered_reason(self, tmp_path: Path, drop: Path) -> None:
        """A second failure of the same name gets "a (2).pdf" and "a (2).pdf.reason.txt"."""
        failed = tmp_path / "failed"
        move_to_failed(drop_file(drop, "Jones/a.pdf", b"1"), "Jones/a.pdf", failed, "one",
                       staff_group=None)
        final = move_to_failed(drop_file(drop, "Jones/a.pdf", b"2"), "Jones/a.pdf", failed, "two",
                               staff_group=None)
        assert final == failed / "Jones" / "a (2).pdf"
        assert final.read_bytes() == b"2"
        assert (failed / "Jones" / "a (2).pdf.reason.txt").read_text(encoding="utf-8") == "two"
        assert (failed / "Jones" / "a.pdf.reason.txt").read_text(encoding="utf-8") == "one"

    def test_failed_stale_reason_kept(self, tmp_path: Path, drop: Path) -> None:
        """A leftover reason file with no file beside it is neither overwritten nor reused."""
        failed = tmp_path / "failed"
        (failed / "Jones").mkdir(parents=True)
        stale = failed / "Jones" / "a.pdf.reason.txt"
        stale.write_text("old reason", encoding="utf-8")
        final = move_to_failed(drop_file(drop, "Jones/a.pdf", b"x"), "Jones/a.pdf", failed,
                               "new reason", staff_group=None)
        assert final.name == "a (2).pdf"
        assert stale.read_text(encoding="utf-8") == "old reason"
        assert not (failed / "Jones" / "a.pdf").exists()
        assert (failed / "Jones" / "a (2).pdf.reason.txt").read_text(encoding="utf-8") == (
            "new reason"
        )

    def test_failed_name_taken_no_orphan(self, tmp_path: Path, drop: Path) -> None:
        """When the file's name is taken, no reason file is left for that taken name."""
        failed = tmp_path / "failed"
        (failed / "Jones").mkdir(parents=True)
        (failed / "Jones" / "a.pdf").write_bytes(b"someone else's")
        move_to_failed(drop_file(drop, "Jones/a.pdf", b"x"), "Jones/a.pdf", failed, "r",
                       staff_group=None)
        assert sorted(os.listdir(failed / "Jones")) == [
            "a (2).pdf", "a (2).pdf.reason.txt", "a.pdf",
        ]
        assert (failed / "Jones" / "a.pdf").read_bytes() == b"someone else's"


class TestReadOnlyTarget:
    def test_read_only_archive(self, tmp_path: Path, drop: Path) -> None:
        """A read-only archive raises OSError (EROFS) and leaves the source and its bytes."""
        archive = tmp_path / "archive"
        archive.mkdir()
        src = drop_file(drop, REL, b"keep me")
        with mounted(["--bind", "-o", "ro", str(archive)], archive):
            if not _really_read_only(archive):
                pytest.skip("the bind mount did not become read-only")
            with pytest.raises(OSError) as caught:
                archive_file(src, REL, archive, staff_group=None)
        assert caught.value.errno == errno.EROFS
        assert src.read_bytes() == b"keep me"
        assert os.listdir(archive) == []

    def test_read_only_failed(self, tmp_path: Path, drop: Path) -> None:
        """A read-only failed folder raises OSError and leaves the source in place."""
        failed = tmp_path / "failed"
        (failed / "Jones").mkdir(parents=True)
        src = drop_file(drop, "Jones/a.pdf", b"keep me")
        with mounted(["--bind", "-o", "ro", str(failed)], failed):
            if not _really_read_only(failed):
                pytest.skip("the bind mount did not become read-only")
            with pytest.raises(OSError):
                move_to_failed(src, "Jones/a.pdf", failed, "r", staff_group=None)
        assert src.read_bytes() == b"keep me"
        assert os.listdir(failed / "Jones") == []


def _really_read_only(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError as exc:
        return exc.errno == errno.EROFS
    (folder / ".probe").unlink()
    return False


def _check_link_archived_as_link(tmp_path: Path, drop: Path, archive: Path) -> None:
    """Archive a link that points outside the drop folder and check that the link itself moved."""
    target = tmp_path / "outside.pdf"
    target.write_bytes(b"target bytes")
    link = drop / "Jones" / "link.pdf"
    link.parent.mkdir()
    link.symlink_to(target)
    final = archive_file(link, "Jones/link.pdf", archive, staff_group=None)
    assert final.is_symlink()
    assert os.readlink(final) == str(target)
    assert target.read_bytes() == b"target bytes"
    assert not os.path.lexists(link)


class TestOtherFilesystem:
    """A tmpfs mount makes hard links impossible (EXDEV), so these run the copy path."""

    @pytest.fixture
    def tmpfs(self, tmp_path: Path) -> Iterator[Path]:
        target = tmp_path / "tmpfs"
        target.mkdir()
        with mounted(["-t", "tmpfs", "-o", "size=16m", "tmpfs"], target):
            yield target

    def test_copy_bytes_and_mtime(self, drop: Path, tmpfs: Path) -> None:
        """Across filesystems the copy has the exact bytes and mtime; the source goes."""
        data = os.urandom(700_000)  # several copy chunks
        src = drop_file(drop, REL, data)
        os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
        final = archive_file(src, REL, tmpfs / "archive", staff_group=None)
        assert final.read_bytes() == data
        assert os.lstat(final).st_mtime_ns == 1_600_000_000_123_456_789
        assert mode_of(final) == 0o600
        assert os.lstat(final).st_dev != os.lstat(drop).st_dev
        assert not src.exists()

    def test_copy_no_overwrite(self, drop: Path, tmpfs: Path) -> None:
        """Across filesystems three same-named files keep their bytes and leave no temp files."""
        archive = tmpfs / "archive"
        for data in (b"first", b"second", b"third"):
            archive_file(drop_file(drop, "Jones/name.pdf", data), "Jones/name.pdf", archive,
                         staff_group=None)
        folder = archive / "Jones"
        assert sorted(os.listdir(folder)) == ["name (2).pdf", "name (3).pdf", "name.pdf"]
        assert (folder / "name.pdf").read_bytes() == b"first"
        assert (folder / "name (2).pdf").read_bytes() == b"second"
        assert (folder / "name (3).pdf").read_bytes() == b"third"

    def test_copy_failed_reason(self, drop: Path, tmpfs: Path) -> None:
        """Across filesystems a failed file still gets its reason file beside it."""
        final = move_to_failed(drop_file(drop, "Jones/a.pdf", b"x"), "Jones/a.pdf",
                               tmpfs / "failed", "why", staff_group=None)
        assert final.read_bytes() == b"x"
        assert (tmpfs / "failed" / "Jones" / "a.pdf.reason.txt").read_text(encoding="utf-8") == "why"

    def test_copy_disk_full(self, tmp_path: Path, drop: Path) -> None:
        """A full target filesystem raises ENOSPC, leaves the source, and leaves no partial copy."""
        target = tmp_path / "small"
        target.mkdir()
        src = drop_file(drop, "Jones/big.pdf", os.urandom(2 * 1024 * 1024))
        with mounted(["-t", "tmpfs", "-o", "size=1m", "tmpfs"], target):
            with pytest.raises(OSError) as caught:
                archive_file(src, "Jones/big.pdf", target / "archive", staff_group=None)
            leftovers = os.listdir(target / "archive" / "Jones")
        assert caught.value.errno == errno.ENOSPC
        assert leftovers == []
        assert src.stat().st_size == 2 * 1024 * 1024

    def test_copy_symlink_source(self, tmp_path: Path, drop: Path, tmpfs: Path) -> None:
        """Across filesystems a symbolic link is recreated as a link, not copied from its target."""
        _check_link_archived_as_link(tmp_path, drop, tmpfs / "archive")


class TestSymlinks:
    def test_symlink_source_moved_as_link(self, tmp_path: Path, drop: Path) -> None:
        """A symbolic link source is moved as the link itself; its target is untouched."""
        _check_link_archived_as_link(tmp_path, drop, tmp_path / "archive")

    def test_symlink_in_mirror_rejected(self, tmp_path: Path, drop: Path) -> None:
        """A symbolic link planted as a mirrored folder is not followed; the move fails."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        archive = tmp_path / "archive"
        archive.mkdir()
        (archive / "Jones").symlink_to(elsewhere)
        src = drop_file(drop, "Jones/a.pdf", b"x")
        with pytest.raises(OSError) as caught:
            archive_file(src, "Jones/a.pdf", archive, staff_group=None)
        assert caught.value.errno in (errno.ELOOP, errno.ENOTDIR)
        assert os.listdir(elsewhere) == []
        assert src.read_bytes() == b"x"

    def test_symlinked_archive_root_followed(self, tmp_path: Path, drop: Path) -> None:
        """The configured archive root itself may be a symbolic link, chosen by the operator."""
        real = tmp_path / "real-archive"
        real.mkdir()
        (tmp_path / "archive").symlink_to(real)
        src = drop_file(drop, "Jones/a.pdf", b"x")
        archive_file(src, "Jones/a.pdf", tmp_path / "archive", staff_group=None)
        assert (real / "Jones" / "a.pdf").read_bytes() == b"x"


class TestDelete:
    def test_delete_file(self, drop: Path) -> None:
        """delete_file removes the file and keeps its folder."""
        src = drop_file(drop, "Jones/a.pdf", b"x")
        delete_file(src)
        assert not src.exists()
        assert (drop / "Jones").is_dir()

    def test_delete_missing(self, drop: Path) -> None:
        """Deleting a file that is already gone is not an error."""
        delete_file(drop / "Jones" / "gone.pdf")
        assert not (drop / "Jones").exists()

    def test_delete_symlink(self, tmp_path: Path, drop: Path) -> None:
        """Deleting a symbolic link removes the link, never its target."""
        target = tmp_path / "outside.pdf"
        target.write_bytes(b"target bytes")
        link = drop / "link.pdf"
        link.symlink_to(target)
        delete_file(link)
        assert not os.path.lexists(link)
        assert target.read_bytes() == b"target bytes"

    def test_delete_folder_refused(self, drop: Path) -> None:
        """A folder is never removed: delete_file raises and the folder stays."""
        (drop / "Jones").mkdir()
        with pytest.raises(IsADirectoryError):
            delete_file(drop / "Jones")
        assert (drop / "Jones").is_dir()
