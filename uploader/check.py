"""
The ``check`` command: find what would stop the service before it is started.

It validates the configuration and reads the installed systemd unit (its user,
writable paths, credentials and stop timeout). As the unit's user, it tests that the
drop root and the output folders can be read and written. It checks where the secret
and access token come from, checks the ledger and its filesystem, and reports the
clock's sync state. With ``online`` it also signs one request to the coreplus Client
list and looks up every mapped client id, so that a mistyped GUID that points at
another patient is caught before a letter goes to the wrong record. It also logs in
to the alert mail server.

Each result is a ``Finding`` (ok, warning or error). Nothing here changes the ledger,
and the only files written are a hidden probe file in each folder that must be
writable, removed at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import grp
import json
import os
import pwd
import shutil
import smtplib
import sqlite3
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from uploader.alerts import AlertDeliveryError, connect_smtp, read_password
from uploader.config import Config, load_config
from uploader.constants import CLOCK_SKEW_WARN_S, ExitCode
from uploader.credentials import (
    SYSTEMD_ACCESS_TOKEN_NAME,
    SYSTEMD_SECRET_NAME,
    Credentials,
    load_credentials,
)
from uploader.exceptions import (
    ConfigError,
    CredentialsError,
    RetryableUploadError,
    ServicePausedError,
    UploadError,
)
from uploader.folders import normalise_alias, parse_guid, resolve_folder
from uploader.ledger import SCHEMA_VERSION, LedgerLock

Level = Literal["ok", "warning", "error"]

#: The unit's file name, and where systemd looks for it, most specific first.
UNIT_NAME = "coreplus-uploader.service"
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/system"),
             Path("/usr/local/lib/systemd/system"), Path("/usr/lib/systemd/system"),
             Path("/lib/systemd/system"))

#: Filesystem types on which SQLite's WAL mode and its locks are not safe.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "ceph", "glusterfs", "afs", "9p",
    "lustre", "gpfs", "davfs", "fuse.sshfs", "fuse.glusterfs", "fuse.rclone", "fuse.s3fs",
})

#: At most this many entries under the drop root are tested for access.
MAX_PROBED_ENTRIES = 20_000

#: At most this many access problems are listed; the rest are counted.
MAX_LISTED_PROBLEMS = 10

#: Client list page size for the GUID look-up; the stand-in allows up to 100.
PAGE_SIZE = 100

# Kernel clock facts (linux/timex.h): TIME_ERROR means "not synchronised", and a
# maximum error of 16 s or more is what the kernel reports when no time daemon runs.
_TIME_ERROR = 5
_UNSYNCED_MAX_ERROR_US = 16_000_000


@dataclass(frozen=True)
class Finding:
    """
    One result of the check.

    Attributes:
        level: "ok", "warning" (works, but should be looked at) or "error".
        topic: What was checked, e.g. "config", "unit", "access", "secrets".
        message: A plain sentence naming the value and, for problems, the fix.
        exit_code: The exit code an error maps to (2, 3 or 75); ignored otherwise.
    """

    level: Level
    topic: str
    message: str
    exit_code: int = ExitCode.USAGE


@dataclass(frozen=True)
class UnitInfo:
    """
    The settings of the installed unit that ``check`` compares with the configuration.
    """

    path: Path
    """The unit file read (drop-ins are merged into the values below)."""
    user: str | None = None
    group: str | None = None
    read_write_paths: tuple[str, ...] = ()
    state_directories: tuple[str, ...] = ()
    credentials: Mapping[str, str] = field(default_factory=dict)
    """``LoadCredential=`` name -> source path."""
    requires_mounts_for: tuple[str, ...] = ()
    timeout_stop_s: float | None = None


@dataclass
class CheckReport:
    """
    Everything ``check`` found, for the text report and ``--json``.
    """

    config_path: Path
    findings: list[Finding] = field(default_factory=list)
    credentials_source: str | None = None
    unit: str | None = None
    user: str | None = None
    clients: list[dict[str, Any]] = field(default_factory=list)

    def add(self, level: Level, topic: str, message: str,
            exit_code: int = ExitCode.USAGE) -> None:
        """Record one finding."""
        self.findings.append(Finding(level, topic, message, exit_code))

    @property
    def errors(self) -> list[Finding]:
        """The findings that stop the service from working."""
        return [finding for finding in self.findings if finding.level == "error"]

    def exit_code(self) -> int:
        """0 without errors; else 2 for configuration, 3 for the ledger, 75 temporary."""
        codes = {finding.exit_code for finding in self.errors}
        for code in (ExitCode.USAGE, ExitCode.LEDGER_UNAVAILABLE, ExitCode.TEMPORARY):
            if code in codes:
                return code
        return ExitCode.OK

    def as_json(self) -> dict[str, Any]:
        """Return the report as plain data for JSON."""
        return {"config": str(self.config_path), "ok": not self.errors,
                "exit_code": self.exit_code(), "unit": self.unit, "user": self.user,
                "credentials_source": self.credentials_source,
                "findings": [asdict(finding) for finding in self.findings],
                "clients": self.clients}


# --- the systemd unit -------------------------------------------------------------------


def parse_unit_text(text: str, values: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """
    Read ``Key=value`` lines of a unit file or drop-in into lists per key.

    A later assignment adds to the list and an empty one clears it, as systemd does for
    list settings; for single-value settings the caller takes the last item. Comments,
    section headers and backslash continuations are handled.

    Args:
        text: The file's text.
        values: Values read from earlier files, updated in place.
    """
    result = values if values is not None else {}
    joined = text.replace("\\\n", " ")
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if value:
            result.setdefault(key, []).append(value)
        else:
            result[key] = []
    return result


def parse_timespan_s(text: str) -> float | None:
    """
    Convert a systemd time span ("90", "90s", "1min 30s", "infinity") to seconds.

    Returns:
        Seconds, ``inf`` for "infinity", or None when the text is not a time span.
    """
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60,
             "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600,
             "hours": 3600}
    text = text.strip()
    if text == "infinity":
        return float("inf")
    total = 0.0
    for word in text.replace(" ", "\n").split():
        number = word.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = word[len(number):] or "s"
        try:
            total += float(number) * units[unit]
        except (ValueError, KeyError):
            return None
    return total


def find_unit(unit_path: Path | None = None) -> Path | None:
    """Return the unit file given, or else the installed one that systemd would use."""
    if unit_path is not None:
        return unit_path
    for folder in UNIT_DIRS:
        if (folder / UNIT_NAME).is_file():
            return folder / UNIT_NAME
    return None


def read_unit(path: Path) -> UnitInfo:
    """
    Read a unit file and its drop-ins (``<name>.d/*.conf`` beside it and in /etc).

    Raises:
        OSError: The unit file cannot be read.
    """
    values = parse_unit_text(path.read_text("utf-8"))
    drop_in_dirs = [path.parent / f"{path.name}.d", Path("/etc/systemd/system") / f"{path.name}.d"]
    seen: set[Path] = set()
    for folder in drop_in_dirs:
        if folder in seen or not folder.is_dir():
            continue
        seen.add(folder)
        for drop_in in sorted(folder.glob("*.conf")):
            parse_unit_text(drop_in.read_text("utf-8"), values)

    def last(key: str) -> str | None:
        return values[key][-1] if values.get(key) else None

    def words(key: str) -> tuple[str, ...]:
        return tuple(word.lstrip("-+") for value in values.get(key, []) for word in value.split())

    credentials = {}
    for value in values.get("LoadCredential", []):
        name, _, source = value.partition(":")
        credentials[name] = source
    timeout = last("TimeoutStopSec") or last("TimeoutSec")
    return UnitInfo(path=path, user=last("User"), group=last("Group"),
                    read_write_paths=words("ReadWritePaths"),
                    state_directories=words("StateDirectory"), credentials=credentials,
                    requires_mounts_for=words("RequiresMountsFor"),
                    timeout_stop_s=parse_timespan_s(timeout) if timeout else None)


def _covered(path: Path, prefixes: list[str]) -> bool:
    return any(path == Path(prefix) or Path(prefix) in path.parents for prefix in prefixes)


def check_unit(report: CheckReport, config: Config, unit: UnitInfo) -> None:
    """Compare the unit's user, writable paths, mounts and stop timeout with the config."""
    report.add("ok", "unit", f"Read the unit {unit.path} (user {unit.user or 'root'}).")
    writable = list(unit.read_write_paths) + [f"/var/lib/{name}" for name in unit.state_directories]
    for key, folder in _output_folders(config):
        if not _covered(folder, writable):
            report.add("error", "unit", f"{key} {folder} is not writable under the unit's "
                       "ProtectSystem=strict. Add it to ReadWritePaths= (systemctl edit "
                       "coreplus-uploader), or move it under a path listed there.")
    if not _covered(config.watch.root, list(unit.requires_mounts_for)):
        report.add("warning", "unit", f"RequiresMountsFor= does not name the drop root "
                   f"{config.watch.root}, so the service may start before its disk or share "
                   "is mounted. Add it with systemctl edit coreplus-uploader.")
    grace_s = config.upload.shutdown_grace_seconds
    if unit.timeout_stop_s is not None and unit.timeout_stop_s <= grace_s:
        report.add("error", "unit", f"TimeoutStopSec= ({unit.timeout_stop_s:g} s) is not longer "
                   f"than upload.shutdown_grace_seconds ({grace_s:g} s), so systemd would kill "
                   "uploads in flight at every stop. Raise TimeoutStopSec= or lower the grace.")


def _output_folders(config: Config) -> list[tuple[str, Path]]:
    folders = [("watch.root", config.watch.root), ("upload.failed_dir", config.upload.failed_dir),
               ("ledger.path's folder", config.ledger.path.parent)]
    if config.upload.archive_dir is not None:
        folders.insert(1, ("upload.archive_dir", config.upload.archive_dir))
    return folders


# --- filesystems and paths ------------------------------------------------------------


def _unescape_mount(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(escape, char)
    return text


def filesystem_type(path: Path) -> str | None:
    """
    Return the filesystem type of the mount that contains ``path`` (or its nearest
    existing parent).

    Returns:
        The type, such as "ext4" or "nfs4", or None when it cannot be found.
    """
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    return mount_type(str(target.resolve()), mountinfo)


def mount_type(path: str, mountinfo: str) -> str | None:
    """
    Return the type of the longest mount point in ``mountinfo`` that contains ``path``.

    Args:
        path: An absolute path with symbolic links resolved.
        mountinfo: Text in the format of /proc/self/mountinfo.
    """
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        left, separator, right = line.partition(" - ")
        fields = left.split()
        if not separator or len(fields) < 5 or not right.split():
            continue
        mount_point = _unescape_mount(fields[4])
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        # ">=" so that a later mount on the same point, which hides the earlier, wins.
        if inside and (best is None or len(mount_point) >= len(best[0])):
            best = (mount_point, right.split()[0])
    return best[1] if best else None


def check_paths(report: CheckReport, config: Config) -> None:
    """Check the drop root, the output folders and the filesystems they live on."""
    root = config.watch.root
    if not root.is_dir():
        report.add("error", "paths", f"The drop root {root} (watch.root) does not exist or is "
                   "not a folder. Create it, or correct watch.root.")
    else:
        report.add("ok", "paths", f"The drop root {root} exists.")
    real_root = root.resolve()
    for key, folder in _output_folders(config)[1:]:
        real = folder.resolve()
        if real == real_root or real_root in real.parents or real in real_root.parents:
            report.add("error", "paths", f"{key} {folder} overlaps the drop root {root} once "
                       "symbolic links are followed. Move it outside the drop root.")
    ledger_fs = filesystem_type(config.ledger.path)
    if ledger_fs in NETWORK_FILESYSTEMS:
        report.add("error", "ledger", f"The ledger {config.ledger.path} is on a {ledger_fs} "
                   "network filesystem, where SQLite's WAL mode and locks are not safe. Set "
                   "ledger.path to a local disk, e.g. /var/lib/coreplus-uploader/ledger.sqlite3.")
    elif ledger_fs is None:
        report.add("warning", "ledger", f"The filesystem type under {config.ledger.path} could "
                   "not be read from /proc/self/mountinfo. Make sure it is a local disk.")
    else:
        report.add("ok", "ledger", f"The ledger's folder is on a local {ledger_fs} filesystem.")
    root_fs = filesystem_type(root)
    if root_fs in NETWORK_FILESYSTEMS and not config.watch.force_polling:
        report.add("warning", "paths", f"The drop root is on a {root_fs} network mount, where "
                   "inotify does not see files written by other machines. Set "
                   "watch.force_polling = true.")


# --- access as the unit's user ---------------------------------------------------------


def probe_access(request: dict[str, Any]) -> dict[str, Any]:
    """
    Test access as the current user; runs in a child process as the unit's user.

    Args:
        request: ``root`` (the drop root), ``root_exists`` (whether the caller sees
            it), ``writable`` (pairs of a folder that must be writable and, when
            it does not exist yet, its nearest existing parent) and ``readable``
            (files that must be readable).

    Returns:
        ``problems`` (sentences), ``problem_count`` and ``probed`` (entries tested).
    """
    problems: list[str] = []
    root = request["root"]
    probed = 0
    if os.path.isdir(root):
        probed = _probe_tree(root, problems)
    elif request.get("root_exists"):
        problems.append(f"cannot reach the drop root {root} (no search access to a folder "
                        "above it)")
    for folder, parent in request["writable"]:
        _probe_writable(folder, problems, parent)
    for path in request["readable"]:
        if not os.access(path, os.R_OK):
            problems.append(f"cannot read {path}")
    return {"problems": problems[:MAX_LISTED_PROBLEMS], "problem_count": len(problems),
            "probed": probed}


def _probe_tree(root: str, problems: list[str]) -> int:
    _probe_writable(root, problems)
    count = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                problems.append(f"cannot list, add to or remove from the folder {path}")
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and not os.access(path, os.R_OK):
                problems.append(f"cannot read {path}")
        count += len(dirs) + len(files)
        if count >= MAX_PROBED_ENTRIES:
            break
    return count


def _probe_writable(folder: str, problems: list[str], parent: str | None = None) -> None:
    """
    Test that files can be created in ``folder``; when the caller saw that it does not
    exist yet, test ``parent``, its nearest existing folder, instead.
    """
    if parent is not None:
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"cannot create {folder}: no write access to {parent}")
        return
    if not os.path.isdir(folder):
        problems.append(f"cannot reach {folder} (no search access to a folder above it)")
        return
    try:
        fd, temp = tempfile.mkstemp(prefix=".coreplus-check-", suffix=".tmp", dir=folder)
    except OSError as exc:
        problems.append(f"cannot create files in {folder}: {exc.strerror}")
        return
    os.close(fd)
    os.unlink(temp)


def _run_probe_as(user: pwd.struct_passwd, request: dict[str, Any]) -> dict[str, Any]:
    """
    Run ``probe_access`` in a forked child that has dropped to the user's ids and groups.

    A fork rather than a new interpreter, because the interpreter itself may lie where
    that user cannot read (a virtual environment under /root, for example).

    Raises:
        OSError: The child could not switch user or did not report back.
    """
    groups = [g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its result is checked by the parent
        os.close(read_fd)
        code = 0
        try:
            os.setgroups(groups)
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            result: dict[str, Any] = probe_access(request)
        except OSError as exc:
            result, code = {"error": str(exc)}, 1
        with os.fdopen(write_fd, "wb") as out:
            out.write(json.dumps(result).encode())
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise OSError(f"the access test as {user.pw_name} ended without a result") from None
    if "error" in answer:
        raise OSError(f"the access test as {user.pw_name} failed: {answer['error']}")
    return answer


def _writable_request(config: Config, unit: UnitInfo | None) -> list[tuple[str, str | None]]:
    """Folders to test for writing, each with its nearest existing parent if missing."""
    managed = [Path("/var/lib") / name for name in unit.state_directories] if unit else []
    pairs: list[tuple[str, str | None]] = []
    for _, folder in _output_folders(config)[1:]:
        if folder.exists():
            pairs.append((str(folder), None))
        elif not _covered(folder, [str(path) for path in managed]):
            parent = folder
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            pairs.append((str(folder), str(parent)))
    return pairs


def check_access(report: CheckReport, config: Config, unit: UnitInfo | None,
                 readable: list[Path]) -> None:
    """
    Check, as the unit's user, that the drop root and output folders can be used.

    Folders systemd creates for the unit (``StateDirectory=``) are not required to
    exist yet.
    """
    current = pwd.getpwuid(os.geteuid())
    name = (unit.user if unit else None) or current.pw_name
    report.user = name
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        report.add("error", "access", f"The unit runs as user {name}, which does not exist. "
                   f"Create it: adduser --system --group --home /var/lib/{name} {name}")
        return
    request = {"root": str(config.watch.root), "root_exists": config.watch.root.is_dir(),
               "writable": _writable_request(config, unit),
               "readable": [str(path) for path in readable]}
    try:
        if user.pw_uid == current.pw_uid:
            result = probe_access(request)
        elif os.geteuid() == 0:
            result = _run_probe_as(user, request)
        else:
            report.add("warning", "access", f"Access was not tested: run check as root or as "
                       f"{name} to test what the service may read and write.")
            return
    except OSError as exc:
        report.add("error", "access", f"The access test as {name} did not run: {exc}")
        return
    _report_access(report, name, result)


def _report_access(report: CheckReport, name: str, result: dict[str, Any]) -> None:
    count = result["problem_count"]
    if not count:
        report.add("ok", "access", f"User {name} can read and write the drop root "
                   f"({result['probed']} entries tested) and the output folders.")
        return
    listed = "; ".join(result["problems"])
    hidden = count - len(result["problems"])
    more = f"; and {hidden} more" if hidden else ""
    report.add("error", "access", f"User {name} {listed}{more}. Give the service's group "
               "read and write access (chgrp -R and chmod -R g+rwX, with the setgid bit on "
               "folders, or force group in the Samba share).")


# --- secrets ---------------------------------------------------------------------------


def check_secrets(report: CheckReport, config: Config, unit: UnitInfo | None,
                  environ: Mapping[str, str]) -> Credentials | None:
    """
    Find the secret source the service would use, check it and load the credentials.

    Returns:
        The credentials, or None after an error.
    """
    wanted = (SYSTEMD_SECRET_NAME, SYSTEMD_ACCESS_TOKEN_NAME)
    from_unit = unit is not None and all(name in unit.credentials for name in wanted)
    try:
        if from_unit and not environ.get("CREDENTIALS_DIRECTORY"):
            assert unit is not None
            credentials = _load_unit_credentials(config, unit)
        else:
            credentials = load_credentials(config.api, environ)
    except CredentialsError as exc:
        report.add("error", "secrets", str(exc))
        return None
    report.credentials_source = credentials.source
    report.add("ok", "secrets", f"The secret and access token come from "
               f"{credentials.source}.")
    if from_unit and config.api.secret_file is not None:
        report.add("warning", "secrets", "api.secret_file and api.access_token_file are "
                   "ignored under systemd, because the unit's LoadCredential= comes first. "
                   "Remove them from the configuration to avoid confusion.")
    return credentials


def _load_unit_credentials(config: Config, unit: UnitInfo) -> Credentials:
    """Load the files the unit's LoadCredential= names, as systemd would hand them over."""
    with tempfile.TemporaryDirectory() as folder:
        for name in (SYSTEMD_SECRET_NAME, SYSTEMD_ACCESS_TOKEN_NAME):
            source = Path(unit.credentials[name])
            _check_credential_file(source, name, unit.path)
            os.symlink(source, Path(folder) / name)
        loaded = load_credentials(config.api, {"CREDENTIALS_DIRECTORY": folder})
    sources = " and ".join(unit.credentials[name] for name in
                           (SYSTEMD_SECRET_NAME, SYSTEMD_ACCESS_TOKEN_NAME))
    return Credentials(loaded.consumer_id, loaded.secret, loaded.access_token,
                       source=f"systemd credentials (LoadCredential= in {unit.path}): {sources}")


def _check_credential_file(path: Path, name: str, unit_path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialsError(
            f"The unit {unit_path} loads the credential {name} from {path}, which does not "
            "exist, so the service would fail to start. Create it (mode 600, owned by root) "
            "containing only the value.") from None
    if mode & 0o077:
        raise CredentialsError(
            f"The credential file {path} has mode {stat.S_IMODE(mode):04o}, which lets group "
            f"or others read it. Run: chmod 600 {path}")


# --- ledger and clock ------------------------------------------------------------------


def check_ledger(report: CheckReport, config: Config, user_name: str | None) -> None:
    """Check the ledger's integrity, schema version and owner, and whether a daemon runs."""
    path = config.ledger.path
    if not path.exists():
        report.add("ok", "ledger", f"The ledger {path} does not exist yet; the daemon creates "
                   "it at its first start.")
        return
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            quick = db.execute("PRAGMA quick_check").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as exc:
        quick, version = str(exc), None
    if quick != "ok":
        report.add("error", "ledger", f"The ledger {path} is damaged or not a ledger ({quick}). "
                   "Restore it from a copy made with `coreplus-uploader ledger backup`.",
                   ExitCode.LEDGER_UNAVAILABLE)
        return
    _report_ledger_version(report, path, version)
    _report_ledger_owner(report, path, user_name)
    lock = LedgerLock(path)
    if lock.is_held_elsewhere():
        report.add("ok", "ledger", f"A daemon holds the ledger (pid {lock.holder_pid()}).")


def _report_ledger_version(report: CheckReport, path: Path, version: int | None) -> None:
    if version is not None and version > SCHEMA_VERSION:
        report.add("error", "ledger", f"The ledger {path} has schema version {version}, newer "
                   f"than this program's {SCHEMA_VERSION}. Upgrade coreplus-uploader.",
                   ExitCode.LEDGER_UNAVAILABLE)
    elif version is not None and version < SCHEMA_VERSION:
        report.add("ok", "ledger", f"The ledger {path} (schema {version}) passed SQLite's "
                   f"check; the daemon upgrades it to schema {SCHEMA_VERSION} at its next "
                   "start. Back it up first with `coreplus-uploader ledger backup`.")
    else:
        report.add("ok", "ledger", f"The ledger {path} passed SQLite's check (schema "
                   f"{version}).")


def _report_ledger_owner(report: CheckReport, path: Path, user_name: str | None) -> None:
    info = path.stat()
    if info.st_mode & 0o077:
        report.add("warning", "ledger", f"The ledger {path} has mode "
                   f"{stat.S_IMODE(info.st_mode):04o}; it lists patient file names. Run: "
                   f"chmod 600 {path}")
    if user_name is None:
        return
    try:
        uid = pwd.getpwnam(user_name).pw_uid
    except KeyError:
        return
    if info.st_uid != uid:
        report.add("error", "ledger", f"The ledger {path} is not owned by the service's user "
                   f"{user_name}, which must write it. Run: chown {user_name}: {path}*")


class _Timex(ctypes.Structure):
    """``struct timex`` from linux/timex.h, with room for the padding at its end."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("constant", ctypes.c_long),
                ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long),
                ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long),
                ("shift", ctypes.c_int), ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long),
                ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long),
                ("tai", ctypes.c_int), ("padding", ctypes.c_int * 11)]


def clock_synchronised() -> bool | None:
    """
    Ask the kernel whether a time daemon keeps the clock synchronised.

    The rule is systemd-timedated's: the clock counts as synchronised when the kernel's
    maximum error estimate is below 16 s. Reading it (``adjtimex`` with no changes)
    needs no privilege.

    Returns:
        True or False, or None when the kernel cannot be asked.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = _Timex()
        state = libc.adjtimex(ctypes.byref(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR and timex.maxerror < _UNSYNCED_MAX_ERROR_US


def check_clock(report: CheckReport) -> None:
    """Report the clock's sync state; coreplus refuses tokens from a clock that is off."""
    synced = clock_synchronised()
    if synced:
        report.add("ok", "clock", "The system clock is synchronised.")
    elif synced is None:
        report.add("warning", "clock", "The clock's sync state is unknown. coreplus refuses "
                   "requests from a clock that is off; check it with timedatectl.")
    else:
        report.add("warning", "clock", "The system clock is not synchronised. coreplus "
                   "refuses requests from a clock that is off. Install and enable a time "
                   "service: apt-get install systemd-timesyncd (or chrony).")


# --- alerts ------------------------------------------------------------------------------


def check_alerts(report: CheckReport, config: Config, online: bool) -> None:
    """Check that the alert command exists and the mail settings work (online only)."""
    alert = config.alert
    if alert.command:
        program = alert.command.split()[0]
        if shutil.which(program) is None:
            report.add("error", "alerts", f"alert.command names {program}, which is not an "
                       "executable program here. Correct the path or install it.")
        else:
            report.add("ok", "alerts", f"alert.command runs {shutil.which(program)}.")
    if alert.smtp_host is None:
        if not alert.command:
            report.add("warning", "alerts", "No alert.command or alert.smtp_host is set, so "
                       "problems only reach the log and the status file. Set one in [alert].")
        return
    try:
        password = read_password(alert.smtp_password_file)
        if online:
            with connect_smtp(alert) as server:
                if alert.smtp_user is not None and password is not None:
                    server.login(alert.smtp_user, password)
    except (OSError, smtplib.SMTPException, AlertDeliveryError) as exc:
        report.add("error", "alerts", f"Alert e-mail through {alert.smtp_host}:{alert.smtp_port} "
                   f"will fail: {type(exc).__name__}: {exc}", ExitCode.USAGE)
        return
    done = "logged in to" if online and alert.smtp_user else "settings for"
    report.add("ok", "alerts", f"E-mail alerts: {done} {alert.smtp_host}:{alert.smtp_port}.")


# --- online: the Client list ---------------------------------------------------------------


def mapped_clients(config: Config) -> list[dict[str, Any]]:
    """
    List every client id the daemon would upload to: drop folders present now, then
    aliases in ``[clients]`` without a folder yet.

    Returns:
        Dicts with ``folder``, ``client_id`` (None when the folder maps to no client)
        and ``rule``.
    """
    entries: list[dict[str, Any]] = []
    folders = set()
    try:
        names = sorted(entry.name for entry in os.scandir(config.watch.root)
                       if entry.is_dir(follow_symlinks=False))
    except OSError:
        names = []
    for name in names:
        resolution = resolve_folder(name, config.clients)
        folders.add(normalise_alias(name))
        entries.append({"folder": name, "client_id": resolution.client_id,
                        "rule": resolution.rule, "problem": resolution.problem})
    for alias, client_id in sorted(config.clients.items()):
        if alias not in folders:
            entries.append({"folder": alias, "client_id": client_id, "rule": "alias",
                            "problem": None, "no_folder_yet": True})
    return entries


async def _lookup_clients(config: Config, credentials: Credentials,
                          wanted: set[str]) -> tuple[dict[str, dict[str, Any]], float | None]:
    """Page through the Client list until every wanted id is found or the list ends."""
    from uploader.client import CoreplusClient, create_session
    from uploader.daemon import api_settings
    from uploader.ratelimit import RateLimiter

    settings = api_settings(config)
    found: dict[str, dict[str, Any]] = {}
    async with create_session(settings, connection_limit=2) as session:
        client = CoreplusClient(session, settings, credentials,
                                RateLimiter(config.api.max_requests_per_second))
        page = 1
        while True:
            data = await client.list_clients(page, PAGE_SIZE)
            for record in data.get("clients") or []:
                client_id = parse_guid(str(record.get("clientId", "")))
                if client_id in wanted:
                    found[client_id] = record
            total = int((data.get("paging") or {}).get("totalRows") or 0)
            if found.keys() >= wanted or page * PAGE_SIZE >= total:
                break
            page += 1
        skew = _clock_skew_s(client.last_server_date)
    return found, skew


def _clock_skew_s(server_date: datetime | None) -> float | None:
    if server_date is None:
        return None
    return (datetime.now(UTC) - server_date).total_seconds()


def check_online(report: CheckReport, config: Config, credentials: Credentials) -> None:
    """Sign one Client list request, then look up every mapped client id in coreplus."""
    entries = mapped_clients(config)
    wanted = {entry["client_id"] for entry in entries if entry["client_id"]}
    try:
        found, skew_s = asyncio.run(_lookup_clients(config, credentials, wanted))
    except ServicePausedError as exc:
        report.add("error", "service", f"coreplus refused the credentials or the connection: "
                   f"{exc}. Check the consumer id, secret, access token and api.base_url.")
        return
    except RetryableUploadError as exc:
        report.add("error", "service", f"coreplus could not be reached: {exc}. Try again "
                   "later, or check the network and api.proxy.", ExitCode.TEMPORARY)
        return
    except UploadError as exc:
        report.add("error", "service", f"The Client list request failed: {exc}. Check "
                   "api.base_url and api.client_list_version.")
        return
    report.add("ok", "service", f"coreplus accepted a signed request to {config.api.base_url}.")
    if skew_s is not None and abs(skew_s) > CLOCK_SKEW_WARN_S:
        report.add("warning", "clock", f"This clock differs from coreplus's by {skew_s:+.0f} s. "
                   "Synchronise it (timedatectl).")
    _report_clients(report, entries, found)


def _report_clients(report: CheckReport, entries: list[dict[str, Any]],
                    found: dict[str, dict[str, Any]]) -> None:
    for entry in entries:
        client_id = entry["client_id"]
        record = found.get(client_id) if client_id else None
        if record is not None:
            parts = (str(record.get(key) or "") for key in ("firstName", "middleName", "lastName"))
            entry["name"] = " ".join(part for part in parts if part)
            entry["date_of_birth"] = str(record.get("dateOfBirth") or "")[:10] or None
        entry["found"] = record is not None
        report.clients.append(entry)
        if client_id is None:
            report.add("warning", "clients", f"The drop folder {entry['folder']} maps to no "
                       f"client, so nothing in it is uploaded. {entry['problem']}")
        elif record is None:
            report.add("error", "clients", f"{entry['folder']} maps to client id {client_id}, "
                       "which coreplus does not know. Correct the GUID in the folder name or "
                       "in [clients].")
    known = sum(1 for entry in entries if entry.get("found"))
    summary = (f"{known} of {len(entries)} mapped folders and aliases name a client that "
               "coreplus knows")
    if known == len(entries):
        report.add("ok", "clients", f"{summary}; compare the names below with the folder names.")
    else:
        # The lines above name each one and its problem, so an OK here would mislead.
        report.add("warning", "clients", f"{summary}. Fix the ones listed above, then run "
                   "the check again.")


# --- the whole check -------------------------------------------------------------------------


def run_check(config_path: Path, *, online: bool = False, unit_path: Path | None = None,
              environ: Mapping[str, str] | None = None) -> CheckReport:
    """
    Run every check and return the report; nothing is raised for a failed check.

    Args:
        config_path: The configuration file.
        online: Also contact coreplus and the mail server.
        unit_path: The unit file to compare with; by default the installed one.
        environ: Where credentials in the environment are read from.
    """
    env = os.environ if environ is None else environ
    report = CheckReport(config_path)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        report.add("error", "config", str(exc))
        return report
    report.add("ok", "config", f"The configuration {config.path} is valid.")
    unit = _check_unit_file(report, config, unit_path)
    check_paths(report, config)
    credentials = check_secrets(report, config, unit, env)
    readable = [path for path in (config.api.secret_file, config.api.access_token_file)
                if path is not None and credentials is not None
                and credentials.source.startswith("files")]
    check_access(report, config, unit, readable)
    check_ledger(report, config, unit.user if unit else None)
    check_clock(report)
    check_alerts(report, config, online)
    if online and credentials is not None:
        check_online(report, config, credentials)
    return report


def _check_unit_file(report: CheckReport, config: Config,
                     unit_path: Path | None) -> UnitInfo | None:
    path = find_unit(unit_path)
    if path is None:
        report.add("warning", "unit", f"No installed {UNIT_NAME} was found, so access is "
                   "tested as the current user. Install the unit from systemd/ first.")
        return None
    try:
        unit = read_unit(path)
    except OSError as exc:
        report.add("error", "unit", f"The unit {path} cannot be read: {exc.strerror}.")
        return None
    report.unit = str(path)
    check_unit(report, config, unit)
    return unit


def render_text(report: CheckReport) -> str:
    """Render the report as aligned lines for a person at a terminal."""
    labels = {"ok": "OK", "warning": "WARNING", "error": "ERROR"}
    lines = [f"coreplus-uploader check of {report.config_path}", ""]
    for finding in report.findings:
        lines.append(f"{labels[finding.level]:<8} {finding.topic:<9} {finding.message}")
    if report.clients:
        lines += ["", "Clients in coreplus (check each name against its folder):"]
        for entry in report.clients:
            lines.append("  " + _client_line(entry))
    errors = len(report.errors)
    warnings = sum(1 for finding in report.findings if finding.level == "warning")
    lines += ["", f"{errors} error(s), {warnings} warning(s)."]
    return "\n".join(lines) + "\n"


def _client_line(entry: dict[str, Any]) -> str:
    folder = entry["folder"] + (" (alias, no folder yet)" if entry.get("no_folder_yet") else "")
    if entry["client_id"] is None:
        return f"{folder} -> no client"
    if not entry.get("found"):
        return f"{folder} -> {entry['client_id']}: NOT FOUND in coreplus"
    born = f", born {entry['date_of_birth']}" if entry.get("date_of_birth") else ""
    return f"{folder} -> {entry['client_id']}: {entry['name']}{born}"
