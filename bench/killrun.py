"""
Faults at volume: upload 500 files while the stand-in injects faults into 5 % of them
and the daemon is killed with SIGKILL 10 times at random moments, restarted each time.
Afterwards no file may be lost, and every file the stand-in stored more than once must
have a ledger row flagged ``possible_duplicate``.

Run on its own (from the repository root, in the virtualenv):

    .venv/bin/python -m bench.killrun --files 500 --kills 10 --fault-rate 0.05

It exits 0 when nothing was lost and every duplicate is flagged, and 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data import PlannedFile, drop_folders, plan_files, write_planned
from bench.env import (
    BenchError,
    Context,
    CpuPlan,
    DaemonProcess,
    Install,
    StandInProcess,
    client_ids,
    ledger_rows,
    make_install,
    state_counts,
    wait_until,
    write_credentials,
)
from bench.results import Figure, judged, reported

PHASE = "faults"
CLIENTS = 20

#: Faults the stand-in applies once the file part's name is known. Several of them
#: store the file and then hide the success, which is what produces duplicates.
NAMED_FAULTS: list[dict[str, Any]] = [
    {"kind": "status", "status": 503, "retry_after": "1"},
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 429},
    {"kind": "reset_after_body"},
    {"kind": "reset_after_store"},
    {"kind": "slow", "seconds": 2.0},
    {"kind": "bad_json_200"},
    {"kind": "wrong_size_200"},
]

#: Faults that hit whichever File request comes next, before its body is read.
NEXT_REQUEST_FAULTS: list[dict[str, Any]] = [
    {"kind": "refuse_early", "status": 503},
    {"kind": "reset_before_body"},
]

#: States after which the daemon has nothing more to do for a file without a person.
_UNFINISHED_STATES = ("waiting", "queued", "uploading", "deferred", "uncertain")

#: Latest kill after a start, in seconds; a start takes about one second.
_MAX_KILL_DELAY_S = 5.0


@dataclass
class KillRunResult:
    """
    The outcome of a kill run: what the stand-in stored and what the ledger recorded.

    Attributes:
        lost: Files whose bytes never reached their client.
        duplicates: Extra copies stored (a file stored 3 times counts 2).
        unflagged: Files stored more than once without a ``possible_duplicate`` row.
        false_flags: Files flagged ``possible_duplicate`` that the stand-in stored once,
            which someone would check in coreplus for nothing.
        wrong_client: Uploads of bytes that belong to no planned (client, file) pair.
        states: Ledger rows per state at the end.
        left_in_drop: Files still in the drop folders at the end.
    """

    files: int
    kills: int
    faults: int
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    unflagged: list[str] = field(default_factory=list)
    false_flags: int = 0
    wrong_client: int = 0
    states: dict[str, int] = field(default_factory=dict)
    left_in_drop: int = 0
    elapsed_s: float = 0.0

    def lines(self) -> list[str]:
        """Describe the result in a few plain lines."""
        return [
            f"files {self.files}, kills {self.kills}, injected faults {self.faults}, "
            f"{self.elapsed_s:.0f} s",
            f"lost: {len(self.lost)} {self.lost[:5] if self.lost else ''}".rstrip(),
            f"duplicates stored: {self.duplicates}, not flagged possible_duplicate: "
            f"{len(self.unflagged)} {self.unflagged[:5] if self.unflagged else ''}".rstrip(),
            f"flagged possible_duplicate but stored once: {self.false_flags}",
            f"uploads to a wrong client: {self.wrong_client}",
            f"ledger states: {dict(sorted(self.states.items()))}",
            f"files left in drop folders: {self.left_in_drop}",
        ]

    @property
    def passed(self) -> bool:
        """True when nothing was lost or misdirected and every duplicate is flagged."""
        return not self.lost and not self.unflagged and not self.wrong_client


class _Run:
    """One kill run: the stand-in, the installation, the planned files and the faults."""

    def __init__(self, standin: StandInProcess, install: Install, planned: list[tuple[
            PlannedFile, bytes]], rng: random.Random, progress: Callable[[str], None]) -> None:
        self.standin = standin
        self.install = install
        self.planned = planned
        self.rng = rng
        self.progress = progress
        self.faults = 0

    def queue_named_faults(self, count: int) -> None:
        """Queue ``count`` faults, each tied to a different random file's name."""
        chosen = self.rng.sample(self.planned, count)
        faults = [{**self.rng.choice(NAMED_FAULTS), "match_name": f.rel_path.rsplit("/", 1)[1]}
                  for f, _ in chosen]
        self.standin.control("POST", "faults", {"faults": faults})
        self.faults += count

    def queue_next_request_fault(self) -> None:
        """Queue one fault for whichever File request arrives next."""
        self.standin.control("POST", "faults", {"faults": [self.rng.choice(NEXT_REQUEST_FAULTS)]})
        self.faults += 1

    def kill_cycles(self, kills: int, waves: list[list[tuple[PlannedFile, bytes]]],
                    next_request_faults: int) -> None:
        """Start, write the next wave, and SIGKILL the daemon at a random moment, ``kills`` times."""
        fault_cycles = set(self.rng.sample(range(kills), min(kills, next_request_faults)))
        for cycle in range(kills):
            daemon = DaemonProcess(self.install).start()
            write_planned(self.install.root, waves[cycle + 1])
            if cycle in fault_cycles:
                self.queue_next_request_fault()
            time.sleep(self.rng.uniform(0.3, _MAX_KILL_DELAY_S))
            daemon.kill9()
            self.progress(f"killed the daemon ({cycle + 1} of {kills}), "
                          f"{self.standin.ok_count()} uploads stored so far")

    def finish(self, timeout_s: float) -> None:
        """Run the daemon until every file is handled, or ``timeout_s`` passes."""
        with DaemonProcess(self.install):
            try:
                wait_until(self._finished, timeout_s, "the last files to be handled", 0.5)
            except BenchError as exc:
                self.progress(f"kill run: {exc}; reporting what is there")

    def _finished(self) -> bool:
        counts = state_counts(self.install.ledger)
        return not any(counts.get(s) for s in _UNFINISHED_STATES) and not self.files_left()

    def files_left(self) -> int:
        return sum(1 for p in self.install.root.rglob("*") if p.is_file())


