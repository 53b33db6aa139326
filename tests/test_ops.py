"""
Tests for uploader.ops: passes of the operations loop over a real ledger, with a real
notify socket, a real alert command and a real drop root; and the daemon's wiring of
READY=1, WATCHDOG=1, STATUS= and STOPPING=1 against the stand-in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import ALPHA, DaemonRunner, Setup, make_setup, wait_until
from standin_helpers import add_faults, received
from structlog.testing import capture_logs

from uploader.alerts import Alerter, SentRegister
from uploader.config import AlertConfig
from uploader.constants import STATUS_FILE_NAME, State
from uploader.context import AsyncLedger, Runtime
from uploader.folders import IgnoreRules
from uploader.ledger import Ledger
from uploader.logs import NameHider
from uploader.ops import STUCK_MOVE_S, Operations, Snapshot, status_line
from uploader.sdnotify import Notifier
from uploader.standin import StandIn, StandInSettings

PAUSE = ("coreplus refused the credentials (HTTP 401), so every upload is paused. The "
         "usual causes are: the access token has expired.")


class NotifySocket:
    """A datagram socket in place of systemd's, collecting every message."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="ops-", dir="/tmp")
        self.path = os.path.join(self.folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[list[str]] = []

    def drain(self) -> list[list[str]]:
        """Read every waiting datagram into ``messages`` and return them all."""
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode().split("\n"))
            except BlockingIOError:
                return self.messages

    def statuses(self) -> list[str]:
        return [line[7:] for message in self.drain() for line in message
                if line.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.folder)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    listener = NotifySocket()
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def setup(tmp_path: Path, standin_settings: StandInSettings) -> Setup:
    """An installation whose API is never called by these tests."""
    return make_setup(tmp_path, "http://127.0.0.1:9", standin_settings)


def recorder(tmp_path: Path) -> tuple[str, Path]:
    """An alert command that appends each alert's stdin to a JSON-lines file."""
    out = tmp_path / "alerts.jsonl"
    script = tmp_path / "record.py"
    script.write_text("import json, os, sys\n"
                      f"with open({str(out)!r}, 'a') as f:\n"
                      "    f.write(json.dumps({'stdin': sys.stdin.read(), "
                      "'kinds': os.environ['COREPLUS_ALERT_KINDS']}) + '\\n')\n")
    return f"{sys.executable} {script}", out


