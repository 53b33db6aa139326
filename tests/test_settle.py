"""
Tests for uploader.settle: every verdict on a fake clock, the PDF end-of-file check,
and reading a real file's tail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uploader.settle import (
    PDF_TAIL_BYTES,
    SettleRules,
    StatSnapshot,
    TrackedFile,
    Verdict,
    decide,
    is_pdf_name,
    next_check_s,
    observe,
    pdf_has_eof,
    read_tail,
    touch,
)

RULES = SettleRules(settle_s=5.0, empty_grace_s=60.0, pdf_wait_s=120.0)
T0 = 1000.0


def tracked(size: int = 10, *, is_pdf: bool = False, at_s: float = T0) -> TrackedFile:
    """A file first seen, and last changed, at ``at_s`` on the fake clock."""
    return TrackedFile(first_seen_s=at_s, snapshot=StatSnapshot(size, 1, 1),
                       changed_at_s=at_s, is_pdf=is_pdf)


class TestSnapshot:
    def test_snapshot_of_stat(self, tmp_path: Path) -> None:
        """StatSnapshot.of copies size, mtime_ns and ctime_ns from a real stat."""
        path = tmp_path / "a.pdf"
        path.write_bytes(b"12345")
        st = os.stat(path)
        assert StatSnapshot.of(st) == StatSnapshot(5, st.st_mtime_ns, st.st_ctime_ns)


class TestObserve:
    def test_observe_unchanged(self) -> None:
        """An identical snapshot is no change and keeps the settle window."""
        file = tracked()
        assert observe(file, StatSnapshot(10, 1, 1), T0 + 3) is False
        assert file.changed_at_s == T0

    @pytest.mark.parametrize("snapshot", [StatSnapshot(11, 1, 1), StatSnapshot(10, 2, 1),
                                          StatSnapshot(10, 1, 2)])
    def test_observe_change_resets(self, snapshot: StatSnapshot) -> None:
        """A new size, mtime or ctime restarts the settle window at the new time."""
        file = tracked()
        assert observe(file, snapshot, T0 + 4) is True
        assert file.snapshot == snapshot
        assert file.changed_at_s == T0 + 4
        assert decide(file, T0 + 8.9, RULES) is Verdict.WAIT
        assert decide(file, T0 + 9, RULES) is Verdict.SETTLED

    def test_touch_resets(self) -> None:
        """A watcher event restarts the window even when stat shows no change."""
        file = tracked()
        touch(file, T0 + 4)
        assert file.changed_at_s == T0 + 4
        assert decide(file, T0 + 5, RULES) is Verdict.WAIT


class TestDecide:
    def test_decide_inside_window(self) -> None:
        """Inside the settle window the verdict is WAIT."""
        assert decide(tracked(), T0 + 4.999, RULES) is Verdict.WAIT

    def test_decide_window_boundary(self) -> None:
        """Exactly settle_seconds after the last change the file is SETTLED."""
        assert decide(tracked(), T0 + 5, RULES) is Verdict.SETTLED

    def test_decide_empty_grace(self) -> None:
        """An empty file waits for the grace time from first sight, then is EMPTY_TOO_LONG."""
        file = tracked(size=0)
        assert decide(file, T0 + 5, RULES) is Verdict.WAIT
        assert decide(file, T0 + 59.9, RULES) is Verdict.WAIT
        assert decide(file, T0 + 60, RULES) is Verdict.EMPTY_TOO_LONG

    def test_decide_empty_recently_changed(self) -> None:
        """An empty file that changed recently waits even after its grace time."""
        file = tracked(size=0)
        observe(file, StatSnapshot(0, 9, 9), T0 + 58)
        assert decide(file, T0 + 61, RULES) is Verdict.WAIT
        assert decide(file, T0 + 63, RULES) is Verdict.EMPTY_TOO_LONG

    def test_decide_empty_pdf(self) -> None:
        """An empty PDF is judged as empty, not as missing %%EOF."""
        file = tracked(size=0, is_pdf=True)
        assert decide(file, T0 + 60, RULES, pdf_complete=False) is Verdict.EMPTY_TOO_LONG

    def test_decide_pdf_without_eof(self) -> None:
        """A PDF without %%EOF waits pdf_wait_seconds from first sight, then settles anyway."""
        file = tracked(is_pdf=True)
        assert decide(file, T0 + 5, RULES, pdf_complete=False) is Verdict.WAIT
        assert decide(file, T0 + 119.9, RULES, pdf_complete=False) is Verdict.WAIT
        assert decide(file, T0 + 120, RULES, pdf_complete=False) is Verdict.SETTLED_WITHOUT_EOF

    def test_decide_pdf_with_eof(self) -> None:
        """A PDF with %%EOF settles after the normal window."""
        file = tracked(is_pdf=True)
        assert decide(file, T0 + 5, RULES, pdf_complete=True) is Verdict.SETTLED

    def test_decide_pdf_not_checked(self) -> None:
        """A PDF whose tail was not checked settles after the normal window."""
        assert decide(tracked(is_pdf=True), T0 + 5, RULES) is Verdict.SETTLED

    def test_decide_pdf_growing(self) -> None:
        """A PDF still growing keeps waiting even past pdf_wait_seconds."""
        file = tracked(is_pdf=True)
        observe(file, StatSnapshot(20, 2, 2), T0 + 118)
        assert decide(file, T0 + 121, RULES, pdf_complete=False) is Verdict.WAIT
        assert decide(file, T0 + 123, RULES, pdf_complete=False) is Verdict.SETTLED_WITHOUT_EOF

    def test_decide_not_pdf_ignores_eof(self) -> None:
        """For a file that is not a PDF a missing %%EOF does not matter."""
        assert decide(tracked(), T0 + 5, RULES, pdf_complete=False) is Verdict.SETTLED


class TestNextCheck:
    def test_next_check_window_end(self) -> None:
        """Inside the window the next check is the window's end."""
        file = tracked()
        assert next_check_s(file, T0 + 1, RULES) == T0 + 5

    def test_next_check_after_window(self) -> None:
        """Past the window (empty or waiting PDF) the next check is a settle period later."""
        file = tracked(size=0)
        assert next_check_s(file, T0 + 30, RULES) == T0 + 35

    def test_next_check_minimum(self) -> None:
        """With a zero settle time the next check is still half a second away."""
        rules = SettleRules(settle_s=0.0, empty_grace_s=60.0, pdf_wait_s=120.0)
        assert next_check_s(tracked(size=0), T0 + 30, rules) == T0 + 30.5


