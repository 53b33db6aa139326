"""
Intake: turn paths reported by scans and the watcher into ``queued`` ledger rows.

A path is filtered (ignored names, unmapped folders, links and special files), tracked
until it settles, hashed off the event loop, and only then queued. Paths the ledger has
already handled are recognised by path, size and mtime, so a rescan reads no contents
and logs nothing for them.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass

import structlog
from watchfiles import Change

from uploader import settle
from uploader.constants import CHUNK_BYTES, State
from uploader.context import Runtime, daemon_user
from uploader.ledger import FileRow
from uploader.settle import SettleRules, StatSnapshot, TrackedFile, Verdict
from uploader.watcher import kind_of, scan_tree

log = structlog.get_logger("uploader.intake")

#: How often tracked files are checked; bounds the settle latency above settle_seconds.
_TICK_S = 0.2

#: Files hashed at once; hashing is disk-bound, so more would only add seeks.
_HASH_CONCURRENCY = 2


@dataclass(frozen=True)
class Hashed:
    """The SHA-256 of a file and the stat it had before and after reading."""

    sha256: str
    snapshot: StatSnapshot


def hash_file(path: str, expected: StatSnapshot) -> Hashed | None:
    """
    Hash a file without following links; returns None when it changed while reading.

    Raises:
        FileNotFoundError: the file disappeared.
        PermissionError: the daemon's user may not read it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        before = StatSnapshot.of(os.fstat(fd))
        if before != expected:
            return None
        digest = hashlib.sha256()
        while chunk := os.read(fd, CHUNK_BYTES):
            digest.update(chunk)
        after = StatSnapshot.of(os.fstat(fd))
    finally:
        os.close(fd)
    if after != before:
        return None
    return Hashed(digest.hexdigest(), after)


