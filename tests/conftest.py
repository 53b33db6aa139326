"""
Shared pytest fixtures.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from harness import Setup, kill_spawned, make_setup

from uploader.standin import DEMO_CLIENTS, StandIn, StandInSettings, start_standin

# --- stand-in fixtures ---------------------------------------------------------
# A real stand-in on 127.0.0.1 with fresh credentials per test. Tests that need
# other settings build them with dataclasses.replace(standin_settings, ...).


@pytest.fixture
def standin_settings(tmp_path: Path) -> StandInSettings:
    """Stand-in settings with a random secret, access token and consumer id."""
    return StandInSettings(
        consumer_id=f"test-consumer-{secrets.token_hex(4)}",
        secret=secrets.token_urlsafe(32),
        access_token=secrets.token_hex(20),
        storage_dir=tmp_path / "standin-storage",
        clients=list(DEMO_CLIENTS),
    )


@pytest.fixture
async def standin(standin_settings: StandInSettings) -> AsyncIterator[StandIn]:
    """A running stand-in on a free loopback port, closed at teardown."""
    running = await start_standin(standin_settings)
    try:
        yield running
    finally:
        await running.close()


# --- end of stand-in fixtures --------------------------------------------------


# --- shared certificates -------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> SimpleNamespace:
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return SimpleNamespace(cert=cert, key=key)


# --- installations for daemon tests ----------------------------------------------


@pytest.fixture
def setup_factory(tmp_path: Path, standin: StandIn,
                  standin_settings: StandInSettings) -> Callable[..., Setup]:
    """Build an installation pointing at the stand-in; keyword args override tables."""

    def build(**overrides: dict[str, Any]) -> Setup:
        return make_setup(tmp_path, standin.url, standin_settings, **overrides)

    return build


@pytest.fixture(autouse=True)
def _kill_spawned_processes() -> Iterator[None]:
    """Kill every daemon a test started with ``harness.spawn``, even after a failure."""
    yield
    kill_spawned()
