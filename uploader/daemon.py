"""
The daemon's lifecycle: start-up, the long-running loops, and an orderly shutdown.

Start-up takes the ledger lock, opens the ledger, marks uploads left in flight by a
crash as ``uncertain``, scans the drop root, and starts the watcher. Shutdown stops new
work, lets in-flight uploads finish within ``upload.shutdown_grace_seconds``, and leaves
everything else ``queued`` for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from uploader.client import ApiSettings, CoreplusClient, create_session
from uploader.config import Config, load_clients
from uploader.constants import ExitCode, State
from uploader.context import AsyncLedger, Runtime
from uploader.credentials import Credentials
from uploader.exceptions import ConfigError
from uploader.folders import IgnoreRules
from uploader.gate import ServiceGate
from uploader.intake import Intake
from uploader.ledger import Ledger, LedgerLock
from uploader.ops import Operations
from uploader.ratelimit import RateLimiter
from uploader.uploads import Uploader
from uploader.watcher import watch_changes

log = structlog.get_logger("uploader.daemon")

#: How long to wait before looking again for a missing drop root or a failed watcher.
_ROOT_RETRY_S = 5.0

#: How often the watcher checks that the drop root is still the same folder.
_ROOT_CHECK_S = 2.0

#: Head start given to the watcher before the first scan.
_WATCH_START_S = 0.2

#: Delay before the scan that follows a (re)started watcher.
_CATCH_UP_SCAN_S = 2.0

#: How often archive moves that failed earlier are tried again.
_MOVE_RETRY_S = 60.0

#: Seconds that confirmed uploads get to be recorded at shutdown, even when the grace
#: is used up or a second signal forces the stop. A commit and a move normally take
#: milliseconds.
_FINISH_GRACE_MIN_S = 5.0


@dataclass(frozen=True)
class RunOptions:
    """
    The daemon's run mode: for ever (``run``) or one pass (``import``).

    Attributes:
        oneshot: Scan once, upload, and return instead of watching.
        import_timeout_s: In one-pass mode, how long to wait for deferred files.
        handle_signals: Install SIGTERM, SIGINT and SIGHUP handlers.
        on_progress: Called about twice a second in one-pass mode with the uploader.
    """

    oneshot: bool = False
    import_timeout_s: float = 600.0
    handle_signals: bool = True
    on_progress: Callable[[Uploader, int], None] | None = None


def api_settings(config: Config) -> ApiSettings:
    """Map the ``[api]`` table onto the HTTP client's settings."""
    api = config.api
    return ApiSettings(
        base_url=api.base_url, version=api.version,
        client_list_version=api.client_list_version, issuer=api.issuer,
        audience=api.audience, clock_leeway_s=api.clock_leeway_seconds,
        connect_timeout_s=api.connect_timeout_seconds,
        idle_timeout_s=api.idle_timeout_seconds, ca_file=api.ca_file, proxy=api.proxy)


