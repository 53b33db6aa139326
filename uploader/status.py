"""
The `status` report: whether the daemon runs, whether it is paused, the queue, today's
uploads, and every file that needs a person, read from the ledger without locking it.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from uploader.constants import State
from uploader.ledger import DISPOSITION_RETRIED, FileRow, Ledger, LedgerLock

#: States listed file by file, because someone may need to act on them.
_LISTED = (State.FAILED, State.HELD, State.DEFERRED, State.UNCERTAIN, State.WAITING,
           State.QUEUED, State.UPLOADING)

#: At most this many rows per listed state in the text report; --json has all.
_TEXT_ROWS = 20


def local_time(unix_s: float | None) -> str | None:
    """Format a unix time as local ISO 8601 with its UTC offset."""
    if unix_s is None:
        return None
    return datetime.fromtimestamp(unix_s).astimezone().isoformat(timespec="seconds")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """
    Replace control characters (newlines, terminal escapes) with "?", so a file name
    cannot rewrite the terminal or fake a line of the report.
    """
    return _CONTROL.sub("?", str(text))


def _start_of_today() -> float:
    now = datetime.now().astimezone()
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _file_entry(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "path": row.display_path,
        "client": row.client_id,
        "state": row.state,
        "size": row.size,
        "attempts": row.attempts,
        "error": row.last_error,
        "next_attempt_at": local_time(row.next_attempt_at),
        "remote_id": row.remote_id,
        "possible_duplicate": bool(row.possible_duplicate),
        "updated_at": local_time(row.updated_at),
    }


def collect(ledger_path: Path) -> dict[str, Any]:
    """
    Gather the status as a dict, the same data the text report and --json show.

    Raises:
        LedgerError: the ledger is missing or damaged.
    """
    lock = LedgerLock(ledger_path)
    running = lock.is_held_elsewhere()
    ledger = Ledger.open(ledger_path, readonly=True)
    try:
        facts = ledger.get_status()
        counts = ledger.count_by_state()
        files = {str(state): [_file_entry(r) for r in ledger.rows_in_state(state)
                              if r.disposition != DISPOSITION_RETRIED]
                 for state in _LISTED}
        report = {
            "running": running,
            "pid": lock.holder_pid() if running else None,
            "paused": bool(running and facts.get("paused")),
            "pause_reason": facts.get("paused") if running else None,
            "pause_action": facts.get("paused_action") if running else None,
            "counts": {str(s): counts.get(str(s), 0) for s in State},
            "uploaded_today": ledger.count_uploaded_since(_start_of_today()),
            "uploaded_total": counts.get(State.UPLOADED, 0),
            "files": files,
            "unmapped": [{**u, "first_seen_at": local_time(u["first_seen_at"]),  # type: ignore[arg-type]
                          "last_seen_at": local_time(u["last_seen_at"])}  # type: ignore[arg-type]
                         for u in ledger.unmapped()],
            "pending_moves": [_file_entry(r) for r in ledger.pending_dispositions()],
            "recent": [_file_entry(r) for r in ledger.recent(State.UPLOADED, State.DUPLICATE)],
            "possible_duplicates": [_file_entry(r) for r in ledger.possible_duplicates()],
            "generated_at": local_time(time.time()),
        }
    finally:
        ledger.close()
    return report


def render_text(report: dict[str, Any]) -> str:
    """Render the status as a few plain paragraphs for a person at a terminal."""
    lines: list[str] = []
    if report["running"]:
        lines.append(f"Daemon: running (pid {report['pid']}).")
    else:
        lines.append("Daemon: not running.")
    if report["paused"]:
        lines.append(f"Uploads are PAUSED: {report['pause_reason']}")
        lines.append(f"  What to do: {report['pause_action']}")
    counts = report["counts"]
    lines.append(
        f"Queue: {counts['waiting']} waiting, {counts['queued']} queued, "
        f"{counts['uploading']} uploading, {counts['deferred']} deferred.")
    lines.append(f"Uploaded: {report['uploaded_today']} today, {report['uploaded_total']} in "
                 f"total; {counts['duplicate']} duplicates skipped.")
    for state in ("failed", "held", "uncertain", "deferred", "waiting", "queued", "uploading"):
        _render_files(lines, state, report["files"][state])
    if report["pending_moves"]:
        lines.append("")
        lines.append("Uploaded, but not yet moved out of the drop folder (retried every "
                     "minute; never uploaded again):")
        for entry in report["pending_moves"]:
            lines.append(f"  #{entry['id']} {entry['path']}")
    if report["recent"]:
        lines.append("")
        lines.append("Recent uploads:")
        for entry in report["recent"]:
            lines.append(f"  {entry['updated_at']}  {entry['state']:<9}  {entry['path']}")
    if report["unmapped"]:
        lines.append("")
        lines.append("Unmapped (nothing is uploaded from these until they map to a client):")
        for entry in report["unmapped"]:
            lines.append(f"  {entry['path']}: {entry['problem']}")
    if report["possible_duplicates"]:
        lines.append("")
        lines.append("Possible duplicates (check coreplus for a second copy):")
        for entry in report["possible_duplicates"]:
            lines.append(f"  #{entry['id']} {entry['path']} ({entry['state']}, client "
                         f"{entry['client']})")
    return "\n".join(printable(line) for line in lines) + "\n"


def _render_files(lines: list[str], state: str, entries: list[dict[str, Any]]) -> None:
    if not entries:
        return
    lines.append("")
    lines.append(f"{state.capitalize()} ({len(entries)}):")
    for entry in entries[:_TEXT_ROWS]:
        detail = entry["error"] or ""
        if state in ("deferred", "uncertain") and entry["next_attempt_at"]:
            detail = f"next attempt {entry['next_attempt_at']}; {detail}"
        lines.append(f"  #{entry['id']} {entry['path']}  {detail}".rstrip())
    if len(entries) > _TEXT_ROWS:
        lines.append(f"  ... and {len(entries) - _TEXT_ROWS} more (use --json for all)")
