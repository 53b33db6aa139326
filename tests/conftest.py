"""
Shared pytest fixtures.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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