def read_pdf_tail(path: str, size: int) -> bytes:
    """Read the last bytes of a PDF without following links."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        return settle.read_tail(fd, size)
    finally:
        os.close(fd)


class Intake:
    """
    Track candidate files until they settle, then hash and queue them.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        watch = rt.config.watch
        self.rules = SettleRules(watch.settle_seconds, watch.empty_grace_seconds,
                                 watch.pdf_wait_seconds)
        self.tracked: dict[str, TrackedFile] = {}
        self.due: dict[str, float] = {}
        self._hashing: set[str] = set()
        self._claiming: set[str] = set()
        self._hash_slots = asyncio.Semaphore(_HASH_CONCURRENCY)
        self._tasks: set[asyncio.Task[None]] = set()
        self.unmapped_seen: set[bytes] = set()

    @property
    def busy(self) -> bool:
        """True while any file is still settling or being hashed."""
        return bool(self.tracked or self._hashing)

    # -- scanning ------------------------------------------------------------------

    async def scan(self, start: str = "") -> int:
        """
        Walk the drop root (or one subtree) and feed every file found.

        Returns:
            How many files the walk found.

        Raises:
            OSError: the drop root cannot be listed.
        """
        result = await asyncio.to_thread(scan_tree, self.rt.root, self.rt.ignore, start)
        for rel, kind in result.skipped:
            self._report_skipped(rel, kind)
        if not start:
            self.unmapped_seen = set()
            for folder in result.folders:
                self._check_folder(folder)
        for rel in result.files:
            await self.handle_path(rel)
        if not start:
            await self.rt.ledger.clear_unmapped(self.unmapped_seen)
        return len(result.files)

    async def handle_changes(self, changes: set[tuple[Change, str]]) -> None:
        """Feed a batch of watcher changes."""
        for change, rel in sorted(changes, key=lambda c: c[1]):
            if change == Change.deleted:
                await self._lost(rel)
            else:
                await self.handle_path(rel, from_event=True)

    # -- one path ------------------------------------------------------------------

    async def handle_path(self, rel: str, *, from_event: bool = False) -> None:
        """Filter one path and start or refresh its tracking."""
        rt = self.rt
        if rt.ignore.is_ignored(rel):
            log.debug("file.ignored", path=_display(rel))
            return
        try:
            st = os.lstat(rt.root / rel)
        except FileNotFoundError:
            await self._lost(rel)
            return
        except OSError as exc:
            rt.warn_once("file.detected", client=None, path=_display(rel),
                         cause=f"cannot read file details: {exc}")
            return
        if stat.S_ISDIR(st.st_mode):
            if "/" not in rel:
                self._check_folder(rel)
            if from_event:
                # A folder moved or copied in with files already inside sends one event
                # for the folder only, so walk it.
                self._spawn(self._scan_subtree(rel))
            return
        folder, resolution = rt.resolve(rel)
        if folder is None or resolution is None or resolution.client_id is None:
            await self._report_unmapped(rel, folder, resolution)
            return
        if not stat.S_ISREG(st.st_mode) or self._parent_is_link(rel):
            self._report_skipped(rel, kind_of(st.st_mode))
            return
        await self._track(rel, resolution.client_id, folder, StatSnapshot.of(st),
                          from_event=from_event)

    async def _track(self, rel: str, client_id: str, folder: str,
                     snap: StatSnapshot, *, from_event: bool = False) -> None:
        now = time.monotonic()
        tracked = self.tracked.get(rel)
        if tracked is not None:
            changed = settle.observe(tracked, snap, now)
            # A rescan that finds the file unchanged adds nothing new, so only a change
            # or a watcher event restarts the settle window.
            if changed or from_event:
                settle.touch(tracked, now)
                self.due[rel] = now + self.rules.settle_s
            return
        if rel in self._hashing or rel in self._claiming:
            # Another scan or event is already looking this path up in the ledger; a
            # second lookup could insert the same version twice.
            return
        self._claiming.add(rel)
        try:
            row = await self.rt.ledger.find_live(os.fsencode(rel))
            row = await self._reconcile(row, rel, snap)
            if row is False:
                return
            if row is None:
                row = await self.rt.ledger.insert_waiting(
                    rel_path=os.fsencode(rel), display_path=_display(rel), drop_folder=folder,
                    client_id=client_id, size=snap.size, mtime_ns=snap.mtime_ns,
                    ctime_ns=snap.ctime_ns)
                log.info("file.detected", client=client_id, path=row.display_path,
                         size=snap.size)
            self._start_tracking(rel, row, snap, time.monotonic())
        finally:
            self._claiming.discard(rel)

    async def _reconcile(self, row: FileRow | None, rel: str,
                         snap: StatSnapshot) -> FileRow | None | bool:
        """
        Match a live ledger row: returns the row to keep tracking, None for a new
        version, or False when the file needs nothing from the intake.
        """
        if row is None:
            return None
        same = (row.size, row.mtime_ns) == (snap.size, snap.mtime_ns)
        if row.state == State.WAITING:
            return row
        if row.state == State.UPLOADING or same:
            return False
        if row.state in (State.QUEUED, State.DEFERRED, State.UNCERTAIN, State.HELD):
            log.info("file.changed", client=row.client_id, path=row.display_path,
                     state=State.WAITING, size=snap.size)
            return await self.rt.ledger.update(
                row.id, state=State.WAITING, size=snap.size, mtime_ns=snap.mtime_ns,
                ctime_ns=snap.ctime_ns, sha256=None, next_attempt_at=None)
        # An upload kept in place was replaced by new content: a new version.
        return None

    def _start_tracking(self, rel: str, row: FileRow, snap: StatSnapshot, now: float) -> None:
        self.tracked[rel] = TrackedFile(
            first_seen_s=now, snapshot=snap, changed_at_s=now, row_id=row.id,
            is_pdf=settle.is_pdf_name(rel))
        self.due[rel] = now + self.rules.settle_s

    async def _lost(self, rel: str) -> None:
        tracked = self.tracked.pop(rel, None)
        self.due.pop(rel, None)
        if tracked is None or tracked.row_id is None:
            return
        row = await self.rt.ledger.update(tracked.row_id, state=State.VANISHED,
                                          last_error="The file disappeared before it settled.")
        log.debug("file.vanished", client=row.client_id, path=row.display_path)

    # -- settling ------------------------------------------------------------------

    async def settle_loop(self) -> None:
        """Check due files every tick until the daemon stops."""
        while not self.rt.stopping.is_set():
            try:
                await self.check_due()
            except Exception as exc:  # noqa: BLE001 - e.g. a full disk under the ledger
                self.rt.warn_once("file.settled", client=None, path=None, level="error",
                                  cause=f"{type(exc).__name__}: {exc}",
                                  message="Checking waiting files failed; the daemon keeps "
                                  "trying.", action="Check the disk holding the ledger.")
            try:
                await asyncio.wait_for(self.rt.stopping.wait(), _TICK_S)
            except TimeoutError:
                pass

    async def check_due(self) -> None:
        """Look at every tracked file whose check time has come."""
        now = time.monotonic()
        for rel in [r for r, due in self.due.items() if due <= now]:
            await self._check_one(rel, now)

    async def _check_one(self, rel: str, now: float) -> None:
        tracked = self.tracked[rel]
        path = os.fspath(self.rt.root / rel)
        try:
            snap = StatSnapshot.of(os.lstat(path))
            settle.observe(tracked, snap, now)
            pdf_complete = None
            if tracked.is_pdf and now - tracked.changed_at_s >= self.rules.settle_s:
                tail = await asyncio.to_thread(read_pdf_tail, path, snap.size)
                pdf_complete = settle.pdf_has_eof(tail)
        except FileNotFoundError:
            await self._lost(rel)
            return
        except OSError as exc:
            # EBUSY or EIO from a share: look again later.
            self.due[rel] = now + max(self.rules.settle_s, 1.0)
            self.rt.warn_once("file.settled", client=None, path=_display(rel),
                              cause=f"cannot read the file yet: {exc}")
            return
        verdict = settle.decide(tracked, now, self.rules, pdf_complete)
        if verdict is Verdict.WAIT:
            self.due[rel] = settle.next_check_s(tracked, now, self.rules)
            return
        del self.tracked[rel]
        del self.due[rel]
        if verdict is Verdict.EMPTY_TOO_LONG:
            self._spawn(self._fail_empty(tracked))
            return
        if verdict is Verdict.SETTLED_WITHOUT_EOF:
            log.warning("file.settled", path=_display(rel), size=snap.size,
                        error="PDF has no %%EOF marker",
                        message="This PDF still has no end-of-file marker after "
                        f"{self.rules.pdf_wait_s:g} seconds, so it is uploaded as it is.",
                        action="Check in coreplus that the document opens and is complete.")
        self._hashing.add(rel)
        self._spawn(self._hash_and_queue(rel, tracked))

    async def _hash_and_queue(self, rel: str, tracked: TrackedFile) -> None:
        try:
            async with self._hash_slots:
                await self._hash_and_queue_inner(rel, tracked)
        finally:
            self._hashing.discard(rel)

    async def _hash_and_queue_inner(self, rel: str, tracked: TrackedFile) -> None:
        rt = self.rt
        assert tracked.row_id is not None
        path = os.fspath(rt.root / rel)
        try:
            hashed = await asyncio.to_thread(hash_file, path, tracked.snapshot)
        except FileNotFoundError:
            self.tracked[rel] = tracked
            await self._lost(rel)
            return
        except OSError as exc:
            await self._hash_failed(rel, tracked, exc)
            return
        if hashed is None:
            # It changed while being read: settle it again from now.
            now = time.monotonic()
            tracked.changed_at_s = now
            self.tracked[rel] = tracked
            self.due[rel] = now + self.rules.settle_s
            return
        await self._queue(tracked, hashed)

    async def _queue(self, tracked: TrackedFile, hashed: Hashed) -> None:
        rt = self.rt
        assert tracked.row_id is not None
        snap = hashed.snapshot
        # Not durable: a power cut can only lose the hash, and the file then settles
        # again. The commit that marks the row uploading syncs this one with it.
        row = await rt.ledger.update(
            tracked.row_id, durable=False, state=State.QUEUED, sha256=hashed.sha256,
            size=snap.size, mtime_ns=snap.mtime_ns, ctime_ns=snap.ctime_ns)
        limit = rt.config.upload.max_file_bytes
        if limit and snap.size > limit:
            await rt.fail_file(
                row, error=f"the file is {snap.size} bytes, more than upload.max_file_bytes "
                f"({limit})", reason="The file is larger than this clinic allows uploads to be.",
                action="Attach it in coreplus by hand, or raise upload.max_file_bytes.")
            return
        log.info("file.settled", client=row.client_id, path=row.display_path,
                 size=snap.size, state=State.QUEUED)
        rt.work_available.set()

    async def _hash_failed(self, rel: str, tracked: TrackedFile, exc: OSError) -> None:
        assert tracked.row_id is not None
        row = await self.rt.ledger.get(tracked.row_id)
        if isinstance(exc, PermissionError):
            await self.rt.hold(
                row, f"The daemon's user ({daemon_user()}) may not read this file: {exc}",
                action="Give the service's group read access to the file (for Samba shares, "
                "set 'force group' to that group), then run `coreplus-uploader retry`.")
            return
        if exc.errno in (errno.EBUSY, errno.EAGAIN, errno.EIO):
            now = time.monotonic()
            self.tracked[rel] = tracked
            self.due[rel] = now + max(self.rules.settle_s, 5.0)
            self.rt.warn_once("file.settled", client=row.client_id, path=row.display_path,
                              cause=f"the file is busy: {exc}")
            return
        await self.rt.hold(row, f"Reading the file failed: {exc}",
                           action="Check the disk and the file, then run "
                           "`coreplus-uploader retry`.")

    async def _fail_empty(self, tracked: TrackedFile) -> None:
        assert tracked.row_id is not None
        row = await self.rt.ledger.get(tracked.row_id)
        await self.rt.fail_file(
            row, error="the file is empty",
            reason=f"The file stayed empty for {self.rules.empty_grace_s:g} seconds, so there "
            "was nothing to upload. Scanners sometimes create an empty file when a scan fails.",
            action="Scan or save the document again into the client's folder.")

    # -- reporting -----------------------------------------------------------------

    def _check_folder(self, folder: str) -> None:
        if self.rt.ignore.is_ignored(folder):
            return
        _, resolution = self.rt.resolve(folder + "/x")
        if resolution is not None and resolution.client_id is None:
            self._spawn(self._report_unmapped(folder + "/", folder, resolution))

    async def _report_unmapped(self, rel: str, folder: str | None, resolution: object) -> None:
        key = folder if folder is not None else rel
        problem = getattr(resolution, "problem", None) or (
            "Files directly in the drop root belong to no client.")
        self.unmapped_seen.add(os.fsencode(key))
        first = await self.rt.ledger.record_unmapped(os.fsencode(key), _display(key), problem)
        if first:
            log.warning("file.unmapped", folder=_display(key), message=problem,
                        action="Move the file into a client's folder, rename the folder so "
                        "it ends in the client's coreplus id in brackets, or add an alias "
                        "under [clients] and reload.")

    def _report_skipped(self, rel: str, kind: str) -> None:
        self.rt.warn_once("file.ignored", client=None, path=_display(rel),
                          cause=f"{kind} skipped: only regular files are uploaded and links "
                          "are never followed")

    def _parent_is_link(self, rel: str) -> bool:
        parts = rel.split("/")[:-1]
        current = self.rt.root
        for part in parts:
            current = current / part
            try:
                if stat.S_ISLNK(os.lstat(current).st_mode):
                    return True
            except OSError:
                return True
        return False

    async def _scan_subtree(self, rel: str) -> None:
        try:
            await self.scan(rel)
        except OSError:
            pass  # It went away again; the next rescan covers it.

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for hashing and reporting tasks started by the intake."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _display(rel: str) -> str:
    """Return a path for people and logs, with undecodable bytes as U+FFFD."""
    return os.fsencode(rel).decode("utf-8", "replace")
