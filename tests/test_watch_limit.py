"""
Falling back to polling when inotify runs out of watches. The limit is lowered inside a
new user namespace (`unshare -U -r`), where /proc/sys/user/max_inotify_watches belongs to
the test alone, so other processes on the machine keep their watches.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Setup, make_setup, spawn, wait_until
from standin_helpers import received

from uploader.constants import State
from uploader.standin import StandIn, StandInSettings


def user_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 3 > /proc/sys/user/max_inotify_watches"],
        capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not user_namespaces_work(),
                                reason="cannot lower the inotify limit in a user namespace")


@pytest.fixture
def setup(tmp_path: Path, standin: StandIn, standin_settings: StandInSettings) -> Setup:
    """An installation with more folders than the namespace's inotify limit allows."""
    built = make_setup(tmp_path, standin.url, standin_settings)
    for index in range(8):
        (built.root / f"Spare {index}").mkdir()
    (built.root / "Alpha Person").mkdir()
    return built


async def test_watch_limit_falls_back_to_polling(standin: StandIn, setup: Setup) -> None:
    """With inotify watches used up, the daemon polls, warns once naming the sysctl, and uploads."""
    script = (f"echo 4 > /proc/sys/user/max_inotify_watches && exec {sys.executable} "
              f"-m uploader run --config '{setup.config_path}'")
    daemon = await spawn(
        "unshare", "-U", "-r", "sh", "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(2.0)
    setup.drop("Alpha Person", "polled.txt", b"found by polling")
    await wait_until(lambda: [r.state for r in setup.rows()] == [State.UPLOADED],
                     timeout_s=30, what="upload while polling")
    daemon.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(daemon.communicate(), 30)

    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    fallback = [e for e in lines if e.get("polling") is True]
    assert len(fallback) == 1
    assert "fs.inotify.max_user_watches" in fallback[0]["action"]
    assert fallback[0]["level"] == "warning"
    assert len(await received(standin.url)) == 1
