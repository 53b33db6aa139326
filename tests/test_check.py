"""
Tests for uploader.check and the `check` command: real configuration files, unit
files, ledgers and folders in tmp_path, access tested as another user through a real
child process, and `--online` against the stand-in and a local SMTP server.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ALPHA, BRAVO, CHARLIE, Setup, make_setup
from test_alerts import MailServer

from uploader.check import (
    CheckReport,
    filesystem_type,
    mount_type,
    parse_timespan_s,
    parse_unit_text,
    read_unit,
    render_text,
    run_check,
)
from uploader.constants import ExitCode
from uploader.ledger import SCHEMA_VERSION, Ledger
from uploader.standin import StandIn, StandInSettings

UNKNOWN = "00000000-0000-4000-8000-00000000dead"


def write_unit(folder: Path, setup: Setup, **changes: str) -> Path:
    """A unit like the shipped one, for this setup's folders and the given user."""
    settings = {
        "User": pwd.getpwuid(os.geteuid()).pw_name,
        "ReadWritePaths": str(setup.tmp),
        "RequiresMountsFor": str(setup.root),
        "TimeoutStopSec": "90",
    }
    settings.update(changes)
    lines = ["[Unit]", f"RequiresMountsFor={settings.pop('RequiresMountsFor')}", "",
             "[Service]", "Type=notify"]
    lines += [f"{key}={value}" for key, value in settings.items()]
    path = folder / "coreplus-uploader.service"
    path.write_text("\n".join(lines) + "\n")
    return path


def topics(report: CheckReport, level: str) -> list[str]:
    return [finding.topic for finding in report.findings if finding.level == level]


def messages(report: CheckReport, level: str) -> str:
    return "\n".join(f.message for f in report.findings if f.level == level)


@pytest.fixture
def setup(tmp_path: Path, standin_settings: StandInSettings) -> Setup:
    """An installation pointing at an address where nothing listens."""
    return make_setup(tmp_path, "http://127.0.0.1:9", standin_settings)


class TestUnitParsing:
    @pytest.mark.parametrize(("text", "seconds"), [
        ("90", 90.0), ("90s", 90.0), ("1min 30s", 90.0), ("2m", 120.0), ("500ms", 0.5),
        ("1h", 3600.0), ("infinity", float("inf")), ("soon", None), ("5 parsecs", None),
    ])
    def test_timespan(self, text: str, seconds: float | None) -> None:
        """systemd time spans convert to seconds; other text gives None."""
        assert parse_timespan_s(text) == seconds

    def test_unit_text_lists(self) -> None:
        """Repeated keys add up, an empty assignment clears, continuations join."""
        values = parse_unit_text("[Service]\n# c\nReadWritePaths=/a\nReadWritePaths=\n"
                                 "ReadWritePaths=/b \\\n /c\nUser = x\n; other\n")
        assert values == {"ReadWritePaths": ["/b   /c"], "User": ["x"]}

    def test_unit_drop_in(self, tmp_path: Path, setup: Setup) -> None:
        """A drop-in beside the unit changes the user and adds a writable path."""
        unit = write_unit(tmp_path, setup, User="someone")
        drop_ins = tmp_path / "coreplus-uploader.service.d"
        drop_ins.mkdir()
        (drop_ins / "override.conf").write_text("[Service]\nUser=other\nReadWritePaths=-/x\n")
        info = read_unit(unit)
        assert info.user == "other"
        assert info.read_write_paths == (str(setup.tmp), "/x")


