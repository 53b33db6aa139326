"""
Tests for uploader.ledger on real SQLite files in tmp_path: opening and checking the
file, the lock between processes, and every lookup and change the daemon relies on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from uploader.constants import ACTIVE_STATES, State
from uploader.exceptions import LedgerDamagedError, LedgerError, LedgerLockedError
from uploader.ledger import (
    _SCHEMA_V1,
    DISPOSITION_ARCHIVED,
    DISPOSITION_DELETED,
    DISPOSITION_FAILED_DIR,
    DISPOSITION_KEPT,
    DISPOSITION_PENDING,
    SCHEMA_VERSION,
    Claim,
    FileRow,
    Ledger,
    LedgerLock,
)

CLIENT_A = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
CLIENT_B = "54c8f0b4-632b-49af-99e8-cf729198846d"
SHA_1 = "a" * 64
SHA_2 = "b" * 64
NOW = 1_760_000_000.0

LedgerFactory = Callable[..., Ledger]

# A child process that takes the lock, reports it, then sleeps until it is killed.
_HOLDER_SCRIPT = """
import sys, time
from pathlib import Path
from uploader.ledger import LedgerLock
LedgerLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def open_ledger(tmp_path: Path) -> Iterator[LedgerFactory]:
    """A factory for ledgers under tmp_path that closes every ledger it opened."""
    opened: list[Ledger] = []

    def factory(path: Path | None = None, **kwargs: object) -> Ledger:
        ledger = Ledger.open(path or tmp_path / "state" / "ledger.sqlite3", **kwargs)
        opened.append(ledger)
        return ledger

    yield factory
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_ledger: LedgerFactory) -> Ledger:
    """A new, empty ledger."""
    return open_ledger()


def add_row(
    ledger: Ledger,
    rel_path: str = "Smith [g]/letter.pdf",
    *,
    client_id: str | None = CLIENT_A,
    size: int = 100,
    now: float = NOW,
    **values: object,
) -> FileRow:
    """Insert a waiting row, then set any further columns given."""
    row = ledger.insert_waiting(
        rel_path=os.fsencode(rel_path), display_path=rel_path,
        drop_folder=rel_path.split("/")[0], client_id=client_id, size=size,
        mtime_ns=1, ctime_ns=2, now=now)
    if values:
        row = ledger.update(row.id, **values)
    return row


def file_mode(path: Path) -> int:
    """The permission bits of a file."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def start_lock_holder() -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """A factory for processes that hold a ledger's lock, each killed at teardown."""
    started: list[subprocess.Popen[str]] = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def start(ledger_path: Path) -> subprocess.Popen[str]:
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER_SCRIPT, str(ledger_path)],
                                  stdout=subprocess.PIPE, text=True, env=env)
        started.append(holder)
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        return holder

    yield start
    for holder in started:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


