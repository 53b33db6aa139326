"""
Test data for the bench: files in drop folders, and ledgers and archives built
directly, so that phases needing 50,000 archived files or 1,000,000 ledger rows start
in seconds. Ledgers are created by ``uploader.ledger.Ledger`` (so the schema is the
daemon's own), then filled with plain SQLite inserts.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.env import folder_name
from uploader.ledger import DISPOSITION_ARCHIVED, DISPOSITION_KEPT, FileRow, Ledger

#: Columns the bench fills in; the others keep their schema defaults.
_INSERT_COLUMNS = ("rel_path", "display_path", "drop_folder", "client_id", "size", "mtime_ns",
                   "ctime_ns", "sha256", "state", "attempts", "remote_id", "disposition",
                   "final_path", "first_seen_at", "updated_at", "uploaded_at")

# A ledger column list that no longer matches the daemon's schema should fail here,
# not as a confusing SQLite error halfway through a million inserts.
assert set(_INSERT_COLUMNS) <= {f.name for f in FileRow.__dataclass_fields__.values()}


@dataclass(frozen=True)
class PlannedFile:
    """
    A file the bench wrote into a drop folder.

    Attributes:
        rel_path: The path relative to the drop root, "/"-separated.
        client_id: The client its drop folder maps to.
        sha256: The SHA-256 of its bytes in hex.
        size: Its size in bytes.
    """

    rel_path: str
    client_id: str
    sha256: str
    size: int


def drop_folders(root: Path, ids: list[str]) -> list[str]:
    """Create one drop folder per client under ``root`` and return their names."""
    names = [folder_name(index, client_id) for index, client_id in enumerate(ids)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    return names


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` at once, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def plan_files(ids: list[str], count: int, size_bytes: int | tuple[int, int], *,
               seed: int, prefix: str = "doc") -> list[tuple[PlannedFile, bytes]]:
    """
    Make ``count`` files with distinct random bytes, spread round-robin over the clients.

    Args:
        ids: The client GUIDs; file ``i`` goes to client ``i % len(ids)``.
        size_bytes: One size for every file, or an inclusive (min, max) range.
        seed: Seed for the bytes and sizes, so runs are repeatable.
        prefix: The start of each file name.
    """
    rng = random.Random(seed)
    planned = []
    for number in range(count):
        index = number % len(ids)
        size = size_bytes if isinstance(size_bytes, int) else rng.randint(*size_bytes)
        # A counter at the front keeps every file's bytes distinct whatever the size.
        data = number.to_bytes(8, "big") + rng.randbytes(max(0, size - 8))
        rel_path = f"{folder_name(index, ids[index])}/{prefix}-{number:05d}.txt"
        sha256 = hashlib.sha256(data).hexdigest()
        planned.append((PlannedFile(rel_path, ids[index], sha256, len(data)), data))
    return planned


def write_planned(root: Path, planned: Iterable[tuple[PlannedFile, bytes]]) -> list[PlannedFile]:
    """Write planned files under ``root`` and return their descriptions."""
    written = []
    for file, data in planned:
        write_file(root / file.rel_path, data)
        written.append(file)
    return written


# -- ledgers ----------------------------------------------------------------------------


def create_ledger(path: Path) -> None:
    """Create an empty ledger with the daemon's schema, owner-only, as the daemon would."""
    Ledger.open(path).close()


def insert_rows(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """
    Insert ledger rows in one transaction and return how many were inserted.

    Each row maps column names from the ledger's ``files`` table to values.
    """
    marks = ", ".join("?" for _ in _INSERT_COLUMNS)
    sql = f"INSERT INTO files ({', '.join(_INSERT_COLUMNS)}) VALUES ({marks})"
    db = sqlite3.connect(path)
    try:
        # Only this bulk load goes without fsync; the daemon's own connection uses FULL.
        db.execute("PRAGMA synchronous = OFF")
        with db:
            cursor = db.executemany(sql, (tuple(r[c] for c in _INSERT_COLUMNS) for r in rows))
        return cursor.rowcount
    finally:
        db.close()


def uploaded_row(rel_path: str, client_id: str, sha256: str, size: int, *, now: float,
                 disposition: str = DISPOSITION_ARCHIVED, final_path: str | None = None,
                 mtime_ns: int = 0, ctime_ns: int = 0) -> dict[str, Any]:
    """Return the columns of a row for a file uploaded once, as the daemon writes it."""
    return {
        "rel_path": os.fsencode(rel_path), "display_path": rel_path,
        "drop_folder": rel_path.split("/", 1)[0], "client_id": client_id, "size": size,
        "mtime_ns": mtime_ns, "ctime_ns": ctime_ns, "sha256": sha256, "state": "uploaded",
        "attempts": 1, "remote_id": hashlib.md5(sha256.encode()).hexdigest(),
        "disposition": disposition, "final_path": final_path, "first_seen_at": now,
        "updated_at": now, "uploaded_at": now,
    }


def synthetic_rows(ids: list[str], count: int, *, start: int = 0) -> Iterator[dict[str, Any]]:
    """
    Yield ``count`` rows of archived uploads whose files no longer exist, like the rows
    a ledger collects over years of use.
    """
    now = time.time()
    for number in range(start, start + count):
        index = number % len(ids)
        rel_path = f"{folder_name(index, ids[index])}/{number // 1000:04d}/old-{number:07d}.pdf"
        sha256 = hashlib.sha256(number.to_bytes(8, "big")).hexdigest()
        yield uploaded_row(rel_path, ids[index], sha256, 50_000 + number % 997,
                           now=now - 86400, final_path=f"/srv/archive/{rel_path}")


def kept_rows(root: Path, files: list[PlannedFile]) -> Iterator[dict[str, Any]]:
    """Yield rows for files uploaded and kept in place, matching their current stat."""
    now = time.time()
    for file in files:
        st = os.stat(root / file.rel_path)
        yield uploaded_row(file.rel_path, file.client_id, file.sha256, st.st_size, now=now,
                           disposition=DISPOSITION_KEPT, mtime_ns=st.st_mtime_ns,
                           ctime_ns=st.st_ctime_ns)


# -- an archive of earlier uploads ------------------------------------------------------


def build_archive(archive: Path, ledger: Path, ids: list[str], per_client: int) -> int:
    """
    Fill ``archive`` with ``per_client`` small files for each client, and record each
    in ``ledger`` as uploaded and archived. Returns the number of files.
    """
    now = time.time()
    rows = []
    for index, client_id in enumerate(ids):
        folder = archive / folder_name(index, client_id)
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_client):
            data = f"{client_id} archived letter {number}\n".encode()
            path = folder / f"letter-{number:05d}.txt"
            path.write_bytes(data)
            rel_path = f"{folder.name}/{path.name}"
            rows.append(uploaded_row(rel_path, client_id, hashlib.sha256(data).hexdigest(),
                                     len(data), now=now, final_path=str(path)))
    return insert_rows(ledger, rows)
