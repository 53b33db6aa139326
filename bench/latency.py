"""
Latency: the time from a file's last write to the start of its upload, over 100 files
written one after another into a running daemon's drop folders.

The last write is taken just after the final ``write`` returns; the start of the upload
is the daemon's ``upload.started`` event (millisecond timestamps). The budget is
``watch.settle_seconds`` plus at most 0.5 s.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.data import drop_folders, plan_files
from bench.env import (
    BenchError,
    Context,
    DaemonProcess,
    StandInProcess,
    client_ids,
    event_time,
    make_install,
    wait_until,
    write_credentials,
)
from bench.results import Figure, judged, percentile, reported

PHASE = "latency"
CLIENTS = 10
FILE_BYTES = 30_000

#: Gap between two files, so each one's latency is its own and not a queue's.
_GAP_S = 0.3

#: Pause between the two writes of each file, as a copy over the network would make.
_WRITE_PAUSE_S = 0.05

#: The daemon scans again 2 s after its watcher starts, and that scan restarts the
#: settle time of files being tracked. So the measurement starts after it.
_AFTER_START_S = 3.0

#: Allowed time above settle_seconds.
BUDGET_ABOVE_SETTLE_S = 0.5


def run(ctx: Context) -> list[Figure]:
    """Write the files, wait for every upload to start, and return the figures."""
    count = 20 if ctx.quick else 100
    # The daemon's default settle time is 5 s; the quick run uses 2 s to stay short.
    watch = {"settle_seconds": 2} if ctx.quick else {}
    base = ctx.folder(PHASE)
    ids = client_ids(CLIENTS)
    ctx.progress(f"latency: {count} files, one every {_GAP_S} s")
    with StandInProcess(base / "standin", write_credentials(base / "secrets"), ids,
                        latency_ms=30, cpus=ctx.cpus.standin) as standin:
        install = make_install(base / "install", standin, watch=watch)
        drop_folders(install.root, ids)
        with DaemonProcess(install, ctx.cpus.daemon) as daemon:
            daemon.wait_started()
            time.sleep(_AFTER_START_S)
            last_writes = _write_files(install.root, ids, count)
            latencies = _wait_for_starts(daemon, last_writes, install.settle_s)
    return _figures(count, latencies, install.settle_s)


def _write_files(root: Path, ids: list[str], count: int) -> dict[str, float]:
    """Write each file in two pieces; return the unix time of each file's last write."""
    last_writes = {}
    for planned, data in plan_files(ids, count, FILE_BYTES, seed=11, prefix="latency"):
        half = len(data) // 2
        with open(root / planned.rel_path, "wb") as out:
            out.write(data[:half])
            out.flush()
            time.sleep(_WRITE_PAUSE_S)
            out.write(data[half:])
            out.flush()
            last_writes[planned.rel_path] = time.time()
        time.sleep(_GAP_S)
    return last_writes


def _wait_for_starts(daemon: DaemonProcess, last_writes: dict[str, float],
                     settle_s: float) -> list[float]:
    """Return each file's seconds from its last write to its first upload.started."""
    starts: dict[str, float] = {}

    def all_started() -> bool:
        for event in daemon.log.named("upload.started"):
            starts.setdefault(event["path"], event_time(event))
        return set(last_writes) <= set(starts)

    wait_until(all_started, settle_s * 4 + 60, f"{len(last_writes)} uploads to start")
    missing = set(last_writes) - set(starts)
    if missing:
        raise BenchError(f"no upload.started event for {sorted(missing)[:3]}")
    return [starts[path] - written for path, written in last_writes.items()]


def _figures(count: int, latencies: list[float], settle_s: float) -> list[Figure]:
    budget_s = settle_s + BUDGET_ABOVE_SETTLE_S
    budget = f"<= {budget_s:g} s (settle {settle_s:g} s + 0.5 s)"
    median_s = statistics.median(latencies)
    p95_s = percentile(latencies, 0.95)
    return [
        judged(PHASE, f"last write to upload start, median of {count}", f"{median_s:.3f} s",
               budget, median_s <= budget_s),
        judged(PHASE, f"last write to upload start, p95 of {count}", f"{p95_s:.3f} s",
               budget, p95_s <= budget_s),
        reported(PHASE, f"last write to upload start, max of {count}",
                 f"{max(latencies):.3f} s"),
    ]