class TestOpen:
    def test_open_new_ledger_wal(self, ledger: Ledger) -> None:
        """A new ledger is created, flagged as created, and runs in WAL mode."""
        assert ledger.created is True
        assert ledger.path.exists()
        check = sqlite3.connect(ledger.path)
        try:
            assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            check.close()

    def test_open_new_ledger_private(self, tmp_path: Path, open_ledger: LedgerFactory) -> None:
        """A new ledger file is mode 0600 and its missing folder is created mode 0700."""
        path = tmp_path / "missing" / "ledger.sqlite3"
        open_ledger(path)
        assert file_mode(path) == 0o600
        assert file_mode(path.parent) == 0o700
        assert not path.with_name("ledger.sqlite3.new").exists()

    def test_open_schema_version(self, ledger: Ledger) -> None:
        """A new ledger carries the current schema version in PRAGMA user_version."""
        check = sqlite3.connect(ledger.path)
        try:
            assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        finally:
            check.close()

    def test_open_existing_not_created(self, ledger: Ledger, open_ledger: LedgerFactory) -> None:
        """Opening an existing ledger again keeps its rows and reports created False."""
        row = add_row(ledger)
        ledger.close()
        again = open_ledger(ledger.path)
        assert again.created is False
        assert again.get(row.id) == row

    def test_open_newer_schema_rejected(self, ledger: Ledger, open_ledger: LedgerFactory) -> None:
        """A ledger written by a newer schema raises LedgerError naming both versions."""
        ledger.close()
        db = sqlite3.connect(ledger.path)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.commit()
        db.close()
        with pytest.raises(LedgerError) as caught:
            open_ledger(ledger.path)
        assert not isinstance(caught.value, LedgerDamagedError)
        assert str(ledger.path) in str(caught.value)
        assert f"schema {SCHEMA_VERSION + 1}" in str(caught.value)
        assert "Upgrade the program" in str(caught.value)

    def test_open_foreign_database(self, tmp_path: Path, open_ledger: LedgerFactory) -> None:
        """An SQLite file with tables but no schema version is reported as damaged."""
        path = tmp_path / "other.sqlite3"
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE notes (body TEXT)")
        db.commit()
        db.close()
        with pytest.raises(LedgerDamagedError, match="no schema version"):
            open_ledger(path)

    def test_open_garbage_file(self, tmp_path: Path, open_ledger: LedgerFactory) -> None:
        """A file that is not SQLite raises LedgerDamagedError with its path, untouched."""
        path = tmp_path / "ledger.sqlite3"
        garbage = b"this is not an SQLite database\n" * 200
        path.write_bytes(garbage)
        with pytest.raises(LedgerDamagedError) as caught:
            open_ledger(path)
        assert str(path) in str(caught.value)
        assert "ledger backup" in str(caught.value)
        assert path.read_bytes() == garbage

    def test_open_empty_file(self, tmp_path: Path, open_ledger: LedgerFactory) -> None:
        """An empty file raises LedgerDamagedError with its path and stays empty."""
        path = tmp_path / "ledger.sqlite3"
        path.touch()
        with pytest.raises(LedgerDamagedError) as caught:
            open_ledger(path)
        assert str(path) in str(caught.value)
        assert "the file is empty" in str(caught.value)
        assert path.stat().st_size == 0

    def test_open_corrupt_pages(self, ledger: Ledger, open_ledger: LedgerFactory) -> None:
        """A ledger whose table pages were overwritten raises LedgerDamagedError."""
        for i in range(200):
            add_row(ledger, f"Smith [g]/letter-{i:03}.pdf")
        ledger.close()
        page_size = 4096
        with open(ledger.path, "r+b") as f:
            f.seek(page_size)
            f.write(b"\xff" * page_size * 3)
        with pytest.raises(LedgerDamagedError) as caught:
            open_ledger(ledger.path)
        assert str(ledger.path) in str(caught.value)

    def test_open_missing_no_create(self, tmp_path: Path, open_ledger: LedgerFactory) -> None:
        """A missing ledger with create=False or readonly raises LedgerError, creates nothing."""
        path = tmp_path / "ledger.sqlite3"
        with pytest.raises(LedgerError, match="does not exist"):
            open_ledger(path, create=False)
        with pytest.raises(LedgerError, match="does not exist"):
            open_ledger(path, readonly=True)
        assert list(tmp_path.iterdir()) == []

    def test_open_readonly_rejects_writes(
        self, ledger: Ledger, open_ledger: LedgerFactory
    ) -> None:
        """A ledger opened read-only reads rows and rejects changes."""
        row = add_row(ledger)
        ledger.close()
        reader = open_ledger(ledger.path, readonly=True)
        assert reader.get(row.id) == row
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.update(row.id, state=State.QUEUED)


class TestLock:
    def test_lock_other_process(self, tmp_path: Path, start_lock_holder: Any) -> None:
        """A lock held by another process raises LedgerLockedError naming its pid."""
        ledger_path = tmp_path / "ledger.sqlite3"
        holder = start_lock_holder(ledger_path)
        lock = LedgerLock(ledger_path)
        with pytest.raises(LedgerLockedError) as caught:
            lock.acquire()
        assert f"pid {holder.pid}" in str(caught.value)
        assert str(ledger_path) in str(caught.value)
        assert lock.is_held_elsewhere() is True
        assert lock.holder_pid() == holder.pid

    def test_lock_released_on_death(self, tmp_path: Path, start_lock_holder: Any) -> None:
        """After the holder is killed with SIGKILL the lock can be taken and stores our pid."""
        ledger_path = tmp_path / "ledger.sqlite3"
        holder = start_lock_holder(ledger_path)
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait() == -signal.SIGKILL
        lock = LedgerLock(ledger_path)
        assert lock.is_held_elsewhere() is False
        lock.acquire()
        try:
            assert lock.holder_pid() == os.getpid()
        finally:
            lock.release()

    def test_lock_file_private(self, tmp_path: Path) -> None:
        """The lock file is beside the ledger, with mode 0600, and contains our pid."""
        lock = LedgerLock(tmp_path / "ledger.sqlite3")
        lock.acquire()
        try:
            assert lock.path == tmp_path / "ledger.sqlite3.lock"
            assert file_mode(lock.path) == 0o600
            assert lock.path.read_text() == f"{os.getpid()}\n"
        finally:
            lock.release()

    def test_lock_second_holder_same_process(self, tmp_path: Path) -> None:
        """A second lock object on the same ledger is rejected until the first releases."""
        first = LedgerLock(tmp_path / "ledger.sqlite3")
        second = LedgerLock(tmp_path / "ledger.sqlite3")
        first.acquire()
        try:
            with pytest.raises(LedgerLockedError):
                second.acquire()
        finally:
            first.release()
        second.acquire()
        second.release()
        assert second.path.exists()

    def test_lock_not_held(self, tmp_path: Path) -> None:
        """Without a lock file nobody holds the lock and no pid is known."""
        lock = LedgerLock(tmp_path / "ledger.sqlite3")
        assert lock.is_held_elsewhere() is False
        assert lock.holder_pid() is None


