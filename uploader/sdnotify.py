"""
The systemd notification protocol: datagrams to the socket named by ``NOTIFY_SOCKET``.

A ``Type=notify`` unit waits for ``READY=1`` before it counts the service as started,
shows the last ``STATUS=`` line in ``systemctl status``, and restarts the service when
``WATCHDOG=1`` stops arriving within ``WatchdogSec=``. The protocol is one
``AF_UNIX``/``SOCK_DGRAM`` datagram per message, each line a ``KEY=value`` pair. A
socket name starting with ``@`` is in the abstract namespace, and its ``@`` stands
for a NUL byte.

Without ``NOTIFY_SOCKET`` (a shell, a test, ``import``) every call does nothing, so the
daemon never needs to know whether systemd started it.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("uploader.sdnotify")

#: systemd stores STATUS= text as one line; longer text only clutters `systemctl status`.
MAX_STATUS_CHARS = 400


def socket_address(value: str) -> str | None:
    """
    Turn a ``NOTIFY_SOCKET`` value into an address for ``socket.sendto``.

    Args:
        value: A file system path, or a name starting with ``@`` for the abstract
            namespace.

    Returns:
        The address, with a leading NUL for abstract names, or None when the value
        is empty or of a kind this module does not speak (such as ``vsock:``).
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """
    Return how often to send ``WATCHDOG=1``: half of ``WATCHDOG_USEC``.

    Args:
        environ: The process environment.
        pid: This process's id; defaults to ``os.getpid()``.

    Returns:
        Seconds between keep-alive messages, or None when systemd set no watchdog for
        this process (no ``WATCHDOG_USEC``, a value that is not a positive integer, or
        a ``WATCHDOG_PID`` naming another process).
    """
    raw_usec = environ.get("WATCHDOG_USEC", "")
    if not raw_usec.isdigit() or int(raw_usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(raw_usec) / 1_000_000 / 2


def _one_line(text: str) -> str:
    """STATUS= ends at the first newline, so fold the text onto one line."""
    flat = " ".join(text.split())
    if len(flat) > MAX_STATUS_CHARS:
        flat = flat[: MAX_STATUS_CHARS - 3] + "..."
    return flat


class Notifier:
    """
    Send notifications to systemd, or do nothing when not started by systemd.

    Args:
        environ: Where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are
            read from; defaults to ``os.environ``.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw)
        self.watchdog_interval_s = watchdog_interval_s(env) if self.address else None
        self._socket: socket.socket | None = None
        self._failed = False
        if raw and self.address is None:
            log.warning("daemon.started", notify_socket=raw,
                        message=f"NOTIFY_SOCKET={raw} is not a path or an abstract socket "
                        "name, so systemd is not told when the service is ready.",
                        action="Run the service with the unit shipped in systemd/.")

    @property
    def enabled(self) -> bool:
        """True when systemd asked for notifications."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """
        Send one datagram holding ``KEY=value`` lines.

        Returns:
            True when the datagram was sent; False when notifications are off or the
            send failed (logged once, because the service keeps working without it).
        """
        if self.address is None:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._socket is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                self._socket = socket.socket(socket.AF_UNIX, kind)
            self._socket.sendto(payload, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("daemon.started", error=str(exc), notify_socket=self.address,
                            message="A notification to systemd could not be sent.",
                            action="If systemd restarts the service for a missed watchdog, "
                            "check that NotifyAccess=main is set in the unit.")
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd that start-up finished, optionally with a status line."""
        return self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        """Set the line that ``systemctl status`` shows."""
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self) -> bool:
        """Tell systemd that an orderly shutdown has begun."""
        return self.send("STOPPING=1", "STATUS=Stopping: letting uploads in flight finish.")

    def reloading(self) -> bool:
        """Tell systemd that a reload started; follow it with ``ready()``."""
        return self.send("RELOADING=1")

    def watchdog(self) -> bool:
        """Send one keep-alive."""
        return self.send("WATCHDOG=1")

    async def watchdog_loop(self) -> None:
        """
        Send ``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` until cancelled.

        The keep-alive is sent from the event loop itself, so a loop that blocks stops
        it and systemd restarts the service. It keeps going while the daemon drains
        uploads at shutdown, because the caller cancels it only at the very end.
        """
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval_s)

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
