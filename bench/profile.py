"""
Profile one throughput batch: where each worker's time goes between two uploads, and
(when py-spy is installed in the virtualenv) which code each daemon thread runs.

Run from the repository root, in the virtualenv:

    .venv/bin/python -m bench.profile --workers 4 --files 1000

The stage times come from the daemon's log and the stand-in's receipt times, so they
need no profiler. The py-spy samples (200 per second, every thread) are written to
``--workdir`` as collapsed stacks, which speedscope or flamegraph.pl can draw.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench import throughput
from bench.env import Context, CpuPlan, DaemonProcess, event_time

#: py-spy, if it was installed into the same virtualenv.
PY_SPY = Path(sys.executable).parent / "py-spy"


def stage_times_ms(run: throughput.Run, workers: int,
                   latency_s: float = throughput.LATENCY_MS / 1000) -> dict[str, float]:
    """
    Split the time a worker spends per upload into stages, as means in milliseconds.

    The first stage runs from taking the row to ``upload.started``, which covers the
    duplicate lookup and the ``uploading`` commit before the first byte. The second runs
    from there until the stand-in has stored the file, and the third is the stand-in's
    added latency. The rest of the slot covers reading the response and starting the
    next row. The ``uploaded`` commit and the archive move run after the slot is freed,
    so their time is reported separately.
    """
    stored_at = {record["name"]: record["received_at"] for record in run.received}
    started = {_name(e): event_time(e) for e in run.events if e["event"] == "upload.started"}
    succeeded = [e for e in run.events if e["event"] == "upload.succeeded"]
    stages: dict[str, list[float]] = defaultdict(list)
    record_times: list[float] = []
    for event in succeeded:
        name, done = _name(event), event_time(event)
        begun = done - event["elapsed_ms"] / 1000
        stages["row taken to upload.started"].append(started[name] - begun)
        stages["upload.started to stored by the stand-in"].append(stored_at[name] - started[name])
        stages["stand-in latency"].append(latency_s)
        record_times.append(done - stored_at[name] - latency_s)
    first_begun = min(event_time(e) - e["elapsed_ms"] / 1000 for e in succeeded)
    span_s = max(event_time(e) for e in succeeded) - first_begun
    slot_ms = span_s * workers / len(succeeded) * 1000
    means = {stage: statistics.mean(values) * 1000 for stage, values in stages.items()}
    means["rest of the slot (response, next row)"] = slot_ms - sum(means.values())
    means["worker slot per upload"] = slot_ms
    means["after the slot: response to uploaded committed"] = statistics.mean(record_times) * 1000
    return means


def _name(event: dict[str, Any]) -> str:
    return str(event["path"]).rsplit("/", 1)[-1]


def summarise_stacks(path: Path, top: int = 8) -> list[str]:
    """Return, per thread, the sample count and its most frequent innermost frames."""
    per_thread: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        thread = frames[0].rsplit(":", 1)[-1].strip()
        innermost = ";".join(frame.split(" (")[0] for frame in frames[-2:])
        per_thread[thread][innermost] += int(count)
    lines = []
    for thread, counter in sorted(per_thread.items(), key=lambda i: -sum(i[1].values()))[:6]:
        lines.append(f"{thread}: {sum(counter.values())} samples")
        lines += [f"    {count:6d}  {frame}" for frame, count in counter.most_common(top)]
    return lines


def _attach_py_spy(out: Path, spies: list[subprocess.Popen[bytes]]) -> None:
    """Make every daemon started from now on run under ``py-spy record``."""
    original = DaemonProcess.start

    def start(self: DaemonProcess) -> DaemonProcess:
        original(self)
        command = [str(PY_SPY), "record", "--pid", str(self.pid), "--rate", "200",
                   "--threads", "--format", "raw", "--output", str(out)]
        spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        return self

    DaemonProcess.start = start  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """Profile one batch and print the stage times and the busiest frames."""
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__
                                     .split("\n\n")[0].strip())
    parser.add_argument("--workers", type=int, default=4, help="upload.workers (default 4)")
    parser.add_argument("--files", type=int, default=1000, help="files to upload (default 1000)")
    parser.add_argument("--workdir", type=Path, help="scratch folder, kept afterwards")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="coreplus-profile-"))
    ctx = Context(work, quick=False, cpus=CpuPlan.detect())
    stacks = work / "py-spy.txt"
    spies: list[subprocess.Popen[bytes]] = []
    if PY_SPY.exists():
        _attach_py_spy(stacks, spies)
    else:
        ctx.progress(f"{PY_SPY} not found: stage times only (pip install py-spy into .venv)")
    run = throughput.measure_daemon(ctx, f"profile-{args.workers}", args.files,
                                    standin_limit=0, api={"max_requests_per_second": 0},
                                    upload={"workers": args.workers})
    for spy in spies:
        _wait_for_spy(spy)
    print(f"{args.files} files, {args.workers} workers, limit off: {run.rate_per_s:.1f}/s, "
          f"daemon CPU {run.cpu_ms_per_file:.1f} ms per upload")
    for stage, value_ms in stage_times_ms(run, args.workers).items():
        print(f"  {value_ms:7.1f} ms  {stage}")
    if stacks.exists():
        print("\n".join(summarise_stacks(stacks)))
        print(f"collapsed stacks: {stacks}")
    return 0


def _wait_for_spy(spy: subprocess.Popen[bytes]) -> None:
    # py-spy writes its output when the profiled process exits.
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