def run_killrun(work: Path, *, files: int, kills: int, fault_rate: float, seed: int,
                cpus: CpuPlan, progress: Callable[[str], None]) -> KillRunResult:
    """
    Run the whole kill scenario in ``work`` and return what happened.

    Args:
        files: Files to upload, spread over 20 clients, 1 KB to 200 KB each.
        kills: How many times the daemon is killed with SIGKILL.
        fault_rate: Share of files that meet an injected fault.
        seed: Seed for file contents, fault choice and kill timing.
    """
    started = time.monotonic()
    rng = random.Random(seed)
    ids = client_ids(CLIENTS)
    with StandInProcess(work / "standin", write_credentials(work / "secrets"), ids,
                        latency_ms=30, cpus=cpus.standin) as standin:
        install = make_install(work / "install", standin, watch={"settle_seconds": 1},
                               upload={"backoff_max_seconds": 5})
        drop_folders(install.root, ids)
        planned = plan_files(ids, files, (1000, 200_000), seed=seed, prefix="kill")
        run = _Run(standin, install, planned, rng, progress)
        total_faults = round(files * fault_rate)
        next_request_faults = min(kills, total_faults // 5)
        run.queue_named_faults(total_faults - next_request_faults)
        waves = [planned[i::kills + 1] for i in range(kills + 1)]
        write_planned(install.root, waves[0])
        run.kill_cycles(kills, waves, next_request_faults)
        progress("kill run: final start, waiting for the remaining files")
        run.finish(timeout_s=120 + files)
        result = _check(run, [f for f, _ in planned], kills)
    result.elapsed_s = time.monotonic() - started
    return result


def _check(run: _Run, planned: list[PlannedFile], kills: int) -> KillRunResult:
    """Compare what the stand-in stored with the planned files and the ledger's flags."""
    expected = {(f.client_id, f.sha256): f.rel_path for f in planned}
    stored = Counter((r["clientId"], r["sha256"]) for r in run.standin.received())
    flagged = set(ledger_rows(run.install.ledger, "SELECT client_id, sha256 FROM files "
                                                  "WHERE possible_duplicate = 1"))
    result = KillRunResult(len(planned), kills, run.faults)
    result.lost = sorted(path for pair, path in expected.items() if stored[pair] == 0)
    result.duplicates = sum(count - 1 for count in stored.values() if count > 1)
    result.unflagged = sorted(expected.get(pair, str(pair)) for pair, count in stored.items()
                              if count > 1 and pair not in flagged)
    result.false_flags = sum(1 for pair in flagged if stored[pair] == 1)
    result.wrong_client = sum(count for pair, count in stored.items() if pair not in expected)
    result.states = state_counts(run.install.ledger)
    result.left_in_drop = run.files_left()
    return result


# -- as a bench phase and on its own -----------------------------------------------------


def run(ctx: Context) -> list[Figure]:
    """Run the kill scenario as a bench phase and return its figures."""
    files, kills = (100, 3) if ctx.quick else (500, 10)
    ctx.progress(f"faults: {files} files, {kills} kills, 5 % faults")
    result = run_killrun(ctx.folder(PHASE), files=files, kills=kills, fault_rate=0.05,
                         seed=2024, cpus=ctx.cpus, progress=ctx.progress)
    conditions = f"{files} files, {kills} x kill -9, {result.faults} faults"
    unfinished = sum(result.states.get(s, 0) for s in (*_UNFINISHED_STATES, "held"))
    return [
        judged(PHASE, f"files lost, {conditions}", str(len(result.lost)), "0",
               not result.lost and not result.wrong_client),
        judged(PHASE, "duplicates stored / of them not flagged",
               f"{result.duplicates} / {len(result.unflagged)}", "each flagged",
               not result.unflagged),
        reported(PHASE, "files flagged as possible duplicates but stored once",
                 str(result.false_flags)),
        reported(PHASE, "files unfinished at the end (left in drop folders)",
                 f"{unfinished} ({result.left_in_drop})"),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the kill scenario from the command line; returns 0 when it passed."""
    parser = argparse.ArgumentParser(prog="python -m bench.killrun", description=__doc__
                                     .split("\n\n")[0].strip())
    parser.add_argument("--files", type=int, default=500, help="files to upload (default 500)")
    parser.add_argument("--kills", type=int, default=10,
                        help="times the daemon is killed with SIGKILL (default 10)")
    parser.add_argument("--fault-rate", type=float, default=0.05,
                        help="share of files that meet an injected fault (default 0.05)")
    parser.add_argument("--seed", type=int, default=2024, help="random seed (default 2024)")
    parser.add_argument("--workdir", type=Path,
                        help="scratch folder, kept afterwards (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="coreplus-killrun-"))

    def progress(message: str) -> None:
        print(f"[killrun {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    result = run_killrun(work, files=args.files, kills=args.kills, fault_rate=args.fault_rate,
                         seed=args.seed, cpus=CpuPlan.detect(), progress=progress)
    print("\n".join(result.lines()))
    print(f"logs and ledger: {work}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