class TestPdfEof:
    @pytest.mark.parametrize(("tail", "expected"), [
        pytest.param(b"%PDF-1.7\n...\n%%EOF", True, id="eof-last"),
        pytest.param(b"...%%EOF\n", True, id="eof-lf"),
        pytest.param(b"...%%EOF\r\n", True, id="eof-crlf"),
        pytest.param(b"...%%EOF \t\r\n\f\x00\n", True, id="eof-pdf-whitespace"),
        pytest.param(b"%%EOF\n...incremental update...\n%%EOF\n", True, id="eof-after-update"),
        pytest.param(b"", False, id="empty"),
        pytest.param(b"%PDF-1.7\nstream half written", False, id="no-eof"),
        pytest.param(b"...%%EOF\ngarbage", False, id="text-after-eof"),
        pytest.param(b"...%%EOF\n%%EO", False, id="partial-second-eof"),
        pytest.param(b"...%%EOF x", False, id="letter-after-eof"),
        pytest.param(b"...%%eof\n", False, id="lower-case"),
        pytest.param(b"...%EOF\n", False, id="single-percent"),
    ])
    def test_pdf_eof(self, tail: bytes, expected: bool) -> None:
        """%%EOF is found only in upper case and followed by nothing but PDF whitespace."""
        assert pdf_has_eof(tail) is expected

    def test_is_pdf_name(self) -> None:
        """Names ending in .pdf in any case are PDFs, and other names are not."""
        assert is_pdf_name("scan.PDF") is True
        assert is_pdf_name("Smith [g]/referral.pdf") is True
        assert is_pdf_name("scan.pdf.tmp") is False
        assert is_pdf_name("pdf") is False


def _tail_of(path: Path, size: int) -> bytes:
    """Open ``path``, read its tail for a file of ``size`` bytes, and close it again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_tail(fd, size)
    finally:
        os.close(fd)


LARGE_PDF = bytes(range(256)) * 20 + b"\n%%EOF\n"
SMALL_PDF = b"%PDF-1.4\n%%EOF"


class TestReadTail:
    @pytest.mark.parametrize(("data", "expected_tail"), [
        pytest.param(LARGE_PDF, LARGE_PDF[-PDF_TAIL_BYTES:], id="larger-than-tail"),
        pytest.param(SMALL_PDF, SMALL_PDF, id="smaller-than-tail"),
    ])
    def test_read_tail_sizes(self, tmp_path: Path, data: bytes, expected_tail: bytes) -> None:
        """A file over PDF_TAIL_BYTES gives its last PDF_TAIL_BYTES, and a smaller one all of it."""
        path = tmp_path / "doc.pdf"
        path.write_bytes(data)
        tail = _tail_of(path, len(data))
        assert tail == expected_tail
        assert pdf_has_eof(tail) is True

    def test_read_tail_uses_given_size(self, tmp_path: Path) -> None:
        """The tail ends at the size given, so bytes appended after the stat are not read."""
        path = tmp_path / "growing.pdf"
        path.write_bytes(b"x" * 2000 + b"%%EOF\n" + b"more pages")
        tail = _tail_of(path, 2006)
        assert len(tail) == PDF_TAIL_BYTES
        assert tail.endswith(b"%%EOF\n")

    def test_read_tail_empty(self, tmp_path: Path) -> None:
        """An empty file gives an empty tail."""
        path = tmp_path / "empty.pdf"
        path.touch()
        assert _tail_of(path, 0) == b""
