"""
Logging set-up: structlog events to stdout, JSON lines or console output, with the
systemd priority prefix when journald reads the stream, and a limiter that turns a
repeated condition into one line plus a periodic count.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from datetime import datetime
from typing import Any, Literal, TextIO

import structlog

from uploader.constants import REPEAT_LOG_INTERVAL_S

#: syslog priorities for the ``<N>`` prefix that journald turns into the priority field.
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}

#: Fields that carry file or folder names, replaced when ``log.file_names = "hide"``.
_NAME_FIELDS = ("path", "folder", "archive_path", "failed_path", "name", "earlier_path")

#: Free-text fields that may quote a hidden name; ``event``, ``level`` and ``timestamp``
#: are never touched.
_TEXT_FIELDS = ("error", "message", "action", "traceback", "exception", "cause")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["timestamp"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
    return event


def _replace_surrogates(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # File names that are not valid UTF-8 arrive as surrogate escapes, which a UTF-8
    # stream cannot write. Show each bad byte as U+FFFD so the line is not lost.
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return event


class NameHider:
    """
    Replace file and folder names in log fields with a keyed hash, so logs can still
    be matched against each other without showing patient names.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def token(self, value: str) -> str:
        """Return a short stable pseudonym for one name or path."""
        digest = hmac.new(self._key, value.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "name-" + digest.hexdigest()[:16]

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        names = {}
        for key in _NAME_FIELDS:
            value = event.get(key)
            if isinstance(value, str) and value:
                names[value] = self.token(value)
                event[key] = names[value]
        # Error texts often quote the same path (an OSError names the file), so replace
        # each hidden name inside the free-text fields too, longest first.
        ordered = sorted(names, key=len, reverse=True)
        for key in _TEXT_FIELDS:
            if key in event:
                event[key] = _replace_names(event[key], ordered, names)
        return event


def _replace_names(value: Any, ordered: list[str], tokens: dict[str, str]) -> Any:
    """Replace hidden names in a text, or in the texts inside a rendered traceback."""
    if isinstance(value, str):
        for name in ordered:
            value = value.replace(name, tokens[name])
        return value
    if isinstance(value, list):
        return [_replace_names(item, ordered, tokens) for item in value]
    if isinstance(value, dict):
        return {key: _replace_names(item, ordered, tokens) for key, item in value.items()}
    return value


def configure_logging(
    *,
    format: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    hide_key: bytes | None = None,
    stream: TextIO | None = None,
) -> None:
    """
    Configure structlog and the standard library's logging once, for the whole process.

    Args:
        format: "auto" renders for people on a terminal and JSON otherwise.
        level: The lowest level written.
        hide_key: When set, names and paths in events are replaced by keyed hashes.
        stream: Where lines go; stdout by default, because journald collects it.
    """
    out = stream or sys.stdout
    use_json = format == "json" or (format == "auto" and not out.isatty())
    under_journald = use_json and bool(os.environ.get("JOURNAL_STREAM"))
    processors: list[Callable[..., Any]] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_timestamp,
        _replace_surrogates,
    ]
    # Tracebacks become text or dicts before names are hidden, so the hider sees them;
    # frame locals are left out because they can hold names and credentials.
    if use_json:
        processors.append(structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)))
    elif hide_key is not None:
        processors.append(structlog.processors.format_exc_info)
    if hide_key is not None:
        processors.append(NameHider(hide_key))
    if use_json:
        processors += [
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ]
        if under_journald:
            processors.append(_PriorityPrefix())
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio report through the standard library; keep their warnings.
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(name)s: %(message)s")


class _PriorityPrefix:
    """Prefix each rendered JSON line with ``<N>`` so journald sets its priority."""

    def __call__(self, _: Any, method: str, rendered: str) -> str:
        return f"<{_SYSLOG_PRIORITY.get(method, 6)}>{rendered}"


class RepeatLimiter:
    """
    Log a repeated condition once, then its count every ``interval_s``, or at once when
    its cause changes.

    A condition is keyed by event name, client and path; the cause is the error text.
    """

    def __init__(self, interval_s: float = REPEAT_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._seen: dict[tuple[str, str | None, str | None], tuple[str, float, int]] = {}

    def check(self, event: str, client: str | None, path: str | None, cause: str) -> int | None:
        """
        Decide whether to log this occurrence.

        Returns:
            None to stay quiet; otherwise the number of occurrences this line stands for
            (1 the first time, more when it reports suppressed repeats).
        """
        key = (event, client, path)
        now = self._clock()
        previous = self._seen.get(key)
        if previous is None or previous[0] != cause:
            self._seen[key] = (cause, now, 0)
            return 1
        _, logged_at, suppressed = previous
        if now - logged_at >= self._interval_s:
            self._seen[key] = (cause, now, 0)
            return suppressed + 1
        self._seen[key] = (cause, logged_at, suppressed + 1)
        return None

    def clear(self, event: str, client: str | None = None, path: str | None = None) -> None:
        """Forget a condition once it has cleared, so a later return is logged again."""
        self._seen.pop((event, client, path), None)