class TestReport:
    def test_config_error(self, tmp_path: Path) -> None:
        """An unknown key is an error naming the key, and the exit code is 2."""
        path = tmp_path / "config.toml"
        path.write_text("[api]\nbase_urll = 1\n")
        report = run_check(path)
        assert topics(report, "error") == ["config"]
        assert "api.base_urll" in messages(report, "error")
        assert report.exit_code() == ExitCode.USAGE

    def test_clean_setup_passes(self, setup: Setup, tmp_path: Path) -> None:
        """A complete setup with a matching unit has no errors and names its secret source."""
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        assert report.errors == []
        assert report.exit_code() == ExitCode.OK
        assert report.credentials_source is not None
        assert report.credentials_source.startswith("files ")
        assert "secrets" in topics(report, "ok")
        assert "access" in topics(report, "ok")
        assert "clock" in topics(report, "ok") + topics(report, "warning")

    def test_unit_paths_not_writable(self, setup: Setup, tmp_path: Path) -> None:
        """Folders outside ReadWritePaths= and a short TimeoutStopSec are errors."""
        unit = write_unit(tmp_path, setup, ReadWritePaths=str(setup.root),
                          TimeoutStopSec="10s", RequiresMountsFor="/elsewhere")
        report = run_check(setup.config_path, unit_path=unit)
        errors = messages(report, "error")
        assert f"upload.failed_dir {setup.failed} is not writable" in errors
        assert f"upload.archive_dir {setup.archive} is not writable" in errors
        assert "TimeoutStopSec= (10 s) is not longer than upload.shutdown_grace_seconds" in errors
        assert "RequiresMountsFor= does not name the drop root" in messages(report, "warning")

    def test_missing_drop_root(self, setup: Setup, tmp_path: Path) -> None:
        """A drop root that does not exist is an error that names it."""
        setup.root.rmdir()
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        assert f"The drop root {setup.root} (watch.root) does not exist" in messages(report,
                                                                                    "error")

    def test_secret_file_open(self, setup: Setup, tmp_path: Path) -> None:
        """A secret file readable by group is an error with the chmod fix."""
        (setup.tmp / "state" / "secret").chmod(0o640)
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        assert "chmod 600" in messages(report, "error")
        assert report.credentials_source is None

    def test_unit_credentials_source(self, setup: Setup, tmp_path: Path) -> None:
        """With LoadCredential= in the unit, check uses those files and names them."""
        creds = tmp_path / "creds"
        creds.mkdir()
        for name, source in (("coreplus-secret", "secret"), ("coreplus-access-token", "token")):
            shutil.copy(setup.tmp / "state" / source, creds / name)
            (creds / name).chmod(0o600)
        unit = write_unit(tmp_path, setup)
        with unit.open("a") as out:
            out.write(f"LoadCredential=coreplus-secret:{creds}/coreplus-secret\n"
                      f"LoadCredential=coreplus-access-token:{creds}/coreplus-access-token\n")
        report = run_check(setup.config_path, unit_path=unit, environ={})
        assert report.credentials_source is not None
        assert report.credentials_source.startswith(f"systemd credentials (LoadCredential= in "
                                                    f"{unit})")
        assert "api.secret_file and api.access_token_file are ignored" in messages(report,
                                                                                   "warning")

    def test_unit_credential_missing(self, setup: Setup, tmp_path: Path) -> None:
        """A LoadCredential= source that does not exist is an error: the unit would fail."""
        unit = write_unit(tmp_path, setup)
        with unit.open("a") as out:
            out.write("LoadCredential=coreplus-secret:/nonexistent/secret\n"
                      "LoadCredential=coreplus-access-token:/nonexistent/token\n")
        report = run_check(setup.config_path, unit_path=unit, environ={})
        assert "/nonexistent/secret, which does not exist, so the service would fail to " \
               "start" in messages(report, "error")

    def test_missing_user(self, setup: Setup, tmp_path: Path) -> None:
        """A unit user that does not exist is an error with the adduser command."""
        unit = write_unit(tmp_path, setup, User="no-such-user-zq")
        report = run_check(setup.config_path, unit_path=unit)
        assert "adduser --system --group" in messages(report, "error")

    def test_alert_command_missing(self, setup: Setup, tmp_path: Path) -> None:
        """An alert.command whose program does not exist is an error."""
        with setup.config_path.open("a") as out:
            out.write(f'[alert]\ncommand = "{tmp_path}/no-such-program --x"\n')
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        assert "not an executable program" in messages(report, "error")

    def test_render_text(self, setup: Setup, tmp_path: Path) -> None:
        """The text report has one line per finding and a count line."""
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        text = render_text(report)
        assert text.startswith(f"coreplus-uploader check of {setup.config_path}\n")
        assert text.count("\nOK       ") == len(topics(report, "ok"))
        assert text.endswith(f"0 error(s), {len(topics(report, 'warning'))} warning(s).\n")


class TestLedger:
    def test_ledger_ok(self, setup: Setup, tmp_path: Path) -> None:
        """An existing ledger passes SQLite's check and shows its schema version."""
        Ledger.open(setup.ledger).close()
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        assert f"The ledger {setup.ledger} passed SQLite's check (schema {SCHEMA_VERSION})." in messages(
            report, "ok")

    def test_ledger_damaged(self, setup: Setup, tmp_path: Path) -> None:
        """A file that is not SQLite is an error with exit code 3."""
        setup.ledger.write_bytes(b"not a database at all" * 100)
        setup.ledger.chmod(0o600)
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        assert "is damaged or not a ledger" in messages(report, "error")
        assert report.exit_code() == ExitCode.LEDGER_UNAVAILABLE

    def test_ledger_newer_schema(self, setup: Setup, tmp_path: Path) -> None:
        """A ledger from a newer program is an error asking for an upgrade."""
        Ledger.open(setup.ledger).close()
        db = sqlite3.connect(setup.ledger)
        db.execute("PRAGMA user_version = 99")
        db.commit()
        db.close()
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup))
        assert "schema version 99, newer than" in messages(report, "error")

    def test_ledger_wrong_owner(self, setup: Setup, tmp_path: Path) -> None:
        """A ledger owned by another user than the unit's is an error with chown."""
        if os.geteuid() != 0:
            pytest.skip("only root can give the ledger to another user")
        Ledger.open(setup.ledger).close()
        unit = write_unit(tmp_path, setup, User="nobody")
        report = run_check(setup.config_path, unit_path=unit)
        assert "is not owned by the service's user nobody" in messages(report, "error")


MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 27 0:50 / /srv/share rw,relatime - nfs4 nas:/export rw
41 40 0:51 / /srv/share/local\\040disk rw - xfs /dev/sdb1 rw
"""


class TestFilesystems:
    @pytest.mark.parametrize(("path", "expected"), [
        ("/srv/share/ledger.sqlite3", "nfs4"),
        ("/srv/share/local disk/ledger.sqlite3", "xfs"),
        ("/srv/shared/ledger.sqlite3", "ext4"),
        ("/var/lib/x/ledger.sqlite3", "ext4"),
    ])
    def test_filesystem_type(self, path: str, expected: str) -> None:
        """The longest mount point that contains the path decides its type."""
        assert mount_type(path, MOUNTINFO) == expected

    def test_filesystem_real(self, tmp_path: Path) -> None:
        """The real mount table gives a type for tmp_path."""
        assert filesystem_type(tmp_path) is not None


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder under /tmp that other users can reach (tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="check-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="testing another user's access needs root")
class TestAccessAsOtherUser:
    def test_access_denied_named(self, setup: Setup, tmp_path: Path) -> None:
        """As nobody, the root-only test folders are reported one by one with the fix."""
        report = run_check(setup.config_path, unit_path=write_unit(tmp_path, setup,
                                                                   User="nobody"))
        errors = messages(report, "error")
        assert f"User nobody cannot reach the drop root {setup.root}" in errors
        assert f"cannot create {setup.archive}: no write access to {setup.tmp}" in errors
        assert "chmod -R g+rwX" in errors
        assert report.user == "nobody"

    def test_access_granted(self, shared_folder: Path,
                            standin_settings: StandInSettings) -> None:
        """Folders and secrets owned by nobody pass; then a root-only file is named."""
        setup = make_setup(shared_folder, "http://127.0.0.1:9", standin_settings)
        nobody = pwd.getpwnam("nobody")
        (setup.root / "Alpha Person").mkdir()
        setup.archive.mkdir()
        setup.failed.mkdir()
        state = setup.tmp / "state"
        for path in (setup.root, setup.root / "Alpha Person", setup.archive, setup.failed,
                     state, state / "secret", state / "token"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        unit = write_unit(shared_folder, setup, User="nobody")
        report = run_check(setup.config_path, unit_path=unit)
        assert report.errors == []
        assert "User nobody can read and write the drop root (1 entries tested)" in messages(
            report, "ok")

        private = setup.drop("Alpha Person", "private.pdf", b"x")
        private.chmod(0o600)
        os.chown(state / "secret", 0, 0)
        report = run_check(setup.config_path, unit_path=unit)
        errors = messages(report, "error")
        assert f"User nobody cannot read {private}; cannot read {state / 'secret'}." in errors
        assert os.listdir(setup.archive) == []


class TestOnline:
    def write_folders(self, setup: Setup) -> None:
        for name in ("Alpha Person", f"Charlie Someone [{CHARLIE}]", f"Typo [{UNKNOWN}]",
                     "Unknown Person"):
            (setup.root / name).mkdir()

    async def test_online_names_clients(self, tmp_path: Path, standin: StandIn,
                                        standin_settings: StandInSettings) -> None:
        """Every mapped id is looked up; names and birth dates appear, an unknown id fails."""
        setup = make_setup(tmp_path, standin.url, standin_settings)
        self.write_folders(setup)
        unit = write_unit(tmp_path, setup)
        report = await asyncio.to_thread(run_check, setup.config_path, online=True,
                                         unit_path=unit)
        by_folder = {entry["folder"]: entry for entry in report.clients}
        assert by_folder["Alpha Person"]["name"] == "Alpha Democlient"
        assert by_folder["Alpha Person"]["date_of_birth"] == "1970-01-10"
        assert by_folder[f"Charlie Someone [{CHARLIE}]"]["name"] == "Charlie Democlient"
        assert by_folder["bravo person"]["client_id"] == BRAVO
        assert by_folder["bravo person"]["no_folder_yet"] is True
        assert by_folder[f"Typo [{UNKNOWN}]"]["found"] is False
        assert by_folder["Unknown Person"]["client_id"] is None
        assert f"maps to client id {UNKNOWN}, which coreplus does not know" in messages(
            report, "error")
        assert "The drop folder Unknown Person maps to no client" in messages(report, "warning")
        # Not every folder names a known client, so the summary is no OK line.
        assert "name a client that coreplus knows" in messages(report, "warning")
        assert "coreplus knows" not in messages(report, "ok")
        assert report.exit_code() == ExitCode.USAGE
        text = render_text(report)
        assert f"Alpha Person -> {ALPHA}: Alpha Democlient, born 1970-01-10" in text
        assert f"Typo [{UNKNOWN}] -> {UNKNOWN}: NOT FOUND in coreplus" in text

    async def test_online_pages(self, tmp_path: Path, standin: StandIn,
                                standin_settings: StandInSettings) -> None:
        """A client on the third page of 100 is found by paging through the list."""
        extra = [dict(c, clientId=f"00000000-0000-4000-8000-{i:012x}", firstName=f"P{i}")
                 for i, c in enumerate([standin_settings.clients[0]] * 230)]
        standin.state.clients = extra + standin.state.clients
        setup = make_setup(tmp_path, standin.url, standin_settings,
                           clients={"Alpha Person": ALPHA})
        report = await asyncio.to_thread(run_check, setup.config_path, online=True,
                                         unit_path=write_unit(tmp_path, setup))
        assert report.errors == []
        assert report.clients[0]["name"] == "Alpha Democlient"
        assert "2 of 2 mapped folders and aliases name a client" in messages(report, "ok")

    async def test_online_wrong_secret(self, tmp_path: Path, standin: StandIn,
                                       standin_settings: StandInSettings) -> None:
        """A wrong secret is an error about the credentials, exit code 2."""
        setup = make_setup(tmp_path, standin.url, standin_settings)
        (setup.tmp / "state" / "secret").write_text("not-the-secret\n")
        report = await asyncio.to_thread(run_check, setup.config_path, online=True,
                                         unit_path=write_unit(tmp_path, setup))
        assert "coreplus refused the credentials" in messages(report, "error")
        assert report.exit_code() == ExitCode.USAGE

    def test_online_unreachable(self, setup: Setup, tmp_path: Path) -> None:
        """A service that refuses connections is a temporary error, exit code 75."""
        report = run_check(setup.config_path, online=True, unit_path=write_unit(tmp_path, setup))
        assert "coreplus could not be reached" in messages(report, "error")
        assert report.exit_code() == ExitCode.TEMPORARY

    async def test_online_smtp_login(self, setup: Setup, tmp_path: Path) -> None:
        """With --online, check logs in to the mail server and sends nothing."""
        mail = MailServer(password="s3cret")
        server = await mail.start()
        password = tmp_path / "smtp-password"
        password.write_text("s3cret\n")
        password.chmod(0o600)
        with setup.config_path.open("a") as out:
            out.write(f'[alert]\nsmtp_host = "127.0.0.1"\nsmtp_port = {mail.port}\n'
                      f'smtp_security = "none"\nsmtp_user = "it"\nsmtp_password_file = '
                      f'"{password}"\nemail_from = "u@clinic.example"\n'
                      f'email_to = ["it@clinic.example"]\n')
        try:
            report = await asyncio.to_thread(run_check, setup.config_path, online=True,
                                             unit_path=write_unit(tmp_path, setup))
        finally:
            server.close()
            await server.wait_closed()
        assert f"E-mail alerts: logged in to 127.0.0.1:{mail.port}." in messages(report, "ok")
        assert mail.received == []


class TestCommandLine:
    async def test_cli_json(self, tmp_path: Path, standin: StandIn,
                            standin_settings: StandInSettings) -> None:
        """`check --online --json` prints the report as JSON and exits 0 when all is well."""
        setup = make_setup(tmp_path, standin.url, standin_settings)
        (setup.root / "Alpha Person").mkdir()
        unit = write_unit(tmp_path, setup)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "uploader", "check", "--config", str(setup.config_path),
            "--online", "--json", "--unit", str(unit), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, out.decode() + err.decode()
        data = json.loads(out)
        assert data["ok"] is True
        assert data["unit"] == str(unit)
        assert data["credentials_source"].startswith("files ")
        alpha = next(e for e in data["clients"] if e["folder"] == "Alpha Person")
        assert alpha["name"] == "Alpha Democlient"

    async def test_cli_config_error_exit_2(self, tmp_path: Path) -> None:
        """A configuration that does not load gives exit code 2 and names the problem."""
        path = tmp_path / "config.toml"
        path.write_text("[watch]\nroot = 5\n")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "uploader", "check", "--config", str(path),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == ExitCode.USAGE
        assert "ERROR    config" in out.decode()
