"""
Processes and files for one benchmark phase.

The stand-in and the daemon run as subprocesses on loopback, each daemon with its own
configuration, drop root, ledger and credentials (mode 0600) under a temporary folder.
This module starts and stops them, reads their CPU time, memory and I/O from /proc,
and follows the daemon's JSON log.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

#: The daemon's command, from the virtualenv that runs the bench.
UPLOADER_BIN = str(Path(sys.executable).parent / "coreplus-uploader")

CONSUMER_ID = "bench-consumer"
ISSUER = "https://bench.clinic.example"

_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(r"stand-in listening on (\S+)")
_GUID_NAMESPACE = uuid.UUID("6f0d6a52-3c1e-4c55-9a4e-0b6a3f2d7c11")


class BenchError(RuntimeError):
    """
    A phase could not run or finish, for example a process did not start in time.
    """


# -- clients and folders --------------------------------------------------------------


def client_ids(count: int) -> list[str]:
    """Return ``count`` fixed client GUIDs in lower case, the same on every run."""
    return [str(uuid.uuid5(_GUID_NAMESPACE, f"bench-client-{index}")) for index in range(count)]


def folder_name(index: int, client_id: str) -> str:
    """Return a drop folder name that maps to ``client_id`` through its bracketed GUID."""
    return f"Bench Client {index:03d} [{client_id}]"


def write_clients_file(path: Path, ids: list[str]) -> Path:
    """Write a client list for the stand-in's ``--clients`` option and return its path."""
    clients = [
        {"clientId": client_id, "firstName": f"Client{index:03d}", "lastName": "Benchclient"}
        for index, client_id in enumerate(ids)
    ]
    path.write_text(json.dumps(clients), "utf-8")
    return path


# -- CPU placement ----------------------------------------------------------------------


@dataclass(frozen=True)
class CpuPlan:
    """
    CPU lists for ``taskset -c``: the stand-in on the last CPU, the daemon on the rest,
    so a phase that measures the daemon's CPU does not share a core with the stand-in.
    ``None`` means the process is not pinned (one CPU, or no taskset).
    """

    standin: str | None
    daemon: str | None

    @classmethod
    def detect(cls) -> CpuPlan:
        """Build the plan from this process's CPU affinity."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(str(cpus[-1]), ",".join(str(cpu) for cpu in cpus[:-1]))


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """Prefix ``command`` with ``taskset -c cpus`` when ``cpus`` is set."""
    return ["taskset", "-c", cpus, *command] if cpus else command


# -- /proc readings ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProcSample:
    """
    One reading of a process from /proc.

    Attributes:
        cpu_s: User plus system CPU seconds used so far, all threads.
        rss_kib: Resident set size now (VmRSS).
        peak_rss_kib: Highest resident set size so far (VmHWM).
        rchar: Bytes returned by read-like system calls so far, page cache included.
    """

    cpu_s: float
    rss_kib: int
    peak_rss_kib: int
    rchar: int


def read_proc(pid: int) -> ProcSample:
    """
    Read CPU time, memory and read bytes of a running process.

    Raises:
        FileNotFoundError: The process has exited.
    """
    stat_text = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which may contain spaces, start at field 3 (state);
    # utime and stime are fields 14 and 15.
    after_name = stat_text[stat_text.rindex(")") + 2 :].split()
    cpu_s = (int(after_name[11]) + int(after_name[12])) / _CLOCK_TICKS_PER_S
    status = _colon_fields(Path(f"/proc/{pid}/status").read_text())
    io = _colon_fields(Path(f"/proc/{pid}/io").read_text())
    return ProcSample(cpu_s, int(status["VmRSS"].split()[0]),
                      int(status["VmHWM"].split()[0]), int(io["rchar"]))


def _colon_fields(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


# -- waiting ----------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               poll_s: float = 0.2) -> float:
    """
    Poll ``predicate`` until it returns True and return the seconds waited.

    Raises:
        BenchError: ``timeout_s`` passed first; the message names ``what``.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - start


