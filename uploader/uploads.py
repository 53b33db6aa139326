"""
Workers: take ready rows from the ledger, upload each once, and record the outcome.

Each outcome maps to a ledger state as the failure table in the README lists: confirmed uploads are
``uploaded`` and then archived, deleted or kept; transient failures are ``deferred`` with
a ``next_attempt_at``; lost responses are ``uncertain`` and flagged; rejections are
``failed`` with a reason file; 401, 403 and TLS errors pause the gate and leave the file
``queued``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from uploader import disposal
from uploader.client import CoreplusClient, UploadRequest, UploadResult
from uploader.constants import CLOCK_SKEW_WARN_S, LEDGER_POLL_INTERVAL_S, State
from uploader.context import Runtime, daemon_user
from uploader.exceptions import (
    FileChangedError,
    FileVanishedError,
    LedgerError,
    PermanentUploadError,
    RetryableUploadError,
    ServicePausedError,
    UncertainUploadError,
)
from uploader.gate import ServiceGate
from uploader.ledger import (
    DISPOSITION_ARCHIVED,
    DISPOSITION_DELETED,
    DISPOSITION_KEPT,
    DISPOSITION_PENDING,
    FileRow,
)
from uploader.multipart import display_name
from uploader.retry import deferral_delay_s, upload_with_retry

log = structlog.get_logger("uploader.uploads")

#: Seconds between attempts to record a confirmed upload while the ledger is unwritable.
_LEDGER_RETRY_S = 5.0

#: Local errors that mean "try again later", such as a share that is briefly away.
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.EIO, errno.ETIMEDOUT, errno.EHOSTDOWN,
                     errno.ENOTCONN, errno.ESTALE}


@dataclass
class RunCounters:
    """Outcomes counted during this process's life, for `import` and STATUS=."""

    uploaded: int = 0
    duplicate: int = 0
    failed: int = 0
    deferred: int = 0
    uncertain: int = 0
    held: int = 0
    handled_ids: set[int] = field(default_factory=set)


