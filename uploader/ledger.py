"""
The ledger: a SQLite database with one row per file version the daemon has seen.

The ledger is the only thing that stops a document going up twice, because coreplus
offers no way to ask whether a file already arrived. Every state is committed before
the daemon acts on it: a row is ``uploading`` before the first byte is sent, and
``uploaded`` only after the service confirmed. This module has no HTTP or
asyncio code; the daemon calls it from one dedicated thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from uploader.constants import ACTIVE_STATES, RETRYABLE_BY_USER, State
from uploader.exceptions import LedgerDamagedError, LedgerError, LedgerLockedError

#: Bumped whenever the schema changes; `_migrate` upgrades older ledgers in place.
SCHEMA_VERSION = 3

_SCHEMA_V1 = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    rel_path BLOB NOT NULL,
    display_path TEXT NOT NULL,
    drop_folder TEXT,
    client_id TEXT,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    sha256 TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    deferrals INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    remote_id TEXT,
    duplicate_of INTEGER,
    possible_duplicate INTEGER NOT NULL DEFAULT 0,
    forgotten INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    disposition TEXT,
    final_path TEXT,
    first_seen_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    uploaded_at REAL
);
CREATE INDEX files_rel_path ON files (rel_path);
CREATE INDEX files_client_sha ON files (client_id, sha256);
CREATE INDEX files_state ON files (state, next_attempt_at);
CREATE TABLE unmapped (
    rel_path BLOB PRIMARY KEY,
    display_path TEXT NOT NULL,
    problem TEXT NOT NULL,
    first_seen_at REAL NOT NULL,
    last_seen_at REAL NOT NULL
);
CREATE TABLE daemon (
    key TEXT PRIMARY KEY,
    value TEXT
);
"""

#: Schema steps: applying step N to a ledger at version N - 1 brings it to version N.
_MIGRATIONS = {
    1: _SCHEMA_V1,
    # Lets the operations loop count today's uploads without reading every row.
    2: "CREATE INDEX files_state_uploaded ON files (state, uploaded_at);",
    # Lets the operations loop look for stuck archive moves every few seconds. The
    # index contains only the rows whose move is still to do, so it stays small.
    3: "CREATE INDEX files_pending_move ON files (uploaded_at) WHERE disposition = 'pending';",
}

#: Dispositions after an upload. ``pending`` means the move to the archive (or the
#: delete) failed and is retried later, so the file is still in its drop folder.
DISPOSITION_ARCHIVED = "archived"
DISPOSITION_DELETED = "deleted"
DISPOSITION_KEPT = "kept"
DISPOSITION_PENDING = "pending"
DISPOSITION_FAILED_DIR = "moved to failed folder"
#: A failed file that `retry` moved back into its drop folder; the row is history.
DISPOSITION_RETRIED = "moved back for retry"

#: Rows whose file is still expected at its path in the drop folder, so a scan that
#: finds the same version must not treat it as new.
_LIVE_CONDITION = (
    f"(state IN ({', '.join(repr(str(s)) for s in ACTIVE_STATES)})"
    f" OR disposition IN ('{DISPOSITION_KEPT}', '{DISPOSITION_PENDING}')"
    # Uploaded but not yet archived: the archive's hard link changes the file's ctime
    # and the watcher reports it, which must not look like a new file.
    f" OR (state IN ('{State.UPLOADED}', '{State.DUPLICATE}') AND disposition IS NULL))"
)


