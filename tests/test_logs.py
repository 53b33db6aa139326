"""
Tests for uploader.logs: the repeat limiter on a fake clock, JSON lines written to a
StringIO, the journald priority prefix, hidden names and surrogate escapes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog

from uploader.logs import NameHider, RepeatLimiter, configure_logging

KEY = b"test key for names"
_TOKEN = re.compile(r"name-[0-9a-f]{16}")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d")


class FakeClock:
    """A monotonic clock that moves only when the test sets it."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(autouse=True)
def reset_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start each test outside journald, then restore structlog and the root logger."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def limiter_clock() -> FakeClock:
    """The fake clock for a RepeatLimiter."""
    return FakeClock()


@pytest.fixture
def limiter(limiter_clock: FakeClock) -> RepeatLimiter:
    """A limiter with a 600-second interval on the fake clock."""
    return RepeatLimiter(interval_s=600.0, clock=limiter_clock)


def log_lines(**configure: Any) -> tuple[io.StringIO, structlog.typing.FilteringBoundLogger]:
    """Configure logging into a new StringIO and return it with a logger."""
    out = io.StringIO()
    configure_logging(stream=out, **configure)
    return out, structlog.get_logger("uploader.test")


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    """Parse every line written so far as JSON."""
    return [json.loads(line) for line in out.getvalue().splitlines()]


class TestRepeatLimiter:
    def test_repeat_first(self, limiter: RepeatLimiter) -> None:
        """The first occurrence is logged as one."""
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") == 1

    def test_repeat_suppressed(self, limiter: RepeatLimiter, limiter_clock: FakeClock) -> None:
        """Repeats with the same cause inside the interval are suppressed."""
        limiter.check("move.failed", "c1", "a.pdf", "disk full")
        limiter_clock.now_s += 599.9
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") is None
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") is None

    def test_repeat_count_after_interval(
        self, limiter: RepeatLimiter, limiter_clock: FakeClock
    ) -> None:
        """After the interval one line reports the suppressed repeats plus this one."""
        limiter.check("move.failed", "c1", "a.pdf", "disk full")
        for _ in range(3):
            limiter_clock.now_s += 10
            assert limiter.check("move.failed", "c1", "a.pdf", "disk full") is None
        limiter_clock.now_s = 100.0 + 600.0
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") == 4
        limiter_clock.now_s += 1
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") is None
        limiter_clock.now_s += 600
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") == 2

    def test_repeat_cause_change(self, limiter: RepeatLimiter, limiter_clock: FakeClock) -> None:
        """A new cause is logged at once, and then suppressed in its turn."""
        limiter.check("move.failed", "c1", "a.pdf", "disk full")
        limiter_clock.now_s += 1
        assert limiter.check("move.failed", "c1", "a.pdf", "read-only filesystem") == 1
        limiter_clock.now_s += 1
        assert limiter.check("move.failed", "c1", "a.pdf", "read-only filesystem") is None

    def test_repeat_keys_separate(self, limiter: RepeatLimiter) -> None:
        """Another event, client or path is a separate condition."""
        limiter.check("move.failed", "c1", "a.pdf", "disk full")
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") is None
        assert limiter.check("upload.held", "c1", "a.pdf", "disk full") == 1
        assert limiter.check("move.failed", "c2", "a.pdf", "disk full") == 1
        assert limiter.check("move.failed", "c1", "b.pdf", "disk full") == 1
        assert limiter.check("move.failed", None, None, "disk full") == 1

    def test_repeat_clear(self, limiter: RepeatLimiter) -> None:
        """After clear the same condition is logged again at once, and others stay suppressed."""
        limiter.check("move.failed", "c1", "a.pdf", "disk full")
        limiter.check("move.failed", "c1", "b.pdf", "disk full")
        limiter.clear("move.failed", "c1", "a.pdf")
        assert limiter.check("move.failed", "c1", "a.pdf", "disk full") == 1
        assert limiter.check("move.failed", "c1", "b.pdf", "disk full") is None
        limiter.clear("never.seen")

    def test_repeat_clear_defaults(self, limiter: RepeatLimiter) -> None:
        """clear with only the event name clears the condition logged without client or path."""
        limiter.check("service.paused", None, None, "401")
        limiter.clear("service.paused")
        assert limiter.check("service.paused", None, None, "401") == 1


