"""
The command line run as real subprocesses: signals, exit codes, status and import.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest
from harness import Setup, make_setup, spawn, wait_until
from standin_helpers import add_faults, received, received_content

from uploader.constants import ExitCode, State
from uploader.ledger import DISPOSITION_ARCHIVED
from uploader.standin import StandIn, StandInSettings


@pytest.fixture
def setup(tmp_path: Path, standin: StandIn, standin_settings: StandInSettings) -> Setup:
    """An installation whose daemon logs JSON and has one worker."""
    return make_setup(tmp_path, standin.url, standin_settings,
                      upload={"workers": 1, "shutdown_grace_seconds": 10})


async def start_cli(setup: Setup, *args: str) -> asyncio.subprocess.Process:
    """Start `python -m uploader` with the setup's configuration."""
    return await spawn(
        sys.executable, "-m", "uploader", *args, "--config", str(setup.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def run_cli(setup: Setup, *args: str) -> tuple[int, str, str]:
    """Run one CLI command to completion; returns (exit code, stdout, stderr)."""
    process = await start_cli(setup, *args)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def events(stdout: str) -> list[dict[str, object]]:
    """The JSON log lines a daemon printed."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


async def test_sigterm_finishes_in_flight_upload(standin: StandIn, setup: Setup) -> None:
    """SIGTERM during a slow upload lets it finish, leaves the rest queued, and exits 0."""
    await add_faults(standin.url, {"kind": "slow", "seconds": 2})
    for index in range(4):
        setup.drop("Alpha Person", f"doc{index}.txt", f"document {index}".encode())
    daemon = await start_cli(setup, "run")
    await wait_until(lambda: any(r.state == State.UPLOADING for r in setup.rows()),
                     what="an upload in flight")
    daemon.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(daemon.communicate(), 30)

    assert daemon.returncode == 0, err.decode()
    names = [e["event"] for e in events(out.decode())]
    assert "daemon.stopping" in names
    assert names[-1] == "daemon.stopped"
    got = await received(standin.url)
    assert len(got) == 1
    counts: dict[str, int] = {}
    for row in setup.rows():
        counts[row.state] = counts.get(row.state, 0) + 1
    assert counts == {State.UPLOADED: 1, State.QUEUED: 3}
    # The archive move runs after the worker is free, and the stop still waits for it.
    uploaded = next(r for r in setup.rows() if r.state == State.UPLOADED)
    assert uploaded.disposition == DISPOSITION_ARCHIVED
    assert not (setup.root / uploaded.rel_path_str).exists()
    archived = setup.archive / uploaded.rel_path_str
    stored = await received_content(standin.url, got[0]["id"])
    assert archived.read_bytes() == stored


async def test_rate_limited_rows_stay_queued(standin: StandIn, tmp_path: Path,
                                             standin_settings: StandInSettings) -> None:
    """
    Rows whose workers wait for the rate limiter stay queued, so a forced stop flags at
    most the one upload that was admitted.
    """
    setup = make_setup(tmp_path, standin.url, standin_settings,
                       api={"max_requests_per_second": 1},
                       upload={"workers": 4, "shutdown_grace_seconds": 10})
    for index in range(8):
        setup.drop("Alpha Person", f"doc{index}.txt", f"document {index}".encode())
    daemon = await start_cli(setup, "run")
    await wait_until(lambda: len([r for r in setup.rows() if r.state == State.UPLOADED]) >= 2,
                     timeout_s=30, what="two uploads at one a second")
    uploading_seen = []
    for _ in range(20):
        states = [r.state for r in setup.rows()]
        uploading_seen.append(states.count(State.UPLOADING))
        await asyncio.sleep(0.05)
    daemon.send_signal(signal.SIGTERM)
    daemon.send_signal(signal.SIGTERM)
    await asyncio.wait_for(daemon.communicate(), 30)

    # Four workers are busy, but only the admitted one may have its bytes on the way.
    assert max(uploading_seen) <= 1
    rows = setup.rows()
    flagged = [r for r in rows if r.possible_duplicate]
    assert len(flagged) <= 1
    stored = {g["name"] for g in await received(standin.url)}
    for row in rows:
        if row.state == State.QUEUED:
            assert os.path.basename(row.display_path) not in stored
            assert row.attempts == 0


async def test_second_daemon_exits_3(standin: StandIn, setup: Setup) -> None:
    """A second daemon on the same ledger exits 3 and names the lock holder."""
    first = await start_cli(setup, "run")
    await wait_until(lambda: setup.ledger.exists() and bool(setup.rows()) or
                     setup.ledger.exists(), what="first daemon's ledger")
    await asyncio.sleep(1.0)
    code, _, err = await run_cli(setup, "run")
    first.send_signal(signal.SIGINT)
    await asyncio.wait_for(first.communicate(), 30)

    assert code == ExitCode.LEDGER_UNAVAILABLE
    assert "in use by another process" in err
    assert first.returncode == 0


async def test_damaged_ledger_exits_3(setup: Setup) -> None:
    """A ledger file that is not SQLite makes the daemon exit 3 with the path and the fix."""
    setup.ledger.write_bytes(b"this is not a database" * 100)
    code, _, err = await run_cli(setup, "run")

    assert code == ExitCode.LEDGER_UNAVAILABLE
    assert str(setup.ledger) in err
    assert "ledger backup" in err
    assert setup.ledger.read_bytes() == b"this is not a database" * 100


async def test_bad_config_exits_2(setup: Setup) -> None:
    """An unknown key is a usage error (exit 2) naming the key."""
    setup.config_path.write_text(setup.config_path.read_text() + "\n[extra]\nsurprise = 1\n")
    code, _, err = await run_cli(setup, "status")

    assert code == ExitCode.USAGE
    assert "extra" in err


async def test_import_then_status(standin: StandIn, setup: Setup) -> None:
    """`import` uploads and exits 0; `status --json` then reports the uploads."""
    for index in range(3):
        setup.drop("Bravo Person", f"b{index}.txt", f"bravo {index}".encode())
    report = setup.tmp / "report.csv"
    code, _, err = await run_cli(setup, "import", "--report", str(report))
    assert code == ExitCode.OK, err
    status_code, out, _ = await run_cli(setup, "status", "--json")

    assert status_code == 0
    data = json.loads(out)
    assert data["running"] is False
    assert data["counts"]["uploaded"] == 3
    assert data["uploaded_today"] == 3
    assert len(await received(standin.url)) == 3
    assert report.stat().st_mode & 0o777 == 0o600
    assert report.read_text().count("uploaded") == 3
    # `import` returns only after every uploaded file has left its drop folder.
    assert sorted(p.name for p in (setup.archive / "Bravo Person").iterdir()) == [
        "b0.txt", "b1.txt", "b2.txt"]
    assert list((setup.root / "Bravo Person").iterdir()) == []


async def test_import_with_failure_exits_1(standin: StandIn, setup: Setup) -> None:
    """An import in which the service rejects a file exits 1."""
    await add_faults(standin.url, {"kind": "status", "status": 422})
    setup.drop("Alpha Person", "x.txt", b"x")
    code, _, _ = await run_cli(setup, "import")

    assert code == ExitCode.FILES_FAILED
    assert [r.state for r in setup.rows()] == [State.FAILED]


async def test_status_text_lists_failed(standin: StandIn, setup: Setup) -> None:
    """The text status names failed files with their reason."""
    await add_faults(standin.url, {"kind": "status", "status": 400, "body": "no"})
    setup.drop("Alpha Person", "x.txt", b"x")
    await run_cli(setup, "import")
    code, out, _ = await run_cli(setup, "status")

    assert code == 0
    assert "Daemon: not running." in out
    assert "Failed (1):" in out
    assert "Alpha Person/x.txt" in out
    assert "HTTP 400" in out


async def test_ledger_files_are_private(standin: StandIn, setup: Setup) -> None:
    """The ledger and its lock are created owner-only, in WAL mode."""
    setup.drop("Alpha Person", "x.txt", b"x")
    code, _, _ = await run_cli(setup, "import")

    assert code == 0
    assert setup.ledger.stat().st_mode & 0o777 == 0o600
    lock = setup.ledger.with_name(setup.ledger.name + ".lock")
    assert lock.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(setup.ledger) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_no_secret_in_output_or_ledger(standin: StandIn, setup: Setup,
                                             standin_settings: StandInSettings) -> None:
    """Debug logs, stderr and the ledger never contain the secret, access token or a token."""
    setup.drop("Alpha Person", "x.txt", b"x")
    await add_faults(standin.url, {"kind": "status", "status": 401})
    process = await start_cli(setup, "run")
    await wait_until(lambda: [r.state for r in setup.rows()] == [State.UPLOADED],
                     timeout_s=30, what="upload after a pause")
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(process.communicate(), 30)
    ledger_bytes = b"".join(p.read_bytes() for p in setup.ledger.parent.glob("ledger.sqlite3*"))

    for blob in (out, err, ledger_bytes):
        assert standin_settings.secret.encode() not in blob
        assert standin_settings.access_token.encode() not in blob
        assert b"JwToken" not in blob
        assert b"eyJ" not in blob  # the start of every JWT header


async def test_force_polling_uploads(standin: StandIn, tmp_path: Path,
                                     standin_settings: StandInSettings) -> None:
    """With watch.force_polling the daemon still notices a dropped file and uploads it."""
    polled = make_setup(tmp_path, standin.url, standin_settings,
                        watch={"force_polling": True})
    process = await start_cli(polled, "run")
    await asyncio.sleep(1.0)
    polled.drop("Alpha Person", "p.txt", b"polled")
    await wait_until(lambda: [r.state for r in polled.rows()] == [State.UPLOADED],
                     timeout_s=30, what="upload while polling")
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.communicate(), 30)

    assert process.returncode == 0
    assert len(await received(standin.url)) == 1


async def test_retry_moves_failed_file_back(standin: StandIn, setup: Setup) -> None:
    """`retry --all` moves a failed file back into its drop folder; the next run uploads it."""
    await add_faults(standin.url, {"kind": "status", "status": 400})
    setup.drop("Alpha Person", "again.txt", b"second chance")
    await run_cli(setup, "import")
    assert (setup.failed / "Alpha Person" / "again.txt").exists()

    code, out, _ = await run_cli(setup, "retry", "--all")
    assert code == ExitCode.OK
    assert (setup.root / "Alpha Person" / "again.txt").read_bytes() == b"second chance"
    assert not (setup.failed / "Alpha Person" / "again.txt.reason.txt").exists()
    code, _, _ = await run_cli(setup, "import")

    assert code == ExitCode.OK
    states = [r.state for r in setup.rows()]
    assert states == [State.FAILED, State.UPLOADED]
    got = await received(standin.url)
    assert len(got) == 1


async def test_empty_ledger_file_exits_3(setup: Setup) -> None:
    """A truncated (0-byte) ledger is damaged, not a fresh start: exit 3, file untouched."""
    setup.ledger.write_bytes(b"")
    code, _, err = await run_cli(setup, "run")

    assert code == ExitCode.LEDGER_UNAVAILABLE
    assert "empty" in err
    assert setup.ledger.read_bytes() == b""
