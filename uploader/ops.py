"""
The operations loop: the daemon's reports to systemd, the IT contact and reception.

Every few seconds it reads a snapshot from the ledger (the queue, today's uploads, the
pause reason the gate stored, failed and held files, unmapped folders) and the free
space of the filesystems the daemon writes to. From that it

- sends ``STATUS=`` to systemd, so ``systemctl status`` shows the state at a glance;
- hands every condition that needs a person to ``Alerter``, which reports each cause
  at most once a day;
- writes or removes the reception status file in the drop root;
- prunes the archive once a day when ``upload.archive_keep_days`` is set.

Alongside, it sends ``WATCHDOG=1`` from the event loop. It never changes a ledger row.
With ``log.file_names = "hide"`` no file or folder name leaves this module: STATUS=
has none, alerts carry the same keyed hashes as the log, and the status file gives
counts only.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from uploader.alerts import SENT_FILE_NAME, Alert, Alerter, SentRegister
from uploader.config import Config
from uploader.constants import State
from uploader.context import Runtime
from uploader.exceptions import LedgerError
from uploader.ledger import FileRow
from uploader.logs import NameHider
from uploader.prune import prune_archive
from uploader.sdnotify import Notifier
from uploader.statusfile import ReceptionView, StatusFile, render

log = structlog.get_logger("uploader.ops")

#: Seconds between two passes; well under the 30 s watchdog half-interval, and short
#: enough that `systemctl status` and the status file follow the daemon closely.
POLL_INTERVAL_S = 5.0

#: Seconds between two prunes of the archive.
PRUNE_INTERVAL_S = 86_400.0

#: An uploaded file still waiting for its archive move this long after its upload is
#: reported: moves are retried every minute, so this rules out a brief lock or hiccup.
STUCK_MOVE_S = 600.0

#: States still on their way to coreplus, counted as the queue.
QUEUE_STATES = (State.WAITING, State.QUEUED, State.UPLOADING, State.DEFERRED,
                State.UNCERTAIN)

# Maximum length of the error text quoted in an alert.
_ERROR_MAX_CHARS = 300


@dataclass(frozen=True)
class LowDisk:
    """
    A filesystem the daemon writes to that is nearly full.

    Attributes:
        paths: The configured folders on it.
        free_percent: Free space available to the daemon, as a share of its size.
        free_bytes: The same in bytes.
    """

    paths: tuple[str, ...]
    free_percent: float
    free_bytes: int


@dataclass(frozen=True)
class Snapshot:
    """
    The state one pass of the loop acts on.
    """

    counts: dict[str, int]
    """Ledger rows per state."""
    uploaded_today: int
    """Uploads coreplus confirmed since local midnight."""
    paused: str | None
    """The pause reason the gate stored, or None while uploads run."""
    paused_action: str | None
    """The action that clears the pause."""
    failed: list[FileRow] = field(default_factory=list)
    """Failed rows whose file is still in the failed folder."""
    held: list[FileRow] = field(default_factory=list)
    """Held rows."""
    unmapped: list[dict[str, Any]] = field(default_factory=list)
    """Unmapped folders and root files, as ``Ledger.unmapped`` returns them."""
    low_disks: list[LowDisk] = field(default_factory=list)
    """Filesystems below ``alert.disk_min_free_percent``."""
    stuck_moves: int = 0
    """Uploaded files still in their drop folders ``STUCK_MOVE_S`` after the upload."""

    @property
    def queue(self) -> int:
        """Files not yet uploaded that the daemon is still working on."""
        return sum(self.counts.get(state, 0) for state in QUEUE_STATES)


def first_sentence(text: str) -> str:
    """Return the text up to and including its first full stop followed by a space."""
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


def start_of_today(now: float) -> float:
    """Unix time of the local midnight that began the day of ``now``."""
    day = datetime.fromtimestamp(now).astimezone()
    return day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def status_line(snapshot: Snapshot) -> str:
    """Build the one-line ``STATUS=`` text, which never contains a file or folder name."""
    parts = [f"Queue {snapshot.queue}", f"uploaded today {snapshot.uploaded_today}",
             f"failed {len(snapshot.failed)}", f"held {len(snapshot.held)}"]
    if snapshot.unmapped:
        parts.append(f"unmapped {len(snapshot.unmapped)}")
    for disk in snapshot.low_disks:
        parts.append(f"disk {disk.free_percent:.1f}% free")
    line = ", ".join(parts)
    if snapshot.paused:
        line = f"PAUSED: {first_sentence(snapshot.paused)} {line}"
    return line


class Operations:
    """
    Run the operations loop for one daemon.

    Args:
        rt: The daemon's shared runtime (configuration and ledger).
        notifier: systemd notifications; built from the environment by default.
        alerter: Alert delivery; built from ``[alert]`` by default, remembering sent
            causes beside the ledger.
        hider: Replaces names when ``log.file_names = "hide"``; built from the key
            beside the ledger by default.
        poll_interval_s: Seconds between passes.
        clock: Unix time source.
    """

    def __init__(self, rt: Runtime, *, notifier: Notifier | None = None,
                 alerter: Alerter | None = None, hider: NameHider | None = None,
                 poll_interval_s: float = POLL_INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        config = rt.config
        self.rt = rt
        self.notifier = notifier or Notifier()
        self.alerter = alerter or Alerter(
            config.alert, SentRegister(config.ledger.path.parent / SENT_FILE_NAME))
        self.hider = hider if hider is not None else default_hider(config)
        self.status_file = StatusFile(rt.root, config.upload.staff_group)
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._paused_since: float | None = None
        self._next_prune_s = 0.0

    # -- systemd -------------------------------------------------------------------

    def ready(self, files_found: int) -> None:
        """Send READY=1 once the ledger is open and the first scan has queued its files."""
        files = "1 file" if files_found == 1 else f"{files_found} files"
        self.notifier.ready(f"Started; the first scan found {files}.")

    def waiting_for_root(self) -> None:
        """
        Send READY=1 while the drop root cannot be read, so systemd does not time the
        start out and restart the daemon while it waits for the share.
        """
        self.notifier.ready("Started; waiting for the drop root to be readable (see the "
                            "journal). Nothing is uploaded until it is.")

    def stopping(self) -> None:
        """Send STOPPING=1 at the start of an orderly shutdown."""
        self.notifier.stopping()

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Send keep-alives and run a pass every ``poll_interval_s`` until cancelled."""
        watchdog = asyncio.create_task(self.notifier.watchdog_loop())
        try:
            while True:
                await self._guarded_tick()
                await asyncio.sleep(self.poll_interval_s)
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
            self.notifier.close()

    async def _guarded_tick(self) -> None:
        try:
            await self.tick()
        except (OSError, LedgerError, sqlite3.Error) as exc:
            self.rt.warn_once("ops.failed", client=None, path=None, cause=str(exc),
                              message="The status report, alerts or status file could not "
                              "be updated; uploads carry on.",
                              action="Check the ledger's disk and the drop root.")
        except Exception as exc:  # A bug here must not end STATUS=, alerts or pruning.
            log.error("ops.failed", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(), message="A pass of the operations "
                      "loop failed; the next pass tries again.", action="Report this line.")

    async def tick(self) -> Snapshot:
        """
        Run one pass: read a snapshot, then update systemd, alerts, the status file,
        and the archive when a prune is due.

        Returns:
            The snapshot acted on.
        """
        snapshot = await self.snapshot()
        self.notifier.status(status_line(snapshot))
        await self.alerter.send(self.alerts(snapshot))
        await asyncio.to_thread(self.status_file.update, render(self.reception_view(snapshot)))
        await self._prune_if_due()
        return snapshot

    # -- reading the state -------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Read the ledger and the disks into a ``Snapshot``."""
        ledger = self.rt.ledger
        now = self._clock()
        facts = await ledger.get_status()
        failed = await ledger.rows_in_state(State.FAILED)
        snapshot = Snapshot(
            counts=await ledger.count_by_state(*QUEUE_STATES, State.FAILED, State.HELD),
            uploaded_today=await ledger.count_uploaded_since(start_of_today(now)),
            paused=facts.get("paused"), paused_action=facts.get("paused_action"),
            failed=await asyncio.to_thread(_still_in_failed_folder, failed),
            held=await ledger.rows_in_state(State.HELD),
            unmapped=await ledger.unmapped(),
            low_disks=await asyncio.to_thread(self._low_disks),
            stuck_moves=await ledger.count_pending_moves(before=now - STUCK_MOVE_S))
        self._paused_since = (self._paused_since or now) if snapshot.paused else None
        return snapshot

    def _low_disks(self) -> list[LowDisk]:
        threshold = self.rt.config.alert.disk_min_free_percent
        if threshold <= 0:
            return []
        found = [disk for disk in disk_usage(watched_folders(self.rt.config))
                 if disk.free_percent < threshold]
        return found

    # -- alerts and the status file ---------------------------------------------------

    def name(self, display_path: str) -> str:
        """Return a name as alerts show it: the path, or its keyed hash when hidden."""
        return self.hider.token(display_path) if self.hider else display_path

    def _scrub(self, text: str, row: FileRow) -> str:
        """Replace the row's path and drop folder in free text when names are hidden."""
        if not self.hider:
            return text
        for value in (str(self.rt.root / row.display_path), row.display_path, row.drop_folder):
            if value:
                text = text.replace(value, self.hider.token(value))
        return text

    def alerts(self, snapshot: Snapshot) -> list[Alert]:
        """List every condition in the snapshot that needs a person, one per cause."""
        found: list[Alert] = []
        if snapshot.paused:
            reason = first_sentence(snapshot.paused)
            found.append(Alert("paused", f"paused:{reason}", f"Uploads are paused: {reason}",
                               snapshot.paused_action or "Run `coreplus-uploader status`."))
        found += [self._disk_alert(disk) for disk in snapshot.low_disks]
        found += [self._failed_alert(row) for row in snapshot.failed]
        found += [self._held_alert(row) for row in snapshot.held]
        if snapshot.stuck_moves:
            found.append(self._moves_alert(snapshot.stuck_moves))
        found += [self._unmapped_alert(entry) for entry in snapshot.unmapped]
        return found

    def _moves_alert(self, count: int) -> Alert:
        files = "1 uploaded file is" if count == 1 else f"{count} uploaded files are"
        # One cause for all of them: the archive folder, not each file, is the problem.
        return Alert("moves", "moves",
                     f"{files} still in the drop folders more than "
                     f"{STUCK_MOVE_S / 60:.0f} minutes after the upload, because moving "
                     "them out failed. They are in coreplus and will not be uploaded again.",
                     "Look for move.failed in the log, which names the folder and the "
                     f"cause. Fix the permissions or free space on {self._move_target()}; "
                     "the move is retried every minute. `coreplus-uploader status` lists "
                     "the files.")

    def _move_target(self) -> str:
        upload = self.rt.config.upload
        if upload.after_success == "archive" and upload.archive_dir is not None:
            return f"the archive folder {upload.archive_dir}"
        return "the drop folders, where the daemon's user must be able to delete files"

    def _disk_alert(self, disk: LowDisk) -> Alert:
        where = ", ".join(disk.paths)
        return Alert("disk", f"disk:{where}",
                     f"Only {disk.free_percent:.1f}% ({disk.free_bytes / 2**30:.1f} GiB) is "
                     f"free on the filesystem holding {where}.",
                     "Free space there, or delete old archived files (see "
                     "upload.archive_keep_days). On a full disk uploads, archiving and the "
                     "ledger stop working.")

    def _failed_alert(self, row: FileRow) -> Alert:
        error = self._scrub((row.last_error or "no reason recorded")[:_ERROR_MAX_CHARS], row)
        return Alert("failed", f"failed:{row.id}",
                     f"The file {self.name(row.display_path)} (#{row.id}) was not uploaded "
                     f"and is in the failed folder: {error}",
                     f"Read the .reason.txt file beside it in {self.rt.config.upload.failed_dir}"
                     ", fix the cause, then drop the file into the client's folder again.")

    def _held_alert(self, row: FileRow) -> Alert:
        error = self._scrub((row.last_error or "no reason recorded")[:_ERROR_MAX_CHARS], row)
        return Alert("held", f"held:{row.id}",
                     f"The file {self.name(row.display_path)} (#{row.id}) is held in its "
                     f"drop folder: {error}",
                     f"Fix the cause, then run `coreplus-uploader retry {row.id}`.")

    def _unmapped_alert(self, entry: dict[str, Any]) -> Alert:
        path = str(entry["path"])
        shown = self.name(path)
        return Alert("unmapped", f"unmapped:{path}",
                     f"Nothing in {shown} is uploaded, because it maps to no client.",
                     str(entry["problem"]) if not self.hider else
                     "Run `coreplus-uploader status` to see the name and the fix.")

    def reception_view(self, snapshot: Snapshot) -> ReceptionView:
        """Build the status file's view for reception, without names when they are hidden."""

        def names(paths: list[str]) -> list[str | None]:
            return [None if self.hider else path for path in paths]

        return ReceptionView(
            paused_reason=first_sentence(snapshot.paused) if snapshot.paused else None,
            paused_since=self._paused_since,
            failed=names([row.display_path for row in snapshot.failed]),
            held=names([row.display_path for row in snapshot.held]),
            unmapped=names([str(entry["path"]) for entry in snapshot.unmapped]),
            failed_dir=self.rt.config.upload.failed_dir)

    # -- archive -------------------------------------------------------------------------

    async def _prune_if_due(self) -> None:
        upload = self.rt.config.upload
        if upload.archive_keep_days <= 0 or upload.archive_dir is None:
            return
        if time.monotonic() < self._next_prune_s:
            return
        self._next_prune_s = time.monotonic() + PRUNE_INTERVAL_S
        result = await asyncio.to_thread(prune_archive, upload.archive_dir,
                                         upload.archive_keep_days, now=self._clock())
        log.info("archive.pruned", deleted_files=result.deleted_files,
                 deleted_bytes=result.deleted_bytes, keep_days=upload.archive_keep_days)
        if result.errors:
            log.warning("archive.pruned", errors=result.errors, error=result.first_error,
                        message=f"{result.errors} archived files could not be deleted.",
                        action="Check the archive folder's permissions; pruning tries "
                        "again tomorrow.")


