"""
The daemon killed at exact points, with strace injecting SIGKILL or an error at one
system call, so the production code carries no test hooks. After a restart every
document is uploaded once (or flagged when it may have gone up twice).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from harness import Setup, make_setup, spawn, wait_until
from standin_helpers import received

from uploader.constants import State
from uploader.standin import StandIn, StandInSettings

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")


@pytest.fixture
def setup(tmp_path: Path, standin: StandIn, standin_settings: StandInSettings) -> Setup:
    """An installation whose daemon runs as a subprocess."""
    return make_setup(tmp_path, standin.url, standin_settings)


async def run_daemon(setup: Setup, *strace_args: str) -> asyncio.subprocess.Process:
    """Start `coreplus-uploader run`, under strace when arguments are given."""
    command = [sys.executable, "-m", "uploader", "run", "--config", str(setup.config_path)]
    if strace_args:
        command = ["strace", "-f", "-qq", "-o", "/dev/null", *strace_args, *command]
    return await spawn(*command, stdout=asyncio.subprocess.DEVNULL,
                       stderr=asyncio.subprocess.DEVNULL)


async def run_injected(
    setup: Setup, path: Path, syscall: str, injection: str
) -> asyncio.subprocess.Process:
    """Start the daemon under strace, applying ``injection`` to ``syscall`` calls on ``path``."""
    return await run_daemon(setup, "-P", str(path), "-e", f"trace={syscall}",
                            "-e", f"inject={syscall}:{injection}")


async def wait_for_state(setup: Setup, state: State, timeout_s: float,
                         description: str) -> None:
    """Wait until the ledger has exactly one row and that row is in ``state``."""
    await wait_until(lambda: [r.state for r in setup.rows()] == [state],
                     timeout_s=timeout_s, what=description)


async def wait_for_upload_in_flight(setup: Setup) -> None:
    """Wait until some row is in the uploading state."""
    await wait_until(lambda: any(r.state == State.UPLOADING for r in setup.rows()),
                     timeout_s=30, what="upload in flight")


async def stop(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the daemon (the child, when strace runs it) and wait for the exit."""
    if process.returncode is None:
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for pid in children or [str(process.pid)]:
            os.kill(int(pid), signal.SIGTERM)
    await asyncio.wait_for(process.wait(), 30)


async def test_kill_between_upload_and_archive(standin: StandIn, setup: Setup) -> None:
    """Killed at the archive link after the 200: the restart archives, never re-uploads."""
    setup.drop("Alpha Person", "a.txt", b"confirmed before the kill")
    first = await run_daemon(setup, "-e", "trace=link,linkat",
                             "-e", "inject=link,linkat:signal=KILL")
    await asyncio.wait_for(first.wait(), 30)
    assert first.returncode != 0
    assert [r.state for r in setup.rows()] == [State.UPLOADED]
    assert (setup.root / "Alpha Person" / "a.txt").exists()

    second = await run_daemon(setup)
    await wait_until(lambda: setup.rows()[0].disposition == "archived",
                     timeout_s=20, what="archive after restart")
    await stop(second)

    assert len(await received(standin.url)) == 1
    rows = setup.rows()
    assert [(r.state, r.disposition, r.possible_duplicate) for r in rows] == [
        (State.UPLOADED, "archived", 0)]
    assert not (setup.root / "Alpha Person" / "a.txt").exists()


async def test_kill_mid_body_flags_possible_duplicate(standin: StandIn, setup: Setup) -> None:
    """Killed while the body is being sent: the restart sends it again and flags the row."""
    data = os.urandom(64 * 1024 * 1024)
    setup.drop("Alpha Person", "big.bin", data)
    first = await run_daemon(setup)
    await wait_for_upload_in_flight(setup)
    first.send_signal(signal.SIGKILL)
    await first.wait()

    second = await run_daemon(setup)
    await wait_for_state(setup, State.UPLOADED, 60, "upload after restart")
    await stop(second)

    got = await received(standin.url)
    assert 1 <= len(got) <= 2
    assert all(Path(u["stored_path"]).read_bytes() == data for u in got)
    row = setup.rows()[0]
    assert row.possible_duplicate == 1


