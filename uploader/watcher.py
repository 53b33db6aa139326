"""
Find candidate files under the drop root: a full scan, and a watchfiles watch between
scans.

Nothing here follows a symbolic link, uploads, or decides whether a file is finished:
the scan returns paths and their kinds, the watch yields the paths that changed.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import watchfiles

from uploader.folders import IgnoreRules

log = structlog.get_logger("uploader.watcher")

#: How long watchfiles groups changes before yielding them, and how often it checks.
#: Kept short because every millisecond here adds to the settle latency.
_DEBOUNCE_MS = 400
_STEP_MS = 50
_POLL_DELAY_MS = 500


@dataclass
class ScanResult:
    """
    The result of one walk of the drop root.

    Attributes:
        files: Relative paths ("/"-separated, surrogate-escaped) of regular files.
        folders: Names of the drop folders directly under the root.
        skipped: (relative path, kind) for symlinks, FIFOs, sockets and devices.
    """

    files: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def relative_path(root: Path, path: str | os.PathLike[str]) -> str | None:
    """Return the path relative to the root with "/" separators, or None when outside."""
    try:
        rel = os.path.relpath(os.fspath(path), os.fspath(root))
    except ValueError:
        return None
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return None
    return rel.replace(os.sep, "/")


def kind_of(mode: int) -> str:
    """Name a file type in plain words, for warnings about skipped entries."""
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "folder"
    return "regular file"


def scan_tree(root: Path, ignore: IgnoreRules, start: str = "") -> ScanResult:
    """
    Walk the drop root (or the subtree ``start`` under it) without following links.

    Raises:
        OSError: the root itself cannot be listed (missing, or a share that is away).
    """
    result = ScanResult()
    base = root / start if start else root
    pending = [(base, start)]
    while pending:
        folder, rel_folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            if folder == base:
                raise
            continue
        for entry in entries:
            _classify_entry(entry, rel_folder, ignore, result, pending)
    result.files.sort()
    return result


def _classify_entry(
    entry: os.DirEntry[str],
    rel_folder: str,
    ignore: IgnoreRules,
    result: ScanResult,
    pending: list[tuple[Path, str]],
) -> None:
    rel = f"{rel_folder}/{entry.name}" if rel_folder else entry.name
    if ignore.is_ignored(rel):
        return
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        if not rel_folder:
            result.folders.append(entry.name)
        pending.append((Path(entry.path), rel))
    elif stat.S_ISREG(mode):
        result.files.append(rel)
    else:
        result.skipped.append((rel, kind_of(mode)))


def is_watch_limit_error(exc: BaseException) -> bool:
    """Return True when inotify ran out of watches (fs.inotify.max_user_watches)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc).lower()
    return "watch limit" in text or "no space left on device" in text


async def watch_changes(
    root: Path,
    *,
    stop_event: asyncio.Event,
    force_polling: bool,
    on_fallback: Callable[[BaseException], None] | None = None,
) -> AsyncIterator[set[tuple[watchfiles.Change, str]]]:
    """
    Yield batches of (change, relative path) under the root until ``stop_event`` is set.

    When inotify cannot add a watch, because ``fs.inotify.max_user_watches`` is used up
    or a folder is not readable, it switches to polling and calls ``on_fallback`` once.

    Raises:
        FileNotFoundError: the root does not exist (the caller waits and restarts).
    """
    polling = force_polling
    while not stop_event.is_set():
        try:
            async for changes in watchfiles.awatch(
                root,
                stop_event=stop_event,
                force_polling=polling,
                poll_delay_ms=_POLL_DELAY_MS,
                debounce=_DEBOUNCE_MS,
                step=_STEP_MS,
                watch_filter=None,
                recursive=True,
                # With inotify, errors must surface: watchfiles hides a used-up watch limit
                # along with permission errors when set to ignore them. Polling has no
                # limit, so there an unreadable folder is simply skipped.
                ignore_permission_denied=polling,
            ):
                batch = set()
                for change, path in changes:
                    rel = relative_path(root, path)
                    if rel is not None:
                        batch.add((change, rel))
                if batch:
                    yield batch
            return
        except OSError as exc:
            if polling or not (is_watch_limit_error(exc) or isinstance(exc, PermissionError)):
                raise
            polling = True
            if on_fallback is not None:
                on_fallback(exc)
