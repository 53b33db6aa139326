"""
Ledger scale: a ledger of 1,000,000 rows, 10,000 of them files uploaded earlier and
kept in their drop folders (``upload.after_success = "keep"``).

It measures the daemon's start-up, to ``daemon.started`` and to its first scan. It times
one duplicate lookup in the ledger on its own, and in the daemon from ``file.settled`` to
``upload.duplicate``. It also checks that scanning the 10,000 handled files does not read
their contents again. That check uses access times: each kept file's atime is set
an hour before its mtime, and Linux's default ``relatime`` updates the atime on the
next read, so a file whose atime is still old was not read.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from pathlib import Path

from bench.data import (
    PlannedFile,
    create_ledger,
    drop_folders,
    insert_rows,
    kept_rows,
    plan_files,
    synthetic_rows,
    uploaded_row,
    write_planned,
)
from bench.env import (
    BenchError,
    Context,
    DaemonProcess,
    Install,
    StandInProcess,
    client_ids,
    event_time,
    ledger_rows,
    make_install,
    write_credentials,
)
from bench.results import Figure, judged, reported
from uploader.ledger import Ledger

PHASE = "ledger"
CLIENTS = 20
KEPT_FILE_BYTES = 16_000

#: Bytes of the file that the duplicate lookup finds in the ledger.
_DUPLICATE_BYTES = b"referral letter already uploaded for this client\n" * 100


def run(ctx: Context) -> list[Figure]:
    """Build the ledger, run the daemon on it and return the figures."""
    total = 100_000 if ctx.quick else 1_000_000
    kept_count = 1000 if ctx.quick else 10_000
    base = ctx.folder(PHASE)
    ids = client_ids(CLIENTS)
    with StandInProcess(base / "standin", write_credentials(base / "secrets"), ids,
                        latency_ms=30, cpus=ctx.cpus.standin) as standin:
        # The rescan checked below is the catch-up scan 2 s after the first one. The
        # periodic rescan keeps its default of 300 s, so none falls in the idle window.
        watch = {"settle_seconds": 1}
        install = make_install(base / "install", standin, watch=watch,
                               upload={"after_success": "keep"}, log={"level": "debug"})
        ctx.progress(f"ledger: building {total} rows, {kept_count} kept files")
        files = _build(install, ids, total, kept_count)
        figures = _run_daemon(ctx, install, ids, files, total)
    figures += _lookup_figures(install.ledger, ids)
    return figures


def _build(install: Install, ids: list[str], total: int, kept_count: int) -> list[PlannedFile]:
    drop_folders(install.root, ids)
    files = write_planned(install.root, plan_files(ids, kept_count, KEPT_FILE_BYTES, seed=13))
    for file in files:
        path = install.root / file.rel_path
        st = os.stat(path)
        os.utime(path, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))
    create_ledger(install.ledger)
    insert_rows(install.ledger, kept_rows(install.root, files))
    insert_rows(install.ledger, [_duplicate_row(ids[0])])
    insert_rows(install.ledger, synthetic_rows(ids, total - kept_count - 1))
    return files


def _duplicate_row(client_id: str) -> dict[str, object]:
    return uploaded_row(f"earlier/{client_id}/referral.txt", client_id,
                        hashlib.sha256(_DUPLICATE_BYTES).hexdigest(), len(_DUPLICATE_BYTES),
                        now=time.time() - 86400)


def _run_daemon(ctx: Context, install: Install, ids: list[str], files: list[PlannedFile],
                total: int) -> list[Figure]:
    ctx.progress("ledger: starting the daemon on it")
    with DaemonProcess(install, ctx.cpus.daemon) as daemon:
        started = daemon.wait_event("daemon.started", 300, after=daemon.started_at)
        scanned = daemon.wait_started(timeout_s=600)
        rescan = daemon.wait_event("scan.finished", 120, after=event_time(scanned) + 0.5)
        figures = [
            reported(PHASE, f"start-up to daemon.started, {total} rows",
                     f"{event_time(started) - daemon.started_at:.2f} s"),
            reported(PHASE, f"start-up to first scan finished, {len(files)} kept files",
                     f"{event_time(scanned) - daemon.started_at:.2f} s"),
        ]
        figures += _unread_figures(daemon, install, files, total)
        figures.append(_daemon_duplicate(daemon, install, ids[0], after=event_time(rescan)))
        figures.append(_idle_cpu(daemon, total, 10.0 if ctx.quick else 30.0))
    return figures


def _unread_figures(daemon: DaemonProcess, install: Install, files: list[PlannedFile],
                    total: int) -> list[Figure]:
    detected = daemon.log.named("file.detected")
    rows = ledger_rows(install.ledger, "SELECT COUNT(*) FROM files")[0][0]
    measure = f"first scan and a rescan of {len(files)} handled files"
    if not _check_atime_works(install.base):
        value = (f"reads not checked (atime not updated here), {len(detected)} "
                 f"file.detected, {rows - total} new rows")
        return [judged(PHASE, measure, value, "0 read, 0 new", False)]
    read_again = sum(_was_read(install.root / f.rel_path) for f in files)
    value = f"{read_again} files read, {len(detected)} file.detected, {rows - total} new rows"
    return [judged(PHASE, measure, value, "0 read, 0 new",
                   read_again == 0 and not detected and rows == total)]


def _was_read(path: Path) -> bool:
    st = os.stat(path)
    return st.st_atime_ns >= st.st_mtime_ns


def _daemon_duplicate(daemon: DaemonProcess, install: Install, client_id: str, *,
                      after: float) -> Figure:
    """Drop a file whose bytes the ledger already contains and time its duplicate verdict."""
    folder = next(p.name for p in install.root.iterdir() if client_id in p.name)
    rel_path = f"{folder}/referral again.txt"
    (install.root / rel_path).write_bytes(_DUPLICATE_BYTES)
    verdict = daemon.wait_event("upload.duplicate", 60, after=after)
    settled = [e for e in daemon.log.named("file.settled") if e.get("path") == rel_path]
    if not settled:
        raise BenchError(f"no file.settled event for {rel_path}")
    elapsed_ms = (event_time(verdict) - event_time(settled[0])) * 1000
    return reported(PHASE, "duplicate found by the daemon, file.settled to upload.duplicate",
                    f"{elapsed_ms:.0f} ms (1 ms log resolution)")


def _idle_cpu(daemon: DaemonProcess, total: int, window_s: float) -> Figure:
    """Measure the daemon's CPU while nothing arrives and no rescan runs."""
    before, started = daemon.sample().cpu_s, time.monotonic()
    time.sleep(window_s)
    percent = (daemon.sample().cpu_s - before) / (time.monotonic() - started) * 100
    return reported(PHASE, f"idle CPU, one core, {total} rows, {window_s:g} s, no rescan",
                    f"{percent:.2f} %")