def _still_in_failed_folder(rows: list[FileRow]) -> list[FileRow]:
    """Failed rows whose file a person has not yet removed from the failed folder."""
    return [row for row in rows if row.final_path and os.path.lexists(row.final_path)]


def watched_folders(config: Config) -> list[Path]:
    """List the folders the daemon writes to: drop root, archive, failed, ledger's."""
    folders = [config.watch.root, config.upload.failed_dir, config.ledger.path.parent]
    if config.upload.after_success == "archive" and config.upload.archive_dir is not None:
        folders.insert(1, config.upload.archive_dir)
    return folders


def disk_usage(folders: list[Path]) -> list[LowDisk]:
    """
    Free space per filesystem among ``folders``; folders that do not exist are skipped.

    Returns:
        One entry per filesystem, naming the folders on it.
    """
    by_device: dict[int, tuple[list[str], os.statvfs_result]] = {}
    for folder in folders:
        try:
            device = os.stat(folder).st_dev
            usage = os.statvfs(folder)
        except OSError:
            continue
        by_device.setdefault(device, ([], usage))[0].append(str(folder))
    result = []
    for paths, usage in by_device.values():
        if usage.f_blocks == 0:
            continue  # A pseudo filesystem without a size.
        free_bytes = usage.f_bavail * usage.f_frsize
        percent = 100.0 * usage.f_bavail / usage.f_blocks
        result.append(LowDisk(tuple(paths), percent, free_bytes))
    return result


def default_hider(config: Config) -> NameHider | None:
    """Build the name hider for ``log.file_names = "hide"``, with the log's key."""
    if config.log.file_names != "hide":
        return None
    # NOTE: imported here because the key helper lives in the CLI module, which
    # imports the daemon; it would sit better in uploader.logs.
    from uploader.cli import name_key

    return NameHider(name_key(config))