def alerts_sent(out: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


OpsFactory = Callable[..., Operations]


@pytest.fixture
async def runtime(setup: Setup) -> AsyncIterator[Runtime]:
    """A Runtime over a real ledger in the setup's state folder."""
    config = setup.config()
    ledger = AsyncLedger(Ledger.open(config.ledger.path))
    try:
        yield Runtime(config, ledger, config.clients, IgnoreRules())
    finally:
        ledger.close()


@pytest.fixture
def make_ops(runtime: Runtime, notify: NotifySocket, tmp_path: Path) -> OpsFactory:
    """Build Operations with the test socket and a recording alert command."""

    def build(*, hide: bool = False, clock: Callable[[], float] | None = None,
              alert: AlertConfig | None = None) -> Operations:
        command, _ = recorder(tmp_path)
        alerter = Alerter(alert or AlertConfig(command=command, disk_min_free_percent=0),
                          SentRegister(tmp_path / "state" / "sent.json"), hostname="srv")
        options: dict[str, Any] = {"clock": clock} if clock else {}
        return Operations(runtime, notifier=Notifier({"NOTIFY_SOCKET": notify.path}),
                          alerter=alerter, hider=NameHider(b"k" * 32) if hide else None,
                          **options)

    return build


def add_row(ledger: Ledger, rel_path: str, state: str, **values: Any) -> int:
    folder = rel_path.split("/")[0]
    row = ledger.insert_waiting(rel_path=rel_path.encode(), display_path=rel_path,
                                drop_folder=folder, client_id=ALPHA, size=10, mtime_ns=0,
                                ctime_ns=0)
    ledger.update(row.id, state=state, **values)
    return row.id


def failed_file(setup: Setup, rel_path: str) -> Path:
    """A file in the failed folder, as disposal leaves it."""
    path = setup.failed / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


class TestStatusLine:
    def test_status_line_counts(self) -> None:
        """The queue counts waiting, queued, uploading, deferred and uncertain rows."""
        snapshot = Snapshot(counts={"waiting": 1, "queued": 2, "uploading": 1, "deferred": 3,
                                    "uncertain": 1, "uploaded": 50, "held": 9},
                            uploaded_today=4, paused=None, paused_action=None)
        assert status_line(snapshot) == "Queue 8, uploaded today 4, failed 0, held 0"

    def test_status_line_paused(self) -> None:
        """A pause leads the line with the first sentence of its reason."""
        snapshot = Snapshot(counts={}, uploaded_today=0, paused=PAUSE, paused_action="x",
                            unmapped=[{"path": "Smith", "problem": "p"}])
        assert status_line(snapshot) == (
            "PAUSED: coreplus refused the credentials (HTTP 401), so every upload is paused. "
            "Queue 0, uploaded today 0, failed 0, held 0, unmapped 1")


class TestTick:
    async def test_tick_all_well(self, setup: Setup, runtime: Runtime, make_ops: OpsFactory,
                                 notify: NotifySocket, tmp_path: Path) -> None:
        """With nothing wrong: STATUS= with counts, no alert, no status file."""
        sync = runtime.ledger.sync
        add_row(sync, "Alpha Person/a.pdf", State.UPLOADED, uploaded_at=time.time())
        add_row(sync, "Alpha Person/b.pdf", State.QUEUED)
        await make_ops().tick()
        assert notify.statuses() == ["Queue 1, uploaded today 1, failed 0, held 0"]
        assert alerts_sent(tmp_path / "alerts.jsonl") == []
        assert not (setup.root / STATUS_FILE_NAME).exists()

    async def test_tick_problems_reported(self, setup: Setup, runtime: Runtime,
                                          make_ops: OpsFactory, notify: NotifySocket,
                                          tmp_path: Path) -> None:
        """Pause, failed, held and unmapped reach STATUS=, one alert and the status file."""
        sync = runtime.ledger.sync
        final = failed_file(setup, "Alpha Person/letter.pdf")
        failed_id = add_row(sync, "Alpha Person/letter.pdf", State.FAILED,
                            last_error="coreplus rejected the file: HTTP 415",
                            final_path=str(final))
        held_id = add_row(sync, "Alpha Person/scan.tiff", State.HELD,
                          last_error="Permission denied")
        sync.record_unmapped(b"Smith John", "Smith John", "The folder name matches no alias.")
        sync.set_status(paused=PAUSE, paused_action="Renew the access token.")
        await make_ops().tick()

        assert notify.statuses() == [
            "PAUSED: coreplus refused the credentials (HTTP 401), so every upload is paused. "
            "Queue 0, uploaded today 0, failed 1, held 1, unmapped 1"]
        sent = alerts_sent(tmp_path / "alerts.jsonl")
        assert len(sent) == 1
        assert sent[0]["kinds"] == "paused,failed,held,unmapped"
        body = sent[0]["stdin"]
        assert "Uploads are paused: coreplus refused the credentials" in body
        assert f"Alpha Person/letter.pdf (#{failed_id}) was not uploaded" in body
        assert f"coreplus-uploader retry {held_id}" in body
        assert "Nothing in Smith John is uploaded" in body
        text = (setup.root / STATUS_FILE_NAME).read_text()
        flat = " ".join(text.split())
        assert "Uploads to coreplus are paused since" in flat
        assert "1 file could not be uploaded and was moved to the failed folder" in flat
        assert "Alpha Person/letter.pdf" in flat
        assert "Alpha Person/scan.tiff" in flat
        assert "Smith John" in flat

    async def test_tick_repeat_quiet(self, setup: Setup, runtime: Runtime,
                                     make_ops: OpsFactory, tmp_path: Path) -> None:
        """A second pass over the same problems sends no alert and keeps the same file."""
        sync = runtime.ledger.sync
        add_row(sync, "Alpha Person/scan.tiff", State.HELD, last_error="Permission denied")
        ops = make_ops()
        await ops.tick()
        inode = (setup.root / STATUS_FILE_NAME).stat().st_ino
        await ops.tick()
        assert len(alerts_sent(tmp_path / "alerts.jsonl")) == 1
        assert (setup.root / STATUS_FILE_NAME).stat().st_ino == inode

    async def test_tick_restart_no_repeat(self, runtime: Runtime, make_ops: OpsFactory,
                                          tmp_path: Path) -> None:
        """A new Operations (a restart) does not alert again on the same day."""
        add_row(runtime.ledger.sync, "Alpha Person/scan.tiff", State.HELD, last_error="x")
        await make_ops().tick()
        await make_ops().tick()
        assert len(alerts_sent(tmp_path / "alerts.jsonl")) == 1

    async def test_tick_new_failure_alerts(self, setup: Setup, runtime: Runtime,
                                           make_ops: OpsFactory, tmp_path: Path) -> None:
        """A file failing after the first pass gets an alert of its own."""
        sync = runtime.ledger.sync
        ops = make_ops()
        add_row(sync, "Alpha Person/one.pdf", State.HELD, last_error="x")
        await ops.tick()
        final = failed_file(setup, "Alpha Person/two.pdf")
        add_row(sync, "Alpha Person/two.pdf", State.FAILED, last_error="HTTP 400",
                final_path=str(final))
        await ops.tick()
        sent = alerts_sent(tmp_path / "alerts.jsonl")
        assert [entry["kinds"] for entry in sent] == ["held", "failed"]
        assert "one.pdf" not in sent[1]["stdin"]

    async def test_tick_clears_status_file(self, setup: Setup, runtime: Runtime,
                                           make_ops: OpsFactory, notify: NotifySocket) -> None:
        """Once the failed file is removed and the held row is retried, the file goes."""
        sync = runtime.ledger.sync
        final = failed_file(setup, "Alpha Person/letter.pdf")
        add_row(sync, "Alpha Person/letter.pdf", State.FAILED, last_error="HTTP 415",
                final_path=str(final))
        held_id = add_row(sync, "Alpha Person/scan.tiff", State.HELD, last_error="x")
        ops = make_ops()
        await ops.tick()
        assert (setup.root / STATUS_FILE_NAME).exists()
        final.unlink()
        sync.requeue([held_id])
        await ops.tick()
        assert not (setup.root / STATUS_FILE_NAME).exists()
        assert notify.statuses()[-1] == "Queue 1, uploaded today 0, failed 0, held 0"

    async def test_tick_hidden_names(self, setup: Setup, runtime: Runtime,
                                     make_ops: OpsFactory, notify: NotifySocket,
                                     tmp_path: Path) -> None:
        """With hidden names no name reaches STATUS=, the alert or the status file."""
        sync = runtime.ledger.sync
        final = failed_file(setup, "Okafor Ada/letter.pdf")
        add_row(sync, "Okafor Ada/letter.pdf", State.FAILED, final_path=str(final),
                last_error=f"cannot read {setup.root / 'Okafor Ada/letter.pdf'}")
        sync.record_unmapped(b"Smith John", "Smith John", "No alias for Smith John.")
        ops = make_ops(hide=True)
        await ops.tick()
        status = " ".join(notify.statuses())
        body = alerts_sent(tmp_path / "alerts.jsonl")[0]["stdin"]
        text = (setup.root / STATUS_FILE_NAME).read_text()
        for name in ("Okafor", "letter.pdf", "Smith John"):
            assert name not in status
            assert name not in body
            assert name not in text
        assert ops.hider is not None
        assert ops.hider.token("Okafor Ada/letter.pdf") in body
        assert ops.hider.token("Smith John") in body
        assert "1 file could not be uploaded" in " ".join(text.split())

    async def test_tick_stuck_move_alert(self, runtime: Runtime, make_ops: OpsFactory,
                                         tmp_path: Path) -> None:
        """Moves pending ten minutes after their upload raise one alert; newer ones none."""
        sync = runtime.ledger.sync
        now = time.time()
        for name in ("old1.pdf", "old2.pdf"):
            add_row(sync, f"Alpha Person/{name}", State.UPLOADED, disposition="pending",
                    uploaded_at=now - STUCK_MOVE_S - 60)
        add_row(sync, "Alpha Person/new.pdf", State.UPLOADED, disposition="pending",
                uploaded_at=now - 30)
        add_row(sync, "Alpha Person/done.pdf", State.UPLOADED, disposition="archived",
                uploaded_at=now - 2 * STUCK_MOVE_S)
        snapshot = await make_ops().tick()

        assert snapshot.stuck_moves == 2
        sent = alerts_sent(tmp_path / "alerts.jsonl")
        assert [entry["kinds"] for entry in sent] == ["moves"]
        assert "2 uploaded files are still in the drop folders" in sent[0]["stdin"]
        assert str(runtime.config.upload.archive_dir) in sent[0]["stdin"]

    async def test_tick_low_disk_alert(self, runtime: Runtime, make_ops: OpsFactory,
                                       notify: NotifySocket, tmp_path: Path) -> None:
        """A threshold of 100% makes every filesystem low, which STATUS= and an alert report."""
        command, out = recorder(tmp_path)
        alert = AlertConfig(command=command, disk_min_free_percent=100)
        runtime.config = dataclasses.replace(runtime.config, alert=alert)
        ops = make_ops(alert=alert)
        snapshot = await ops.tick()
        assert snapshot.low_disks
        assert str(runtime.root) in snapshot.low_disks[0].paths
        assert "% free" in notify.statuses()[0]
        sent = alerts_sent(out)
        assert sent[0]["kinds"] == "disk"
        assert "is free on the filesystem holding" in sent[0]["stdin"]

    async def test_tick_prunes_archive(self, setup: Setup, runtime: Runtime,
                                       make_ops: OpsFactory, tmp_path: Path) -> None:
        """With archive_keep_days set, a pass deletes archived files older than that."""
        upload = dataclasses.replace(runtime.config.upload, archive_keep_days=2)
        runtime.config = dataclasses.replace(runtime.config, upload=upload)
        archived = setup.archive / "Alpha Person" / "old.pdf"
        archived.parent.mkdir(parents=True)
        archived.write_bytes(b"old")
        with capture_logs() as logs:
            await make_ops(clock=lambda: time.time() + 3 * 86_400).tick()
        assert not archived.exists()
        assert (setup.archive / "Alpha Person").is_dir()
        pruned = next(entry for entry in logs if entry["event"] == "archive.pruned")
        assert pruned["deleted_files"] == 1
        assert pruned["deleted_bytes"] == 3

    async def test_tick_survives_missing_root(self, setup: Setup, runtime: Runtime,
                                              make_ops: OpsFactory,
                                              notify: NotifySocket) -> None:
        """A missing drop root skips the status file but STATUS= is still sent."""
        add_row(runtime.ledger.sync, "Alpha Person/a.pdf", State.HELD, last_error="x")
        setup.root.rmdir()
        ops = make_ops()
        with capture_logs() as logs:
            await ops._guarded_tick()
        assert notify.statuses() == ["Queue 0, uploaded today 0, failed 0, held 1"]
        assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
            "alert.raised", "ops.failed"]


