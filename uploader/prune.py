"""
Delete archived files older than ``upload.archive_keep_days``.

Age is taken from each file's ctime, not its mtime. Archiving by hard link keeps the
mtime the file had in the drop folder, which may be years old, while link() and
rename() set the ctime to the moment of archiving. Folders are left in place, even
when empty, because the daemon may be creating a file in one at the same moment.
Symbolic links are removed by their own age and never followed.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

#: Seconds in a day, for ``archive_keep_days``.
DAY_S = 86_400


@dataclass(frozen=True)
class PruneResult:
    """
    The outcome of one pass over the archive.

    Attributes:
        deleted_files: How many files (and symbolic links) were deleted.
        deleted_bytes: Their total size.
        errors: How many could not be examined or deleted.
        first_error: The first such error, for the log.
    """

    deleted_files: int = 0
    deleted_bytes: int = 0
    errors: int = 0
    first_error: str | None = None


class _Tally:
    def __init__(self) -> None:
        self.files = self.bytes = self.errors = 0
        self.first_error: str | None = None

    def error(self, exc: OSError) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{exc.filename}: {exc.strerror}"

    def result(self) -> PruneResult:
        return PruneResult(self.files, self.bytes, self.errors, self.first_error)


def prune_archive(archive_dir: Path, keep_days: int, *, now: float | None = None) -> PruneResult:
    """
    Delete files under ``archive_dir`` whose ctime is more than ``keep_days`` days ago.

    Args:
        archive_dir: The archive folder; a missing folder is not an error.
        keep_days: Days to keep; 0 or less deletes nothing.
        now: Unix time to measure age from; defaults to the current time.

    Returns:
        Counts of what was deleted and of errors; errors do not stop the pass.
    """
    if keep_days <= 0:
        return PruneResult()
    cutoff = (time.time() if now is None else now) - keep_days * DAY_S
    tally = _Tally()
    _prune_folder(str(archive_dir), cutoff, tally)
    return tally.result()


def _prune_folder(folder: str, cutoff: float, tally: _Tally) -> None:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return  # No archive yet, or a folder removed while we walked.
    except OSError as exc:
        tally.error(exc)
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            tally.error(exc)
            continue
        if stat.S_ISDIR(info.st_mode):
            _prune_folder(entry.path, cutoff, tally)
        elif info.st_ctime < cutoff:
            _delete(entry.path, info, tally)


def _delete(path: str, info: os.stat_result, tally: _Tally) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        tally.error(exc)
        return
    tally.files += 1
    tally.bytes += info.st_size if stat.S_ISREG(info.st_mode) else 0
