"""
The service gate: pauses every upload when coreplus refuses our credentials, its TLS
certificate does not verify, or its responses suggest a configuration error, and reopens it
when a probe succeeds.

No file ever fails because of a pause: files stay ``queued`` until the gate reopens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from uploader.constants import CONFIG_ERROR_PAUSE_AFTER
from uploader.context import Runtime
from uploader.exceptions import ServicePausedError, UploadError

log = structlog.get_logger("uploader.gate")

AUTH = "auth"
TLS = "tls"
CONFIG = "config"

_MESSAGES = {
    AUTH: (
        "coreplus refused the credentials (HTTP {status}), so every upload is paused. "
        "The usual causes are: the access token has expired; a wrong consumer secret or "
        "consumer id; sandbox credentials used against the production URL; or this "
        "server's clock is off.",
        "In coreplus, open Setup > Add-Ons and press Refresh (or Extend, once expired) on "
        "the add-on's tile, then put the new access token in place. Check the consumer id "
        "and secret, that api.base_url matches the credentials, and that the clock is "
        "synchronised (timedatectl). Uploads resume by themselves once coreplus accepts a "
        "probe.",
    ),
    TLS: (
        "The TLS certificate of {url} did not verify, so every upload is paused: {error}",
        "If the clinic's network inspects HTTPS, set api.ca_file to the proxy's CA bundle. "
        "Otherwise check api.base_url. Uploads resume once a probe succeeds.",
    ),
    CONFIG: (
        "coreplus rejected {count} uploads in a row for different clients (last: HTTP "
        "{status}), which suggests a configuration error rather than bad files, so every "
        "upload is paused.",
        "Check api.base_url and api.version, then restart or reload the daemon. One file "
        "is tried again every api.auth_probe_seconds.",
    ),
}


class ServiceGate:
    """
    Open or paused; workers wait on it before each upload.

    Args:
        rt: The shared runtime.
        probe: Raises when the service still refuses us; returns when it accepts.
        probe_interval_s: Seconds between probes while paused.
        base_url: Shown in the TLS message.
    """

    def __init__(self, rt: Runtime, probe: Callable[[], Awaitable[None]],
                 probe_interval_s: float, base_url: str) -> None:
        self.rt = rt
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self._base_url = base_url
        self._open = asyncio.Event()
        self._open.set()
        self.kind: str | None = None
        self.reason: str | None = None
        self._rejections: list[str] = []
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def paused(self) -> bool:
        """True while uploads are paused."""
        return not self._open.is_set()

    async def wait_open(self) -> None:
        """Return once uploads may go ahead."""
        await self._open.wait()

    async def pause_for(self, exc: ServicePausedError) -> None:
        """Pause after a 401, 403 or TLS error."""
        kind = TLS if exc.status is None else AUTH
        await self._pause(kind, status=exc.status, error=str(exc), count=0)

    async def note_rejection(self, client_id: str | None, exc: UploadError) -> None:
        """
        Count a permanent rejection; enough in a row for different clients pause
        everything as a suspected configuration error.
        """
        self._rejections.append(client_id or "")
        recent = self._rejections[-CONFIG_ERROR_PAUSE_AFTER:]
        if len(recent) >= CONFIG_ERROR_PAUSE_AFTER and len(set(recent)) == len(recent):
            await self._pause(CONFIG, status=exc.status, error=str(exc), count=len(recent))

    def note_success(self) -> None:
        """Reset the run of rejections after a confirmed upload."""
        self._rejections.clear()

    async def _pause(self, kind: str, *, status: int | None, error: str, count: int) -> None:
        if self.paused:
            return
        self._open.clear()
        template, action = _MESSAGES[kind]
        message = template.format(status=status, url=self._base_url, error=error, count=count)
        self.kind, self.reason = kind, message
        await self.rt.ledger.set_status(paused=message, paused_action=action)
        log.error("service.paused", error=error, message=message, action=action)
        self._probe_task = asyncio.create_task(self._probe_until_open())

    async def _probe_until_open(self) -> None:
        while self.paused and not self.rt.stopping.is_set():
            try:
                await asyncio.wait_for(self.rt.stopping.wait(), self._probe_interval_s)
                return
            except TimeoutError:
                pass
            if self.kind == CONFIG:
                # Only a real upload can show whether the File endpoint is right.
                await self.resume("probe interval passed; trying one upload")
                return
            try:
                await self._probe()
            except ServicePausedError as exc:
                self.rt.warn_once("service.paused", client=None, path=None,
                                  cause=f"probe still refused: {exc}")
                continue
            except UploadError:
                # Any other response means the credentials got through.
                pass
            await self.resume("probe accepted")

    async def resume(self, why: str) -> None:
        """Reopen the gate and tell the workers."""
        if not self.paused:
            return
        self.kind = self.reason = None
        self._rejections.clear()
        await self.rt.ledger.set_status(paused=None, paused_action=None)
        self.rt.repeats.clear("service.paused")
        log.info("service.resumed", message=why)
        self._open.set()
        self.rt.work_available.set()

    async def close(self) -> None:
        """Stop probing."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
