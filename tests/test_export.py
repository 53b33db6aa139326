"""
Tests for uploader.export: formula escaping, the CSV written from real ledger rows,
and the owner-only output file.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path

import pytest

from uploader.constants import State
from uploader.export import COLUMNS, escape_cell, export_to, open_private, row_cells, write_csv
from uploader.ledger import FileRow, Ledger
from uploader.status import local_time

CLIENT = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
SHA = "c" * 64
NOW = 1_760_000_000.0


@pytest.fixture
def rows(tmp_path: Path) -> list[FileRow]:
    """Three ledger rows: an upload, a flagged uncertain row, and a failure named like a formula."""
    ledger = Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        uploaded = _insert(ledger, "Smith [g]/referral.pdf")
        ledger.update(uploaded, state=State.UPLOADED, sha256=SHA, remote_id="r-77",
                      uploaded_at=NOW, updated_at=NOW + 60)
        uncertain = _insert(ledger, "Smith [g]/letter.pdf")
        ledger.update(uncertain, state=State.UNCERTAIN, possible_duplicate=1,
                      last_error="connection lost after the body was sent", updated_at=NOW)
        failed = _insert(ledger, "=HYPERLINK(\"http://x\")/-2+3.pdf")
        ledger.update(failed, state=State.FAILED, last_error="@SUM(A1) rejected",
                      updated_at=NOW)
        return list(ledger.all_rows())
    finally:
        ledger.close()


def _insert(ledger: Ledger, rel_path: str) -> int:
    return ledger.insert_waiting(rel_path=os.fsencode(rel_path), display_path=rel_path,
                                 drop_folder=rel_path.split("/")[0], client_id=CLIENT,
                                 size=1234, mtime_ns=1, ctime_ns=1, now=NOW).id


class TestEscapeCell:
    @pytest.mark.parametrize("text", ["=1+2", "+61 2 9999 0000", "-5", "@SUM(A1)",
                                      "\tcmd", "\rcmd"])
    def test_escape_formula_starts(self, text: str) -> None:
        """Text starting with = + - @ tab or CR gets a leading quote."""
        assert escape_cell(text) == "'" + text

    @pytest.mark.parametrize("text", ["Smith [g]/a.pdf", "a=b", "1+1", "", "'quoted"])
    def test_escape_plain_text(self, text: str) -> None:
        """Other text is left as it is."""
        assert escape_cell(text) == text

    def test_escape_values(self) -> None:
        """None becomes empty, numbers become their text, a negative number is quoted."""
        assert escape_cell(None) == ""
        assert escape_cell(1234) == "1234"
        assert escape_cell(-1) == "'-1"


class TestWriteCsv:
    def test_write_csv_header_and_rows(self, rows: list[FileRow]) -> None:
        """A header line is followed by one line per row, and the row count is returned."""
        out = io.StringIO()
        assert write_csv(rows, out) == 3
        lines = list(csv.reader(io.StringIO(out.getvalue())))
        assert lines[0] == list(COLUMNS)
        assert len(lines) == 4
        assert out.getvalue().endswith("\r\n")

    def test_write_csv_uploaded_row(self, rows: list[FileRow]) -> None:
        """An uploaded row shows its upload time, client, path, size, hash and remote id."""
        out = io.StringIO()
        write_csv(rows, out)
        record = dict(zip(COLUMNS, list(csv.reader(io.StringIO(out.getvalue())))[1],
                          strict=True))
        assert record == {
            "id": str(rows[0].id), "when": local_time(NOW), "client": CLIENT,
            "path": "Smith [g]/referral.pdf", "size": "1234", "sha256": SHA,
            "state": "uploaded", "remote_id": "r-77", "possible_duplicate": "", "error": "",
        }

    def test_write_csv_flag_and_error(self, rows: list[FileRow]) -> None:
        """A flagged row has yes in possible_duplicate and its last change as the time."""
        cells = row_cells(rows[1])
        record = dict(zip(COLUMNS, cells, strict=True))
        assert record["possible_duplicate"] == "yes"
        assert record["when"] == local_time(NOW)
        assert record["error"] == "connection lost after the body was sent"

    def test_write_csv_escapes_formulas(self, rows: list[FileRow]) -> None:
        """A path and an error that look like formulas are written with a leading quote."""
        out = io.StringIO()
        write_csv(rows, out)
        record = dict(zip(COLUMNS, list(csv.reader(io.StringIO(out.getvalue())))[3],
                          strict=True))
        assert record["path"] == "'=HYPERLINK(\"http://x\")/-2+3.pdf"
        assert record["error"] == "'@SUM(A1) rejected"

    def test_write_csv_empty(self) -> None:
        """No rows give the header alone and a count of zero."""
        out = io.StringIO()
        assert write_csv([], out) == 0
        assert out.getvalue() == ",".join(COLUMNS) + "\r\n"


class TestOpenPrivate:
    def test_open_private_mode(self, tmp_path: Path) -> None:
        """A new file is created with mode 0600 and written as UTF-8."""
        path = tmp_path / "audit.csv"
        with open_private(path) as out:
            out.write("Nguyễn\r\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes() == "Nguyễn\r\n".encode()

    def test_open_private_refuses_existing(self, tmp_path: Path) -> None:
        """An existing file raises FileExistsError and keeps its content."""
        path = tmp_path / "audit.csv"
        path.write_text("earlier export")
        with pytest.raises(FileExistsError):
            open_private(path)
        assert path.read_text() == "earlier export"

    def test_open_private_refuses_symlink(self, tmp_path: Path) -> None:
        """A symbolic link at the path is not followed, even to a missing target."""
        path = tmp_path / "audit.csv"
        path.symlink_to(tmp_path / "elsewhere.csv")
        with pytest.raises(FileExistsError):
            open_private(path)
        assert not (tmp_path / "elsewhere.csv").exists()

    def test_export_to_file(self, rows: list[FileRow], tmp_path: Path) -> None:
        """export_to writes a private CSV file with every row."""
        path = tmp_path / "audit.csv"
        assert export_to(rows, path) == 3
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
        assert [line[0] for line in lines] == ["id"] + [str(r.id) for r in rows]

    def test_export_to_stdout(
        self, rows: list[FileRow], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without an output file the CSV goes to stdout."""
        assert export_to(rows, None) == 3
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == ",".join(COLUMNS)
        assert len(lines) == 4