class TestRows:
    def test_insert_waiting(self, ledger: Ledger) -> None:
        """A new row is waiting, with its stat fields and both times set to now."""
        row = add_row(ledger, size=42)
        assert row.state == State.WAITING
        assert row.rel_path == b"Smith [g]/letter.pdf"
        assert row.drop_folder == "Smith [g]"
        assert row.client_id == CLIENT_A
        assert (row.size, row.mtime_ns, row.ctime_ns) == (42, 1, 2)
        assert row.first_seen_at == NOW
        assert row.updated_at == NOW
        assert row.attempts == 0
        assert row.possible_duplicate == 0
        assert row.sha256 is None

    def test_update_sets_updated_at(self, ledger: Ledger) -> None:
        """update changes the given columns and stamps updated_at with the current time."""
        row = add_row(ledger)
        before = time.time()
        changed = ledger.update(row.id, state=State.QUEUED, sha256=SHA_1, attempts=2)
        after = time.time()
        assert changed.state == State.QUEUED
        assert changed.sha256 == SHA_1
        assert changed.attempts == 2
        assert before <= changed.updated_at <= after
        assert changed.first_seen_at == NOW
        assert ledger.get(row.id) == changed

    def test_update_explicit_updated_at(self, ledger: Ledger) -> None:
        """An updated_at passed to update is stored as given."""
        row = add_row(ledger)
        changed = ledger.update(row.id, state=State.QUEUED, updated_at=NOW + 5)
        assert changed.updated_at == NOW + 5

    def test_update_unknown_column(self, ledger: Ledger) -> None:
        """An unknown column name raises ValueError and changes nothing."""
        row = add_row(ledger)
        with pytest.raises(ValueError, match="unknown ledger columns: \\['colour'\\]"):
            ledger.update(row.id, state=State.QUEUED, colour="red")
        assert ledger.get(row.id) == row

    def test_update_missing_row(self, ledger: Ledger) -> None:
        """Updating a row id that does not exist raises LedgerError."""
        with pytest.raises(LedgerError, match="ledger row 99"):
            ledger.update(99, state=State.QUEUED)

    def test_get_missing(self, ledger: Ledger) -> None:
        """get returns None for an unknown id."""
        assert ledger.get(12345) is None

    def test_as_dict_without_raw_path(self, ledger: Ledger) -> None:
        """as_dict has every column except the raw rel_path bytes."""
        data = add_row(ledger).as_dict()
        assert "rel_path" not in data
        assert data["display_path"] == "Smith [g]/letter.pdf"
        assert data["state"] == "waiting"

    def test_rows_in_state_and_counts(self, ledger: Ledger) -> None:
        """rows_in_state lists oldest first up to a limit, and count_by_state counts each state."""
        first = add_row(ledger, "A/1.pdf", state=State.QUEUED)
        second = add_row(ledger, "A/2.pdf", state=State.QUEUED)
        add_row(ledger, "A/3.pdf", state=State.FAILED)
        add_row(ledger, "A/4.pdf")
        assert [r.id for r in ledger.rows_in_state(State.QUEUED)] == [first.id, second.id]
        assert [r.id for r in ledger.rows_in_state(State.QUEUED, limit=1)] == [first.id]
        assert len(ledger.rows_in_state(State.QUEUED, State.FAILED)) == 3
        assert ledger.count_by_state() == {"queued": 2, "failed": 1, "waiting": 1}

    def test_count_uploaded_since(self, ledger: Ledger) -> None:
        """count_uploaded_since counts uploaded rows confirmed at or after the time."""
        add_row(ledger, "A/1.pdf", state=State.UPLOADED, uploaded_at=NOW - 10)
        add_row(ledger, "A/2.pdf", state=State.UPLOADED, uploaded_at=NOW)
        add_row(ledger, "A/3.pdf", state=State.DUPLICATE, uploaded_at=NOW)
        assert ledger.count_uploaded_since(NOW) == 1
        assert ledger.count_uploaded_since(NOW - 10) == 2

    def test_recent_newest_first(self, ledger: Ledger) -> None:
        """recent returns rows of the given states by updated_at, newest first, limited."""
        old = add_row(ledger, "A/1.pdf", state=State.UPLOADED, updated_at=NOW + 1)
        new = add_row(ledger, "A/2.pdf", state=State.DUPLICATE, updated_at=NOW + 3)
        mid = add_row(ledger, "A/3.pdf", state=State.UPLOADED, updated_at=NOW + 2)
        add_row(ledger, "A/4.pdf", state=State.FAILED, updated_at=NOW + 9)
        recent = ledger.recent(State.UPLOADED, State.DUPLICATE)
        assert [r.id for r in recent] == [new.id, mid.id, old.id]
        assert [r.id for r in ledger.recent(State.UPLOADED, limit=1)] == [mid.id]

    def test_all_rows_oldest_first(self, ledger: Ledger) -> None:
        """all_rows yields every row in id order."""
        ids = [add_row(ledger, f"A/{i}.pdf").id for i in range(3)]
        assert [r.id for r in ledger.all_rows()] == ids


