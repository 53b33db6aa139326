"""
Decide when a file has finished arriving (settled) and may be uploaded.

Pure logic: callers pass stat snapshots and the current time, and get a verdict. A
file settles when its size, mtime and ctime have not changed for ``settle_seconds``.
Empty files wait longer (``empty_grace_seconds``), because scanners and SMB clients
often create the file first and fill it later. A PDF also waits, up to
``pdf_wait_seconds``, for its ``%%EOF`` marker, so a scanner that pauses between pages
for longer than the settle time does not leave half a document in coreplus.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass, field

#: How much of a PDF's tail is searched for the end-of-file marker.
PDF_TAIL_BYTES = 1024

_PDF_EOF = re.compile(rb"%%EOF[\x00\t\n\f\r ]*\Z")


@dataclass(frozen=True)
class StatSnapshot:
    """
    The fields of a stat result that show whether a file is still being written.
    """

    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> StatSnapshot:
        """Build a snapshot from ``os.stat``/``os.lstat`` output."""
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Verdict(enum.Enum):
    """
    The action to take with a tracked file now.
    """

    WAIT = "wait"
    """Still changing, or inside its settle window."""
    SETTLED = "settled"
    """Unchanged for the settle time: hash it and queue it."""
    SETTLED_WITHOUT_EOF = "settled without eof"
    """A PDF that never showed %%EOF within pdf_wait_seconds: upload with a warning."""
    EMPTY_TOO_LONG = "empty too long"
    """Still empty after empty_grace_seconds: it fails."""


@dataclass
class TrackedFile:
    """
    One file being watched until it settles.
    """

    first_seen_s: float
    snapshot: StatSnapshot
    changed_at_s: float
    row_id: int | None = None
    is_pdf: bool = False
    notes: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SettleRules:
    """
    The timings from ``[watch]``, in seconds.
    """

    settle_s: float
    empty_grace_s: float
    pdf_wait_s: float


def observe(tracked: TrackedFile, snapshot: StatSnapshot, now_s: float) -> bool:
    """
    Record a new stat snapshot; returns True when the file changed since the last one,
    which restarts its settle window.
    """
    if snapshot == tracked.snapshot:
        return False
    tracked.snapshot = snapshot
    tracked.changed_at_s = now_s
    return True


def touch(tracked: TrackedFile, now_s: float) -> None:
    """Restart the settle window because the watcher reported a change."""
    tracked.changed_at_s = now_s


def decide(
    tracked: TrackedFile, now_s: float, rules: SettleRules, pdf_complete: bool | None = None
) -> Verdict:
    """
    Decide whether a tracked file has settled, given its latest snapshot.

    Args:
        tracked: The file, with its latest snapshot already observed.
        now_s: The current time on the same clock as ``tracked``'s times.
        rules: The settle timings.
        pdf_complete: For a PDF, whether its tail holds ``%%EOF``; None when not checked.
    """
    if now_s - tracked.changed_at_s < rules.settle_s:
        return Verdict.WAIT
    if tracked.snapshot.size == 0:
        if now_s - tracked.first_seen_s < rules.empty_grace_s:
            return Verdict.WAIT
        return Verdict.EMPTY_TOO_LONG
    if tracked.is_pdf and pdf_complete is False:
        if now_s - tracked.first_seen_s < rules.pdf_wait_s:
            return Verdict.WAIT
        return Verdict.SETTLED_WITHOUT_EOF
    return Verdict.SETTLED


def next_check_s(tracked: TrackedFile, now_s: float, rules: SettleRules) -> float:
    """When the file should be looked at again if nothing reports a change."""
    due = tracked.changed_at_s + rules.settle_s
    if due > now_s:
        return due
    # Past the settle window but still waiting (empty file or PDF without %%EOF): look
    # again a settle period later, and not more often than twice a second.
    return now_s + max(rules.settle_s, 0.5)


def pdf_has_eof(tail: bytes) -> bool:
    """Return True when a PDF's last bytes end with ``%%EOF`` and only whitespace."""
    return _PDF_EOF.search(tail) is not None


def read_tail(fd: int, size: int) -> bytes:
    """Read the last PDF_TAIL_BYTES of an open file."""
    start = max(0, size - PDF_TAIL_BYTES)
    return os.pread(fd, size - start, start)


def is_pdf_name(name: str) -> bool:
    """Return True for names that end in ``.pdf`` in any case."""
    return name.lower().endswith(".pdf")
