"""
Helpers for tests that run the whole daemon against the stand-in over loopback: write a
configuration, start and stop the daemon in-process, and wait for ledger states.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uploader.config import Config, load_config
from uploader.credentials import Credentials
from uploader.daemon import Daemon, RunOptions
from uploader.exceptions import LedgerError
from uploader.ledger import FileRow, Ledger
from uploader.standin import DEMO_CLIENTS, StandInSettings

CLIENT_IDS = [c["clientId"] for c in DEMO_CLIENTS]
ALPHA, BRAVO, CHARLIE = CLIENT_IDS[:3]


def toml_value(value: Any) -> str:
    """Render a Python value as TOML (enough for the test configurations)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


@dataclass
class Setup:
    """
    Paths and credentials of one test installation.
    """

    tmp: Path
    root: Path
    archive: Path
    failed: Path
    ledger: Path
    config_path: Path
    credentials: Credentials
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    def config(self) -> Config:
        """Load the written configuration."""
        return load_config(self.config_path)

    def rows(self) -> list[FileRow]:
        """Every ledger row, read with a separate connection."""
        if not self.ledger.exists():
            return []
        try:
            ledger = Ledger.open(self.ledger, readonly=True)
        except LedgerError:
            return []  # The daemon is still creating it.
        try:
            return list(ledger.all_rows())
        except sqlite3.OperationalError:
            return []  # Created but its tables are not written yet.
        finally:
            ledger.close()

    def drop(self, folder: str, name: str, data: bytes) -> Path:
        """Write a file into a drop folder at once."""
        path = self.root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def make_setup(tmp: Path, standin_url: str, settings: StandInSettings,
               **overrides: dict[str, Any]) -> Setup:
    """
    Write credentials and a configuration for a daemon talking to the stand-in.

    ``overrides`` maps table names to keys that replace the test defaults, e.g.
    ``upload={"after_success": "keep"}``.
    """
    root, archive, failed = tmp / "drop", tmp / "archive", tmp / "failed"
    root.mkdir()
    state = tmp / "state"
    state.mkdir(mode=0o700)
    (state / "secret").write_text(settings.secret + "\n")
    (state / "token").write_text(settings.access_token + "\n")
    (state / "secret").chmod(0o600)
    (state / "token").chmod(0o600)
    tables: dict[str, dict[str, Any]] = {
        "api": {"base_url": standin_url, "consumer_id": settings.consumer_id,
                "issuer": "https://clinic.example", "secret_file": str(state / "secret"),
                "access_token_file": str(state / "token"), "auth_probe_seconds": 1,
                "max_requests_per_second": 9},
        "watch": {"root": str(root), "settle_seconds": 0.5, "rescan_seconds": 300,
                  "empty_grace_seconds": 2},
        "upload": {"workers": 4, "archive_dir": str(archive), "failed_dir": str(failed),
                   "backoff_max_seconds": 2, "shutdown_grace_seconds": 10},
        "ledger": {"path": str(state / "ledger.sqlite3")},
        "log": {"format": "json", "level": "debug"},
        "clients": {"Alpha Person": ALPHA, "Bravo Person": BRAVO},
    }
    for table, values in overrides.items():
        tables.setdefault(table, {}).update(values)
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    config_path = tmp / "config.toml"
    config_path.write_text("\n".join(lines))
    credentials = Credentials(settings.consumer_id, settings.secret, settings.access_token,
                              source="test files")
    return Setup(tmp, root, archive, failed, state / "ledger.sqlite3", config_path,
                 credentials, tables)


class DaemonRunner:
    """
    Run a daemon as a task in the test's event loop and stop it cleanly.
    """

    def __init__(self, setup: Setup, *, oneshot: bool = False) -> None:
        self.setup = setup
        self.daemon = Daemon(setup.config(), setup.credentials,
                             RunOptions(handle_signals=False, oneshot=oneshot,
                                        import_timeout_s=30))
        self.task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> DaemonRunner:
        self.task = asyncio.create_task(self.daemon.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> int:
        """Ask the daemon to stop, as a SIGTERM would, and return its exit code."""
        assert self.task is not None
        if not self.task.done():
            while not hasattr(self.daemon, "rt"):
                await asyncio.sleep(0.01)
            self.daemon.request_stop()
        return await asyncio.wait_for(self.task, 30)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 15.0,
                     what: str = "condition", describe: Callable[[], object] | None = None) -> None:
    """
    Poll ``predicate`` until it holds; on timeout fail the test naming ``what`` and
    the output of ``describe``.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            detail = f": {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{detail}")
        await asyncio.sleep(0.05)


def states(setup: Setup) -> dict[str, str]:
    """Map each row's display path to its state (the newest row wins)."""
    return {row.display_path: row.state for row in setup.rows()}


_spawned: list[asyncio.subprocess.Process] = []


async def spawn(*command: str, **options: Any) -> asyncio.subprocess.Process:
    """
    Start a subprocess in its own session and remember it, so ``kill_spawned`` can
    end it (and any child, such as the daemon under strace) when a test fails half-way.
    """
    process = await asyncio.create_subprocess_exec(*command, start_new_session=True, **options)
    _spawned.append(process)
    return process


def kill_spawned() -> None:
    """Kill the process group of every subprocess ``spawn`` started that still runs."""
    while _spawned:
        process = _spawned.pop()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