class Uploader:
    """
    Run ``upload.workers`` uploads at once, fed from the ledger.
    """

    def __init__(self, rt: Runtime, client: CoreplusClient, gate: ServiceGate) -> None:
        self.rt = rt
        self.client = client
        self.gate = gate
        self.counters = RunCounters()
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        #: Confirmed uploads still being recorded and moved. They no longer hold a
        #: worker slot, so the next upload can start while the ledger commits.
        self.finishing: dict[int, asyncio.Task[None]] = {}
        # The (client, bytes) key of each row in flight or still being recorded, by row
        # id, because a worker may have moved the row to another client meanwhile.
        self._busy_keys: dict[int, tuple[str | None, str | None]] = {}
        self._accepting = True

    # -- dispatching ---------------------------------------------------------------

    async def dispatch_loop(self) -> None:
        """Start workers for ready rows until the daemon stops taking new work."""
        workers = self.rt.config.upload.workers
        while self._accepting and not self.rt.stopping.is_set():
            await self.gate.wait_open()
            free = workers - len(self.in_flight)
            if free > 0:
                self._start(await self._read_queue(free), free)
            self.rt.work_available.clear()
            try:
                await asyncio.wait_for(self._wake(), LEDGER_POLL_INTERVAL_S)
            except TimeoutError:
                pass

    async def _wake(self) -> None:
        stop = asyncio.ensure_future(self.rt.stopping.wait())
        work = asyncio.ensure_future(self.rt.work_available.wait())
        try:
            await asyncio.wait({stop, work}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            work.cancel()

    async def _read_queue(self, free: int) -> list[FileRow]:
        try:
            return await self.rt.ledger.next_ready(
                now=time.time(), limit=free + len(self._busy_keys) + 8,
                include_uncertain=self.rt.config.upload.on_uncertain == "retry",
                exclude=list(self.in_flight))
        except Exception as exc:  # noqa: BLE001 - the loop must outlive ledger errors
            self.rt.warn_once("upload.deferred", client=None, path=None,
                              level="error", cause=f"{type(exc).__name__}: {exc}",
                              message="Reading the queue from the ledger failed; the "
                              "daemon keeps trying.",
                              action="Check the disk holding the ledger.")
            return []

    def _start(self, rows: list[FileRow], free: int) -> None:
        for row in rows:
            if free <= 0 or self.gate.paused or self.rt.stopping.is_set():
                return
            key = (row.client_id, row.sha256)
            if key in self._busy_keys.values():
                # The same bytes for the same client are in flight or not yet recorded:
                # once that ends, this row becomes a duplicate or goes up itself.
                continue
            self._busy_keys[row.id] = key
            self.in_flight[row.id] = asyncio.create_task(self._run(row))
            free -= 1

    def stop_accepting(self) -> None:
        """Take no new rows; in-flight uploads carry on."""
        self._accepting = False

    @property
    def busy(self) -> bool:
        """Whether an upload is in flight or a confirmed one is still being recorded."""
        return bool(self.in_flight or self.finishing)

    async def _run(self, row: FileRow) -> None:
        try:
            await self.process(row)
        except asyncio.CancelledError:
            await asyncio.shield(self._interrupted(row))
            raise
        except Exception as exc:  # The per-file boundary: the daemon must keep running.
            await self._unexpected(row, exc)
        finally:
            self.in_flight.pop(row.id, None)
            if row.id not in self.finishing:
                self._release(row.id)
            self.rt.work_available.set()

    def _release(self, row_id: int) -> None:
        # Let the next row with the same client and bytes start. It finds this row in
        # the ledger and becomes a duplicate, or goes up itself if this upload failed.
        self._busy_keys.pop(row_id, None)
        self.counters.handled_ids.add(row_id)

    async def wait_finishing(self, timeout_s: float | None) -> list[asyncio.Task[None]]:
        """
        Wait for confirmed uploads to be recorded and moved; return the tasks still
        running after ``timeout_s``.
        """
        tasks = list(self.finishing.values())
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        return list(pending)

    async def _interrupted(self, row: FileRow) -> None:
        current = await self.rt.ledger.get(row.id)
        if current is not None and current.state == State.UPLOADING:
            # Cancelled after the shutdown grace: the body may have been sent already.
            await self.rt.ledger.update(
                row.id, state=State.UNCERTAIN, possible_duplicate=1,
                last_error="The daemon stopped during this upload, so coreplus may already "
                "hold the file.")

    async def _unexpected(self, row: FileRow, exc: Exception) -> None:
        current = await self.rt.ledger.get(row.id)
        if current is not None and current.state in (State.UPLOADED, State.DUPLICATE):
            # The upload itself is recorded; only the step after it failed. Holding the
            # row would invite a second upload, so leave it and retry the move later.
            await self.rt.ledger.update(row.id, disposition=DISPOSITION_PENDING)
            log.error("move.failed", client=row.client_id, path=row.display_path,
                      error=f"{type(exc).__name__}: {exc}", state=current.state,
                      traceback="".join(traceback.format_exception(exc)),
                      message="The file is in coreplus, but moving it out of the drop folder "
                      "failed unexpectedly. It will not be uploaded again.",
                      action="Report the error with this log line.")
            return
        log.error("upload.held", client=row.client_id, path=row.display_path,
                  error=f"{type(exc).__name__}: {exc}", state=State.HELD,
                  traceback="".join(traceback.format_exception(exc)),
                  message="An unexpected error stopped this file's upload; the daemon "
                  "carries on with other files.",
                  action="Report the error with this log line, then run "
                  "`coreplus-uploader retry` for the file.")
        self.counters.held += 1
        try:
            await self.rt.ledger.update(row.id, state=State.HELD,
                                        last_error=f"unexpected error: {type(exc).__name__}: {exc}")
        except Exception as ledger_exc:  # noqa: BLE001 - already in the error path
            log.error("upload.held", client=row.client_id, path=row.display_path,
                      error=f"could not record the held state: {ledger_exc}")

    # -- one file ------------------------------------------------------------------

    async def process(self, row: FileRow) -> None:
        """Upload one ready row and record what happened."""
        row = await self._refresh_client(row)
        if row is None:
            return
        current = await self._current_stat(row)
        if current is None:
            return
        if row.sha256 is None:
            # Held before it was ever hashed (an unreadable file) and then retried:
            # settle and hash it like a new file.
            await self._back_to_waiting(row)
            return
        await self._upload(row)

    async def _refresh_client(self, row: FileRow) -> FileRow | None:
        """Resolve the client again just before sending, so a renamed alias counts."""
        _, resolution = self.rt.resolve(row.rel_path_str)
        client_id = resolution.client_id if resolution is not None else None
        if client_id is None:
            await self.rt.hold(row, "The file's folder no longer maps to a client.",
                               action="Rename the folder to end in the client's id in "
                               "brackets or add an alias under [clients], then run "
                               "`coreplus-uploader retry`.")
            self.counters.held += 1
            return None
        if client_id != row.client_id:
            row = await self.rt.ledger.update(row.id, client_id=client_id)
        return row

    async def _current_stat(self, row: FileRow) -> os.stat_result | None:
        path = self.rt.root / row.rel_path_str
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            await self.rt.ledger.update(row.id, state=State.VANISHED,
                                        last_error="The file disappeared before its upload.")
            log.debug("file.vanished", client=row.client_id, path=row.display_path)
            return None
        if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
            await self._back_to_waiting(row)
            return None
        return st

    async def _back_to_waiting(self, row: FileRow) -> None:
        await self.rt.ledger.update(row.id, state=State.WAITING, sha256=None,
                                    next_attempt_at=None)
        log.info("file.changed", client=row.client_id, path=row.display_path,
                 state=State.WAITING)
        # The watcher's event for this change arrived while the row was busy and was
        # ignored, so hand the path back to the intake to settle it again.
        if self.rt.track_again is not None:
            await self.rt.track_again(row.rel_path_str)

    async def _mark_duplicate(self, row: FileRow, earlier: FileRow) -> None:
        row = await self.rt.ledger.update(row.id, state=State.DUPLICATE, duplicate_of=earlier.id,
                                          remote_id=earlier.remote_id)
        log.info("upload.duplicate", client=row.client_id, path=row.display_path,
                 size=row.size, state=State.DUPLICATE, remote_id=earlier.remote_id,
                 earlier_path=earlier.display_path)
        self.counters.duplicate += 1
        await self._dispose(row)

    async def _upload(self, row: FileRow) -> None:
        rt = self.rt
        upload = rt.config.upload
        started = time.monotonic()
        assert row.client_id is not None and row.sha256 is not None
        request = UploadRequest(
            path=os.fsencode(rt.root / row.rel_path_str), client_id=row.client_id,
            name=_display_name(row), size=row.size, sha256=row.sha256,
            mtime_ns=row.mtime_ns, ctime_ns=row.ctime_ns)
        if upload.skip_duplicates:
            # Looked up before the rate limiter, so a duplicate never uses a request slot.
            earlier = await rt.ledger.find_uploaded(row.client_id, row.sha256)
            if earlier is not None and earlier.id != row.id:
                await self._mark_duplicate(row, earlier)
                return
        claimed = row

        async def before_attempt(number: int) -> None:
            # Runs once the rate limiter admits the try, so a stop during that wait
            # leaves the row queued instead of flagged as a possible duplicate.
            nonlocal claimed
            if number == 1:
                claim = await rt.ledger.claim_upload(
                    row.id, attempts=row.attempts + 1,
                    duplicate_key=(row.client_id, row.sha256) if upload.skip_duplicates
                    else None)
                if claim.row is None:
                    raise _NotClaimed(claim.earlier)
                claimed = claim.row
            else:
                claimed = await rt.ledger.update(
                    row.id, state=State.UPLOADING, attempts=claimed.attempts + 1,
                    next_attempt_at=None)
            log.info("upload.started", client=row.client_id, path=row.display_path,
                     size=row.size, attempt=claimed.attempts)

        async def on_retry(number: int, exc: Exception, wait_s: float) -> None:
            log.warning("upload.retrying", client=row.client_id, path=row.display_path,
                        attempt=claimed.attempts, error=str(exc),
                        wait_seconds=round(wait_s, 1))

        try:
            result = await upload_with_retry(
                self.client, request, max_attempts=upload.max_attempts,
                backoff_max_s=upload.backoff_max_seconds, before_attempt=before_attempt,
                on_retry=on_retry)
        except _NotClaimed as lost:
            if lost.earlier is not None:
                await self._mark_duplicate(row, lost.earlier)
            # Otherwise something else changed the row since it was taken (the intake saw
            # the file change, for example) and has already logged why.
            return
        except Exception as exc:
            self._check_clock()
            await self._record_failure(claimed, exc, started)
            return
        self._check_clock(result)
        # The worker slot is free from here. Recording the outcome and moving the file run
        # as a task of their own, and the same bytes stay blocked until the row is uploaded.
        task = asyncio.create_task(self._finish(claimed, result, started))
        self.finishing[row.id] = task

    async def _finish(self, row: FileRow, result: UploadResult, started: float) -> None:
        try:
            try:
                # Shielded: a cancelled daemon must still record an upload that coreplus
                # confirmed, or the next start would flag it and send it again.
                row = await asyncio.shield(self._record_success(row, result, started))
            finally:
                self._release(row.id)
                self.rt.work_available.set()
            await self._dispose(row)
        except Exception as exc:  # The per-file boundary, as in _run.
            await self._unexpected(row, exc)
        finally:
            self.finishing.pop(row.id, None)

    # -- outcomes ------------------------------------------------------------------

    async def _record_success(self, row: FileRow, result: UploadResult,
                              started: float) -> FileRow:
        row = await self._write_until_stored(
            row, state=State.UPLOADED, remote_id=result.remote_id, uploaded_at=time.time(),
            last_error=None, next_attempt_at=None)
        self.gate.note_success()
        self.counters.uploaded += 1
        log.info("upload.succeeded", client=row.client_id, path=row.display_path,
                 size=row.size, attempt=row.attempts, remote_id=result.remote_id,
                 state=State.UPLOADED, elapsed_ms=round((time.monotonic() - started) * 1000),
                 possible_duplicate=bool(row.possible_duplicate))
        return row

    async def _write_until_stored(self, row: FileRow, **values: object) -> FileRow:
        """
        Record a confirmed upload, retrying while the ledger cannot be written (a full
        disk), because losing this row would send the file again.
        """
        while True:
            try:
                return await self.rt.ledger.update(row.id, **values)
            except LedgerError as exc:
                self.rt.warn_once("upload.succeeded", client=row.client_id,
                                  path=row.display_path, level="error", cause=str(exc),
                                  remote_id=values.get("remote_id"),
                                  message="The file is in coreplus, but the ledger cannot be "
                                  "written; the daemon keeps trying.",
                                  action="Free space on the disk holding the ledger.")
                await asyncio.sleep(_LEDGER_RETRY_S)

    async def _record_failure(self, row: FileRow, exc: Exception, started: float) -> None:
        if isinstance(exc, RetryableUploadError):
            await self._defer(row, exc)
        elif isinstance(exc, UncertainUploadError):
            await self._uncertain(row, exc)
        elif isinstance(exc, ServicePausedError):
            await self.rt.ledger.update(row.id, state=State.QUEUED, last_error=str(exc))
            await self.gate.pause_for(exc)
        elif isinstance(exc, PermanentUploadError):
            await self._reject(row, exc)
        elif isinstance(exc, FileChangedError):
            await self._back_to_waiting(row)
        elif isinstance(exc, FileVanishedError):
            await self.rt.ledger.update(row.id, state=State.VANISHED, last_error=str(exc))
            log.debug("file.vanished", client=row.client_id, path=row.display_path)
        elif isinstance(exc, PermissionError):
            self.counters.held += 1
            await self.rt.hold(
                row, f"The daemon's user ({daemon_user()}) may not read this file: {exc}",
                action="Give the service's group read access (chmod g+r, or 'force group' "
                "on the Samba share), then run `coreplus-uploader retry`.")
        elif isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            await self._defer(row, exc)
        else:
            raise exc

    async def _defer(self, row: FileRow, exc: Exception) -> None:
        upload = self.rt.config.upload
        retry_after = getattr(exc, "retry_after_s", None)
        delay = deferral_delay_s(row.deferrals, retry_after_s=retry_after,
                                 backoff_max_s=upload.backoff_max_seconds)
        row = await self.rt.ledger.update(
            row.id, state=State.DEFERRED, deferrals=row.deferrals + 1, last_error=str(exc),
            next_attempt_at=time.time() + delay)
        self.counters.deferred += 1
        self.rt.warn_once("upload.deferred", client=row.client_id, path=row.display_path,
                          cause=str(exc), state=State.DEFERRED, attempt=row.attempts,
                          next_attempt_in_seconds=round(delay, 1))

    async def _uncertain(self, row: FileRow, exc: UncertainUploadError) -> None:
        upload = self.rt.config.upload
        hold = upload.on_uncertain == "hold"
        delay = deferral_delay_s(row.deferrals, retry_after_s=None,
                                 backoff_max_s=upload.backoff_max_seconds)
        row = await self.rt.ledger.update(
            row.id, state=State.HELD if hold else State.UNCERTAIN, possible_duplicate=1,
            deferrals=row.deferrals + 1, last_error=str(exc),
            next_attempt_at=None if hold else time.time() + delay)
        self.counters.uncertain += 1
        action = ("Check in coreplus whether the file arrived. If it did, run "
                  "`coreplus-uploader forget` for it; if not, run `coreplus-uploader retry`."
                  if hold else "It is sent again automatically; check coreplus for a second "
                  "copy afterwards (`coreplus-uploader status` lists possible duplicates).")
        log.warning("upload.uncertain", client=row.client_id, path=row.display_path,
                    size=row.size, attempt=row.attempts, error=str(exc), state=row.state,
                    message="The file was sent but no valid response came back, so coreplus "
                    "may or may not have stored it.", action=action)

    async def _reject(self, row: FileRow, exc: PermanentUploadError) -> None:
        detail = f"coreplus answered HTTP {exc.status}"
        body = (exc.body or "").strip()
        reason = f"coreplus rejected the upload with HTTP {exc.status}." + (
            f" Its answer was: {body[:1000]}" if body else "")
        self.counters.failed += 1
        await self.rt.fail_file(
            row, error=detail, reason=reason,
            action="Check the file and the client's folder name. To try again, move the "
            "file back into the client's folder.")
        await self.gate.note_rejection(row.client_id, exc)

    # -- after the upload ----------------------------------------------------------

    async def _dispose(self, row: FileRow) -> None:
        """Apply upload.after_success; a failed move is retried later, never re-uploaded."""
        upload = self.rt.config.upload
        src = self.rt.root / row.rel_path_str
        try:
            if upload.after_success == "archive":
                assert upload.archive_dir is not None
                final = await asyncio.to_thread(
                    disposal.archive_file, src, row.rel_path_str, upload.archive_dir,
                    staff_group=upload.staff_group)
                await self.rt.ledger.update(row.id, disposition=DISPOSITION_ARCHIVED,
                                            final_path=str(final))
            elif upload.after_success == "delete":
                await asyncio.to_thread(disposal.delete_file, src)
                await self.rt.ledger.update(row.id, disposition=DISPOSITION_DELETED)
            else:
                await self.rt.ledger.update(row.id, disposition=DISPOSITION_KEPT)
        except FileNotFoundError:
            await self.rt.ledger.update(row.id, disposition=DISPOSITION_DELETED)
            # Only on the first try: a retried move may find the file gone because a
            # crash came between the move and its ledger commit.
            # NOTE: that retry records `deleted` although the file is in the archive.
            if upload.after_success == "archive" and row.disposition is None:
                log.warning("move.failed", client=row.client_id, path=row.display_path,
                            state=row.state, error="the file was gone from its drop folder",
                            message="The file is in coreplus, but someone or something "
                            "removed it from the drop folder before it could be archived, "
                            "so the archive has no copy.",
                            action="Nothing is needed for the upload. If the removal was "
                            "not expected, check who else uses the drop folder.")
        except OSError as exc:
            await self.rt.ledger.update(row.id, disposition=DISPOSITION_PENDING)
            # One condition per cause, not per file: a full or read-only archive would
            # otherwise log every file at every retry. `status` lists each pending move.
            self.rt.warn_once(
                "move.failed", client=None, path=None, cause=str(exc),
                first_path=row.display_path, first_client=row.client_id, state=row.state,
                message="A file is in coreplus, but it could not be moved out of the drop "
                "folder. It will not be uploaded again, and later files with the same "
                "problem are counted here, not logged one by one.",
                action="Free space or fix permissions on the archive folder; the move is "
                "retried automatically. `coreplus-uploader status` lists the waiting files.")

    async def retry_pending_moves(self) -> None:
        """Try again to archive or delete files whose move failed earlier."""
        for row in await self.rt.ledger.pending_dispositions():
            if self.rt.stopping.is_set():
                return
            try:
                await self._dispose(row)
            except Exception as exc:  # noqa: BLE001 - one bad row must not stop the others
                self.rt.warn_once("move.failed", client=row.client_id, path=row.display_path,
                                  cause=f"{type(exc).__name__}: {exc}", level="error")

    def _check_clock(self, result: UploadResult | None = None) -> None:
        server_date = result.server_date if result is not None else self.client.last_server_date
        if server_date is None:
            return
        skew = server_date.timestamp() - datetime.now(UTC).timestamp()
        # The Date header has one-second resolution, so allow for that on top.
        if abs(skew) > CLOCK_SKEW_WARN_S + 1:
            # The cause is the direction only, so a drifting value is not a new condition.
            self.rt.warn_once("clock.skew", client=None, path=None,
                              cause="ahead" if skew > 0 else "behind",
                              skew_seconds=round(skew, 1),
                              message="This server's clock differs from coreplus's clock by "
                              f"{abs(skew):.0f} seconds; tokens may be refused.",
                              action="Enable time synchronisation (timedatectl "
                              "set-ntp true).")


class _NotClaimed(Exception):
    """
    Raised before the first byte when the row cannot be claimed: it is no longer ready,
    or ``earlier`` is an upload of the same bytes for the client.
    """

    def __init__(self, earlier: FileRow | None) -> None:
        super().__init__("the row could not be claimed for upload")
        self.earlier = earlier


def _display_name(row: FileRow) -> str:
    return display_name(os.path.basename(row.rel_path))
