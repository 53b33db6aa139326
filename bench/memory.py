"""
Memory: the daemon's peak resident set size (VmHWM in /proc, which covers the whole
life of the process) while it uploads one 2 GiB file, while 10,000 small files are
queued, and with 50,000 files in its archive. The budget is 100 MB in each case.

The 2 GiB file is sparse, so it takes no disk space and reads at memory speed. The
daemon still hashes and streams every byte of it. The archive and its ledger rows are
built directly, then the daemon uploads 100 more files into it.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.data import (
    build_archive,
    create_ledger,
    drop_folders,
    plan_files,
    write_planned,
)
from bench.env import (
    Context,
    DaemonProcess,
    Install,
    StandInProcess,
    client_ids,
    make_install,
    state_counts,
    wait_until,
    write_credentials,
)
from bench.results import Figure, judged, reported

PHASE = "memory"
BUDGET_MB = 100
_KIB_PER_MB = 1000 / 1024 * 1000  # 1 MB = 10^6 bytes = 976.5625 KiB


def run(ctx: Context) -> list[Figure]:
    """Run the three memory cases and return their figures."""
    figures = _big_file(ctx)
    figures += _many_queued(ctx)
    figures += _big_archive(ctx)
    return figures


def _mb(kib: int) -> float:
    return kib / _KIB_PER_MB


def _peak_figure(measure: str, peak_kib: int) -> Figure:
    return judged(PHASE, measure, f"{_mb(peak_kib):.1f} MB", f"< {BUDGET_MB} MB",
                  _mb(peak_kib) < BUDGET_MB)


# -- one 2 GiB file -----------------------------------------------------------------------


def _big_file(ctx: Context) -> list[Figure]:
    size = (256 if ctx.quick else 2048) * 1024 * 1024
    label = f"{size // (1024 * 1024)} MiB"
    ctx.progress(f"memory: one sparse file of {label}")
    base = ctx.folder(f"{PHASE}/big-file")
    ids = client_ids(1)
    with StandInProcess(base / "standin", write_credentials(base / "secrets"), ids,
                        cpus=ctx.cpus.standin) as standin:
        install = make_install(base / "install", standin, watch={"settle_seconds": 1})
        folder = drop_folders(install.root, ids)[0]
        with DaemonProcess(install, ctx.cpus.daemon) as daemon:
            daemon.wait_started()
            idle_peak = daemon.sample().peak_rss_kib
            _drop_sparse(base / "big.bin", install.root / folder / "big.bin", size)
            daemon.wait_event("upload.succeeded", timeout_s=900, after=daemon.started_at)
            peak = daemon.sample().peak_rss_kib
    return [_peak_figure(f"peak RSS, uploading one {label} file", peak),
            reported(PHASE, "peak RSS before that upload", f"{_mb(idle_peak):.1f} MB")]


def _drop_sparse(staging: Path, target: Path, size: int) -> None:
    """Create a sparse file outside the drop root, then move it in at once."""
    with open(staging, "wb") as out:
        out.truncate(size)
    os.rename(staging, target)


# -- 10,000 queued files -----------------------------------------------------------------


def _many_queued(ctx: Context) -> list[Figure]:
    count = 1000 if ctx.quick else 10_000
    ctx.progress(f"memory: {count} small files queued")
    base = ctx.folder(f"{PHASE}/queued")
    ids = client_ids(20)
    with StandInProcess(base / "standin", write_credentials(base / "secrets"), ids,
                        latency_ms=30, cpus=ctx.cpus.standin) as standin:
        install = make_install(base / "install", standin, watch={"settle_seconds": 1})
        drop_folders(install.root, ids)
        write_planned(install.root, plan_files(ids, count, (500, 4000), seed=3))
        with DaemonProcess(install, ctx.cpus.daemon) as daemon:
            queued_s = wait_until(lambda: _all_past_waiting(install, count), 900,
                                  f"{count} files to be queued", 0.5)
            peak = daemon.sample().peak_rss_kib
    # The stand-in limits uploads to 10/s, so nearly all of them are still queued here.
    return [_peak_figure(f"peak RSS, {count} small files queued", peak),
            reported(PHASE, f"start to all {count} files queued (scan, settle, hash)",
                     f"{queued_s:.1f} s")]


def _all_past_waiting(install: Install, count: int) -> bool:
    counts = state_counts(install.ledger)
    return sum(counts.values()) >= count and counts.get("waiting", 0) == 0


# -- 50,000 archived files -------------------------------------------------------------


def archive_fixture(ctx: Context) -> tuple[Path, list[str]]:
    """
    Build (once per bench run) an installation folder whose archive contains 50,000
    files (5,000 when quick) for 500 clients (50 when quick), with their ledger rows.

    Returns:
        The installation folder and the client GUIDs.
    """
    if "archive" in ctx.cache:
        cached: tuple[Path, list[str]] = ctx.cache["archive"]
        return cached
    clients = 50 if ctx.quick else 500
    base = ctx.folder("archive-fixture")
    ids = client_ids(clients)
    ledger = base / "install" / "state" / "ledger.sqlite3"
    create_ledger(ledger)
    build_archive(base / "install" / "archive", ledger, ids, per_client=100)
    drop_folders(base / "install" / "drop", ids)
    ctx.cache["archive"] = (base, ids)
    return base, ids


def _big_archive(ctx: Context) -> list[Figure]:
    base, ids = archive_fixture(ctx)
    archived = len(ids) * 100
    ctx.progress(f"memory: {archived} files in the archive, 100 more uploaded into it")
    with StandInProcess(base / "standin", write_credentials(base / "secrets"), ids,
                        latency_ms=30, cpus=ctx.cpus.standin) as standin:
        install = make_install(base / "install", standin, watch={"settle_seconds": 1})
        # Same names as files already archived, so each move must pick a free name.
        planned = plan_files(ids[:100], 100, 2000, seed=5, prefix="letter")
        with DaemonProcess(install, ctx.cpus.daemon) as daemon:
            daemon.wait_started()
            write_planned(install.root, planned)
            wait_until(lambda: state_counts(install.ledger).get("uploaded", 0) >= archived + 100,
                       300, "100 uploads into the archive", 0.5)
            peak = daemon.sample().peak_rss_kib
    return [_peak_figure(f"peak RSS, {archived} files in the archive", peak)]