def _lookup_figures(ledger_path: Path, ids: list[str]) -> list[Figure]:
    """Time the daemon's own duplicate lookup and ledger open, in this process."""
    opened = time.perf_counter()
    ledger = Ledger.open(ledger_path, readonly=True)
    open_s = time.perf_counter() - opened
    try:
        sha = hashlib.sha256(_DUPLICATE_BYTES).hexdigest()
        timings = []
        for _ in range(50):
            started = time.perf_counter()
            found = ledger.find_uploaded(ids[0], sha)
            timings.append(time.perf_counter() - started)
        if found is None:
            raise BenchError("the duplicate lookup did not find the row it was given")
    finally:
        ledger.close()
    return [
        reported(PHASE, "one duplicate lookup (Ledger.find_uploaded), median of 50",
                 f"{statistics.median(timings) * 1e6:.0f} us"),
        reported(PHASE, "Ledger.open with its integrity check", f"{open_s:.2f} s"),
    ]


def _check_atime_works(folder: Path) -> bool:
    """Return True when reading a file here updates its atime (relatime or strictatime)."""
    probe = folder / "atime-probe"
    probe.write_bytes(b"probe")
    st = os.stat(probe)
    os.utime(probe, ns=(st.st_mtime_ns - 3600 * 10**9, st.st_mtime_ns))
    probe.read_bytes()
    updated = _was_read(probe)
    probe.unlink()
    return updated
