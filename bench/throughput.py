"""
Throughput: 1,000 files of 100 KB for 20 clients, with the stand-in adding 30 ms to
every response. The daemon runs first under the service's limit of 10 requests/s, then
with every limit off. The plain sequential client uploads the same files for comparison.

The rate is taken from the stand-in's own receipt times: (files - 1) divided by the
seconds between the first and the last stored upload. So settle time and start-up are
left out, and the daemon and the sequential client are measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import baseline
from bench.data import PlannedFile, drop_folders, plan_files, write_planned
from bench.env import (
    CONSUMER_ID,
    ISSUER,
    BenchError,
    Context,
    DaemonProcess,
    StandInProcess,
    client_ids,
    make_install,
    state_counts,
    wait_until,
    write_credentials,
)
from bench.results import Figure, judged, reported

PHASE = "throughput"
FILE_BYTES = 100_000
CLIENTS = 20
LATENCY_MS = 30.0
SERVICE_LIMIT_PER_S = 10

#: The bound with the limit off: 4 uploads in flight, each taking at least 30 ms.
FOUR_WORKER_BOUND_PER_S = 4 / (LATENCY_MS / 1000)


@dataclass(frozen=True)
class Run:
    """
    The outcome of uploading one batch.

    Attributes:
        rate_per_s: Uploads per second between the first and the last receipt.
        rate_limited: 429 responses the stand-in sent.
        max_window: The maximum number of requests the stand-in saw in one second.
        cpu_ms_per_file: The daemon's CPU time per upload, or None for the baseline.
        received: The stand-in's records of the stored uploads.
        events: The daemon's log events, empty for the baseline.
    """

    rate_per_s: float
    rate_limited: int
    max_window: int
    cpu_ms_per_file: float | None = None
    received: list[dict[str, Any]] = field(default_factory=list, repr=False)
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)


def run(ctx: Context) -> list[Figure]:
    """Run every throughput measurement and return the figures."""
    figures = _limited_runs(ctx)
    figures += _unlimited_runs(ctx)
    return figures


def _limited_runs(ctx: Context) -> list[Figure]:
    count = 60 if ctx.quick else 1000
    figures = []
    best: tuple[float, str] | None = None
    for setting in (None, 9.5, 10.0):
        api = {} if setting is None else {"max_requests_per_second": setting}
        label = "default (9)" if setting is None else f"{setting:g}"
        ctx.progress(f"throughput: {count} files at max_requests_per_second {label}")
        result = measure_daemon(ctx, f"limited-{label.split()[0]}", count,
                                standin_limit=SERVICE_LIMIT_PER_S, api=api)
        figures.append(_limited_figure(count, label, result, judge=setting is None))
        if result.rate_limited == 0 and (best is None or result.rate_per_s > best[0]):
            best = (result.rate_per_s, label)
    best_text = f"{best[0]:.2f}/s at {best[1]}" if best else "every setting drew 429s"
    figures.append(reported(PHASE, "limit 10/s: best rate with zero 429s", best_text))
    return figures


def _limited_figure(count: int, label: str, result: Run, *, judge: bool) -> Figure:
    measure = f"limit 10/s, {count} files, max_requests_per_second {label}"
    value = (f"{result.rate_per_s:.2f}/s, {result.rate_limited} x 429, "
             f"max {result.max_window} req in 1 s")
    if not judge:
        return reported(PHASE, measure, value)
    met = result.rate_per_s >= 9.0 and result.rate_limited == 0
    return judged(PHASE, measure, value, ">= 9/s and 0 x 429", met)


def _unlimited_runs(ctx: Context) -> list[Figure]:
    count = 200 if ctx.quick else 1000
    ctx.progress(f"throughput: {count} files, limit off, 4 workers")
    four = measure_daemon(ctx, "unlimited-4", count, standin_limit=0,
                          api={"max_requests_per_second": 0})
    ctx.progress(f"throughput: {count} files, limit off, 16 workers")
    sixteen = measure_daemon(ctx, "unlimited-16", count, standin_limit=0,
                             api={"max_requests_per_second": 0}, upload={"workers": 16})
    ctx.progress(f"throughput: {count} files, limit off, sequential client")
    sequential = measure_baseline(ctx, count)
    ctx.progress(f"throughput: {count} files, limit off, 4 sequential clients at once")
    parallel = measure_baseline(ctx, count, clients=4)
    bound = 0.9 * FOUR_WORKER_BOUND_PER_S
    return [
        judged(PHASE, f"limit off, {count} files, 4 workers", f"{four.rate_per_s:.1f}/s "
               f"({four.rate_per_s / FOUR_WORKER_BOUND_PER_S:.0%} of 4 / 30 ms)",
               f">= {bound:.0f}/s (90 % of 133/s)", four.rate_per_s >= bound),
        reported(PHASE, "limit off, daemon CPU per upload, 4 workers",
                 f"{four.cpu_ms_per_file:.1f} ms"),
        reported(PHASE, f"limit off, {count} files, sequential client",
                 f"{sequential.rate_per_s:.1f}/s"),
        reported(PHASE, "limit off, 4 workers / sequential client",
                 f"{four.rate_per_s / sequential.rate_per_s:.2f} x"),
        reported(PHASE, f"limit off, {count} files, 4 sequential clients at once (reference)",
                 f"{parallel.rate_per_s:.1f}/s "
                 f"({parallel.rate_per_s / FOUR_WORKER_BOUND_PER_S:.0%} of 4 / 30 ms)"),
        reported(PHASE, f"limit off, {count} files, 16 workers (ceiling)",
                 f"{sixteen.rate_per_s:.1f}/s, daemon CPU {sixteen.cpu_ms_per_file:.1f} ms "
                 "per upload"),
    ]


# -- one batch ----------------------------------------------------------------------------


def measure_daemon(ctx: Context, name: str, count: int, *, standin_limit: int,
                   api: dict[str, Any] | None = None,
                   upload: dict[str, Any] | None = None) -> Run:
    """
    Upload ``count`` files through a fresh daemon and stand-in and return the rates.

    The daemon starts on an empty drop root. The files are written once its first scan
    has finished, so the watcher picks them up as it would in a clinic.
    """
    base = ctx.folder(f"{PHASE}/{name}")
    ids = client_ids(CLIENTS)
    with StandInProcess(base / "standin", write_credentials(base / "secrets"), ids,
                        latency_ms=LATENCY_MS, rate_limit=standin_limit,
                        cpus=ctx.cpus.standin) as standin:
        install = make_install(base / "install", standin, api=api or {},
                               upload=upload or {}, watch={"settle_seconds": 1})
        drop_folders(install.root, ids)
        planned = plan_files(ids, count, FILE_BYTES, seed=count)
        with DaemonProcess(install, ctx.cpus.daemon) as daemon:
            daemon.wait_started()
            cpu_before_s = daemon.sample().cpu_s
            files = write_planned(install.root, planned)
            _wait_uploaded(standin, install.ledger, count)
            cpu_s = daemon.sample().cpu_s - cpu_before_s
        result = _batch_result(standin, files, cpu_ms_per_file=cpu_s * 1000 / count)
    daemon.log.poll()
    return replace(result, events=daemon.log.events)


def _wait_uploaded(standin: StandInProcess, ledger: Path, count: int) -> None:
    # Allow for a rate well below the limited one before calling the run stuck.
    timeout_s = 60 + count / 3
    wait_until(lambda: standin.ok_count() >= count, timeout_s, f"{count} uploads", 0.5)
    # The last rows are committed just after their response.
    wait_until(lambda: state_counts(ledger).get("uploaded", 0) >= count, 30,
               "the ledger to record every upload")


def measure_baseline(ctx: Context, count: int, clients: int = 1) -> Run:
    """
    Upload ``count`` files with the sequential client, the limit off.

    With ``clients`` above 1, that many copies of the client run at once, each on its
    own share of the files.
    """
    base = ctx.folder(f"{PHASE}/sequential-{clients}")
    ids = client_ids(CLIENTS)
    creds = write_credentials(base / "secrets")
    with StandInProcess(base / "standin", creds, ids, latency_ms=LATENCY_MS, rate_limit=0,
                        cpus=ctx.cpus.standin) as standin:
        files = write_planned(base / "files", plan_files(ids, count, FILE_BYTES, seed=count))
        account = baseline.Account(standin.url, CONSUMER_ID, creds.secret, creds.access_token,
                                   ISSUER)
        pairs = [(base / "files" / f.rel_path, f.client_id) for f in files]
        if clients == 1:
            baseline.upload_all(account, pairs)
        else:
            baseline.upload_parallel(account, pairs, clients)
        return _batch_result(standin, files, cpu_ms_per_file=None)


def _batch_result(standin: StandInProcess, files: list[PlannedFile], *,
                  cpu_ms_per_file: float | None) -> Run:
    received = standin.received()
    stats = standin.stats()
    expected = {(f.client_id, f.sha256) for f in files}
    got = [(r["clientId"], r["sha256"]) for r in received]
    if len(got) != len(files) or set(got) != expected:
        raise BenchError(f"the stand-in stored {len(got)} uploads, {len(set(got) & expected)} "
                         f"of the {len(files)} expected (client, bytes) pairs")
    times = sorted(r["received_at"] for r in received)
    rate = (len(times) - 1) / (times[-1] - times[0])
    return Run(rate, stats["rate_limited"], stats["max_window"], cpu_ms_per_file, received)
