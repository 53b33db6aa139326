"""
State shared by the daemon's parts: configuration, the ledger, client aliases, the
log limiter and the wake-up signal for workers.

It also contains the small helpers that several parts need, such as resolving a path to
its client and moving a file to the failed folder, so that each is written once.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from uploader import disposal
from uploader.config import Config
from uploader.constants import State
from uploader.folders import IgnoreRules, Resolution, resolve_folder, split_drop_path
from uploader.ledger import DISPOSITION_FAILED_DIR, FileRow, Ledger
from uploader.logs import RepeatLimiter

T = TypeVar("T")

log = structlog.get_logger("uploader")


class AsyncLedger:
    """
    Run ledger methods on one dedicated thread, so SQLite writes never block the event
    loop and are never interleaved.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.sync = ledger
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the ledger thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.sync, name)

        async def run(*args: Any, **kwargs: Any) -> Any:
            return await self.call(method, *args, **kwargs)

        return run

    def close(self) -> None:
        """Wait for pending writes, then close the ledger."""
        self._executor.shutdown(wait=True)
        self.sync.close()


@dataclass
class Runtime:
    """
    Everything the intake, the workers and the daemon share while running.
    """

    config: Config
    ledger: AsyncLedger
    aliases: Mapping[str, str]
    ignore: IgnoreRules
    repeats: RepeatLimiter = field(default_factory=RepeatLimiter)
    work_available: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = field(default_factory=time.time)
    track_again: Callable[[str], Awaitable[None]] | None = None
    """Hands a relative path back to the intake, for files that changed after queueing."""

    @property
    def root(self) -> Path:
        """The drop root."""
        return self.config.watch.root

    def resolve(self, rel_path: str) -> tuple[str | None, Resolution | None]:
        """Return the drop folder of a relative path and the client its name maps to."""
        folder, _ = split_drop_path(rel_path)
        if folder is None:
            return None, None
        return folder, resolve_folder(folder, self.aliases)

    def warn_once(self, event: str, *, client: str | None, path: str | None, cause: str,
                  level: str = "warning", **fields: Any) -> None:
        """Log a condition that may repeat: once, then a count every ten minutes."""
        count = self.repeats.check(event, client, path, cause)
        if count is None:
            return
        if count > 1:
            fields["repeats"] = count
        getattr(log, level)(event, client=client, path=path, error=cause, **fields)

    async def fail_file(self, row: FileRow, *, error: str, reason: str, action: str) -> None:
        """
        Move a file to the failed folder with a reason file, and record ``failed``.

        When the move itself fails the row is ``held`` instead, because a failed file
        left in its drop folder would be picked up again as new.
        """
        upload = self.config.upload
        src = self.root / row.rel_path_str
        text = reason_text(row, error=error, reason=reason, action=action)
        try:
            final = await asyncio.to_thread(
                disposal.move_to_failed, src, row.rel_path_str, upload.failed_dir, text,
                staff_group=upload.staff_group,
            )
        except FileNotFoundError:
            await self.ledger.update(row.id, state=State.VANISHED, last_error=error)
            log.debug("file.vanished", client=row.client_id, path=row.display_path)
            return
        except OSError as exc:
            await self.hold(row, f"{error}. It could not be moved to the failed folder "
                            f"{upload.failed_dir}: {exc}", action="Check that the failed "
                            "folder exists and is writable, then run `coreplus-uploader retry`.")
            return
        await self.ledger.update(row.id, state=State.FAILED, last_error=error,
                                 disposition=DISPOSITION_FAILED_DIR, final_path=str(final),
                                 next_attempt_at=None)
        log.error("upload.failed", client=row.client_id, path=row.display_path,
                  error=error, state=State.FAILED, message=reason, action=action,
                  failed_path=str(final))

    async def hold(self, row: FileRow, error: str, *, action: str) -> None:
        """Record ``held``: the file stays where it is until a person acts."""
        await self.ledger.update(row.id, state=State.HELD, last_error=error,
                                 next_attempt_at=None)
        log.error("upload.held", client=row.client_id, path=row.display_path, error=error,
                  state=State.HELD, message=error, action=action)


def daemon_user() -> str:
    """Return the name of the user this process runs as, for permission messages."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def reason_text(row: FileRow, *, error: str, reason: str, action: str) -> str:
    """Compose the text of ``<name>.reason.txt`` beside a failed file."""
    when = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
    return (
        f"This file was not uploaded to coreplus.\n\n"
        f"File:    {row.display_path}\n"
        f"Client:  {row.client_id or 'unknown'}\n"
        f"When:    {when}\n"
        f"Problem: {error}\n\n"
        f"What happened: {reason}\n\n"
        f"What to do: {action}\n"
    )