class TestDaemonWiring:
    async def test_daemon_notifies_systemd(self, tmp_path: Path, standin: StandIn,
                                           standin_settings: StandInSettings,
                                           notify: NotifySocket,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """The daemon sends READY=1 after its first scan, keep-alives, STATUS= and
        STOPPING=1; a failed file writes the status file and runs the alert command."""
        command, out = recorder(tmp_path)
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        monkeypatch.setenv("WATCHDOG_USEC", "2000000")
        setup = make_setup(tmp_path, standin.url, standin_settings,
                           alert={"command": command, "disk_min_free_percent": 0})
        await add_faults(standin.url, {"kind": "status", "status": 415})
        setup.drop("Alpha Person", "bad.txt", b"rejected")
        async with DaemonRunner(setup):
            await wait_until(lambda: any(m[0] == "READY=1" for m in notify.drain()),
                             what="READY=1")
            ready = next(m for m in notify.messages if m[0] == "READY=1")
            await wait_until(lambda: (setup.root / STATUS_FILE_NAME).exists(),
                             what="status file", describe=notify.statuses)
            await wait_until(lambda: bool(alerts_sent(out)), what="alert command")
        messages = notify.drain()
        assert ready == ["READY=1", "STATUS=Started; the first scan found 1 file."]
        assert ["WATCHDOG=1"] in messages
        statuses = notify.statuses()
        assert any("failed 1" in status for status in statuses)
        firsts = [message[0] for message in messages]
        assert firsts.index("READY=1") < firsts.index("STOPPING=1")
        assert alerts_sent(out)[0]["kinds"] == "failed"
        assert "bad.txt" in (setup.root / STATUS_FILE_NAME).read_text()
        assert [r.state for r in setup.rows()] == [State.FAILED]

    async def test_daemon_ready_while_root_missing(self, tmp_path: Path, standin: StandIn,
                                                   standin_settings: StandInSettings,
                                                   notify: NotifySocket,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """A drop root that is missing at start-up gets READY=1 at once, and the files
        dropped once it appears are uploaded."""
        monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
        setup = make_setup(tmp_path, standin.url, standin_settings)
        setup.root.rmdir()
        async with DaemonRunner(setup):
            await wait_until(lambda: any(m[0] == "READY=1" for m in notify.drain()),
                             what="READY=1 while the root is missing")
            first_ready = next(m for m in notify.messages if m[0] == "READY=1")
            assert setup.rows() == []
            setup.root.mkdir()
            setup.drop("Alpha Person", "late.txt", b"arrived after the mount")
            await wait_until(lambda: [r.state for r in setup.rows()] == [State.UPLOADED],
                             timeout_s=30, what="upload once the root exists")
        assert first_ready[1].startswith("STATUS=Started; waiting for the drop root")
        ready_messages = [m for m in notify.drain() if m[0] == "READY=1"]
        assert ready_messages[-1] == ["READY=1", "STATUS=Started; the first scan found 1 file."]
        got = await received(standin.url)
        assert [g["name"] for g in got] == ["late.txt"]