# -- credentials ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """
    A random consumer secret and access token, each in an owner-only file.
    """

    secret: str = field(repr=False)
    access_token: str = field(repr=False)
    secret_file: Path
    access_token_file: Path


def write_credentials(folder: Path) -> Credentials:
    """Create ``folder`` (mode 0700) with fresh secret and token files (mode 0600)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret, token = secrets.token_urlsafe(32), secrets.token_hex(20)
    paths = folder / "secret", folder / "access-token"
    for path, value in zip(paths, (secret, token), strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
    return Credentials(secret, token, *paths)


# -- the stand-in -----------------------------------------------------------------------


def _storage_folder(work: Path) -> Path:
    """
    Return a new folder for the stand-in's received files.

    The folder is in /dev/shm when that exists, so the stand-in's writes do not compete
    with the daemon's fsyncs for the disk, just as coreplus's own storage would not.
    Otherwise it is under ``work``.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="coreplus-bench-standin-", dir=shm))
    return work / "received"


class StandInProcess:
    """
    A stand-in started with ``coreplus-uploader stand-in`` on a free loopback port.

    Args:
        work: A folder for its storage, client list and log.
        credentials: The secret and access token it accepts.
        client_list: The client GUIDs it accepts.
        latency_ms: Delay added before every API response.
        rate_limit: Requests allowed per second; 0 turns the limit off.
        cpus: A ``taskset -c`` CPU list, or None.
    """

    def __init__(self, work: Path, credentials: Credentials, client_list: list[str], *,
                 latency_ms: float = 0.0, rate_limit: int = 10, cpus: str | None = None) -> None:
        self.work = work
        self.storage = _storage_folder(work)
        self.credentials = credentials
        self._client_list = client_list
        self._options = ["--latency-ms", str(latency_ms), "--rate-limit", str(rate_limit)]
        self._cpus = cpus
        self._process: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()
        self.url = ""

    def start(self) -> StandInProcess:
        """Start the process and wait until it listens."""
        self.work.mkdir(parents=True, exist_ok=True)
        clients = write_clients_file(self.work / "clients.json", self._client_list)
        command = [UPLOADER_BIN, "stand-in", "--host", "127.0.0.1", "--port", "0",
                   "--consumer-id", CONSUMER_ID,
                   "--secret-file", str(self.credentials.secret_file),
                   "--access-token-file", str(self.credentials.access_token_file),
                   "--clients", str(clients), "--storage", str(self.storage), *self._options]
        out_path = self.work / "stand-in.out"
        with open(out_path, "wb") as out, open(self.work / "stand-in.log", "wb") as err:
            self._process = subprocess.Popen(pinned(command, self._cpus), stdout=out, stderr=err)
        wait_until(lambda: self._find_url(out_path), 30, "the stand-in to listen", 0.05)
        return self

    def _find_url(self, out_path: Path) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise BenchError(f"the stand-in exited with {self._process.returncode}; "
                             f"see {self.work / 'stand-in.log'}")
        match = _LISTENING.search(out_path.read_text("utf-8", "replace"))
        if match:
            self.url = match.group(1)
        return match is not None

    @property
    def pid(self) -> int:
        """The stand-in's process id."""
        assert self._process is not None
        return self._process.pid

    def control(self, method: str, path: str, body: Any = None) -> Any:
        """Call a ``/_standin/`` control endpoint and return the decoded JSON response."""
        response = self._http.request(method, f"{self.url}/_standin/{path}", json=body,
                                      timeout=120)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """Return the request counters (requests, by_status, rate_limited, max_window)."""
        result: dict[str, Any] = self.control("GET", "stats")
        return result

    def received(self) -> list[dict[str, Any]]:
        """Return every stored upload in arrival order."""
        result: list[dict[str, Any]] = self.control("GET", "received")
        return result

    def ok_count(self) -> int:
        """Return how many API requests got a 200 response."""
        return int(self.stats()["by_status"].get("200", 0))

    def stop(self) -> None:
        """Stop the process with SIGTERM and delete what it stored."""
        self._http.close()
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> StandInProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- one daemon installation ------------------------------------------------------------


@dataclass
class Install:
    """
    The files of one daemon installation under ``base``.

    Attributes:
        tables: The configuration written to ``config_path``, table by table.
    """

    base: Path
    root: Path
    archive: Path
    failed: Path
    ledger: Path
    config_path: Path
    tables: dict[str, dict[str, Any]]

    @property
    def settle_s(self) -> float:
        """The configured ``watch.settle_seconds``, or its default of 5."""
        return float(self.tables["watch"].get("settle_seconds", 5))


def make_install(base: Path, standin: StandInProcess,
                 **overrides: dict[str, Any]) -> Install:
    """
    Create the folders and configuration of a daemon talking to ``standin``.

    Every key not given in ``overrides`` (table name to keys) keeps the daemon's
    default, except the log, which is JSON at info level so the bench can read it.
    """
    root, archive, failed, state = (base / n for n in ("drop", "archive", "failed", "state"))
    root.mkdir(parents=True, exist_ok=True)
    state.mkdir(mode=0o700, exist_ok=True)
    creds = standin.credentials
    tables: dict[str, dict[str, Any]] = {
        "api": {"base_url": standin.url, "consumer_id": CONSUMER_ID, "issuer": ISSUER,
                "secret_file": str(creds.secret_file),
                "access_token_file": str(creds.access_token_file)},
        "watch": {"root": str(root)},
        "upload": {"archive_dir": str(archive), "failed_dir": str(failed)},
        "ledger": {"path": str(state / "ledger.sqlite3")},
        "log": {"format": "json", "level": "info"},
    }
    for table, values in overrides.items():
        tables.setdefault(table, {}).update(values)
    config_path = base / "config.toml"
    config_path.write_text(render_toml(tables), "utf-8")
    return Install(base, root, archive, failed, state / "ledger.sqlite3", config_path, tables)


def render_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write tables of strings, numbers, booleans and lists as TOML."""
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{json.dumps(key)} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))


# -- the daemon's log -------------------------------------------------------------------


def event_time(event: dict[str, Any]) -> float:
    """Return a log event's ``timestamp`` (ISO 8601 with offset) as unix seconds."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


class EventLog:
    """
    Read a daemon's JSON log lines as they are written, keeping every event.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        """Parse lines added since the last call; return the new events."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as log_file:
            log_file.seek(self._offset)
            data = self._partial + log_file.read()
            self._offset = log_file.tell()
        *lines, self._partial = data.split(b"\n")
        new = [event for event in map(_parse_event, lines) if event is not None]
        self.events += new
        return new

    def named(self, name: str) -> list[dict[str, Any]]:
        """Return every event called ``name`` read so far."""
        self.poll()
        return [event for event in self.events if event.get("event") == name]


def _parse_event(line: bytes) -> dict[str, Any] | None:
    # aiohttp and asyncio warnings go to the same stream as plain text lines.
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- the daemon -------------------------------------------------------------------------


class DaemonProcess:
    """
    ``coreplus-uploader run`` as a subprocess, with its log in the installation folder.

    Several starts (after a kill) append to the same log.
    """

    def __init__(self, install: Install, cpus: str | None = None) -> None:
        self.install = install
        self.log = EventLog(install.base / "daemon.log")
        self._cpus = cpus
        self._process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> DaemonProcess:
        """Start the daemon; returns at once (see ``wait_started``)."""
        command = [UPLOADER_BIN, "run", "--config", str(self.install.config_path)]
        with open(self.log.path, "ab") as out, \
                open(self.install.base / "daemon.stderr", "ab") as err:
            self.started_at = time.time()
            self._process = subprocess.Popen(pinned(command, self._cpus), stdout=out, stderr=err)
        return self

    @property
    def pid(self) -> int:
        """The running daemon's process id."""
        assert self._process is not None
        return self._process.pid

    def running(self) -> bool:
        """Return True while the process has not exited."""
        return self._process is not None and self._process.poll() is None

    def sample(self) -> ProcSample:
        """Read the process's CPU time, memory and read bytes."""
        return read_proc(self.pid)

    def wait_event(self, name: str, timeout_s: float, after: float = 0.0) -> dict[str, Any]:
        """
        Wait for the first event ``name`` logged at or after unix time ``after``.

        Raises:
            BenchError: The daemon exited, or ``timeout_s`` passed first.
        """
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            if not self.running():
                raise BenchError(f"the daemon exited before logging {name}; see the log "
                                 f"and stderr in {self.install.base}")
            found[:] = [e for e in self.log.named(name) if event_time(e) >= after - 0.001]
            return bool(found)

        wait_until(seen, timeout_s, f"the daemon's {name} event", 0.05)
        return found[0]

    def wait_started(self, timeout_s: float = 120) -> dict[str, Any]:
        """Wait until this start's first scan has finished and return that event."""
        return self.wait_event("scan.finished", timeout_s, after=self.started_at)

    def stop(self, timeout_s: float = 60) -> int:
        """Send SIGTERM, wait for the exit and return the exit code."""
        if self._process is None:
            return 0
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            return self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise BenchError(f"the daemon did not stop within {timeout_s:.0f} s of SIGTERM; "
                             "it was killed") from None

    def kill9(self) -> None:
        """Kill the daemon with SIGKILL, as a power cut or the OOM killer would."""
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        self._process.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running():
            self.stop()


# -- reading the ledger -----------------------------------------------------------------


def ledger_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """
    Run a read-only query on a ledger, which the daemon may have open at the same time.

    Returns an empty list while the daemon is still creating the ledger.
    """
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        db.close()


def state_counts(path: Path) -> dict[str, int]:
    """Return how many ledger rows are in each state."""
    rows = ledger_rows(path, "SELECT state, COUNT(*) FROM files GROUP BY state")
    return {state: count for state, count in rows}


# -- what every phase gets --------------------------------------------------------------


@dataclass
class Context:
    """
    Settings shared by the phases of one bench run.

    Attributes:
        work: A scratch folder; each phase uses a subfolder.
        quick: Run small versions of every phase.
        cpus: Where to pin the stand-in and the daemon.
        cache: Data that one phase builds and a later one reuses.
    """

    work: Path
    quick: bool
    cpus: CpuPlan
    cache: dict[str, Any] = field(default_factory=dict)

    def progress(self, message: str) -> None:
        """Print a progress line to stderr, so stdout carries only the table."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def folder(self, name: str) -> Path:
        """Return the scratch subfolder ``name``, created empty if it does not exist."""
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path