class TestFindLive:
    @pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
    def test_find_live_active_state(self, ledger: Ledger, state: State) -> None:
        """A row in an active state is live at its path."""
        row = add_row(ledger, state=state)
        found = ledger.find_live(row.rel_path)
        assert found is not None
        assert found.id == row.id

    @pytest.mark.parametrize("disposition", [DISPOSITION_KEPT, DISPOSITION_PENDING])
    @pytest.mark.parametrize("state", [State.UPLOADED, State.DUPLICATE])
    def test_find_live_file_still_in_place(
        self, ledger: Ledger, state: State, disposition: str
    ) -> None:
        """An upload kept in place, or whose archive move is pending, is live."""
        row = add_row(ledger, state=state, disposition=disposition)
        found = ledger.find_live(row.rel_path)
        assert found is not None
        assert found.id == row.id

    @pytest.mark.parametrize(
        ("state", "disposition"),
        [
            (State.UPLOADED, DISPOSITION_ARCHIVED),
            (State.UPLOADED, DISPOSITION_DELETED),
            (State.DUPLICATE, DISPOSITION_ARCHIVED),
            (State.FAILED, DISPOSITION_FAILED_DIR),
            (State.FAILED, None),
            (State.VANISHED, None),
        ],
    )
    def test_find_live_gone_from_folder(
        self, ledger: Ledger, state: State, disposition: str | None
    ) -> None:
        """Archived, deleted, failed and vanished rows are not live."""
        row = add_row(ledger, state=state, disposition=disposition)
        assert ledger.find_live(row.rel_path) is None

    def test_find_live_newest(self, ledger: Ledger) -> None:
        """With several live rows for one path the newest is returned."""
        add_row(ledger, state=State.UPLOADED, disposition=DISPOSITION_KEPT)
        newest = add_row(ledger, state=State.WAITING)
        found = ledger.find_live(b"Smith [g]/letter.pdf")
        assert found is not None
        assert found.id == newest.id

    def test_find_live_other_path(self, ledger: Ledger) -> None:
        """A live row for another path is not found."""
        add_row(ledger, "Smith [g]/a.pdf")
        assert ledger.find_live(b"Smith [g]/b.pdf") is None


class TestFindUploaded:
    def test_find_uploaded_earliest(self, ledger: Ledger) -> None:
        """The earliest uploaded row with the client and hash is returned."""
        first = add_row(ledger, "A/1.pdf", state=State.UPLOADED, sha256=SHA_1)
        add_row(ledger, "A/2.pdf", state=State.UPLOADED, sha256=SHA_1)
        found = ledger.find_uploaded(CLIENT_A, SHA_1)
        assert found is not None
        assert found.id == first.id

    def test_find_uploaded_ignores_forgotten(self, ledger: Ledger) -> None:
        """A forgotten upload no longer counts, so the bytes can go up again."""
        forgotten = add_row(ledger, "A/1.pdf", state=State.UPLOADED, sha256=SHA_1)
        assert ledger.forget(forgotten.rel_path) == 1
        assert ledger.find_uploaded(CLIENT_A, SHA_1) is None
        later = add_row(ledger, "A/2.pdf", state=State.UPLOADED, sha256=SHA_1)
        found = ledger.find_uploaded(CLIENT_A, SHA_1)
        assert found is not None
        assert found.id == later.id

    def test_find_uploaded_other_client(self, ledger: Ledger) -> None:
        """The same bytes uploaded for another client are not a match."""
        add_row(ledger, client_id=CLIENT_B, state=State.UPLOADED, sha256=SHA_1)
        assert ledger.find_uploaded(CLIENT_A, SHA_1) is None

    @pytest.mark.parametrize("state", [State.QUEUED, State.DUPLICATE, State.UNCERTAIN,
                                       State.FAILED])
    def test_find_uploaded_other_states(self, ledger: Ledger, state: State) -> None:
        """Rows with the same hash that are not uploaded are not a match."""
        add_row(ledger, state=state, sha256=SHA_1)
        assert ledger.find_uploaded(CLIENT_A, SHA_1) is None

    def test_find_uploaded_other_hash(self, ledger: Ledger) -> None:
        """An upload of different bytes for the client is not a match."""
        add_row(ledger, state=State.UPLOADED, sha256=SHA_2)
        assert ledger.find_uploaded(CLIENT_A, SHA_1) is None