async def test_kill_while_hashing_then_upload(standin: StandIn, setup: Setup) -> None:
    """Killed while hashing a settled file: after a restart it goes up once."""
    path = setup.drop("Alpha Person", "h.bin", os.urandom(1024 * 1024))
    first = await run_injected(setup, path, "openat", "signal=KILL:when=1")
    await asyncio.wait_for(first.wait(), 30)
    assert [r.state for r in setup.rows()] == [State.WAITING]

    second = await run_daemon(setup)
    await wait_for_state(setup, State.UPLOADED, 30, "upload after restart")
    await stop(second)

    got = await received(standin.url)
    assert len(got) == 1
    assert setup.rows()[0].possible_duplicate == 0


async def test_busy_file_is_retried(standin: StandIn, setup: Setup) -> None:
    """EBUSY when opening a settled file defers it; it goes up once the file is free."""
    path = setup.drop("Alpha Person", "busy.txt", b"locked by the scanner")
    daemon = await run_injected(setup, path, "openat", "error=EBUSY:when=1..2")
    await wait_for_state(setup, State.UPLOADED, 40, "upload after EBUSY")
    await stop(daemon)

    got = await received(standin.url)
    assert len(got) == 1
    assert Path(got[0]["stored_path"]).read_bytes() == b"locked by the scanner"


async def test_changed_during_upload_goes_up_once(standin: StandIn, setup: Setup) -> None:
    """A file rewritten while its body streams is aborted, settles again, and goes up once."""
    first = os.urandom(4 * 1024 * 1024)
    path = setup.drop("Alpha Person", "grow.bin", first)
    # Slow every read of this file so the upload is still streaming when it changes.
    daemon = await run_injected(setup, path, "read", "delay_enter=150000")
    await wait_for_upload_in_flight(setup)
    final = os.urandom(4 * 1024 * 1024)
    with open(path, "r+b") as out:
        out.write(final)
    await wait_for_state(setup, State.UPLOADED, 60, "upload of the new content")
    await stop(daemon)

    got = await received(standin.url)
    assert len(got) == 1
    assert Path(got[0]["stored_path"]).read_bytes() == final
    assert setup.rows()[0].possible_duplicate == 0


async def test_deleted_during_upload_vanishes(standin: StandIn, setup: Setup) -> None:
    """A file deleted while its body streams is dropped quietly; the service stores nothing."""
    path = setup.drop("Alpha Person", "gone.bin", os.urandom(4 * 1024 * 1024))
    daemon = await run_injected(setup, path, "read", "delay_enter=150000")
    await wait_for_upload_in_flight(setup)
    path.unlink()
    await wait_for_state(setup, State.VANISHED, 30, "vanished row")
    await stop(daemon)

    assert await received(standin.url) == []
    assert list(setup.failed.rglob("*")) == []


async def test_unreadable_file_held_then_retried(standin: StandIn, setup: Setup) -> None:
    """EACCES on a settled file holds it; `retry` after the fix settles and uploads it."""
    path = setup.drop("Alpha Person", "locked.txt", b"permissions fixed later")
    daemon = await run_injected(setup, path, "openat", "error=EACCES:when=1")
    await wait_for_state(setup, State.HELD, 30, "held row")
    held = setup.rows()[0]
    assert "may not read" in (held.last_error or "")
    retry = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uploader", "retry", "--all", "--config", str(setup.config_path),
        stdout=asyncio.subprocess.DEVNULL)
    assert await retry.wait() == 0
    await wait_for_state(setup, State.UPLOADED, 30, "upload after retry")
    await stop(daemon)

    got = await received(standin.url)
    assert len(got) == 1
    assert Path(got[0]["stored_path"]).read_bytes() == b"permissions fixed later"
