"""
The plain-text status file for reception staff, in the drop root.

Reception staff work only with folders, so when uploads are paused or files need a person,
the daemon writes one short paragraph into ``UPLOAD-STATUS.txt`` at the top of the
drop root, and deletes the file once all is well. The watcher ignores the file by
name. It is written atomically (a hidden temporary file, then a rename), with Windows
line endings because staff open it over a Samba share, and readable by
``upload.staff_group`` when that is set.
"""

from __future__ import annotations

import contextlib
import grp
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog

from uploader.constants import STATUS_FILE_NAME

log = structlog.get_logger("uploader.statusfile")

#: Names listed per group of files before the rest are only counted.
MAX_NAMES = 5

#: Line width, so the paragraph reads well in Notepad without word wrap.
WIDTH = 76


@dataclass(frozen=True)
class ReceptionView:
    """
    The facts reception needs, taken from the ledger by the operations loop.

    Names are drop-root-relative paths, or None each when ``log.file_names = "hide"``
    is in force, so that only counts are shown.
    """

    paused_reason: str | None = None
    """The first sentence of the pause reason, or None when uploads run."""
    paused_since: float | None = None
    """Unix time the pause was first seen."""
    failed: Sequence[str | None] = field(default_factory=list)
    """Failed files still in the failed folder."""
    held: Sequence[str | None] = field(default_factory=list)
    """Files waiting in their drop folder for a person."""
    unmapped: Sequence[str | None] = field(default_factory=list)
    """Drop folders, or files in the drop root itself, that map to no client."""
    failed_dir: Path | None = None
    """The failed folder, named in the text."""

    @property
    def all_well(self) -> bool:
        """True when there is nothing to tell reception."""
        return not (self.paused_reason or self.failed or self.held or self.unmapped)


def _files(count: int) -> str:
    return "1 file" if count == 1 else f"{count} files"


def _name_list(names: Sequence[str | None]) -> str:
    """': a, b and 2 more' for shown names; empty when names are hidden."""
    shown = [name for name in names if name]
    if not shown:
        return ""
    listed = ", ".join(shown[:MAX_NAMES])
    rest = len(names) - min(len(shown), MAX_NAMES)
    return f": {listed}" + (f" and {rest} more" if rest else "")


def _clock(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s).astimezone().strftime("%H:%M on %d %b %Y")


def _paused_sentence(view: ReceptionView) -> str:
    since = f" since {_clock(view.paused_since)}" if view.paused_since else ""
    return (f"Uploads to coreplus are paused{since} because of a problem that IT support "
            f"needs to fix ({view.paused_reason.rstrip('.') if view.paused_reason else ''}). "
            "Documents you save are safe in their folders and go up by themselves once it "
            "is fixed, so please tell IT support.")


def _failed_sentence(view: ReceptionView) -> str:
    where = f" ({view.failed_dir})" if view.failed_dir else ""
    count = len(view.failed)
    return (f"{_files(count)} could not be uploaded and "
            f"{'was' if count == 1 else 'were'} moved to the failed folder{where}"
            f"{_name_list(view.failed)}. Beside each is a .reason.txt file that says what "
            "to do; once a file is dealt with, delete it and its reason file from the "
            "failed folder.")


def _held_sentence(view: ReceptionView) -> str:
    count = len(view.held)
    return (f"{_files(count)} {'is' if count == 1 else 'are'} waiting in their folder for "
            f"IT support to check{_name_list(view.held)}.")


def _unmapped_sentence(view: ReceptionView) -> str:
    count = len(view.unmapped)
    items = "1 item" if count == 1 else f"{count} items"
    return (f"{items} in this folder {'is' if count == 1 else 'are'} not uploaded because "
            f"{'it is' if count == 1 else 'they are'} not in a folder whose name matches a "
            f"client{_name_list(view.unmapped)}. Put files inside a client's folder, and "
            "name each client folder so that it ends with the client id in brackets, for "
            "example 'Nguyen, Thi [1b4e28ba-2fa1-11d2-883f-0016d3cca427]', or ask IT "
            "support to add the folder name to the uploader's client list.")


def render(view: ReceptionView) -> str | None:
    """
    Write the paragraph for reception.

    Returns:
        The text with Windows line endings but without the "updated" line, or None
        when all is well and the file should not exist.
    """
    if view.all_well:
        return None
    sentences = []
    if view.paused_reason:
        sentences.append(_paused_sentence(view))
    if view.failed:
        sentences.append(_failed_sentence(view))
    if view.held:
        sentences.append(_held_sentence(view))
    if view.unmapped:
        sentences.append(_unmapped_sentence(view))
    paragraph = textwrap.fill(" ".join(sentences), WIDTH)
    return "\r\n".join(["UPLOADS TO COREPLUS NEED ATTENTION", "", *paragraph.split("\n")])


class StatusFile:
    """
    Keep ``UPLOAD-STATUS.txt`` in the drop root in step with the daemon's state.

    Args:
        root: The drop root.
        staff_group: Group given read access (mode 0640); None leaves the file 0600.
    """

    def __init__(self, root: Path, staff_group: str | None = None) -> None:
        self.path = root / STATUS_FILE_NAME
        self._temp = root / f".{STATUS_FILE_NAME}.tmp"
        self._staff_group = staff_group
        self._written: str | None = None

    def update(self, text: str | None, now: float | None = None) -> bool:
        """
        Write ``text`` (with an "updated" line) when it differs from the file's text,
        or remove the file when ``text`` is None.

        Returns:
            True when the file was written or removed.

        Raises:
            OSError: The drop root cannot be written.
        """
        if text is None:
            self._written = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            return True
        if text == self._written and self.path.exists():
            return False
        stamp = datetime.fromtimestamp(now).astimezone() if now else datetime.now().astimezone()
        footer = f"Updated {stamp.strftime('%H:%M on %d %b %Y')}. This file goes away by itself " \
                 "when all is well."
        self._write(f"{text}\r\n\r\n{footer}\r\n".encode())
        self._written = text
        return True

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()
        fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                self._share_with_staff(out.fileno())
                out.write(data)
            os.replace(self._temp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                self._temp.unlink()
            raise

    def _share_with_staff(self, fd: int) -> None:
        """Give the staff group read access; the file stays 0600 when that fails."""
        gid = self._group_id()
        if gid is None:
            return
        try:
            os.fchown(fd, -1, gid)
        except PermissionError as exc:
            log.warning("status_file.failed", group=self._staff_group, error=str(exc),
                        message=f"The status file cannot be given to the group "
                        f"{self._staff_group}, so staff cannot read it.",
                        action="Add the service's user to that group, or set "
                        "upload.staff_group to the service's own group.")
            return
        os.fchmod(fd, 0o640)

    def _group_id(self) -> int | None:
        if self._staff_group is None:
            return None
        try:
            return grp.getgrnam(self._staff_group).gr_gid
        except KeyError:
            log.warning("status_file.failed", group=self._staff_group,
                        message=f"The staff group {self._staff_group} does not exist, so "
                        "the status file is readable by the service's user only.",
                        action="Create the group or correct upload.staff_group.")
            return None