class TestNextReady:
    def test_next_ready_queued_in_order(self, ledger: Ledger) -> None:
        """Queued rows come oldest first, up to the limit."""
        ids = [add_row(ledger, f"A/{i}.pdf", state=State.QUEUED).id for i in range(4)]
        ready = ledger.next_ready(now=NOW, limit=3, include_uncertain=True)
        assert [r.id for r in ready] == ids[:3]

    def test_next_ready_exclude(self, ledger: Ledger) -> None:
        """Excluded ids (already taken by a worker) are skipped."""
        ids = [add_row(ledger, f"A/{i}.pdf", state=State.QUEUED).id for i in range(3)]
        ready = ledger.next_ready(now=NOW, limit=10, include_uncertain=True,
                                  exclude=[ids[0], ids[2]])
        assert [r.id for r in ready] == [ids[1]]

    def test_next_ready_deferred_timing(self, ledger: Ledger) -> None:
        """A deferred row is ready once next_attempt_at has passed, or when it is unset."""
        due = add_row(ledger, "A/due.pdf", state=State.DEFERRED, next_attempt_at=NOW)
        later = add_row(ledger, "A/later.pdf", state=State.DEFERRED, next_attempt_at=NOW + 1)
        unset = add_row(ledger, "A/unset.pdf", state=State.DEFERRED, next_attempt_at=None)
        ready = ledger.next_ready(now=NOW, limit=10, include_uncertain=False)
        assert [r.id for r in ready] == [due.id, unset.id]
        ready = ledger.next_ready(now=NOW + 1, limit=10, include_uncertain=False)
        assert [r.id for r in ready] == [due.id, later.id, unset.id]

    def test_next_ready_uncertain_switch(self, ledger: Ledger) -> None:
        """A due uncertain row is ready only with include_uncertain, and only once due."""
        row = add_row(ledger, state=State.UNCERTAIN, next_attempt_at=NOW)
        assert ledger.next_ready(now=NOW, limit=10, include_uncertain=False) == []
        assert [r.id for r in ledger.next_ready(now=NOW, limit=10, include_uncertain=True)] \
            == [row.id]
        assert ledger.next_ready(now=NOW - 1, limit=10, include_uncertain=True) == []

    @pytest.mark.parametrize("state", [State.WAITING, State.UPLOADING, State.HELD,
                                       State.FAILED, State.UPLOADED, State.VANISHED])
    def test_next_ready_never(self, ledger: Ledger, state: State) -> None:
        """Rows in other states are never handed to a worker."""
        add_row(ledger, state=state, next_attempt_at=NOW - 100)
        assert ledger.next_ready(now=NOW, limit=10, include_uncertain=True) == []

    def test_next_wakeup(self, ledger: Ledger) -> None:
        """next_wakeup is the earliest retry time, counting uncertain rows only when asked."""
        assert ledger.next_wakeup(include_uncertain=True) is None
        add_row(ledger, "A/1.pdf", state=State.DEFERRED, next_attempt_at=NOW + 30)
        add_row(ledger, "A/2.pdf", state=State.UNCERTAIN, next_attempt_at=NOW + 10)
        add_row(ledger, "A/3.pdf", state=State.HELD, next_attempt_at=NOW + 1)
        assert ledger.next_wakeup(include_uncertain=False) == NOW + 30
        assert ledger.next_wakeup(include_uncertain=True) == NOW + 10


class TestClaimUpload:
    def test_claim_marks_uploading(self, ledger: Ledger) -> None:
        """A queued row becomes uploading with the attempt counted and no retry time."""
        row = add_row(ledger, state=State.QUEUED, sha256=SHA_1, next_attempt_at=NOW)
        claim = ledger.claim_upload(row.id, attempts=1, duplicate_key=(CLIENT_A, SHA_1))
        assert claim.earlier is None
        assert claim.row is not None
        stored = ledger.get(row.id)
        assert stored == claim.row
        assert (stored.state, stored.attempts, stored.next_attempt_at) == (
            State.UPLOADING, 1, None)

    @pytest.mark.parametrize("state", [State.DEFERRED, State.UNCERTAIN])
    def test_claim_retry_states(self, ledger: Ledger, state: State) -> None:
        """Deferred and uncertain rows may be claimed for their next attempt."""
        row = add_row(ledger, state=state, sha256=SHA_1, attempts=5)
        claim = ledger.claim_upload(row.id, attempts=6, duplicate_key=None)
        assert claim.row is not None
        assert (claim.row.state, claim.row.attempts) == (State.UPLOADING, 6)

    def test_claim_finds_earlier_upload(self, ledger: Ledger) -> None:
        """The same bytes already uploaded for the client are returned; the row is untouched."""
        earlier = add_row(ledger, "A/1.pdf", state=State.UPLOADED, sha256=SHA_1)
        row = add_row(ledger, "A/2.pdf", state=State.QUEUED, sha256=SHA_1)
        claim = ledger.claim_upload(row.id, attempts=1, duplicate_key=(CLIENT_A, SHA_1))
        assert claim.row is None
        assert claim.earlier is not None
        assert claim.earlier.id == earlier.id
        assert ledger.get(row.id) == row

    def test_claim_without_duplicate_key(self, ledger: Ledger) -> None:
        """With no duplicate key the earlier upload is not looked up, and the row is taken."""
        add_row(ledger, "A/1.pdf", state=State.UPLOADED, sha256=SHA_1)
        row = add_row(ledger, "A/2.pdf", state=State.QUEUED, sha256=SHA_1)
        claim = ledger.claim_upload(row.id, attempts=1, duplicate_key=None)
        assert claim.earlier is None
        assert claim.row is not None
        assert claim.row.state == State.UPLOADING

    @pytest.mark.parametrize("state", [State.WAITING, State.UPLOADING, State.UPLOADED,
                                       State.HELD, State.VANISHED, State.FAILED])
    def test_claim_row_no_longer_ready(self, ledger: Ledger, state: State) -> None:
        """A row that left the ready states since it was read is not taken or changed."""
        row = add_row(ledger, state=state, sha256=SHA_1, attempts=2)
        claim = ledger.claim_upload(row.id, attempts=3, duplicate_key=(CLIENT_A, SHA_1))
        assert claim == Claim()
        assert ledger.get(row.id) == row

    def test_claim_forgotten_earlier_upload(self, ledger: Ledger) -> None:
        """A forgotten earlier upload does not block the same bytes from going up."""
        earlier = add_row(ledger, "A/1.pdf", state=State.UPLOADED, sha256=SHA_1)
        assert ledger.forget(earlier.rel_path) == 1
        row = add_row(ledger, "A/2.pdf", state=State.QUEUED, sha256=SHA_1)
        claim = ledger.claim_upload(row.id, attempts=1, duplicate_key=(CLIENT_A, SHA_1))
        assert claim.earlier is None
        assert claim.row is not None


