"""
Tests for uploader.alerts: the once-a-day register on real files, ``alert.command`` as a
real subprocess, and e-mail through a small SMTP server on 127.0.0.1 written here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from uploader.alerts import Alert, Alerter, SentRegister, compose
from uploader.config import AlertConfig

PAUSED = Alert("paused", "paused:auth", "Uploads are paused: coreplus refused the "
               "credentials.", "Renew the access token.")
FAILED = Alert("failed", "failed:7", "The file Smith/letter.pdf failed: HTTP 415.",
               "Read the reason file beside it in the failed folder.")
DISK = Alert("disk", "disk:/srv", "Only 2% of /srv is free.", "Free some space.")


# --- a small SMTP server ------------------------------------------------------------


@dataclass
class Received:
    """One message as the SMTP server received it."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes
    login: tuple[str, str] | None


@dataclass
class MailServer:
    """
    An SMTP server on 127.0.0.1 that speaks just enough of RFC 5321 for smtplib:
    EHLO, STARTTLS, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP and QUIT.
    """

    password: str | None = None
    tls: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)
    port: int = 0
    handshake_errors: list[str] = field(default_factory=list)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state: dict[str, object] = {"login": None, "from": "", "rcpt": []}
        writer.write(b"220 mail.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                if not await self._command(line.decode().rstrip("\r\n"), state, reader, writer):
                    break
        except (ssl.SSLError, ConnectionError) as exc:
            self.handshake_errors.append(type(exc).__name__)
        finally:
            writer.close()

    async def _command(self, line: str, state: dict[str, object],
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            extensions = ["mail.test", "AUTH PLAIN"] + (["STARTTLS"] if self.tls else [])
            for index, text in enumerate(extensions):
                dash = " " if index == len(extensions) - 1 else "-"
                writer.write(f"250{dash}{text}\r\n".encode())
        elif verb == "STARTTLS" and self.tls is not None:
            writer.write(b"220 go ahead\r\n")
            await writer.drain()
            await writer.start_tls(self.tls)
        elif verb == "AUTH":
            _, user, password = base64.b64decode(line.split()[2]).decode().split("\0")
            if password != self.password:
                writer.write(b"535 authentication failed\r\n")
            else:
                state["login"] = (user, password)
                writer.write(b"235 accepted\r\n")
        elif verb == "MAIL":
            state["from"], state["rcpt"] = line.split(":", 1)[1].strip("<> "), []
            writer.write(b"250 ok\r\n")
        elif verb == "RCPT":
            state["rcpt"].append(line.split(":", 1)[1].strip("<> "))  # type: ignore[attr-defined]
            writer.write(b"250 ok\r\n")
        elif verb == "DATA":
            writer.write(b"354 end with .\r\n")
            await writer.drain()
            data = await reader.readuntil(b"\r\n.\r\n")
            self.received.append(Received(str(state["from"]), list(state["rcpt"]),  # type: ignore[call-overload]
                                          data[:-5], state["login"]))  # type: ignore[arg-type]
            writer.write(b"250 queued\r\n")
        elif verb == "QUIT":
            writer.write(b"221 bye\r\n")
            await writer.drain()
            return False
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
        return True


@pytest.fixture
async def mail_server() -> AsyncIterator[MailServer]:
    """A plain SMTP server on loopback that expects the password 's3cret'."""
    mail = MailServer(password="s3cret")
    server = await mail.start()
    try:
        yield mail
    finally:
        server.close()
        await server.wait_closed()


def mail_config(tmp_path: Path, port: int, **changes: object) -> AlertConfig:
    """An [alert] table for the local server, logging in with a private password file."""
    password_file = tmp_path / "smtp-password"
    password_file.write_text("s3cret\n")
    password_file.chmod(0o600)
    config = AlertConfig(smtp_host="127.0.0.1", smtp_port=port, smtp_security="none",
                         smtp_user="uploader", smtp_password_file=password_file,
                         smtp_timeout_seconds=5, email_from="uploader@clinic.example",
                         email_to=("it@clinic.example", "pm@clinic.example"))
    return replace(config, **changes)  # type: ignore[arg-type]


def self_signed_context(tmp_path: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for 127.0.0.1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


# --- composing and the register -----------------------------------------------------


class TestCompose:
    def test_compose_orders_by_importance(self) -> None:
        """The pause leads the subject and body; the count of the rest follows it."""
        when = datetime(2026, 3, 2, 9, 30, tzinfo=timezone(timedelta(hours=11)))
        subject, body = compose([FAILED, DISK, PAUSED], "clinic-srv", when)
        assert subject == ("coreplus-uploader on clinic-srv: Uploads are paused: coreplus "
                           "refused the credentials (and 2 more)")
        assert body.startswith("coreplus-uploader on clinic-srv needs attention "
                               "(2026-03-02 09:30 +1100).")
        assert body.index(PAUSED.summary) < body.index(DISK.summary) < body.index(FAILED.summary)
        assert f"  What to do: {FAILED.action}" in body

    def test_compose_single(self) -> None:
        """One alert gives a subject without a count."""
        subject, _ = compose([DISK], "srv")
        assert subject == "coreplus-uploader on srv: Only 2% of /srv is free"


class TestSentRegister:
    def test_register_once_per_day(self, tmp_path: Path) -> None:
        """A recorded cause is not offered again the same day, and is the next day."""
        day = [date(2026, 3, 2)]
        register = SentRegister(tmp_path / "sent.json", today=lambda: day[0])
        assert register.unsent([PAUSED, FAILED]) == [PAUSED, FAILED]
        register.record([PAUSED])
        assert register.unsent([PAUSED, FAILED]) == [FAILED]
        day[0] = date(2026, 3, 3)
        assert register.unsent([PAUSED]) == [PAUSED]

    def test_register_survives_restart(self, tmp_path: Path) -> None:
        """A second register on the same file skips today's causes; the file is 0600."""
        path = tmp_path / "sent.json"
        today = date(2026, 3, 2)
        SentRegister(path, today=lambda: today).record([FAILED])
        assert SentRegister(path, today=lambda: today).unsent([FAILED, DISK]) == [DISK]
        assert json.loads(path.read_text()) == {"day": "2026-03-02", "causes": ["failed:7"]}
        assert path.stat().st_mode & 0o777 == 0o600

    def test_register_forgets_yesterday(self, tmp_path: Path) -> None:
        """A file written yesterday does not hold back today's alerts."""
        path = tmp_path / "sent.json"
        SentRegister(path, today=lambda: date(2026, 3, 1)).record([FAILED])
        assert SentRegister(path, today=lambda: date(2026, 3, 2)).unsent([FAILED]) == [FAILED]

    def test_register_damaged_file(self, tmp_path: Path) -> None:
        """A file that is not JSON is treated as empty and rewritten on the next record."""
        path = tmp_path / "sent.json"
        path.write_text("{not json")
        with capture_logs() as logs:
            register = SentRegister(path, today=lambda: date(2026, 3, 2))
        assert [entry["event"] for entry in logs] == ["alert.failed"]
        register.record([DISK])
        assert json.loads(path.read_text())["causes"] == ["disk:/srv"]

    def test_register_duplicate_causes(self) -> None:
        """Two alerts with one cause are offered once."""
        twice = Alert("failed", "failed:7", "other text", "x")
        assert SentRegister(None).unsent([FAILED, twice]) == [FAILED]


# --- the command channel --------------------------------------------------------------


def recorder_script(tmp_path: Path, exit_code: int = 0) -> tuple[str, Path]:
    """A command that saves its stdin and environment as JSON, then exits."""
    out = tmp_path / "recorded.json"
    script = tmp_path / "record.py"
    script.write_text(
        "import json, os, sys\n"
        f"json.dump({{'stdin': sys.stdin.read(), 'argv': sys.argv[1:], 'env': dict(os.environ)}},"
        f" open({str(out)!r}, 'w'))\n"
        f"print('recorder says no')\n"
        f"sys.exit({exit_code})\n")
    return f"{sys.executable} {script} --team 'front desk'", out


class TestCommand:
    async def test_command_gets_text(self, tmp_path: Path) -> None:
        """The command gets the body on stdin, the subject and kinds in its environment."""
        command, out = recorder_script(tmp_path)
        environ = {**os.environ, "COREPLUS_SECRET": "top", "COREPLUS_ACCESS_TOKEN": "tok",
                   "NOTIFY_SOCKET": "/run/systemd/notify"}
        alerter = Alerter(AlertConfig(command=command), SentRegister(None), hostname="srv",
                          environ=environ)
        with capture_logs() as logs:
            sent = await alerter.send([FAILED, PAUSED])
        assert sent == [FAILED, PAUSED]
        recorded = json.loads(out.read_text())
        assert recorded["argv"] == ["--team", "front desk"]
        assert FAILED.summary in recorded["stdin"]
        assert PAUSED.action in recorded["stdin"]
        env = recorded["env"]
        assert env["COREPLUS_ALERT_SUBJECT"].startswith("coreplus-uploader on srv: Uploads are")
        assert env["COREPLUS_ALERT_KINDS"] == "paused,failed"
        assert env["COREPLUS_ALERT_HOST"] == "srv"
        for withheld in ("COREPLUS_SECRET", "COREPLUS_ACCESS_TOKEN", "NOTIFY_SOCKET"):
            assert withheld not in env
        events = [entry["event"] for entry in logs]
        assert events == ["alert.raised", "alert.sent"]

    async def test_command_repeat_suppressed(self, tmp_path: Path) -> None:
        """The same causes sent again the same day run the command only once."""
        command, out = recorder_script(tmp_path)
        alerter = Alerter(AlertConfig(command=command), SentRegister(None), hostname="srv")
        assert await alerter.send([DISK]) == [DISK]
        out.unlink()
        assert await alerter.send([DISK]) == []
        assert not out.exists()

    async def test_command_failure_logged(self, tmp_path: Path) -> None:
        """A command exiting 3 logs alert.failed with its output; the cause stays unsent."""
        command, _ = recorder_script(tmp_path, exit_code=3)
        register = SentRegister(None)
        alerter = Alerter(AlertConfig(command=command), register, hostname="srv")
        with capture_logs() as logs:
            assert await alerter.send([DISK]) == []
        failed = [entry for entry in logs if entry["event"] == "alert.failed"]
        assert len(failed) == 1
        assert "exited with status 3: recorder says no" in failed[0]["error"]
        assert register.unsent([DISK]) == [DISK]
        # Within the retry gap the same alert is not tried again.
        with capture_logs() as again:
            assert await alerter.send([DISK]) == []
        assert again == []

    async def test_failure_does_not_block_new_causes(self, tmp_path: Path) -> None:
        """After every channel failed for one cause, a new cause is still tried at once."""
        failing, _ = recorder_script(tmp_path, exit_code=3)
        alerter = Alerter(AlertConfig(command=failing), SentRegister(None), hostname="srv")
        assert await alerter.send([DISK]) == []
        with capture_logs() as logs:
            assert await alerter.send([DISK, FAILED]) == []
        raised = [entry for entry in logs if entry["event"] == "alert.raised"]
        assert len(raised) == 1
        assert raised[0]["count"] == 1

    async def test_command_missing_program(self, tmp_path: Path) -> None:
        """A program that does not exist logs alert.failed and does not raise."""
        alerter = Alerter(AlertConfig(command=str(tmp_path / "nope")), SentRegister(None))
        with capture_logs() as logs:
            assert await alerter.send([DISK]) == []
        assert "FileNotFoundError" in next(e for e in logs if e["event"] == "alert.failed")["error"]

    async def test_no_channel_logs_only(self) -> None:
        """Without a command or mail server the alert is logged and counted as sent."""
        alerter = Alerter(AlertConfig(), SentRegister(None), hostname="srv")
        with capture_logs() as logs:
            assert await alerter.send([PAUSED]) == [PAUSED]
        assert [entry["event"] for entry in logs] == ["alert.raised"]
        assert logs[0]["log_level"] == "warning"
        assert PAUSED.summary in logs[0]["message"]


# --- the e-mail channel --------------------------------------------------------------


class TestEmail:
    async def test_email_delivered(self, tmp_path: Path, mail_server: MailServer) -> None:
        """The message reaches the server with login, sender, recipients, subject and body."""
        alerter = Alerter(mail_config(tmp_path, mail_server.port), SentRegister(None),
                          hostname="clinic-srv")
        assert await alerter.send([FAILED]) == [FAILED]
        assert len(mail_server.received) == 1
        got = mail_server.received[0]
        assert got.login == ("uploader", "s3cret")
        assert got.mail_from == "uploader@clinic.example"
        assert got.rcpt_to == ["it@clinic.example", "pm@clinic.example"]
        message = message_from_bytes(got.data, policy=policy.default)
        assert message["Subject"].strip() == ("coreplus-uploader on clinic-srv: The file "
                                      "Smith/letter.pdf failed: HTTP 415")
        assert message["To"] == "it@clinic.example, pm@clinic.example"
        assert message["Message-ID"].endswith("@clinic.example>")
        assert FAILED.action in message.get_content()

    async def test_email_once_per_day(self, tmp_path: Path, mail_server: MailServer) -> None:
        """Three passes with the same cause send one e-mail; a new cause sends another."""
        alerter = Alerter(mail_config(tmp_path, mail_server.port), SentRegister(None))
        for _ in range(3):
            await alerter.send([FAILED])
        await alerter.send([FAILED, DISK])
        assert len(mail_server.received) == 2
        second = message_from_bytes(mail_server.received[1].data, policy=policy.default)
        assert DISK.summary in second.get_content()
        assert FAILED.summary not in second.get_content()

    async def test_email_wrong_password(self, tmp_path: Path, mail_server: MailServer) -> None:
        """A refused login logs alert.failed and sends nothing."""
        config = mail_config(tmp_path, mail_server.port)
        assert config.smtp_password_file is not None
        config.smtp_password_file.write_text("wrong\n")
        with capture_logs() as logs:
            assert await Alerter(config, SentRegister(None)).send([DISK]) == []
        assert "SMTPAuthenticationError" in next(
            e for e in logs if e["event"] == "alert.failed")["error"]
        assert mail_server.received == []

    async def test_email_open_password_file(self, tmp_path: Path,
                                            mail_server: MailServer) -> None:
        """A password file readable by others is not used; the error names chmod 600."""
        config = mail_config(tmp_path, mail_server.port)
        assert config.smtp_password_file is not None
        config.smtp_password_file.chmod(0o644)
        with capture_logs() as logs:
            assert await Alerter(config, SentRegister(None)).send([DISK]) == []
        error = next(e for e in logs if e["event"] == "alert.failed")["error"]
        assert "chmod 600" in error
        assert mail_server.received == []

    async def test_email_untrusted_certificate(self, tmp_path: Path) -> None:
        """STARTTLS to a server with a self-signed certificate fails; nothing is sent."""
        mail = MailServer(password="s3cret", tls=self_signed_context(tmp_path))
        server = await mail.start()
        try:
            config = mail_config(tmp_path, mail.port, smtp_security="starttls")
            with capture_logs() as logs:
                assert await Alerter(config, SentRegister(None)).send([DISK]) == []
        finally:
            server.close()
            await server.wait_closed()
        error = next(e for e in logs if e["event"] == "alert.failed")["error"]
        assert "CERTIFICATE_VERIFY_FAILED" in error
        assert mail.received == []

    async def test_email_server_down(self, tmp_path: Path) -> None:
        """A refused connection logs alert.failed naming the e-mail channel."""
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with capture_logs() as logs:
            assert await Alerter(mail_config(tmp_path, port), SentRegister(None)).send([DISK]) == []
        failed = next(e for e in logs if e["event"] == "alert.failed")
        assert failed["channel"] == "email"
        assert "ConnectionRefusedError" in failed["error"]
