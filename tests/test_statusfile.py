"""
Tests for uploader.statusfile: the reception paragraph, and the file in a real drop
root (atomic writes, modes, group, removal).
"""

from __future__ import annotations

import grp
import os
from datetime import datetime
from pathlib import Path

import pytest

from uploader.constants import STATUS_FILE_NAME
from uploader.folders import IgnoreRules
from uploader.statusfile import ReceptionView, StatusFile, render

FAILED_DIR = Path("/srv/coreplus/failed")


def other_group() -> grp.struct_group:
    """A group that is not this process's primary group, for the chown case."""
    for name in ("daemon", "users", "nogroup", "adm"):
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        if group.gr_gid != os.getgid():
            return group
    pytest.skip("no second group on this machine")


class TestRender:
    def test_render_all_well(self) -> None:
        """Nothing paused, failed, held or unmapped gives no text at all."""
        assert render(ReceptionView(failed_dir=FAILED_DIR)) is None

    def test_render_paused(self) -> None:
        """A pause names its reason and start time, and states that documents are safe."""
        since = datetime(2026, 3, 2, 9, 14).timestamp()
        text = render(ReceptionView(paused_reason="coreplus refused the credentials (HTTP "
                                    "401), so every upload is paused.", paused_since=since))
        assert text is not None
        flat = " ".join(text.split())
        assert flat.startswith("UPLOADS TO COREPLUS NEED ATTENTION Uploads to coreplus are "
                               "paused since 09:14 on 02 Mar 2026")
        assert "(coreplus refused the credentials (HTTP 401), so every upload is paused)" in flat
        assert "Documents you save are safe in their folders" in flat

    def test_render_failed_names(self) -> None:
        """Up to five failed names are listed, the rest counted, with the failed folder."""
        names = [f"Smith [g]/letter{i}.pdf" for i in range(7)]
        text = render(ReceptionView(failed=names, failed_dir=FAILED_DIR))
        assert text is not None
        flat = " ".join(text.split())
        assert "7 files could not be uploaded and were moved to the failed folder " \
               "(/srv/coreplus/failed): Smith [g]/letter0.pdf," in flat
        assert "Smith [g]/letter4.pdf and 2 more." in flat
        assert "letter5.pdf" not in flat
        assert ".reason.txt" in flat

    def test_render_singular(self) -> None:
        """One held file and one unmapped folder read in the singular."""
        text = render(ReceptionView(held=["Jones/a.pdf"], unmapped=["Smith John"]))
        assert text is not None
        flat = " ".join(text.split())
        assert "1 file is waiting in their folder for IT support to check: Jones/a.pdf." in flat
        assert "1 item in this folder is not uploaded because it is not in a folder whose " \
               "name matches a client: Smith John." in flat

    def test_render_hidden_names(self) -> None:
        """With hidden names only counts appear."""
        text = render(ReceptionView(failed=[None, None], held=[None], unmapped=[None],
                                    failed_dir=FAILED_DIR))
        assert text is not None
        flat = " ".join(text.split())
        assert "2 files could not be uploaded and were moved to the failed folder " \
               "(/srv/coreplus/failed). Beside" in flat
        assert "for IT support to check." in flat
        assert "matches a client. Put files" in flat

    def test_render_line_shape(self) -> None:
        """Lines end in CRLF and none is wider than 76 characters."""
        text = render(ReceptionView(failed=["x" * 30] * 9, held=["y"], unmapped=["z"]))
        assert text is not None
        assert "\n" not in text.replace("\r\n", "")
        assert max(len(line) for line in text.split("\r\n")) <= 76


class TestStatusFile:
    def test_file_written_private(self, tmp_path: Path) -> None:
        """Without a staff group the file is 0600 and contains the text and an updated line."""
        status = StatusFile(tmp_path)
        assert status.update("line one\r\nline two")
        data = (tmp_path / STATUS_FILE_NAME).read_bytes()
        assert data.startswith(b"line one\r\nline two\r\n\r\nUpdated ")
        assert data.endswith(b"goes away by itself when all is well.\r\n")
        assert (tmp_path / STATUS_FILE_NAME).stat().st_mode & 0o777 == 0o600
        assert sorted(os.listdir(tmp_path)) == [STATUS_FILE_NAME]

    def test_file_staff_group(self, tmp_path: Path) -> None:
        """With a staff group the file is 0640 and owned by that group."""
        if os.geteuid() != 0:
            pytest.skip("only root may give a file to any group")
        group = other_group()
        StatusFile(tmp_path, staff_group=group.gr_name).update("text")
        info = (tmp_path / STATUS_FILE_NAME).stat()
        assert info.st_mode & 0o777 == 0o640
        assert info.st_gid == group.gr_gid

    def test_file_unchanged_not_rewritten(self, tmp_path: Path) -> None:
        """The same text twice leaves the first file (same inode) in place."""
        status = StatusFile(tmp_path)
        status.update("text", now=1_000_000)
        inode = (tmp_path / STATUS_FILE_NAME).stat().st_ino
        assert status.update("text", now=2_000_000) is False
        assert (tmp_path / STATUS_FILE_NAME).stat().st_ino == inode

    def test_file_changed_replaced(self, tmp_path: Path) -> None:
        """New text replaces the file through a rename, leaving no temporary file."""
        status = StatusFile(tmp_path)
        status.update("old")
        inode = (tmp_path / STATUS_FILE_NAME).stat().st_ino
        assert status.update("new")
        assert (tmp_path / STATUS_FILE_NAME).read_bytes().startswith(b"new\r\n")
        assert (tmp_path / STATUS_FILE_NAME).stat().st_ino != inode
        assert os.listdir(tmp_path) == [STATUS_FILE_NAME]

    def test_file_recreated_after_delete(self, tmp_path: Path) -> None:
        """A file someone deleted comes back while the condition lasts."""
        status = StatusFile(tmp_path)
        status.update("text")
        (tmp_path / STATUS_FILE_NAME).unlink()
        assert status.update("text")
        assert (tmp_path / STATUS_FILE_NAME).exists()

    def test_file_removed_when_well(self, tmp_path: Path) -> None:
        """None removes the file; a second None changes nothing."""
        status = StatusFile(tmp_path)
        status.update("text")
        assert status.update(None)
        assert not (tmp_path / STATUS_FILE_NAME).exists()
        assert status.update(None) is False

    def test_file_stale_temp_replaced(self, tmp_path: Path) -> None:
        """A temporary file left by a crash does not block the next write."""
        (tmp_path / f".{STATUS_FILE_NAME}.tmp").write_text("partial")
        StatusFile(tmp_path).update("text")
        assert os.listdir(tmp_path) == [STATUS_FILE_NAME]

    def test_file_missing_root_raises(self, tmp_path: Path) -> None:
        """A drop root that is gone raises OSError for the caller to log."""
        with pytest.raises(FileNotFoundError):
            StatusFile(tmp_path / "gone").update("text")

    def test_names_ignored_by_watcher(self) -> None:
        """The watcher's ignore rules skip the status file and its temporary file."""
        rules = IgnoreRules()
        assert rules.is_ignored(STATUS_FILE_NAME)
        assert rules.is_ignored(f".{STATUS_FILE_NAME}.tmp")