# Writes rows to a ledger, then kills itself before Python can close anything. The first
# write to a new log always syncs it, so "first" stops after that write and is the base.
_RELAXED_WRITER_SCRIPT = """
import os, signal, sys
from pathlib import Path
from uploader.ledger import Ledger
ledger = Ledger.open(Path(sys.argv[1]))
row = ledger.insert_waiting(rel_path=b"A/1.pdf", display_path="A/1.pdf", drop_folder="A",
                            client_id=None, size=1, mtime_ns=1, ctime_ns=1)
if sys.argv[2] != "first":
    for size in range(2, 22):
        ledger.update(row.id, durable=False, state="queued", sha256="a" * 64, size=size)
if sys.argv[2] == "durable":
    ledger.update(row.id, attempts=1)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _fsyncs_while(tmp_path: Path, mode: str) -> tuple[int, Path]:
    """Run the writer script under strace; return its fsync calls and the ledger path."""
    ledger_path = tmp_path / mode / "ledger.sqlite3"
    trace = tmp_path / f"{mode}.strace"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                    sys.executable, "-c", _RELAXED_WRITER_SCRIPT, str(ledger_path), mode],
                   env=env, check=False, timeout=60)
    return len(re.findall(r"\bf(?:data)?sync\(", trace.read_text())), ledger_path


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
class TestDurability:
    def test_relaxed_commits_skip_fsync(self, tmp_path: Path) -> None:
        """
        Twenty relaxed commits make no fsync; the next durable commit does, and every
        change survives SIGKILL either way.
        """
        first_syncs, _ = _fsyncs_while(tmp_path, "first")
        relaxed_syncs, relaxed_path = _fsyncs_while(tmp_path, "relaxed")
        durable_syncs, durable_path = _fsyncs_while(tmp_path, "durable")
        assert relaxed_syncs == first_syncs
        assert durable_syncs > relaxed_syncs
        for path in (relaxed_path, durable_path):
            reopened = Ledger.open(path)
            try:
                rows = list(reopened.all_rows())
            finally:
                reopened.close()
            assert [(r.state, r.sha256, r.size) for r in rows] == [(State.QUEUED, SHA_1, 21)]

    def test_durable_after_relaxed(self, ledger: Ledger) -> None:
        """A durable commit after a relaxed one runs with SQLite's FULL setting again."""
        row = add_row(ledger)
        ledger.update(row.id, durable=False, state=State.QUEUED)
        # The setting is per connection, so only the ledger's own connection can show it.
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 1
        ledger.update(row.id, state=State.UPLOADING)
        assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2