class Daemon:
    """
    Watch the drop root and upload every settled file once.

    Args:
        config: The loaded configuration.
        credentials: The consumer secret and access token.
        options: Daemon or one-pass mode, and signal handling.
    """

    def __init__(self, config: Config, credentials: Credentials,
                 options: RunOptions | None = None) -> None:
        self.config = config
        self.credentials = credentials
        self.options = options or RunOptions()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._force = False
        self.files_found = 0
        self._lock = LedgerLock(config.ledger.path)

    async def run(self) -> int:
        """
        Run until stopped (or, in one-pass mode, until done) and return the exit code.

        Raises:
            LedgerError: the ledger is locked, damaged or cannot be opened.
        """
        self.config.ledger.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            ledger = Ledger.open(self.config.ledger.path)
        except BaseException:
            self._lock.release()
            raise
        self.rt = Runtime(self.config, AsyncLedger(ledger), self.config.clients,
                          IgnoreRules(self.config.watch.ignore))
        try:
            return await self._run_started(ledger)
        finally:
            self.rt.ledger.close()
            self._lock.release()

    async def _run_started(self, ledger: Ledger) -> int:
        rt = self.rt
        config = self.config
        session = create_session(api_settings(config),
                                 connection_limit=config.upload.workers + 2)
        try:
            limiter = RateLimiter(config.api.max_requests_per_second)
            client = CoreplusClient(session, api_settings(config), self.credentials, limiter)
            self.gate = ServiceGate(rt, client.probe, config.api.auth_probe_seconds,
                                    config.api.base_url)
            self.uploader = Uploader(rt, client, self.gate)
            self.intake = Intake(rt)
            rt.track_again = self.intake.handle_path
            self.ops = Operations(rt)
            await self._startup(ledger)
            code = await self._main()
            await self._shutdown()
            return code
        finally:
            await session.close()

    # -- phases --------------------------------------------------------------------

    async def _startup(self, ledger: Ledger) -> None:
        rt = self.rt
        if self.options.handle_signals:
            self._install_signals()
        hold = self.config.upload.on_uncertain == "hold"
        recovered = await rt.ledger.recover_interrupted(hold=hold)
        for row in recovered:
            log.warning("upload.uncertain", client=row.client_id, path=row.display_path,
                        state=State.HELD if hold else State.UNCERTAIN,
                        message="The daemon stopped while this upload was in flight, so "
                        "coreplus may already hold the file.",
                        action="Check coreplus for a second copy after it goes up again.")
        await rt.ledger.set_status(pid=str(os.getpid()), started_at=str(time.time()),
                                   paused=None, paused_action=None)
        log.info("daemon.started", pid=os.getpid(), root=str(rt.root),
                 ledger=str(self.config.ledger.path), new_ledger=ledger.created,
                 workers=self.config.upload.workers, oneshot=self.options.oneshot,
                 credentials=self.credentials.source)
        if ledger.created:
            log.warning("daemon.started", message=f"Started a new, empty ledger at "
                        f"{self.config.ledger.path}.", action="If a ledger existed before, "
                        "stop the daemon and restore it, or files kept in drop folders may "
                        "go up again.")

    async def _main(self) -> int:
        rt = self.rt
        self._spawn(self.intake.settle_loop())
        self._spawn(self.uploader.dispatch_loop())
        if not self.options.oneshot:
            # STATUS=, the watchdog, alerts, the status file and pruning.
            self._spawn(self.ops.run())
            # Watch before the first scan: a file that lands between the scan and the
            # watcher's start would otherwise wait for the next rescan.
            self._spawn(self._watch_loop())
            await asyncio.sleep(_WATCH_START_S)
        if not await self._initial_scan():
            return ExitCode.OK
        self.ops.ready(self.files_found)
        if self.options.oneshot:
            await self.uploader.retry_pending_moves()
            return await self._until_done()
        self._spawn(self._catch_up_scan())
        self._spawn(self._run_job(self.uploader.retry_pending_moves))
        self._spawn(self._every(self.config.watch.rescan_seconds, self._rescan))
        self._spawn(self._every(_MOVE_RETRY_S, self.uploader.retry_pending_moves))
        await rt.stopping.wait()
        return ExitCode.OK

    async def _shutdown(self) -> None:
        rt = self.rt
        self.ops.stopping()
        in_flight = list(self.uploader.in_flight.values())
        log.info("daemon.stopping", in_flight=len(in_flight),
                 grace_seconds=self.config.upload.shutdown_grace_seconds)
        self.uploader.stop_accepting()
        rt.stopping.set()
        grace_s = self.config.upload.shutdown_grace_seconds
        deadline = time.monotonic() + grace_s
        if in_flight and not self._force:
            await asyncio.wait(in_flight, timeout=grace_s)
        leftover = [t for t in self.uploader.in_flight.values() if not t.done()]
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
        # Confirmed uploads still being recorded or moved: the ledger write is what keeps
        # them from going up again, so they get the rest of the grace, and at least a
        # few seconds even after a second signal.
        stuck = await self.uploader.wait_finishing(
            max(deadline - time.monotonic(), _FINISH_GRACE_MIN_S))
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        await self.intake.drain()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.gate.close()
        await rt.ledger.set_status(pid=None)
        counts = self.uploader.counters
        log.info("daemon.stopped", cancelled=len(leftover), uploaded=counts.uploaded,
                 duplicates=counts.duplicate, failed=counts.failed)

    # -- scanning and watching -----------------------------------------------------

    async def _initial_scan(self) -> bool:
        """Scan once the root exists; returns False when stopped while waiting."""
        while not self.rt.stopping.is_set():
            try:
                self.files_found = await self.intake.scan()
            except OSError as exc:
                self.rt.warn_once(
                    "scan.finished", client=None, path=str(self.rt.root), cause=str(exc),
                    message=f"The drop root {self.rt.root} cannot be read, so nothing can "
                    "be uploaded yet. The daemon keeps checking.",
                    action="Check that the share is mounted and watch.root is right.")
                if not self.options.oneshot:
                    self.ops.waiting_for_root()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.rt.stopping.wait(), _ROOT_RETRY_S)
                continue
            await self._vanish_unseen_waiting()
            log.info("scan.finished", files=self.files_found, tracked=len(self.intake.tracked))
            return True
        return False

    async def _vanish_unseen_waiting(self) -> None:
        """Rows left ``waiting`` whose file is gone were removed while we were down."""
        for row in await self.rt.ledger.rows_in_state(State.WAITING):
            if row.rel_path_str not in self.intake.tracked:
                if not (self.rt.root / row.rel_path_str).exists():
                    await self.rt.ledger.update(row.id, state=State.VANISHED)

    async def _rescan(self) -> None:
        self._reload_clients()
        try:
            self.files_found = await self.intake.scan()
        except OSError as exc:
            self.rt.warn_once("scan.finished", client=None, path=str(self.rt.root),
                              cause=str(exc))
            return
        self.rt.repeats.clear("scan.finished", None, str(self.rt.root))
        log.debug("scan.finished", files=self.files_found)

    async def _watch_loop(self) -> None:
        rt = self.rt
        restarted = False
        while not rt.stopping.is_set():
            identity = _root_identity(rt.root)
            if identity is None:
                # The initial scan and the rescans report a missing root; just wait.
                await self._pause_watching()
                restarted = True
                continue
            if restarted:
                rt.repeats.clear("watcher.restarted", None, str(rt.root))
                log.info("watcher.restarted", root=str(rt.root))
                self._spawn(self._catch_up_scan())
            replaced = await self._watch_once(identity)
            restarted = True
            if not replaced:
                await self._pause_watching()

    async def _watch_once(self, identity: tuple[int, int]) -> bool:
        """
        Watch until the daemon stops, the watcher fails, or the drop root is replaced;
        returns True in the last case.
        """
        rt = self.rt
        restart = asyncio.Event()
        monitor = asyncio.create_task(self._monitor_root(identity, restart))
        try:
            async for changes in watch_changes(
                    rt.root, stop_event=restart,
                    force_polling=self.config.watch.force_polling,
                    on_fallback=self._on_watch_fallback):
                await self._handle_changes(changes)
        except Exception as exc:  # noqa: BLE001 - the watcher must always come back
            # watchfiles raises its own Rust-side errors, some inside an ExceptionGroup
            # (for example for a file name that is not valid UTF-8), so catch broadly.
            rt.warn_once("watcher.restarted", client=None, path=str(rt.root),
                         cause=_describe_watch_error(exc),
                         message="The folder watcher stopped; the daemon restarts it and "
                         "rescans, so no file is missed.",
                         action="If this repeats, check that the drop root is mounted.")
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)
        return restart.is_set() and not rt.stopping.is_set()

    async def _monitor_root(self, identity: tuple[int, int], restart: asyncio.Event) -> None:
        """
        Stop the current watch when the daemon stops or the drop root is removed or
        replaced: inotify keeps watching the old folder and would never report again.
        """
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), _ROOT_CHECK_S)
                restart.set()
                return
            if _root_identity(self.rt.root) != identity:
                log.warning("watcher.restarted", root=str(self.rt.root),
                            message="The drop root was removed, replaced or remounted; the "
                            "watcher follows the new folder once it is there.",
                            action="None needed if this was planned.")
                restart.set()
                return

    async def _pause_watching(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.rt.stopping.wait(), _ROOT_RETRY_S)

    async def _catch_up_scan(self) -> None:
        """
        Scan again shortly after the watcher (re)started, for files that arrived while
        it was setting up its watches.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.rt.stopping.wait(), _CATCH_UP_SCAN_S)
            return
        await self._run_job(self._rescan)

    async def _handle_changes(self, changes: set[Any]) -> None:
        try:
            await self.intake.handle_changes(changes)
        except Exception as exc:  # One bad batch must not stop the watcher.
            log.error("watcher.restarted", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(),
                      message="Handling a batch of folder changes failed; the next rescan "
                      "picks up anything missed.", action="Report this log line.")

    def _on_watch_fallback(self, exc: BaseException) -> None:
        if isinstance(exc, PermissionError):
            log.warning("watcher.restarted", error=str(exc), polling=True,
                        message="The folder watcher cannot read a folder under the drop "
                        "root, so the daemon switched to polling, which skips that folder.",
                        action="Give the service's group read access to every drop folder "
                        "and restart the daemon.")
            return
        log.warning("watcher.restarted", error=str(exc), polling=True,
                    message="The kernel's limit on inotify watches is used up, so the daemon "
                    "switched to polling, which costs more CPU.",
                    action="Raise the sysctl fs.inotify.max_user_watches (for example to "
                    "524288 in /etc/sysctl.d/90-inotify.conf) and restart the daemon.")

    # -- one-pass mode ---------------------------------------------------------------

    async def _until_done(self) -> int:
        deadline = time.monotonic() + self.options.import_timeout_s
        include_uncertain = self.config.upload.on_uncertain == "retry"
        while not self.rt.stopping.is_set():
            if self.options.on_progress is not None:
                self.options.on_progress(self.uploader, self.files_found)
            counts = await self.rt.ledger.count_by_state()
            busy = self.intake.busy or self.uploader.busy or counts.get(State.QUEUED)
            waiting_retry = counts.get(State.DEFERRED, 0) + (
                counts.get(State.UNCERTAIN, 0) if include_uncertain else 0)
            if not busy and not self.gate.paused and not waiting_retry:
                return ExitCode.FILES_FAILED if self.uploader.counters.failed else ExitCode.OK
            if time.monotonic() >= deadline:
                return ExitCode.TEMPORARY
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), 0.5)
        return ExitCode.TEMPORARY

    # -- signals and helpers ---------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_clients)

    def request_stop(self) -> None:
        """Stop taking new work; a second request cancels in-flight uploads at once."""
        if self.rt.stopping.is_set():
            self._force = True
            for task in self.uploader.in_flight.values():
                task.cancel()
            return
        self.uploader.stop_accepting()
        self.rt.stopping.set()

    def _reload_clients(self) -> None:
        try:
            aliases = load_clients(self.config.path)
        except ConfigError as exc:
            log.error("config.reloaded", error=str(exc), message="The [clients] table could "
                      "not be reloaded; the previous aliases stay in use.",
                      action="Fix the configuration file and reload again.")
            return
        if aliases != self.rt.aliases:
            self.rt.aliases = aliases
            log.info("config.reloaded", clients=len(aliases))
            # Files already waiting in a newly mapped folder sent no event of their own.
            self._spawn(self._run_job(self._rescan))

    async def _every(self, interval_s: float, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while not self.rt.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), interval_s)
                return
            await self._run_job(job)

    async def _run_job(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a periodic job; a failure is logged and the next period tries again."""
        try:
            await job()
        except Exception as exc:  # noqa: BLE001 - e.g. a full disk under the ledger
            self.rt.warn_once("scan.finished", client=None, path=None, level="error",
                              cause=f"{type(exc).__name__}: {exc}",
                              message=f"A periodic task ({job.__name__}) failed; it runs "
                              "again at its next interval.",
                              action="Check the disk holding the ledger and the drop root.")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _describe_watch_error(exc: BaseException) -> str:
    """Describe a watcher error in one line, unwrapping the ExceptionGroup anyio raises."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def _root_identity(root: Path) -> tuple[int, int] | None:
    """Return the drop root's (device, inode), or None when it is missing."""
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino
