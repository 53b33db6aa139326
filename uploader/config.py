"""
Read the TOML configuration file into frozen dataclasses, and reject anything invalid.

One dataclass per TOML table contains the keys under their TOML names. ``load_config``
checks every key's type and range, rejects unknown tables and keys, and raises
``ConfigError`` with a message that names the dotted key, the value and the fix.

Paths:
    A relative path is resolved against the folder that contains the configuration
    file, not the current directory, so systemd and a shell find the same folders.
    A leading ``~`` is expanded to the home folder of the user running the program.
    Paths are stored absolute, with symbolic links resolved as far as the path
    exists; the folders themselves need not exist yet.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import json
import math
import re
import shlex
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from uploader.exceptions import ConfigError
from uploader.folders import normalise_alias, parse_guid

#: coreplus accepts consumer ids of up to 50 characters.
MAX_CONSUMER_ID_CHARS = 50

#: A token's exp is nbf + 60 s and nbf lies ``clock_leeway_seconds`` in the past, so
#: the leeway must leave the token a few seconds of life.
MAX_CLOCK_LEEWAY_S = 55

LOG_LEVELS = ("debug", "info", "warning", "error")

# An API version becomes a path segment of every request URL.
_VERSION_RE = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """
    The ``[api]`` table: where the coreplus service is and how to sign requests.
    """

    base_url: str
    """Service URL without a trailing slash, e.g. ``https://api.coreplus.com.au``."""
    version: str = "v2.1"
    """File endpoint version, a path segment."""
    client_list_version: str = "v2"
    """Client list endpoint version, a path segment."""
    consumer_id: str
    """The add-on's consumer id, at most 50 characters."""
    secret_file: Path | None = None
    """File holding the consumer secret; set together with ``access_token_file``."""
    access_token_file: Path | None = None
    """File holding the access token; set together with ``secret_file``."""
    issuer: str
    """The ``iss`` claim: the clinic's or integrator's web site URL."""
    audience: str = "https://coreplus.com.au"
    """The ``aud`` claim."""
    max_requests_per_second: float = 9.0
    """Request rate cap for the whole daemon; 0 means no limit."""
    connect_timeout_seconds: float = 15.0
    """Maximum wait for a TCP connection and TLS handshake."""
    idle_timeout_seconds: float = 60.0
    """Maximum time without data while sending or waiting for the response."""
    clock_leeway_seconds: int = 5
    """How far in the past each token's nbf is set, 0 to 55."""
    auth_probe_seconds: int = 300
    """Seconds between probes while uploads are paused by a 401, 403 or TLS error."""
    ca_file: Path | None = None
    """Extra CA bundle; None uses the system store only."""
    proxy: str | None = None
    """HTTPS proxy URL; None leaves ``HTTPS_PROXY`` in charge."""


@dataclass(frozen=True, kw_only=True)
class WatchConfig:
    """
    The ``[watch]`` table: the drop root and when a file counts as settled.
    """

    root: Path
    """The drop root."""
    settle_seconds: float = 5.0
    """How long a file must stay unchanged before it is uploaded."""
    empty_grace_seconds: float = 60.0
    """How long an empty file may stay empty before it fails."""
    pdf_wait_seconds: float = 120.0
    """How long a PDF without its end marker waits before it is uploaded anyway."""
    rescan_seconds: float = 300.0
    """Seconds between full rescans of the drop root."""
    force_polling: bool = False
    """Poll instead of using inotify, for network filesystems."""
    ignore: tuple[str, ...] = ()
    """Extra glob patterns that are never uploaded."""


@dataclass(frozen=True, kw_only=True)
class UploadConfig:
    """
    The ``[upload]`` table: concurrency, retries, and what happens to files afterwards.
    """

    workers: int = 4
    """Uploads in flight at once."""
    max_attempts: int = 5
    """Attempts per cycle before a file becomes ``deferred``."""
    backoff_max_seconds: float = 300.0
    """Cap on the backoff between attempts, and on a service's Retry-After."""
    after_success: Literal["archive", "delete", "keep"] = "archive"
    """Action taken on a file after a successful upload."""
    archive_dir: Path | None = None
    """Folder for uploaded files; required when ``after_success`` is ``"archive"``."""
    archive_keep_days: int = 0
    """Archived files older than this many days are deleted; 0 keeps them forever."""
    failed_dir: Path
    """Folder for permanently failed files, each with a reason file."""
    staff_group: str | None = None
    """Group that may read the failed folder and the status file."""
    max_file_bytes: int = 0
    """Files larger than this fail without an upload; 0 means no limit."""
    on_uncertain: Literal["retry", "hold"] = "retry"
    """Policy for an upload whose outcome is unknown."""
    skip_duplicates: bool = True
    """Skip bytes already uploaded for the same client."""
    shutdown_grace_seconds: float = 30.0
    """How long a stopping daemon waits for uploads in flight."""


@dataclass(frozen=True, kw_only=True)
class LedgerConfig:
    """
    The ``[ledger]`` table.
    """

    path: Path
    """The SQLite ledger file, on a local filesystem."""


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """
    The ``[log]`` table.
    """

    format: Literal["auto", "json", "console"] = "auto"
    """Output format; auto picks console on a terminal and JSON otherwise."""
    level: str = "info"
    """Lowest level logged: debug, info, warning or error."""
    file_names: Literal["show", "hide"] = "show"
    """Whether logs show file names or an HMAC in their place."""


@dataclass(frozen=True, kw_only=True)
class AlertConfig:
    """
    The ``[alert]`` table: the channels that report to a person when uploads need attention.
    """

    command: str | None = None
    """Program and arguments, split as a POSIX shell splits words but run without a
    shell; it gets the alert text on standard input. None runs nothing."""
    smtp_host: str | None = None
    """Mail server for alert e-mails; None sends no e-mail."""
    smtp_port: int = 587
    """Mail server port: 587 for STARTTLS, 465 for TLS, 25 for a plain relay."""
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    """The protection of the connection to the mail server."""
    smtp_user: str | None = None
    """Login name at the mail server; None sends without logging in."""
    smtp_password_file: Path | None = None
    """File containing the mail password; mode 600, set together with ``smtp_user``."""
    smtp_timeout_seconds: float = 30.0
    """Maximum wait for the mail server at each step."""
    email_from: str | None = None
    """Sender address of alert e-mails; required with ``smtp_host``."""
    email_to: tuple[str, ...] = ()
    """Recipient addresses; required with ``smtp_host``."""
    disk_min_free_percent: float = 5.0
    """Alert when a filesystem the daemon writes to has less free space than this
    share of its size; 0 turns the check off."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """
    The whole validated configuration.
    """

    api: ApiConfig
    watch: WatchConfig
    upload: UploadConfig
    ledger: LedgerConfig
    log: LogConfig
    alert: AlertConfig = field(default_factory=AlertConfig)
    """The ``[alert]`` table; every key is optional."""
    clients: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    """Read-only map of normalised alias to lower-case client GUID."""
    path: Path
    """The configuration file, absolute."""


_TABLES: dict[str, type[Any]] = {
    "api": ApiConfig,
    "watch": WatchConfig,
    "upload": UploadConfig,
    "ledger": LedgerConfig,
    "log": LogConfig,
    "alert": AlertConfig,
}
_KNOWN_TABLES = (*_TABLES, "clients")

# Keys whose lower bound is not 0. Every other number must be 0 or more.
_MINIMUMS: dict[str, int] = {
    "upload.workers": 1,
    "upload.max_attempts": 1,
    # A probe every 0 s would hammer a service that has just rejected us.
    "api.auth_probe_seconds": 1,
    "alert.smtp_port": 1,
    # A timeout of 0 s per step would fail before any mail server could reply.
    "alert.smtp_timeout_seconds": 1,
}
_MAXIMUMS: dict[str, int] = {
    "api.clock_leeway_seconds": MAX_CLOCK_LEEWAY_S,
    "alert.smtp_port": 65535,
    "alert.disk_min_free_percent": 100,
}

# Shown in the message for a missing required key.
_EXAMPLES: dict[str, str] = {
    "api.base_url": '"https://api.coreplus.com.au"',
    "api.consumer_id": '"the consumer id of your coreplus add-on"',
    "api.issuer": '"https://your-clinic.example"',
    "watch.root": '"/srv/coreplus/drop"',
    "upload.failed_dir": '"/srv/coreplus/failed"',
    "upload.archive_dir": '"/srv/coreplus/archive"',
    "ledger.path": '"/var/lib/coreplus-uploader/ledger.sqlite3"',
}


def _show(value: object) -> str:
    """Write a TOML value the way the user typed it, shortened for a message."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf", "-inf" and "nan", as TOML spells them
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(key: str, value: object, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{key} = {_show(value)} is invalid: {problem}. {fix}")


def _unknown_key(table: str, leaf: str, known: typing.Iterable[str]) -> ConfigError:
    key = f"{table}.{leaf}"
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f"Did you mean {table}.{close[0]}? " if close else ""
    return ConfigError(
        f"Unknown key {key}. {hint}Remove it or correct the spelling; "
        "config/example.toml lists every key."
    )


# --- Conversion of one value, by the type the dataclass field declares ---


def _expect_number(key: str, value: object, default: object) -> float:
    # bool is a subclass of int in Python, but `true` is never a number in TOML.
    if isinstance(value, bool) or not isinstance(value, int | float):
        example = default if default is not dataclasses.MISSING else 1
        raise _invalid(
            key, value, "expected a number",
            f"Write a number without quotes, e.g. {key} = {_show(example)}.",
        )
    if not math.isfinite(value):
        example = default if default is not dataclasses.MISSING else 1
        raise _invalid(
            key, value, "expected a finite number",
            f"Write a number, e.g. {key} = {_show(example)}.",
        )
    return float(value)


def _expect_int(key: str, value: object, default: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        example = default if default is not dataclasses.MISSING else 1
        raise _invalid(
            key, value, "expected a whole number",
            f"Write a whole number without quotes or a decimal point, "
            f"e.g. {key} = {_show(example)}.",
        )
    return value


def _expect_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _invalid(
            key, value, "expected true or false", f"Write {key} = true or {key} = false."
        )
    return value


def _empty_fix(key: str, default: object) -> str:
    if default is dataclasses.MISSING:
        return "Write a value."
    if default is None:
        return f"Write a value, or remove {key} to leave it unset."
    return f"Write a value, or remove {key} to use its default."


def _expect_text(key: str, value: object, default: object) -> str:
    if not isinstance(value, str):
        raise _invalid(
            key, value, "expected a string", f'Put the value in double quotes, e.g. {key} = "...".'
        )
    if not value.strip():
        raise _invalid(key, value, "the value is empty", _empty_fix(key, default))
    if "\x00" in value:
        raise _invalid(key, value, "it contains a NUL character", "Remove the \\u0000 escape.")
    return value.strip()


def _expect_path(key: str, value: object, default: object, base_dir: Path) -> Path:
    text = _expect_text(key, value, default)
    try:
        return (base_dir / Path(text).expanduser()).resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        raise _invalid(
            key, text, f"the path cannot be resolved ({exc})", "Correct the path or its links."
        ) from None


# The content of each list-of-strings key and an example, for its error message.
_LIST_EXAMPLES: dict[str, tuple[str, str]] = {
    "watch.ignore": ("glob patterns", '["*.bak", "Smith/private"]'),
    "alert.email_to": ("e-mail addresses", '["it@clinic.example", "manager@clinic.example"]'),
}


def _expect_patterns(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        what, example = _LIST_EXAMPLES.get(key, ("strings", '["..."]'))
        raise _invalid(
            key, value, "expected a list of non-empty strings",
            f"Write a list of quoted {what}, e.g. {key} = {example}.",
        )
    return tuple(value)


def _expect_choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(f'"{choice}"' for choice in choices)
        raise _invalid(key, value, f"expected one of {allowed}", f"Set {key} to one of {allowed}.")
    return value


def _convert(key: str, value: object, hint: Any, default: object, base_dir: Path) -> Any:
    """Check ``value`` against a field's declared type and convert it."""
    if typing.get_origin(hint) is types.UnionType:  # X | None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is Literal:
        return _expect_choice(key, value, typing.get_args(hint))
    if hint is bool:
        return _expect_bool(key, value)
    if hint is int:
        return _expect_int(key, value, default)
    if hint is float:
        return _expect_number(key, value, default)
    if hint is Path:
        return _expect_path(key, value, default, base_dir)
    if hint == tuple[str, ...]:
        return _expect_patterns(key, value)
    return _expect_text(key, value, default)


def _check_range(key: str, value: float, written: object) -> None:
    minimum = _MINIMUMS.get(key, 0)
    maximum = _MAXIMUMS.get(key)
    if maximum is not None and not minimum <= value <= maximum:
        raise _invalid(
            key, written, f"it must be between {minimum} and {maximum}",
            f"Set {key} to a value from {minimum} to {maximum}.",
        )
    if value < minimum:
        raise _invalid(
            key, written, f"it must be at least {minimum}", f"Set {key} to {minimum} or more."
        )


# --- Checks of single values beyond their type ---


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redact_url(parts: SplitResult) -> str:
    """Return the URL with any user name and password replaced, for messages."""
    if "@" not in parts.netloc:
        return parts.geturl()
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _split_url(key: str, value: str) -> SplitResult:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - reading the port validates it
    except ValueError:
        raise _invalid(
            key, _redact_url(parts), "the port is not a number from 0 to 65535",
            "Correct the port after the host name.",
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid(
            key, _redact_url(parts), "expected an http or https URL with a host name",
            f'Write a full URL, e.g. {key} = "https://example.com.au".',
        )
    return parts


def _check_base_url(key: str, value: str) -> str:
    parts = _split_url(key, value)
    shown = _redact_url(parts)
    if "@" in parts.netloc:
        raise _invalid(
            key, shown, "the URL contains a user name or password",
            "Remove the user@ part; the secret and access token authenticate requests.",
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        raise _invalid(
            key, shown, "plain http is allowed only to this machine (localhost, 127.0.0.1, ::1)",
            "Use the https:// URL of the service.",
        )
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise _invalid(
            key, shown, "a base URL cannot have a query or fragment",
            "Remove everything from the first ? or #.",
        )
    return value.rstrip("/")


def _check_http_url(key: str, value: str) -> str:
    _split_url(key, value)
    return value


def _check_consumer_id(key: str, value: str) -> str:
    if len(value) > MAX_CONSUMER_ID_CHARS:
        raise _invalid(
            key, value, f"it has {len(value)} characters; coreplus allows at most "
            f"{MAX_CONSUMER_ID_CHARS}", "Copy the consumer id again from the add-on's settings.",
        )
    return value


def _check_version(key: str, value: str) -> str:
    if not _VERSION_RE.fullmatch(value):
        raise _invalid(
            key, value, "a version is one URL path segment of letters, digits, '.', '_' or '-'",
            f'Write it as coreplus documents it, e.g. {key} = "v2.1".',
        )
    return value


def _check_level(key: str, value: str) -> str:
    level = value.lower()
    if level not in LOG_LEVELS:
        allowed = ", ".join(f'"{name}"' for name in LOG_LEVELS)
        raise _invalid(key, value, f"expected one of {allowed}", f"Set {key} to one of {allowed}.")
    return level


def _check_group(key: str, value: str) -> str:
    try:
        grp.getgrnam(value)
    except KeyError:
        raise _invalid(
            key, value, "no group of that name exists on this machine",
            f"Create it (groupadd {value}) or correct the name.",
        ) from None
    return value


def _check_command(key: str, value: str) -> str:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise _invalid(
            key, value, f"it cannot be split into words ({exc})",
            "Close every quote; the command is split as a POSIX shell splits words.",
        ) from None
    if not words:
        raise _invalid(key, value, "the command is empty", f"Write a program, or remove {key}.")
    program = words[0]
    if "/" in program and not program.startswith("/"):
        raise _invalid(
            key, value, f"the program {program} is a relative path",
            "Write the program's absolute path, or a bare name found in PATH.",
        )
    return value


def _check_host(key: str, value: str) -> str:
    if any(char.isspace() for char in value) or "/" in value or ":" in value.strip("[]"):
        raise _invalid(
            key, value, "expected a host name or IP address only",
            f'Write the name alone, e.g. {key} = "smtp.clinic.example"; the port is '
            "alert.smtp_port.",
        )
    return value


def _check_address(key: str, value: str) -> str:
    local, at, domain = value.rpartition("@")
    stray = any(char.isspace() or char in '<>,;"' for char in value)
    if not at or not local or "." not in domain or stray:
        raise _invalid(
            key, value, "expected one e-mail address such as it@clinic.example",
            "Write the bare address, without a display name or angle brackets.",
        )
    return value


_VALUE_CHECKS: dict[str, Callable[[str, str], str]] = {
    "api.base_url": _check_base_url,
    "api.issuer": _check_http_url,
    "api.proxy": _check_http_url,
    "api.consumer_id": _check_consumer_id,
    "api.version": _check_version,
    "api.client_list_version": _check_version,
    "log.level": _check_level,
    "upload.staff_group": _check_group,
    "alert.command": _check_command,
    "alert.smtp_host": _check_host,
    "alert.email_from": _check_address,
}


# --- Tables ---


def _read_table(name: str, raw: object, base_dir: Path) -> Any:
    """Build one table's dataclass from its raw TOML table."""
    cls = _TABLES[name]
    if not isinstance(raw, dict):
        raise _invalid(name, raw, "expected a table", f"Write it as a [{name}] section.")
    fields = {item.name: item for item in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for leaf, value in raw.items():
        key = f"{name}.{leaf}"
        if leaf not in fields:
            raise _unknown_key(name, leaf, fields)
        converted = _convert(key, value, hints[leaf], fields[leaf].default, base_dir)
        if isinstance(converted, int | float) and not isinstance(converted, bool):
            _check_range(key, converted, value)
        check = _VALUE_CHECKS.get(key)
        values[leaf] = check(key, converted) if check else converted
    for leaf, item in fields.items():
        if leaf not in values and item.default is dataclasses.MISSING:
            raise _missing_key(f"{name}.{leaf}")
    return cls(**values)


def _missing_key(key: str) -> ConfigError:
    table, _, leaf = key.partition(".")
    example = _EXAMPLES.get(key, '"..."')
    return ConfigError(
        f"Missing required key {key}. Add it under [{table}], e.g. {leaf} = {example}."
    )


def _inside(path: Path, folder: Path) -> bool:
    """Return whether ``path`` is ``folder`` or lies beneath it; both are resolved."""
    return path == folder or folder in path.parents


def _check_outside_root(key: str, path: Path, root: Path) -> None:
    if _inside(path, root) or _inside(root, path):
        raise _invalid(
            key, str(path), f"it overlaps the drop root {root}, so moved files would be "
            "seen as new drops", "Choose a folder outside watch.root that does not contain it.",
        )


def _check_folders(watch: WatchConfig, upload: UploadConfig, ledger: LedgerConfig) -> None:
    """Reject folders that overlap, because the daemon would act on its own output."""
    _check_outside_root("upload.failed_dir", upload.failed_dir, watch.root)
    if upload.archive_dir is not None:
        _check_outside_root("upload.archive_dir", upload.archive_dir, watch.root)
        if _inside(upload.failed_dir, upload.archive_dir) or _inside(
            upload.archive_dir, upload.failed_dir
        ):
            raise _invalid(
                "upload.failed_dir", str(upload.failed_dir),
                f"it overlaps upload.archive_dir {upload.archive_dir}, whose old files are "
                "deleted after archive_keep_days", "Keep the two folders apart.",
            )
    outputs = [("watch.root", watch.root), ("upload.failed_dir", upload.failed_dir)]
    if upload.archive_dir is not None:
        outputs.append(("upload.archive_dir", upload.archive_dir))
    for other_key, folder in outputs:
        if _inside(ledger.path, folder):
            raise _invalid(
                "ledger.path", str(ledger.path), f"it lies inside {other_key} {folder}",
                "Put the ledger in a state folder of its own, e.g. "
                "/var/lib/coreplus-uploader/ledger.sqlite3.",
            )
    if ledger.path.is_dir():
        raise _invalid(
            "ledger.path", str(ledger.path), "it is a folder",
            "Name the ledger file itself, e.g. .../ledger.sqlite3.",
        )


def _check_cross_keys(api: ApiConfig, upload: UploadConfig) -> None:
    if (api.secret_file is None) != (api.access_token_file is None):
        present, absent = (
            ("api.secret_file", "api.access_token_file")
            if api.secret_file is not None
            else ("api.access_token_file", "api.secret_file")
        )
        raise ConfigError(
            f"{present} is set but {absent} is not; both must come from the same "
            f"source. Set {absent} too, or remove {present}."
        )
    if upload.after_success == "archive" and upload.archive_dir is None:
        raise ConfigError(
            'Missing required key upload.archive_dir: upload.after_success = "archive" '
            "needs it. Add archive_dir under [upload], e.g. archive_dir = "
            f'{_EXAMPLES["upload.archive_dir"]}, or set after_success to "delete" or "keep".'
        )


def _check_alert_mail(alert: AlertConfig) -> None:
    """Check that the e-mail keys of [alert] are complete and consistent."""
    for address in alert.email_to:
        _check_address("alert.email_to", address)
    if alert.smtp_host is None:
        for key, value in (
            ("alert.email_to", alert.email_to),
            ("alert.email_from", alert.email_from),
            ("alert.smtp_user", alert.smtp_user),
            ("alert.smtp_password_file", alert.smtp_password_file),
        ):
            if value:
                raise ConfigError(
                    f"{key} is set but alert.smtp_host is not, so no e-mail would be sent. "
                    f"Set alert.smtp_host to the clinic's mail server, or remove {key}."
                )
        return
    if not alert.email_to:
        raise ConfigError(
            "Missing required key alert.email_to: alert.smtp_host is set. Add it under "
            f"[alert], e.g. email_to = {_LIST_EXAMPLES['alert.email_to'][1]}."
        )
    if alert.email_from is None:
        raise ConfigError(
            "Missing required key alert.email_from: alert.smtp_host is set. Add it under "
            '[alert], e.g. email_from = "uploader@clinic.example".'
        )
    if (alert.smtp_user is None) != (alert.smtp_password_file is None):
        present, absent = (
            ("alert.smtp_user", "alert.smtp_password_file")
            if alert.smtp_user is not None
            else ("alert.smtp_password_file", "alert.smtp_user")
        )
        raise ConfigError(f"{present} is set but {absent} is not. Set both to log in to the "
                          f"mail server, or remove {present} to send without logging in.")
    if (alert.smtp_security == "none" and alert.smtp_user is not None
            and not _is_loopback(alert.smtp_host)):
        raise _invalid(
            "alert.smtp_security", "none", f"the mail password would cross the network to "
            f"{alert.smtp_host} unencrypted", 'Set alert.smtp_security to "starttls" or "tls".',
        )


# --- Clients ---


def _read_clients(raw: object) -> Mapping[str, str]:
    """Validate the ``[clients]`` table into normalised alias -> lower-case GUID."""
    if not isinstance(raw, dict):
        raise _invalid("clients", raw, "expected a table", "Write it as a [clients] section.")
    clients: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for alias, value in raw.items():
        key = f"clients.{_show(alias)}"
        guid = parse_guid(value) if isinstance(value, str) else None
        if guid is None:
            raise _invalid(
                key, value, "expected a client id (a GUID such as "
                '"1b4e28ba-2fa1-11d2-883f-0016d3cca427")',
                "Copy the client id from coreplus and put it in double quotes.",
            )
        normalised = normalise_alias(alias)
        if not normalised.strip():
            raise _invalid(key, value, "the alias is empty", "Write the folder name as the key.")
        if normalised in clients and clients[normalised] != guid:
            raise ConfigError(
                f"[clients] aliases {_show(spelled[normalised])} and {_show(alias)} are "
                f"the same folder name once case and Unicode form are ignored, but name "
                f"different clients ({clients[normalised]} and {guid}). Remove one of them."
            )
        clients[normalised] = guid
        spelled.setdefault(normalised, alias)
    return types.MappingProxyType(clients)


# --- Reading the file ---


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file not found. Check the --config path, or start "
            "from config/example.toml."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the configuration file: {exc.strerror}. Check that the "
            "path names a file and that this user may read it."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid TOML: {exc}. Correct the syntax at that line."
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the file is not valid UTF-8 (byte {exc.start}). Save it as UTF-8."
        ) from None


def _check_tables(document: Mapping[str, object]) -> None:
    for name in document:
        if name not in _KNOWN_TABLES:
            close = difflib.get_close_matches(name, _KNOWN_TABLES, n=1)
            hint = f"Did you mean [{close[0]}]? " if close else ""
            raise ConfigError(
                f"Unknown table or key {name}. {hint}Remove it or correct the spelling; "
                "config/example.toml lists every table."
            )


def load_config(path: Path | str) -> Config:
    """
    Read and validate a configuration file.

    Args:
        path: The TOML file. Relative paths inside it are resolved against its folder.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The file is missing, unreadable or not TOML, and the message
            gives the path and line. Or a key is unknown, missing, of the wrong type,
            out of range or inconsistent with another, and the message names the key,
            the value and the fix.
    """
    config_path = Path(path).absolute()
    document = _read_toml(config_path)
    _check_tables(document)
    base_dir = config_path.parent
    tables = {name: _read_table(name, document.get(name, {}), base_dir) for name in _TABLES}
    _check_cross_keys(tables["api"], tables["upload"])
    _check_alert_mail(tables["alert"])
    _check_folders(tables["watch"], tables["upload"], tables["ledger"])
    return Config(
        **tables, clients=_read_clients(document.get("clients", {})), path=config_path
    )


def load_clients(path: Path | str) -> Mapping[str, str]:
    """
    Read only the ``[clients]`` table again, for a reload on SIGHUP or at a rescan.

    Args:
        path: The TOML file.

    Returns:
        A read-only map of normalised alias to lower-case GUID.

    Raises:
        ConfigError: The file cannot be read or parsed, or ``[clients]`` is invalid.
    """
    document = _read_toml(Path(path).absolute())
    return _read_clients(document.get("clients", {}))