class TestRecovery:
    def test_recover_uploading_to_uncertain(self, ledger: Ledger) -> None:
        """An interrupted upload becomes uncertain, flagged, due now, with an explanation."""
        row = add_row(ledger, state=State.UPLOADING, next_attempt_at=NOW + 60)
        other = add_row(ledger, "A/queued.pdf", state=State.QUEUED)
        stuck = ledger.recover_interrupted(hold=False)
        assert [r.id for r in stuck] == [row.id]
        after = ledger.get(row.id)
        assert after is not None
        assert after.state == State.UNCERTAIN
        assert after.possible_duplicate == 1
        assert after.next_attempt_at is None
        assert after.last_error is not None
        assert "may already hold the file" in after.last_error
        assert ledger.get(other.id) == other

    def test_recover_uploading_held(self, ledger: Ledger) -> None:
        """With the hold policy an interrupted upload becomes held and flagged."""
        row = add_row(ledger, state=State.UPLOADING)
        ledger.recover_interrupted(hold=True)
        after = ledger.get(row.id)
        assert after is not None
        assert after.state == State.HELD
        assert after.possible_duplicate == 1

    def test_recover_pending_disposition(self, ledger: Ledger) -> None:
        """Uploaded and duplicate rows without a disposition get pending, and others keep theirs."""
        uploaded = add_row(ledger, "A/1.pdf", state=State.UPLOADED)
        duplicate = add_row(ledger, "A/2.pdf", state=State.DUPLICATE)
        archived = add_row(ledger, "A/3.pdf", state=State.UPLOADED,
                           disposition=DISPOSITION_ARCHIVED)
        failed = add_row(ledger, "A/4.pdf", state=State.FAILED)
        assert ledger.recover_interrupted(hold=False) == []
        assert [r.id for r in ledger.pending_dispositions()] == [uploaded.id, duplicate.id]
        archived_after = ledger.get(archived.id)
        failed_after = ledger.get(failed.id)
        assert archived_after is not None and archived_after.disposition == DISPOSITION_ARCHIVED
        assert failed_after is not None and failed_after.disposition is None


class TestRequeue:
    def test_requeue_all(self, ledger: Ledger) -> None:
        """ids=None requeues every deferred, held and uncertain row, but no failed row."""
        deferred = add_row(ledger, "A/1.pdf", state=State.DEFERRED, next_attempt_at=NOW,
                           deferrals=3)
        held = add_row(ledger, "A/2.pdf", state=State.HELD)
        uncertain = add_row(ledger, "A/3.pdf", state=State.UNCERTAIN, possible_duplicate=1)
        failed = add_row(ledger, "A/4.pdf", state=State.FAILED)
        uploaded = add_row(ledger, "A/5.pdf", state=State.UPLOADED)
        changed = ledger.requeue(None)
        assert sorted(changed) == [deferred.id, held.id, uncertain.id]
        for row_id in changed:
            row = ledger.get(row_id)
            assert row is not None
            assert row.state == State.QUEUED
            assert row.next_attempt_at is None
            assert row.deferrals == 0
        flagged = ledger.get(uncertain.id)
        assert flagged is not None and flagged.possible_duplicate == 1
        assert ledger.get(failed.id) == failed
        assert ledger.get(uploaded.id) == uploaded

    def test_requeue_ids_filter(self, ledger: Ledger) -> None:
        """Only the given ids change, and a given failed id is still left alone."""
        first = add_row(ledger, "A/1.pdf", state=State.HELD)
        second = add_row(ledger, "A/2.pdf", state=State.HELD)
        failed = add_row(ledger, "A/3.pdf", state=State.FAILED)
        assert ledger.requeue([second.id, failed.id]) == [second.id]
        assert ledger.get(first.id) == first
        assert ledger.get(failed.id) == failed

    def test_requeue_empty_ids(self, ledger: Ledger) -> None:
        """An empty id list changes nothing."""
        row = add_row(ledger, state=State.HELD)
        assert ledger.requeue([]) == []
        assert ledger.get(row.id) == row


class TestForget:
    def test_forget_all_rows_for_path(self, ledger: Ledger) -> None:
        """forget flags every row of the path, counts them, and leaves other paths alone."""
        first = add_row(ledger, "A/1.pdf", state=State.UPLOADED)
        second = add_row(ledger, "A/1.pdf", state=State.DUPLICATE)
        other = add_row(ledger, "A/2.pdf", state=State.UPLOADED)
        assert ledger.forget(b"A/1.pdf") == 2
        for row_id in (first.id, second.id):
            row = ledger.get(row_id)
            assert row is not None and row.forgotten == 1
        assert ledger.get(other.id) == other
        assert ledger.forget(b"A/missing.pdf") == 0


class TestUnmapped:
    def test_record_unmapped_first_time(self, ledger: Ledger) -> None:
        """The first report returns True, the next False with the new problem stored."""
        assert ledger.record_unmapped(b"Loose", "Loose", "no client") is True
        assert ledger.record_unmapped(b"Loose", "Loose", "another problem") is False
        entries = ledger.unmapped()
        assert len(entries) == 1
        assert entries[0]["path"] == "Loose"
        assert entries[0]["problem"] == "another problem"
        assert entries[0]["last_seen_at"] >= entries[0]["first_seen_at"]  # type: ignore[operator]

    def test_clear_unmapped_keeps_present(self, ledger: Ledger) -> None:
        """clear_unmapped drops entries not in keep, and the list is sorted by path."""
        for name in ("Zed", "Alpha", "Gone"):
            ledger.record_unmapped(name.encode(), name, "no client")
        ledger.clear_unmapped([b"Zed", b"Alpha"])
        assert [e["path"] for e in ledger.unmapped()] == ["Alpha", "Zed"]
        assert ledger.record_unmapped(b"Gone", "Gone", "no client") is True


