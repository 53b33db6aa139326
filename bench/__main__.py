"""
Run the benchmark phases one after another and print one table of figures and budgets.

Usage (from the repository root): ``bench/run [--quick] [--only PHASE ...]``, or
``.venv/bin/python -m bench`` in an existing virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

from bench import idle, killrun, latency, ledgerscale, memory, throughput
from bench.env import BenchError, Context, CpuPlan
from bench.results import Figure, failed_phase, render_table

#: Phases in the order they run; memory builds the archive that idle reuses.
PHASES: dict[str, Callable[[Context], list[Figure]]] = {
    "throughput": throughput.run,
    "latency": latency.run,
    "memory": memory.run,
    "idle": idle.run,
    "ledger": ledgerscale.run,
    "faults": killrun.run,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Benchmark the daemon against the stand-in on "
        "loopback and print a table of figures next to their budgets.")
    parser.add_argument("--quick", action="store_true",
                        help="run small versions of every phase (about 3 minutes)")
    parser.add_argument("--only", nargs="+", choices=list(PHASES), metavar="PHASE",
                        help=f"run only these phases: {', '.join(PHASES)}")
    parser.add_argument("--workdir", type=Path,
                        help="scratch folder (default: a new folder under $TMPDIR, "
                        "deleted afterwards)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch folder, with every log, for inspection")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the machine description and figures to FILE")
    return parser.parse_args(argv)


def machine() -> dict[str, str]:
    """Describe this machine for the record: CPU model, CPU count, Python, load."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"commit": _commit(), "cpu": model, "nproc": str(os.cpu_count()),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "kernel": platform.release(), "load average at start": load}


def _commit() -> str:
    """Return the checkout's short commit id, marked when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} with local changes" if changed else head


def run_phases(ctx: Context, names: list[str]) -> list[Figure]:
    """Run the named phases in order; a phase that fails adds one row and the rest go on."""
    figures: list[Figure] = []
    for name in names:
        started = time.monotonic()
        try:
            figures += PHASES[name](ctx)
        except (BenchError, OSError, requests.RequestException, sqlite3.Error,
                subprocess.SubprocessError) as exc:
            ctx.progress(f"{name}: failed: {exc}")
            figures.append(failed_phase(name, exc))
        ctx.progress(f"{name}: done in {time.monotonic() - started:.0f} s")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run the bench and print the table; returns 1 when a budget was missed."""
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="coreplus-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(work, args.quick, CpuPlan.detect())
    described = machine()
    ctx.progress(f"scratch folder {work}; stand-in CPU {ctx.cpus.standin}, "
                 f"daemon CPUs {ctx.cpus.daemon}")
    started = time.monotonic()
    try:
        figures = run_phases(ctx, [name for name in PHASES if name in (args.only or PHASES)])
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    described["bench minutes"] = f"{(time.monotonic() - started) / 60:.1f}"
    described["mode"] = "quick" if args.quick else "full"
    for key, value in described.items():
        print(f"{key}: {value}")
    print()
    print(render_table(figures))
    if args.json is not None:
        document = {"machine": described, "figures": [f.as_dict() for f in figures]}
        args.json.write_text(json.dumps(document, indent=2) + "\n", "utf-8")
    return 1 if any(f.verdict == "MISSED" for f in figures) else 0


if __name__ == "__main__":
    sys.exit(main())
