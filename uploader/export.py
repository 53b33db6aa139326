"""
CSV output of ledger rows: the audit trail (`ledger export`) and the `import --report`.

Files are created owner-only because they list patient file names, and cells that a
spreadsheet would run as a formula are escaped, because these files get opened in Excel.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from uploader.ledger import FileRow
from uploader.status import local_time

COLUMNS = ("id", "when", "client", "path", "size", "sha256", "state", "remote_id",
           "possible_duplicate", "error")

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def escape_cell(value: object) -> str:
    """Prefix a quote to text Excel would treat as a formula."""
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_STARTS):
        return "'" + text
    return text


def row_cells(row: FileRow) -> list[str]:
    """One CSV line's cells for a ledger row."""
    values = (row.id, local_time(row.uploaded_at or row.updated_at), row.client_id,
              row.display_path, row.size, row.sha256, row.state, row.remote_id,
              "yes" if row.possible_duplicate else "", row.last_error)
    return [escape_cell(v) for v in values]


def write_csv(rows: Iterable[FileRow], out: TextIO) -> int:
    """Write a header and one line per row; returns the number of rows."""
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    count = 0
    for row in rows:
        writer.writerow(row_cells(row))
        count += 1
    return count


def open_private(path: Path) -> TextIO:
    """
    Open a new file for writing with mode 0600, refusing to replace an existing one.

    Raises:
        FileExistsError: the file exists already.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return open(fd, "w", encoding="utf-8", newline="")


def export_to(rows: Iterable[FileRow], output: Path | None) -> int:
    """Write rows as CSV to a new private file, or to stdout when output is None."""
    if output is None:
        return write_csv(rows, sys.stdout)
    with open_private(output) as out:
        return write_csv(rows, out)
