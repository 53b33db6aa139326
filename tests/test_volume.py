"""
The main job at volume: 200 files in 10 client folders, some written slowly, some
renamed from temporary names and some repeating bytes, against the strict stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from pathlib import Path

import pytest
from harness import CLIENT_IDS, DaemonRunner, make_setup, wait_until
from standin_helpers import received, received_content, stats

from uploader.constants import State
from uploader.standin import StandIn, StandInSettings

FOLDERS = [f"Client {index} [{client_id}]" for index, client_id in enumerate(CLIENT_IDS)]


def write_slowly(path: Path, data: bytes, pieces: int = 4, pause_s: float = 0.3) -> None:
    """
    Write a file in pieces, as a network copy or a scanner would. It runs in a thread so
    a busy event loop cannot stretch the pauses past the settle time.
    """
    step = max(1, len(data) // pieces)
    with open(path, "wb") as out:
        for start in range(0, len(data), step):
            out.write(data[start:start + step])
            out.flush()
            time.sleep(pause_s)


async def write_then_rename(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename into place."""
    temp = path.with_name(path.name + ".part")
    temp.write_bytes(data)
    await asyncio.sleep(0.2)
    temp.rename(path)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_200_files_each_pair_once(tmp_path: Path, standin: StandIn,
                                        standin_settings: StandInSettings) -> None:
    """Every distinct (client, bytes) pair goes up once, exact; every repeat is a duplicate."""
    setup = make_setup(tmp_path, standin.url, standin_settings,
                       watch={"settle_seconds": 1.5})
    rng = random.Random(7)
    shared = [os.urandom(rng.randint(1, 50_000)) for _ in range(10)]
    plan: list[tuple[int, str, bytes, str]] = []
    for number in range(200):
        folder = number % 10
        data = shared[number % 10] if number % 9 == 0 else os.urandom(rng.randint(1, 60_000))
        how = ("slow", "rename", "plain")[number % 3]
        plan.append((folder, f"doc {number:03d} – Zoë.txt", data, how))
    async with DaemonRunner(setup):
        writers = []
        for folder, name, data, how in plan:
            path = setup.root / FOLDERS[folder] / name
            path.parent.mkdir(exist_ok=True)
            if how == "slow":
                writers.append(asyncio.create_task(asyncio.to_thread(write_slowly, path, data)))
            elif how == "rename":
                writers.append(asyncio.create_task(write_then_rename(path, data)))
            else:
                path.write_bytes(data)
        await asyncio.gather(*writers)
        await wait_until(lambda: all(r.state in (State.UPLOADED, State.DUPLICATE)
                                     for r in setup.rows()) and len(setup.rows()) == 200,
                         timeout_s=90, what="200 files handled",
                         describe=lambda: (len(setup.rows()), sorted(
                             str(p.relative_to(setup.root)) for p in setup.root.rglob("*")
                             if p.is_file())))
        got = await received(standin.url)
        counters = await stats(standin.url)
        contents = {u["id"]: await received_content(standin.url, u["id"]) for u in got}

    pairs = {(CLIENT_IDS[folder], hashlib.sha256(data).hexdigest()) for folder, _, data, _ in plan}
    sent = [(u["clientId"], u["sha256"]) for u in got]
    assert len(sent) == len(set(sent)), "a (client, bytes) pair went up twice"
    assert set(sent) == pairs
    expected = {(CLIENT_IDS[f], n): d for f, n, d, _ in plan}
    for upload in got:
        data = expected[(upload["clientId"], upload["name"])]
        assert contents[upload["id"]] == data
    rows = setup.rows()
    assert sum(r.state == State.DUPLICATE for r in rows) == 200 - len(pairs)
    assert counters["rate_limited"] == 0
    assert not any(".part" in r.display_path for r in rows)