class TestConfigureLogging:
    def test_json_fields(self) -> None:
        """A JSON line has event, level, a timestamp with offset, and the given fields."""
        out, log = log_lines(format="json")
        log.info("upload.succeeded", client="c1", path="Smith/a.pdf", size=12)
        [line] = json_lines(out)
        assert line["event"] == "upload.succeeded"
        assert line["level"] == "info"
        assert _TIMESTAMP.fullmatch(line["timestamp"])
        assert (line["client"], line["path"], line["size"]) == ("c1", "Smith/a.pdf", 12)

    def test_json_timestamp_local_offset(self) -> None:
        """The timestamp carries the local zone's offset, here Australia/Sydney."""
        # time.tzset must run again after TZ is restored, so TZ is handled here and not
        # through monkeypatch, whose undo runs after this test's cleanup.
        previous_tz = os.environ.get("TZ")
        os.environ["TZ"] = "Australia/Sydney"
        time.tzset()
        try:
            out, log = log_lines(format="json")
            log.info("daemon.started")
            stamp = datetime.fromisoformat(json_lines(out)[0]["timestamp"])
        finally:
            if previous_tz is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = previous_tz
            time.tzset()
        expected = datetime.now(ZoneInfo("Australia/Sydney")).utcoffset()
        assert stamp.utcoffset() == expected

    def test_auto_json_off_terminal(self) -> None:
        """With format auto, a stream that is not a terminal gets JSON lines."""
        out, log = log_lines(format="auto")
        log.warning("scan.finished", files=3)
        [line] = json_lines(out)
        assert line["level"] == "warning"
        assert line["files"] == 3

    def test_level_filter(self) -> None:
        """Events below the configured level are not written."""
        out, log = log_lines(format="json", level="warning")
        log.info("file.detected")
        log.debug("file.ignored")
        log.error("upload.failed")
        assert [line["event"] for line in json_lines(out)] == ["upload.failed"]

    def test_contextvars_merged(self) -> None:
        """Fields bound in contextvars appear in every line."""
        out, log = log_lines(format="json")
        structlog.contextvars.bind_contextvars(worker=2)
        log.info("upload.started")
        assert json_lines(out)[0]["worker"] == 2

    def test_priority_prefix_journald(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Under journald each JSON line starts with its syslog priority."""
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
        out, log = log_lines(format="json")
        log.debug("file.ignored")
        log.info("upload.succeeded")
        log.warning("upload.deferred")
        log.error("upload.failed")
        log.critical("daemon.stopped")
        lines = out.getvalue().splitlines()
        prefixes = [line[:3] for line in lines]
        assert prefixes == ["<6>", "<4>", "<3>", "<2>"]
        assert json.loads(lines[1][3:])["event"] == "upload.deferred"

    def test_priority_prefix_debug(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A debug line under journald gets priority 7."""
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
        out, log = log_lines(format="json", level="debug")
        log.debug("file.ignored")
        assert out.getvalue().startswith('<7>{"')

    def test_no_prefix_without_journald(self) -> None:
        """Without JOURNAL_STREAM a JSON line starts with the brace."""
        out, log = log_lines(format="json")
        log.error("upload.failed")
        assert out.getvalue().startswith("{")

    def test_no_prefix_console(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Console output gets no prefix even under journald, and is not JSON."""
        monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
        out, log = log_lines(format="console")
        log.error("upload.failed", path="Smith/a.pdf")
        text = out.getvalue()
        assert not text.startswith("<")
        assert "upload.failed" in text
        assert "Smith/a.pdf" in text
        assert "\x1b[" not in text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)

    def test_surrogates_replaced(self) -> None:
        """Surrogate escapes from non-UTF-8 names are written as U+FFFD."""
        out, log = log_lines(format="json")
        name = Path(b"caf\xe9.pdf".decode("utf-8", "surrogateescape"))
        log.info("file.detected", path=str(name), error=f"cannot open {name}")
        text = out.getvalue()
        text.encode("utf-8")
        [line] = json_lines(out)
        assert line["path"] == "caf\ufffd.pdf"
        assert line["error"] == "cannot open caf\ufffd.pdf"

    def test_hide_names_configured(self) -> None:
        """With a hide key the path field and its copy in the error text are replaced."""
        out, log = log_lines(format="json", hide_key=KEY)
        log.warning("upload.held", path="Nguyen, Thi [g]/referral.pdf", client="c1",
                    error="[Errno 13] Permission denied: "
                    "'/srv/coreplus/drop/Nguyen, Thi [g]/referral.pdf'")
        [line] = json_lines(out)
        token = NameHider(KEY).token("Nguyen, Thi [g]/referral.pdf")
        assert line["path"] == token
        assert line["error"] == f"[Errno 13] Permission denied: '/srv/coreplus/drop/{token}'"
        assert "Nguyen" not in out.getvalue()
        assert line["client"] == "c1"

    def test_hide_names_keeps_standard_fields(self) -> None:
        """Hiding a folder named by this year or 'info' keeps timestamp, level and event."""
        year = str(datetime.now().year)
        out, log = log_lines(format="json", hide_key=KEY)
        log.warning("file.unmapped", folder=year)
        log.info("file.unmapped", folder="info")
        first, second = json_lines(out)
        assert first["folder"] == NameHider(KEY).token(year)
        assert _TIMESTAMP.fullmatch(first["timestamp"])
        assert second["level"] == "info"
        assert first["event"] == "file.unmapped"

    def test_hide_names_in_exception(self) -> None:
        """A logged exception that quotes the hidden path shows its token, not the name."""
        out, log = log_lines(format="json", hide_key=KEY)
        path = "Nguyen, Thi [g]/referral.pdf"
        try:
            raise PermissionError(13, "Permission denied", f"/srv/drop/{path}")
        except PermissionError:
            log.exception("upload.held", path=path)
        assert "Nguyen" not in out.getvalue()


class TestNameHider:
    def test_hider_token_stable(self) -> None:
        """One key gives one token per name, and another name or key gives another token."""
        hider = NameHider(KEY)
        token = hider.token("Smith/a.pdf")
        assert _TOKEN.fullmatch(token)
        assert hider.token("Smith/a.pdf") == token
        assert hider.token("Smith/b.pdf") != token
        assert NameHider(b"other key").token("Smith/a.pdf") != token

    def test_hider_all_name_fields(self) -> None:
        """path, folder, archive_path, failed_path and name are each replaced."""
        hider = NameHider(KEY)
        fields = {"path": "Smith/a.pdf", "folder": "Smith", "archive_path": "/arch/Smith/a.pdf",
                  "failed_path": "/failed/Smith/a.pdf", "name": "a.pdf"}
        event = hider(None, "info", {"event": "upload.failed", "size": 5, **fields})
        for key, value in fields.items():
            assert event[key] == hider.token(value), key
        assert event["size"] == 5
        assert event["event"] == "upload.failed"

    def test_hider_error_text_longest_first(self) -> None:
        """Names inside other text are replaced longest first, so a path stays one token."""
        hider = NameHider(KEY)
        event = hider(None, "error", {
            "event": "move.failed", "path": "Smith/a.pdf", "name": "a.pdf",
            "error": "cannot move /drop/Smith/a.pdf; a.pdf is busy",
        })
        path_token, name_token = hider.token("Smith/a.pdf"), hider.token("a.pdf")
        assert event["error"] == f"cannot move /drop/{path_token}; {name_token} is busy"

    def test_hider_skips_empty_and_non_text(self) -> None:
        """Empty names and non-text values are left as they are."""
        hider = NameHider(KEY)
        event = hider(None, "info", {"event": "scan.finished", "path": "", "folder": None,
                                     "files": 3})
        assert event["path"] == ""
        assert event["folder"] is None
        assert event["files"] == 3
