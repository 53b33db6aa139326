"""
Idle cost: the daemon's CPU time with 500 empty client folders and 50,000 archived
files, over one full ``watch.rescan_seconds`` period of 60 s, with inotify and then
with polling. The budget is under 1 % of one core with inotify; polling is reported.

CPU time is user plus system time of every thread, from /proc/<pid>/stat, so other
processes on the machine do not count towards it.
"""

from __future__ import annotations

import time

from bench.env import (
    Context,
    DaemonProcess,
    StandInProcess,
    make_install,
    write_credentials,
)
from bench.memory import archive_fixture
from bench.results import Figure, judged, reported

PHASE = "idle"
BUDGET_PERCENT = 1.0

#: Wait after the first scan, so the catch-up scan 2 s after start is not counted.
_SETTLE_AFTER_START_S = 4.0


def run(ctx: Context) -> list[Figure]:
    """Measure the idle CPU with inotify and with polling and return the figures."""
    period_s = 10.0 if ctx.quick else 60.0
    base, ids = archive_fixture(ctx)
    conditions = f"{len(ids)} folders, {len(ids) * 100} archived, {period_s:g} s"
    figures = []
    for polling in (False, True):
        mode = "polling" if polling else "inotify"
        ctx.progress(f"idle: {mode}, {conditions}")
        percent = _idle_percent(ctx, polling, period_s)
        measure = f"CPU, one core, {mode}, {conditions}"
        if polling:
            figures.append(reported(PHASE, measure, f"{percent:.2f} %"))
        else:
            figures.append(judged(PHASE, measure, f"{percent:.2f} %",
                                  f"< {BUDGET_PERCENT:g} %", percent < BUDGET_PERCENT))
    return figures


def _idle_percent(ctx: Context, polling: bool, period_s: float) -> float:
    """Run the daemon for one rescan period and return its CPU use in % of one core."""
    base, ids = archive_fixture(ctx)
    watch = {"rescan_seconds": period_s, "force_polling": polling}
    with StandInProcess(base / "standin", write_credentials(base / "secrets"), ids,
                        cpus=ctx.cpus.standin) as standin:
        install = make_install(base / "install", standin, watch=watch)
        with DaemonProcess(install, ctx.cpus.daemon) as daemon:
            daemon.wait_started()
            # The first rescan comes one period after the first scan, so a window that
            # starts a few seconds after it and lasts one period contains that rescan.
            time.sleep(_SETTLE_AFTER_START_S)
            before, started = daemon.sample().cpu_s, time.monotonic()
            time.sleep(period_s)
            used_s = daemon.sample().cpu_s - before
            wall_s = time.monotonic() - started
    return used_s / wall_s * 100
