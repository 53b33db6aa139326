"""
Tests for uploader.prune on a real archive tree: age by ctime, hard links that keep an
old mtime, symbolic links, and folders left in place.
"""

from __future__ import annotations

import os
from pathlib import Path

from uploader.prune import DAY_S, PruneResult, prune_archive


def make_file(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def newer_than(path: Path, reference: Path) -> None:
    """Touch ``path`` until its ctime is at least 1 ms after ``reference``'s."""
    while os.lstat(path).st_ctime_ns - os.lstat(reference).st_ctime_ns < 1_000_000:
        os.utime(path, follow_symlinks=False)


class TestPrune:
    def test_prune_old_files(self, tmp_path: Path) -> None:
        """Files older than keep_days go, newer ones stay, folders stay; sizes are counted."""
        archive = tmp_path / "archive"
        old = make_file(archive / "Smith" / "2024" / "old.pdf", b"a" * 100)
        new = make_file(archive / "Jones" / "new.pdf", b"b" * 7)
        newer_than(new, old)
        # Cut halfway between the two: ctime(old) < now - 30 days < ctime(new).
        middle_s = (os.stat(old).st_ctime_ns + os.stat(new).st_ctime_ns) / 2e9
        result = prune_archive(archive, 30, now=middle_s + 30 * DAY_S)
        assert result == PruneResult(deleted_files=1, deleted_bytes=100)
        assert not old.exists()
        assert new.read_bytes() == b"b" * 7
        assert (archive / "Smith" / "2024").is_dir()

    def test_prune_uses_ctime(self, tmp_path: Path) -> None:
        """A file hard-linked into the archive with a ten-year-old mtime is kept."""
        original = make_file(tmp_path / "drop" / "Smith" / "scan.pdf")
        os.utime(original, (0, 1_000_000_000))
        archived = tmp_path / "archive" / "Smith" / "scan.pdf"
        archived.parent.mkdir(parents=True)
        os.link(original, archived)
        original.unlink()
        assert archived.stat().st_mtime == 1_000_000_000
        assert prune_archive(tmp_path / "archive", 1) == PruneResult()
        assert archived.exists()

    def test_prune_zero_keeps(self, tmp_path: Path) -> None:
        """keep_days = 0 deletes nothing, however old the files are."""
        kept = make_file(tmp_path / "archive" / "a.pdf")
        assert prune_archive(tmp_path / "archive", 0, now=4e9) == PruneResult()
        assert kept.exists()

    def test_prune_missing_archive(self, tmp_path: Path) -> None:
        """An archive folder that does not exist yet is not an error."""
        assert prune_archive(tmp_path / "none", 5, now=4e9) == PruneResult()

    def test_prune_symlinks_not_followed(self, tmp_path: Path) -> None:
        """Old symbolic links are removed themselves; what they point at is untouched."""
        outside = make_file(tmp_path / "outside" / "keep.pdf")
        archive = tmp_path / "archive"
        archive.mkdir()
        (archive / "link.pdf").symlink_to(outside)
        (archive / "folder-link").symlink_to(outside.parent, target_is_directory=True)
        later_s = os.lstat(archive / "folder-link").st_ctime + 2 * DAY_S
        result = prune_archive(archive, 1, now=later_s)
        assert result.deleted_files == 2
        assert result.deleted_bytes == 0
        assert outside.exists()
        assert os.listdir(archive) == []