class TestDaemonStatus:
    def test_set_get_status(self, ledger: Ledger) -> None:
        """Stored values are read back, and a later set_status replaces them, None included."""
        assert ledger.get_status() == {}
        ledger.set_status(paused="credentials rejected", pid="123")
        ledger.set_status(paused=None)
        assert ledger.get_status() == {"paused": None, "pid": "123"}


class TestBackup:
    def test_backup_readable_private(
        self, ledger: Ledger, tmp_path: Path, open_ledger: LedgerFactory
    ) -> None:
        """A backup is a mode 0600 ledger that opens with the same rows."""
        rows = [add_row(ledger, f"A/{i}.pdf", state=State.UPLOADED) for i in range(3)]
        target = tmp_path / "backup.sqlite3"
        ledger.backup(target)
        assert file_mode(target) == 0o600
        copy = open_ledger(target, create=False)
        assert list(copy.all_rows()) == rows

    def test_backup_refuses_existing(self, ledger: Ledger, tmp_path: Path) -> None:
        """A backup onto an existing file raises FileExistsError and keeps the file."""
        target = tmp_path / "backup.sqlite3"
        target.write_bytes(b"keep me")
        with pytest.raises(FileExistsError):
            ledger.backup(target)
        assert target.read_bytes() == b"keep me"


class TestSurrogates:
    RAW = b"Nguy\xe9n [g]/caf\xe9.pdf"

    def test_surrogate_path_stored(self, ledger: Ledger) -> None:
        """A non-UTF-8 name keeps its bytes in rel_path and shows U+FFFD in text columns."""
        text = os.fsdecode(self.RAW)
        row = ledger.insert_waiting(rel_path=self.RAW, display_path=text,
                                    drop_folder=text.split("/")[0], client_id=CLIENT_A,
                                    size=1, mtime_ns=1, ctime_ns=1, now=NOW)
        assert row.rel_path == self.RAW
        assert row.rel_path_str == text
        assert row.display_path == "Nguy\ufffdn [g]/caf\ufffd.pdf"
        assert row.drop_folder == "Nguy\ufffdn [g]"
        found = ledger.find_live(self.RAW)
        assert found is not None and found.id == row.id

    def test_surrogate_error_text(self, ledger: Ledger) -> None:
        """An error message quoting a non-UTF-8 name is stored with U+FFFD."""
        row = add_row(ledger)
        changed = ledger.update(row.id, last_error=f"cannot read {os.fsdecode(self.RAW)}")
        assert changed.last_error == "cannot read Nguy\ufffdn [g]/caf\ufffd.pdf"

    def test_surrogate_unmapped_insert(self, ledger: Ledger) -> None:
        """An unmapped name that is not UTF-8 is listed with U+FFFD."""
        text = os.fsdecode(b"Loose \xff")
        ledger.record_unmapped(b"Loose \xff", text, "no client")
        assert ledger.unmapped()[0]["path"] == "Loose \ufffd"

    def test_surrogate_unmapped_problem_repeat(self, ledger: Ledger) -> None:
        """A repeated report whose problem quotes a non-UTF-8 name stores U+FFFD."""
        problem = "no client for " + os.fsdecode(b"Loose \xff")
        ledger.record_unmapped(b"Loose", "Loose", problem)
        assert ledger.record_unmapped(b"Loose", "Loose", problem) is False
        assert ledger.unmapped()[0]["problem"] == "no client for Loose \ufffd"


def test_schema_1_ledger_is_upgraded(tmp_path: Path) -> None:
    """A ledger written at schema 1 gains the newer indexes and version 3 when opened."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_V1)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO files (rel_path, display_path, size, mtime_ns, ctime_ns, state, "
               "first_seen_at, updated_at) VALUES (x'61', 'a', 1, 1, 1, 'uploaded', 1, 1)")
    db.execute("INSERT INTO files (rel_path, display_path, size, mtime_ns, ctime_ns, state, "
               "first_seen_at, updated_at, uploaded_at, disposition) "
               "VALUES (x'62', 'b', 1, 1, 1, 'uploaded', 1, 1, 5, 'pending')")
    db.commit()
    db.close()

    ledger = Ledger.open(path)
    try:
        version = ledger._db.execute("PRAGMA user_version").fetchone()[0]
        indexes = {r[0] for r in ledger._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")}
        rows = list(ledger.all_rows())
        pending = [r.display_path for r in ledger.pending_dispositions()]
        stuck = ledger.count_pending_moves(before=10)
    finally:
        ledger.close()

    assert version == 3
    assert "files_state_uploaded" in indexes
    assert "files_pending_move" in indexes
    assert [r.display_path for r in rows] == ["a", "b"]
    # The partial index of schema 3 covers rows that were pending before the upgrade.
    assert pending == ["b"]
    assert stuck == 1