@dataclass(frozen=True)
class FileRow:
    """
    One file version as stored in the ledger.
    """

    id: int
    rel_path: bytes
    display_path: str
    drop_folder: str | None
    client_id: str | None
    size: int
    mtime_ns: int
    ctime_ns: int
    sha256: str | None
    state: str
    attempts: int
    deferrals: int
    last_error: str | None
    remote_id: str | None
    duplicate_of: int | None
    possible_duplicate: int
    forgotten: int
    next_attempt_at: float | None
    disposition: str | None
    final_path: str | None
    first_seen_at: float
    updated_at: float
    uploaded_at: float | None

    @property
    def rel_path_str(self) -> str:
        """The relative path as ``str``, with undecodable bytes as surrogate escapes."""
        return os.fsdecode(self.rel_path)

    def as_dict(self) -> dict[str, object]:
        """Return the row for JSON output, without the raw path bytes."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.pop("rel_path")
        return data


_COLUMNS = ", ".join(f.name for f in fields(FileRow))

#: States a worker may take a row from.
_READY_STATES = (State.QUEUED, State.DEFERRED, State.UNCERTAIN)


@dataclass(frozen=True)
class Claim:
    """
    The result of ``Ledger.claim_upload``: the row, now ``uploading``, or an earlier
    upload of the same bytes for the same client, or neither when the row is no longer
    ready.
    """

    row: FileRow | None = None
    earlier: FileRow | None = None


class LedgerLock:
    """
    An exclusive ``flock`` on ``<ledger>.lock``, held by the one process that may
    upload from this ledger. The kernel drops it when the process dies, even on kill -9.
    """

    def __init__(self, ledger_path: Path) -> None:
        self.path = ledger_path.with_name(ledger_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """
        Take the lock or raise LedgerLockedError naming the process that holds it.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LedgerLockedError(
                f"The ledger {self.path.with_suffix('')} is in use by another process "
                f"(pid {holder}). Stop the running daemon (systemctl stop coreplus-uploader) "
                "or wait for the other command to finish."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Release the lock; the lock file stays, so its inode is stable."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def is_held_elsewhere(self) -> bool:
        """
        Return True when another process holds the lock, without taking it for long.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def holder_pid(self) -> int | None:
        """Return the pid written by the process that last took the lock, if readable."""
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None


class Ledger:
    """
    Open a ledger file and read or change its rows.

    Every method commits before it returns. A commit waits until it is on disk, so the
    daemon never acts on a state that a power cut could undo, except where a caller
    passes ``durable=False``: there a lost commit only means settling or hashing a file
    again. Use one instance from one thread at a time.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection, created: bool) -> None:
        self.path = path
        self.created = created
        self._db = connection
        self._durable = True

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = True, readonly: bool = False) -> Ledger:
        """
        Open (and when allowed, create) the ledger, check it, and upgrade its schema.

        Raises:
            LedgerDamagedError: the file is not a ledger, or fails SQLite's check.
            LedgerError: the file or its folder cannot be opened.
        """
        path = Path(path)
        exists = path.exists()
        if not exists and (readonly or not create):
            raise LedgerError(
                f"The ledger {path} does not exist. Check ledger.path in the configuration; "
                "the daemon creates the ledger on its first start."
            )
        if not exists:
            _create_ledger_file(path)
        elif path.stat().st_size == 0:
            # Only a truncation makes an empty ledger, because new ledgers are built
            # aside and renamed into place: treat it as lost data, never as a fresh start.
            raise _damaged(path, sqlite3.DatabaseError("the file is empty"))
        try:
            db = _connect(path, readonly)
            _check_integrity(db, path)
            if not readonly:
                _migrate(db, path)
        except sqlite3.DatabaseError as exc:
            raise _damaged(path, exc) from exc
        return cls(path, db, created=not exists)

    def close(self) -> None:
        """Close the connection; WAL content is checkpointed by SQLite."""
        self._db.close()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        if durable != self._durable:
            # In WAL mode a NORMAL commit survives a crash of the process, and only a power
            # cut can lose it. A FULL commit syncs the whole log, so a power cut loses at
            # most the NORMAL commits made after the last FULL one.
            self._db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        try:
            with self._db:
                yield self._db
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and _is_disk_full(exc):
                raise LedgerError(
                    f"The disk holding the ledger {self.path} is full: {exc}. Free space on "
                    "that filesystem; the daemon retries the write."
                ) from exc
            raise

    # -- lookups -------------------------------------------------------------------

    def get(self, row_id: int) -> FileRow | None:
        """Return the row with this id, or None."""
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (row_id,))
        return _row(cur.fetchone())

    def find_live(self, rel_path: bytes) -> FileRow | None:
        """
        Return the newest row whose file is still expected at ``rel_path`` in the drop
        folder: one the daemon is still working on, or an upload kept in place.
        """
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE rel_path = ? AND {_LIVE_CONDITION} "
            "ORDER BY id DESC LIMIT 1",
            (rel_path,),
        )
        return _row(cur.fetchone())

    def find_uploaded(self, client_id: str, sha256: str) -> FileRow | None:
        """Return the earliest upload of these bytes for this client, unless forgotten."""
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE client_id = ? AND sha256 = ? "
            "AND state = ? AND forgotten = 0 ORDER BY id LIMIT 1",
            (client_id, sha256, State.UPLOADED),
        )
        return _row(cur.fetchone())

    def rows_in_state(self, *states: str, limit: int | None = None) -> list[FileRow]:
        """Rows in any of ``states``, oldest first."""
        marks = ", ".join("?" for _ in states)
        sql = f"SELECT {_COLUMNS} FROM files WHERE state IN ({marks}) ORDER BY id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_row(r) for r in self._db.execute(sql, states)]  # type: ignore[misc]

    def next_ready(
        self, *, now: float, limit: int, include_uncertain: bool, exclude: Iterable[int] = ()
    ) -> list[FileRow]:
        """
        Rows a worker may take now: queued ones, and deferred (and with the retry
        policy, uncertain) ones whose ``next_attempt_at`` has passed.
        """
        states = [State.DEFERRED] + ([State.UNCERTAIN] if include_uncertain else [])
        excluded = list(exclude)
        marks = ", ".join("?" for _ in states)
        skip = f"AND id NOT IN ({', '.join('?' for _ in excluded)})" if excluded else ""
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE (state = ? OR (state IN ({marks}) "
            f"AND COALESCE(next_attempt_at, 0) <= ?)) {skip} ORDER BY id LIMIT ?",
            (State.QUEUED, *states, now, *excluded, limit),
        )
        return [_row(r) for r in cur]  # type: ignore[misc]

    def next_wakeup(self, *, include_uncertain: bool) -> float | None:
        """Return the earliest ``next_attempt_at`` among waiting retries, or None."""
        states = [State.DEFERRED] + ([State.UNCERTAIN] if include_uncertain else [])
        marks = ", ".join("?" for _ in states)
        cur = self._db.execute(
            f"SELECT MIN(next_attempt_at) FROM files WHERE state IN ({marks})", states
        )
        value = cur.fetchone()[0]
        return float(value) if value is not None else None

    def pending_dispositions(self) -> list[FileRow]:
        """Uploaded rows whose move to the archive, or delete, still has to happen."""
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files INDEXED BY files_pending_move "
            f"WHERE disposition = '{DISPOSITION_PENDING}' ORDER BY id"
        )
        return [_row(r) for r in cur]  # type: ignore[misc]

    def count_pending_moves(self, *, before: float) -> int:
        """Count rows whose move is still to do and that were uploaded before ``before``."""
        # The literal lets SQLite match the partial index, which a bound value cannot.
        cur = self._db.execute(
            f"SELECT COUNT(*) FROM files WHERE disposition = '{DISPOSITION_PENDING}' "
            "AND COALESCE(uploaded_at, first_seen_at) < ?",
            (before,),
        )
        return int(cur.fetchone()[0])

    def count_by_state(self, *states: str) -> dict[str, int]:
        """
        Count the rows in each state, or only in ``states`` when given: the index makes
        that cheap however long the ledger's history is.
        """
        if not states:
            cur = self._db.execute("SELECT state, COUNT(*) FROM files GROUP BY state")
            return {state: count for state, count in cur}
        return {state: int(self._db.execute(
            "SELECT COUNT(*) FROM files WHERE state = ?", (state,)).fetchone()[0])
            for state in states}

    def count_uploaded_since(self, since: float) -> int:
        """Count the uploads the service confirmed since ``since`` (unix seconds)."""
        cur = self._db.execute(
            "SELECT COUNT(*) FROM files WHERE state = ? AND uploaded_at >= ?",
            (State.UPLOADED, since),
        )
        return int(cur.fetchone()[0])

    def recent(self, *states: str, limit: int = 10) -> list[FileRow]:
        """Return the rows in ``states`` changed most recently, newest first."""
        marks = ", ".join("?" for _ in states)
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE state IN ({marks}) "
            "ORDER BY updated_at DESC LIMIT ?", (*states, limit))
        return [_row(r) for r in cur]  # type: ignore[misc]

    def possible_duplicates(self) -> list[FileRow]:
        """Rows flagged because the service may hold a second copy."""
        cur = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE possible_duplicate = 1 ORDER BY id"
        )
        return [_row(r) for r in cur]  # type: ignore[misc]

    def all_rows(self) -> Iterator[FileRow]:
        """Yield every row, oldest first, for exports."""
        for r in self._db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY id"):
            yield _row(r)  # type: ignore[misc]

    # -- changes -------------------------------------------------------------------

    def insert_waiting(
        self,
        *,
        rel_path: bytes,
        display_path: str,
        drop_folder: str | None,
        client_id: str | None,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        now: float | None = None,
    ) -> FileRow:
        """
        Record a newly seen file version in the ``waiting`` state. The commit does not
        wait for the disk: after a power cut, the next scan finds the file again.
        """
        now = time.time() if now is None else now
        with self._tx(durable=False) as db:
            cur = db.execute(
                "INSERT INTO files (rel_path, display_path, drop_folder, client_id, size, "
                "mtime_ns, ctime_ns, state, first_seen_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rel_path, _printable(display_path), _printable(drop_folder), client_id, size,
                 mtime_ns, ctime_ns, State.WAITING, now, now),
            )
            row_id = cur.lastrowid
        row = self.get(int(row_id or 0))
        assert row is not None
        return row

    def update(self, row_id: int, *, durable: bool = True, **values: object) -> FileRow:
        """
        Change columns of one row and commit. ``updated_at`` is set automatically.

        Args:
            row_id: The row.
            durable: Whether the commit waits until it is on disk. Pass False only
                when losing the change to a power cut is harmless, such as a finished
                hash that can be computed again.
            values: New column values.
        """
        values.setdefault("updated_at", time.time())
        unknown = set(values) - {f.name for f in fields(FileRow)}
        if unknown:
            raise ValueError(f"unknown ledger columns: {sorted(unknown)}")
        values = {name: _printable(value) for name, value in values.items()}
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self._tx(durable=durable) as db:
            db.execute(
                f"UPDATE files SET {assignments} WHERE id = ?", (*values.values(), row_id)
            )
        row = self.get(row_id)
        if row is None:
            raise LedgerError(f"ledger row {row_id} disappeared while it was being updated")
        return row

    def claim_upload(self, row_id: int, *, attempts: int,
                     duplicate_key: tuple[str, str] | None) -> Claim:
        """
        Mark a ready row ``uploading`` and count its attempt, in one commit that waits
        for the disk, unless the client already has the same bytes or the row is no
        longer ready.

        The duplicate lookup shares the claim's transaction, so no upload of the same
        bytes can be recorded between the check and the claim.

        Args:
            row_id: The row a worker took from ``next_ready``.
            attempts: The row's attempt count including this attempt.
            duplicate_key: ``(client_id, sha256)`` to look for an earlier upload, or
                None when duplicates are not skipped.
        """
        with self._tx() as db:
            if duplicate_key is not None:
                earlier = self.find_uploaded(*duplicate_key)
                if earlier is not None and earlier.id != row_id:
                    return Claim(earlier=earlier)
            marks = ", ".join("?" for _ in _READY_STATES)
            cur = db.execute(
                "UPDATE files SET state = ?, attempts = ?, next_attempt_at = NULL, "
                f"updated_at = ? WHERE id = ? AND state IN ({marks})",
                (State.UPLOADING, attempts, time.time(), row_id, *_READY_STATES))
            if cur.rowcount == 0:
                return Claim()
        return Claim(row=self.get(row_id))

    def recover_interrupted(self, *, hold: bool) -> list[FileRow]:
        """
        Turn rows left ``uploading`` by a crash into ``uncertain`` (or ``held`` with the
        hold policy), flagged as possible duplicates: their body may have arrived.
        """
        with self._tx() as db:
            # Killed between the confirmed upload and the archive move: finish the move,
            # never the upload.
            db.execute(
                "UPDATE files SET disposition = ? WHERE state IN (?, ?) AND disposition IS NULL",
                (DISPOSITION_PENDING, State.UPLOADED, State.DUPLICATE))
        stuck = self.rows_in_state(State.UPLOADING)
        for row in stuck:
            self.update(
                row.id,
                state=State.HELD if hold else State.UNCERTAIN,
                possible_duplicate=1,
                next_attempt_at=None,
                last_error="The daemon stopped while this upload was in flight, so coreplus "
                "may already hold the file.",
            )
        return stuck

    def requeue(self, ids: Iterable[int] | None) -> list[int]:
        """
        Put ``failed``, ``deferred``, ``held`` or ``uncertain`` rows back in the queue.
        ``ids=None`` takes every such row. Returns the ids changed.
        """
        # Failed files live in the failed folder, and `retry` moves them back into the
        # drop folder as a new attempt. So only the other states are requeued here.
        states = [s for s in RETRYABLE_BY_USER if s != State.FAILED]
        marks = ", ".join("?" for _ in states)
        sql = f"SELECT id FROM files WHERE state IN ({marks})"
        params: list[object] = list(states)
        if ids is not None:
            wanted = list(ids)
            sql += f" AND id IN ({', '.join('?' for _ in wanted)})"
            params += wanted
        changed = [r[0] for r in self._db.execute(sql, params)]
        with self._tx() as db:
            for row_id in changed:
                db.execute(
                    "UPDATE files SET state = ?, next_attempt_at = NULL, deferrals = 0, "
                    "updated_at = ? WHERE id = ?",
                    (State.QUEUED, time.time(), row_id),
                )
        return changed

    def forget(self, rel_path: bytes) -> int:
        """Flag every row for this path as forgotten; returns how many rows changed."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE files SET forgotten = 1, updated_at = ? WHERE rel_path = ?",
                (time.time(), rel_path),
            )
        return cur.rowcount

    # -- unmapped folders and daemon status ------------------------------------------

    def record_unmapped(self, rel_path: bytes, display_path: str, problem: str) -> bool:
        """Remember an unmapped folder or root file; returns True the first time."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "UPDATE unmapped SET last_seen_at = ?, problem = ? WHERE rel_path = ?",
                (now, _printable(problem), rel_path),
            )
            if cur.rowcount:
                return False
            db.execute(
                "INSERT INTO unmapped VALUES (?, ?, ?, ?, ?)",
                (rel_path, _printable(display_path), _printable(problem), now, now),
            )
        return True

    def clear_unmapped(self, keep: Iterable[bytes]) -> None:
        """Drop unmapped entries that are no longer present."""
        kept = set(keep)
        rows = list(self._db.execute("SELECT rel_path FROM unmapped"))
        with self._tx() as db:
            for (rel_path,) in rows:
                if rel_path not in kept:
                    db.execute("DELETE FROM unmapped WHERE rel_path = ?", (rel_path,))

    def unmapped(self) -> list[dict[str, object]]:
        """Unmapped folders and root files, for `status`."""
        cur = self._db.execute(
            "SELECT display_path, problem, first_seen_at, last_seen_at FROM unmapped "
            "ORDER BY display_path"
        )
        keys = ("path", "problem", "first_seen_at", "last_seen_at")
        return [dict(zip(keys, r, strict=True)) for r in cur]

    def set_status(self, **values: str | None) -> None:
        """Store daemon facts (pause reason, start time) for `status` to read."""
        with self._tx() as db:
            for key, value in values.items():
                db.execute("INSERT OR REPLACE INTO daemon VALUES (?, ?)", (key, value))

    def get_status(self) -> dict[str, str | None]:
        """Daemon facts stored with `set_status`."""
        return {k: v for k, v in self._db.execute("SELECT key, value FROM daemon")}

    def backup(self, target: Path) -> None:
        """Write a consistent copy through SQLite's backup API, owner-only."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        dest = sqlite3.connect(target)
        try:
            self._db.backup(dest)
        finally:
            dest.close()


def _create_ledger_file(path: Path) -> None:
    """
    Build an empty ledger with its schema beside ``path`` and rename it into place, so a
    crash can never leave a half-made ledger under the real name.
    """
    _make_private_dir(path.parent)
    building = path.with_name(path.name + ".new")
    building.unlink(missing_ok=True)
    # Create the file ourselves so it is owner-only from the first byte.
    os.close(os.open(building, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    db = sqlite3.connect(building)
    try:
        _migrate(db, building)
    finally:
        db.close()
    os.rename(building, path)


def _make_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    if not readonly:
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(
                f"SQLite could not switch the ledger {path} to WAL mode (got {mode!r}). "
                "Put ledger.path on a local filesystem; WAL does not work over NFS or SMB."
            )
        # FULL makes each commit durable before the daemon acts on the new state.
        db.execute("PRAGMA synchronous = FULL")
    return db


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    result = db.execute("PRAGMA quick_check").fetchone()[0]
    if result != "ok":
        raise _damaged(path, sqlite3.DatabaseError(str(result)))


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version == 0 and tables:
        raise _damaged(path, sqlite3.DatabaseError("tables present but no schema version"))
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"The ledger {path} was written by a newer version of coreplus-uploader "
            f"(schema {version}, this version knows {SCHEMA_VERSION}). Upgrade the program."
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        # executescript commits first, so each step and its version bump are one unit
        # only through BEGIN/COMMIT in the script itself.
        db.executescript(f"BEGIN; {_MIGRATIONS[target]} PRAGMA user_version = {target}; COMMIT;")


def _damaged(path: Path, exc: Exception) -> LedgerDamagedError:
    return LedgerDamagedError(
        f"The ledger {path} is damaged or is not a coreplus-uploader ledger ({exc}). "
        "Restore it from a copy made with `coreplus-uploader ledger backup`. If there is no "
        "copy, move the file aside; the daemon then starts a new ledger, and files still in "
        "drop folders or kept after upload would be uploaded again."
    )


def _is_disk_full(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "full" in text or getattr(exc, "sqlite_errorcode", None) == 13 or (
        getattr(exc, "errno", None) == errno.ENOSPC
    )


def _printable(value: object) -> object:
    """
    Text columns hold UTF-8, so undecodable bytes that os.fsdecode turned into surrogate
    escapes (in paths and error messages) are stored as U+FFFD; raw path bytes live in
    ``rel_path`` only.
    """
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _row(raw: tuple[object, ...] | None) -> FileRow | None:
    if raw is None:
        return None
    return FileRow(*raw)  # type: ignore[arg-type]
