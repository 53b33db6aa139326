"""
Tests for uploader.status: collect() on a real ledger with rows in every state, and the
text report a person reads at a terminal.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from uploader.constants import State
from uploader.exceptions import LedgerError
from uploader.ledger import DISPOSITION_ARCHIVED, Ledger, LedgerLock
from uploader.status import collect, local_time, printable, render_text

CLIENT = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
_OFFSET = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")

#: How many rows each state gets, all different so a swapped count shows.
STATE_ROWS = {
    State.WAITING: 1, State.QUEUED: 2, State.UPLOADING: 3, State.UPLOADED: 4,
    State.DUPLICATE: 5, State.DEFERRED: 6, State.UNCERTAIN: 7, State.HELD: 8,
    State.FAILED: 9, State.VANISHED: 10,
}


def midnight_today() -> float:
    """Unix time of the start of today in the local zone."""
    now = datetime.now().astimezone()
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def add_row(ledger: Ledger, rel_path: str, **values: object) -> int:
    """Insert a row for CLIENT, set the given columns, and return the row id."""
    row = ledger.insert_waiting(rel_path=os.fsencode(rel_path), display_path=rel_path,
                                drop_folder=rel_path.split("/")[0], client_id=CLIENT,
                                size=10, mtime_ns=1, ctime_ns=1)
    return ledger.update(row.id, **values).id if values else row.id


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A closed ledger with rows in every state, two unmapped entries and one flag."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger.open(path)
    try:
        today = midnight_today() + 1
        for state, count in STATE_ROWS.items():
            for i in range(count):
                values: dict[str, object] = {"state": state, "updated_at": today + i}
                if state == State.UPLOADED:
                    # One upload yesterday, the rest today.
                    values["uploaded_at"] = today - 7200 if i == 0 else today
                    values["disposition"] = DISPOSITION_ARCHIVED
                if state == State.FAILED:
                    values["last_error"] = f"coreplus rejected the file (HTTP 415) #{i}"
                if state == State.DEFERRED:
                    values["next_attempt_at"] = today + 3600
                add_row(ledger, f"Smith [g]/{state}-{i}.pdf", **values)
        flagged = ledger.rows_in_state(State.UNCERTAIN)[0]
        ledger.update(flagged.id, possible_duplicate=1)
        ledger.record_unmapped(b"Loose", "Loose", "no client matches")
        ledger.record_unmapped(b"Another", "Another", "two clients match")
        ledger.set_status(paused="coreplus rejected the credentials", paused_action="renew")
    finally:
        ledger.close()
    return path


@pytest.fixture
def report(ledger_path: Path) -> dict[str, Any]:
    """The collected status of the populated ledger, with no daemon running."""
    return collect(ledger_path)


class TestCollect:
    def test_collect_counts(self, report: dict[str, Any]) -> None:
        """Every state is counted, with its own number of rows."""
        assert report["counts"] == {str(s): n for s, n in STATE_ROWS.items()}

    def test_collect_uploaded_today(self, report: dict[str, Any]) -> None:
        """Uploads confirmed before midnight count in the total but not today."""
        assert report["uploaded_today"] == STATE_ROWS[State.UPLOADED] - 1
        assert report["uploaded_total"] == STATE_ROWS[State.UPLOADED]

    @pytest.mark.parametrize("state", ["failed", "held", "deferred", "uncertain", "waiting",
                                       "queued", "uploading"])
    def test_collect_files_per_state(self, report: dict[str, Any], state: str) -> None:
        """Each state that may need a person lists every one of its rows, oldest first."""
        entries = report["files"][state]
        assert len(entries) == STATE_ROWS[State(state)]
        assert [e["path"] for e in entries] == [
            f"Smith [g]/{state}-{i}.pdf" for i in range(len(entries))]
        assert {e["state"] for e in entries} == {state}
        assert {e["client"] for e in entries} == {CLIENT}

    def test_collect_done_states_not_listed(self, report: dict[str, Any]) -> None:
        """Uploaded, duplicate and vanished rows are not listed file by file."""
        assert set(report["files"]) == {"failed", "held", "deferred", "uncertain", "waiting",
                                        "queued", "uploading"}

    def test_collect_failed_errors(self, report: dict[str, Any]) -> None:
        """Failed entries carry their error text."""
        errors = [e["error"] for e in report["files"]["failed"]]
        assert errors[0] == "coreplus rejected the file (HTTP 415) #0"
        assert len(set(errors)) == STATE_ROWS[State.FAILED]

    def test_collect_times_have_offset(self, report: dict[str, Any]) -> None:
        """Times in entries are local ISO 8601 with a UTC offset."""
        entry = report["files"]["deferred"][0]
        assert _OFFSET.fullmatch(entry["next_attempt_at"])
        assert _OFFSET.fullmatch(entry["updated_at"])
        assert _OFFSET.fullmatch(report["generated_at"])
        assert report["files"]["waiting"][0]["next_attempt_at"] is None

    def test_collect_unmapped(self, report: dict[str, Any]) -> None:
        """Unmapped entries are listed by path with their problem and local times."""
        unmapped = report["unmapped"]
        assert [(u["path"], u["problem"]) for u in unmapped] == [
            ("Another", "two clients match"), ("Loose", "no client matches")]
        assert _OFFSET.fullmatch(unmapped[0]["first_seen_at"])
        assert _OFFSET.fullmatch(unmapped[0]["last_seen_at"])

    def test_collect_possible_duplicates(self, report: dict[str, Any]) -> None:
        """Only the flagged row is listed as a possible duplicate."""
        [entry] = report["possible_duplicates"]
        assert entry["path"] == "Smith [g]/uncertain-0.pdf"
        assert entry["possible_duplicate"] is True
        assert entry["state"] == "uncertain"

    def test_collect_recent(self, report: dict[str, Any]) -> None:
        """Recent lists uploaded and duplicate rows, newest change first, at most ten."""
        recent = report["recent"]
        assert len(recent) == 9
        assert {e["state"] for e in recent} == {"uploaded", "duplicate"}
        assert recent[0]["path"] == "Smith [g]/duplicate-4.pdf"
        stamps = [e["updated_at"] for e in recent]
        assert stamps == sorted(stamps, reverse=True)

    def test_collect_not_running(self, report: dict[str, Any]) -> None:
        """Without a lock holder the daemon is not running and a stored pause is not shown."""
        assert report["running"] is False
        assert report["pid"] is None
        assert report["paused"] is False
        assert report["pause_reason"] is None
        assert report["pause_action"] is None

    def test_collect_running_paused(self, ledger_path: Path) -> None:
        """With the lock held the report names the pid and the stored pause."""
        lock = LedgerLock(ledger_path)
        lock.acquire()
        try:
            report = collect(ledger_path)
        finally:
            lock.release()
        assert report["running"] is True
        assert report["pid"] == os.getpid()
        assert report["paused"] is True
        assert report["pause_reason"] == "coreplus rejected the credentials"
        assert report["pause_action"] == "renew"

    def test_collect_leaves_ledger_unchanged(self, ledger_path: Path) -> None:
        """Collecting reads only: the rows and the lock file are as before."""
        before = ledger_path.read_bytes()
        collect(ledger_path)
        assert ledger_path.read_bytes() == before
        assert not LedgerLock(ledger_path).path.exists()

    def test_collect_sees_open_writer(self, ledger_path: Path) -> None:
        """Rows committed by a ledger still open (the daemon's) are counted, WAL included."""
        writer = Ledger.open(ledger_path)
        try:
            add_row(writer, "Smith [g]/new.pdf", state=State.HELD)
            report = collect(ledger_path)
        finally:
            writer.close()
        assert report["counts"]["held"] == STATE_ROWS[State.HELD] + 1
        assert report["files"]["held"][-1]["path"] == "Smith [g]/new.pdf"

    def test_collect_missing_ledger(self, tmp_path: Path) -> None:
        """A missing ledger raises LedgerError and is not created."""
        path = tmp_path / "ledger.sqlite3"
        with pytest.raises(LedgerError, match="does not exist"):
            collect(path)
        assert not path.exists()


class TestRender:
    def test_render_summary(self, report: dict[str, Any]) -> None:
        """The text starts with the daemon line, the queue and the upload counts."""
        lines = render_text(report).splitlines()
        assert lines[0] == "Daemon: not running."
        assert lines[1] == "Queue: 1 waiting, 2 queued, 3 uploading, 6 deferred."
        assert lines[2] == "Uploaded: 3 today, 4 in total; 5 duplicates skipped."
        assert "PAUSED" not in render_text(report)

    def test_render_failed_with_errors(self, report: dict[str, Any]) -> None:
        """Failed files are listed with their id, path and error."""
        text = render_text(report)
        assert "\nFailed (9):\n" in text
        first = report["files"]["failed"][0]
        assert (f"  #{first['id']} Smith [g]/failed-0.pdf  "
                "coreplus rejected the file (HTTP 415) #0\n") in text

    def test_render_deferred_next_attempt(self, report: dict[str, Any]) -> None:
        """Deferred files show their next attempt time."""
        entry = report["files"]["deferred"][0]
        assert (f"  #{entry['id']} Smith [g]/deferred-0.pdf  "
                f"next attempt {entry['next_attempt_at']};") in render_text(report)

    def test_render_sections(self, report: dict[str, Any]) -> None:
        """Recent uploads, unmapped folders and possible duplicates get their sections."""
        text = render_text(report)
        assert "\nRecent uploads:\n" in text
        assert "  Loose: no client matches\n" in text
        flagged = report["possible_duplicates"][0]
        assert (f"  #{flagged['id']} Smith [g]/uncertain-0.pdf (uncertain, client "
                f"{CLIENT})\n") in text

    def test_render_running_paused(self, report: dict[str, Any]) -> None:
        """A running, paused daemon shows its pid, the reason and what to do."""
        report.update(running=True, pid=4321, paused=True, pause_reason="HTTP 401",
                      pause_action="Renew the access token.")
        lines = render_text(report).splitlines()
        assert lines[0] == "Daemon: running (pid 4321)."
        assert lines[1] == "Uploads are PAUSED: HTTP 401"
        assert lines[2] == "  What to do: Renew the access token."

    def test_render_long_list_cut(self, tmp_path: Path) -> None:
        """More than twenty rows in one state show twenty and a count of the rest."""
        path = tmp_path / "ledger.sqlite3"
        ledger = Ledger.open(path)
        try:
            for i in range(23):
                add_row(ledger, f"Smith [g]/held-{i:02}.pdf", state=State.HELD)
        finally:
            ledger.close()
        text = render_text(collect(path))
        assert "held-19.pdf" in text
        assert "held-20.pdf" not in text
        assert "  ... and 3 more (use --json for all)\n" in text

    def test_render_control_characters(self, tmp_path: Path) -> None:
        """Control characters in names and errors print as '?', so no line can be faked."""
        path = tmp_path / "ledger.sqlite3"
        evil = "Smith [g]/a\x1b[2J\nDaemon: running\r\x07\x7f\x9b.pdf"
        ledger = Ledger.open(path)
        try:
            add_row(ledger, evil, state=State.FAILED, last_error="bad\ttab\x00")
        finally:
            ledger.close()
        text = render_text(collect(path))
        assert "Smith [g]/a?[2J?Daemon: running????.pdf  bad?tab?\n" in text
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)
        assert [line for line in text.splitlines() if line.startswith("Daemon")] == [
            "Daemon: not running."]

    def test_printable(self) -> None:
        """printable keeps ordinary text and Unicode, and turns controls into '?'."""
        assert printable("Nguyễn, Thị\ufffd.pdf") == "Nguyễn, Thị\ufffd.pdf"
        assert printable("a\nb\x1bc\x85") == "a?b?c?"
        assert printable(42) == "42"


class TestLocalTime:
    def test_local_time_offset(self) -> None:
        """A unix time becomes local ISO 8601 to the second, with its UTC offset."""
        text = local_time(1_760_000_000.0)
        assert text is not None
        assert _OFFSET.fullmatch(text)
        assert datetime.fromisoformat(text).timestamp() == 1_760_000_000.0

    def test_local_time_none(self) -> None:
        """None stays None."""
        assert local_time(None) is None
