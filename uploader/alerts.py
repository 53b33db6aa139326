"""
Tell a person when uploads need attention: run ``alert.command`` and send an e-mail.

The operations loop hands over every condition it finds on each pass. This module drops
the ones already reported today (one alert per cause per calendar day, remembered in a
small JSON file beside the ledger so a restart does not repeat them), joins the rest
into one message, logs it as ``alert.raised``, and delivers it through the configured
channels. A delivery failure is logged as ``alert.failed`` and tried again after
``RETRY_AFTER_FAILURE_S``; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import smtplib
import socket
import ssl
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Literal

import structlog

from uploader.config import AlertConfig

log = structlog.get_logger("uploader.alerts")

AlertKind = Literal["paused", "disk", "failed", "held", "moves", "unmapped"]

#: Order of importance, for the subject line and the body.
KIND_ORDER: tuple[AlertKind, ...] = ("paused", "disk", "failed", "held", "moves", "unmapped")

#: Name of the file, beside the ledger, that remembers which causes were reported today.
SENT_FILE_NAME = "alerts-sent.json"

#: Maximum time ``alert.command`` may run before it is killed.
COMMAND_TIMEOUT_S = 60.0

#: Alerts listed one by one in a message; the rest are counted.
MAX_LISTED = 20

#: After every channel failed, wait this long before trying the same alerts again.
RETRY_AFTER_FAILURE_S = 600.0

#: Environment variables never passed to ``alert.command``: the service's secrets and
#: systemd's notify socket, which a child must not use in the daemon's name.
_WITHHELD_ENV = ("COREPLUS_SECRET", "COREPLUS_ACCESS_TOKEN", "NOTIFY_SOCKET",
                 "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY")

# How much of a failed command's output goes into the log.
_OUTPUT_MAX_CHARS = 500


@dataclass(frozen=True)
class Alert:
    """
    One condition that needs a person.

    Attributes:
        kind: What sort of condition it is.
        cause: Key for the once-a-day limit, e.g. ``failed:42`` or ``disk:/srv``.
        summary: One plain sentence saying what is wrong.
        action: What to do about it.
    """

    kind: AlertKind
    cause: str
    summary: str
    action: str


class SentRegister:
    """
    Remember which causes were reported on which day, in a JSON file.

    Args:
        path: The file, or None to remember in memory only.
        today: Today's local date; a parameter so tests can move to the next day.
    """

    def __init__(self, path: Path | None, today: Callable[[], date] = date.today) -> None:
        self.path = path
        self._today = today
        self._day, self._causes = self._load()

    def _load(self) -> tuple[str, set[str]]:
        today = self._today().isoformat()
        if self.path is None:
            return today, set()
        try:
            data = json.loads(self.path.read_text("utf-8"))
        except FileNotFoundError:
            return today, set()
        except (OSError, ValueError) as exc:
            log.warning("alert.failed", error=str(exc), path=str(self.path),
                        message="The record of alerts sent today cannot be read, so some "
                        "alerts may be sent twice today.",
                        action="Nothing to do; the file is written again.")
            return today, set()
        if not isinstance(data, dict) or data.get("day") != today:
            return today, set()
        causes = data.get("causes")
        return today, {str(cause) for cause in causes} if isinstance(causes, list) else set()

    def _roll_over(self) -> None:
        today = self._today().isoformat()
        if today != self._day:
            self._day, self._causes = today, set()

    def unsent(self, alerts: Sequence[Alert]) -> list[Alert]:
        """Return the alerts whose cause was not reported today, each cause once."""
        self._roll_over()
        fresh: dict[str, Alert] = {}
        for alert in alerts:
            if alert.cause not in self._causes:
                fresh.setdefault(alert.cause, alert)
        return list(fresh.values())

    def record(self, alerts: Sequence[Alert]) -> None:
        """Mark these causes as reported today and save the file."""
        self._roll_over()
        self._causes.update(alert.cause for alert in alerts)
        if self.path is None:
            return
        payload = json.dumps({"day": self._day, "causes": sorted(self._causes)}, indent=1)
        try:
            _write_private(self.path, payload)
        except OSError as exc:
            log.warning("alert.failed", error=str(exc), path=str(self.path),
                        message="The record of alerts sent today cannot be saved, so a "
                        "restart may send them again.",
                        action="Check that the ledger's folder is writable.")


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with an owner-only file."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def compose(alerts: Sequence[Alert], hostname: str,
            now: datetime | None = None) -> tuple[str, str]:
    """
    Build the subject and plain-text body of one message covering ``alerts``.

    Returns:
        (subject, body). The subject names the host and the most important problem.
    """
    ordered = sorted(alerts, key=lambda alert: KIND_ORDER.index(alert.kind))
    headline = ordered[0].summary.rstrip(".")
    if len(ordered) > 1:
        headline += f" (and {len(ordered) - 1} more)"
    subject = f"coreplus-uploader on {hostname}: {headline}"
    when = (now or datetime.now().astimezone()).strftime("%Y-%m-%d %H:%M %z")
    lines = [f"coreplus-uploader on {hostname} needs attention ({when}).", ""]
    for alert in ordered[:MAX_LISTED]:
        lines += [f"- {alert.summary}", f"  What to do: {alert.action}", ""]
    if len(ordered) > MAX_LISTED:
        lines += [f"- and {len(ordered) - MAX_LISTED} more.", ""]
    lines += [f"Run `coreplus-uploader status` on {hostname} for the whole picture.",
              "Each of these is reported at most once a day."]
    return subject, "\n".join(lines) + "\n"


class Alerter:
    """
    Deliver alerts through ``alert.command`` and e-mail, at most once per cause a day.

    Args:
        config: The ``[alert]`` table.
        register: Which causes were reported today.
        hostname: Named in every message; defaults to this machine's name.
        environ: The environment ``alert.command`` inherits, less the service's
            secrets; defaults to ``os.environ``.
    """

    def __init__(self, config: AlertConfig, register: SentRegister, *,
                 hostname: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.register = register
        self.hostname = hostname or socket.gethostname()
        self._environ = os.environ if environ is None else environ
        # Causes whose last delivery failed on every channel, with when to try again.
        # A new cause is still sent at once, so one failure never silences the rest.
        self._retry_at: dict[str, float] = {}

    @property
    def channels(self) -> list[str]:
        """The configured delivery channels: ``command`` and ``email``."""
        names = ["command"] if self.config.command else []
        return names + (["email"] if self.config.smtp_host else [])

    async def send(self, alerts: Sequence[Alert]) -> list[Alert]:
        """
        Report the alerts not yet reported today, as one message.

        Returns:
            The alerts reported now; empty when all were reported earlier today, or
            are waiting to be retried after every channel failed for them.
        """
        now = time.monotonic()
        fresh = [alert for alert in self.register.unsent(alerts)
                 if self._retry_at.get(alert.cause, 0.0) <= now]
        if not fresh:
            return []
        subject, body = compose(fresh, self.hostname)
        kinds = sorted({alert.kind for alert in fresh}, key=KIND_ORDER.index)
        log.warning("alert.raised", subject=subject, kinds=kinds, count=len(fresh),
                    channels=self.channels, message=body)
        results = [await self._deliver(channel, subject, body, kinds) for channel in self.channels]
        if results and not any(results):
            for alert in fresh:
                self._retry_at[alert.cause] = now + RETRY_AFTER_FAILURE_S
            return []
        self.register.record(fresh)
        return fresh

    async def _deliver(self, channel: str, subject: str, body: str, kinds: list[str]) -> bool:
        try:
            if channel == "command":
                await self.run_command(subject, body, kinds)
            else:
                await asyncio.to_thread(self.send_email, subject, body)
        except (OSError, smtplib.SMTPException, AlertDeliveryError) as exc:
            log.error("alert.failed", channel=channel, error=f"{type(exc).__name__}: {exc}",
                      message=f"The alert could not be delivered by {channel}.",
                      action=_fix_for(channel))
            return False
        log.info("alert.sent", channel=channel, subject=subject)
        return True

    async def run_command(self, subject: str, body: str, kinds: Sequence[str]) -> None:
        """
        Run ``alert.command`` with the body on standard input.

        Raises:
            AlertDeliveryError: It exited with a non-zero status or timed out.
            OSError: It could not be started.
        """
        assert self.config.command is not None
        argv = shlex.split(self.config.command)
        env = {k: v for k, v in self._environ.items() if k not in _WITHHELD_ENV}
        env.update(COREPLUS_ALERT_SUBJECT=subject, COREPLUS_ALERT_KINDS=",".join(kinds),
                   COREPLUS_ALERT_HOST=self.hostname)
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            output, _ = await asyncio.wait_for(process.communicate(body.encode()),
                                               COMMAND_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AlertDeliveryError(
                f"{argv[0]} did not finish within {COMMAND_TIMEOUT_S:.0f} s and was killed"
            ) from None
        if process.returncode != 0:
            text = output.decode("utf-8", "replace").strip()[:_OUTPUT_MAX_CHARS]
            raise AlertDeliveryError(f"{argv[0]} exited with status {process.returncode}: "
                                     f"{text or 'no output'}")

    def send_email(self, subject: str, body: str) -> None:
        """
        Send one e-mail through ``alert.smtp_host``; blocking, so call it in a thread.

        Raises:
            smtplib.SMTPException: The server refused the login or the message.
            OSError: The connection or TLS handshake failed, or the password file
                cannot be read.
            AlertDeliveryError: The password file is open to group or others.
        """
        config = self.config
        assert config.smtp_host is not None and config.email_from is not None
        message = EmailMessage()
        message["Subject"] = subject
        message["From"] = config.email_from
        message["To"] = ", ".join(config.email_to)
        message["Date"] = formatdate(localtime=True)
        message["Message-ID"] = make_msgid(domain=config.email_from.rpartition("@")[2])
        message.set_content(body)
        password = read_password(config.smtp_password_file)
        with connect_smtp(config) as server:
            if config.smtp_user is not None and password is not None:
                server.login(config.smtp_user, password)
            server.send_message(message)


class AlertDeliveryError(Exception):
    """An alert channel ran but did not deliver."""


def read_password(path: Path | None) -> str | None:
    """
    Read the mail password from its file, which must be private to its owner.

    Raises:
        AlertDeliveryError: The file is readable or writable by group or others.
        OSError: The file cannot be read.
    """
    if path is None:
        return None
    mode = path.stat().st_mode
    if mode & 0o077:
        raise AlertDeliveryError(
            f"alert.smtp_password_file {path} has mode {stat.S_IMODE(mode):04o}, which lets "
            f"group or others access it. Run: chmod 600 {path}"
        )
    return path.read_text("utf-8").strip()


def connect_smtp(config: AlertConfig) -> smtplib.SMTP:
    """
    Open a connection to ``alert.smtp_host``, with TLS or STARTTLS as configured.

    Raises:
        OSError: The connection or the TLS handshake failed.
        smtplib.SMTPException: The server refused STARTTLS.
    """
    assert config.smtp_host is not None
    timeout_s = config.smtp_timeout_seconds
    context = ssl.create_default_context()
    if config.smtp_security == "tls":
        return smtplib.SMTP_SSL(config.smtp_host, config.smtp_port, timeout=timeout_s,
                                context=context)
    server = smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=timeout_s)
    try:
        if config.smtp_security == "starttls":
            server.starttls(context=context)
    except BaseException:
        server.close()
        raise
    return server


def _fix_for(channel: str) -> str:
    if channel == "command":
        return ("Run alert.command by hand as the service's user with some text on standard "
                "input, and fix what it reports. The alert is in this log as alert.raised.")
    return ("Check alert.smtp_host, smtp_port, smtp_security and the login, and that this "
            "server may reach the mail server. The alert is in this log as alert.raised.")
