"""
Move a file out of its drop folder once its upload is settled: into the archive,
into the failed folder beside a reason file, or away.

The archive and the failed folder mirror ``drop-folder/relative/path``. A move never
overwrites anything: when the name is taken, the file gets ``name (2).ext``,
``name (3).ext`` and so on. Names are claimed race-free, with a hard link or an
``O_EXCL`` create, never by checking first and writing after. The source is removed
only once its bytes are in place and synced. Symbolic links are never followed: a
symbolic link as the source is moved as a link, and a mirrored folder that turns out
to be a symbolic link makes the move fail. No folder is ever removed.

Errors such as ENOSPC, EROFS and EACCES propagate as ``OSError`` and leave the
source where it was.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from uploader.constants import CHUNK_BYTES

#: Suffix of the reason file written beside each failed file.
REASON_SUFFIX = ".reason.txt"

# link() fails with these where hard links are impossible: across filesystems
# (EXDEV), on filesystems without them (EPERM, ENOTSUP), for a file the daemon does
# not own under fs.protected_hardlinks (EPERM), or at the link count limit (EMLINK).
_NO_HARD_LINK_ERRNOS = frozenset(
    {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
)

# Far more "name (N).ext" tries than a real folder needs; a guard against looping.
_MAX_NAME_TRIES = 10_000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def archive_file(src: Path, rel_path: str, archive_dir: Path, *, staff_group: str | None) -> Path:
    """
    Move an uploaded file into the archive, mirroring its path under the drop root.

    The archive folder and the mirrored folders, when this call creates them, get
    mode 0o700, or 0o750 and the staff group when ``staff_group`` is set. Missing
    folders above the archive folder get the default mode. A file moved with a hard link keeps its mode and owner; a
    copied file gets mode 0o600, or 0o640 and the staff group.

    Args:
        src: The file in its drop folder.
        rel_path: Its path relative to the drop root, with ``/`` separators.
        archive_dir: The archive folder; created if missing.
        staff_group: The group that may read what is created, or None.

    Returns:
        The file's new path; its name differs from the original when that was taken.

    Raises:
        OSError: The move failed; the source is still in place.
        ValueError: ``rel_path`` is absolute, empty or contains ``..``.
    """
    return _move_into(src, rel_path, archive_dir, staff_group=staff_group, reason=None)


def move_to_failed(
    src: Path, rel_path: str, failed_dir: Path, reason: str, *, staff_group: str | None
) -> Path:
    """
    Move a permanently failed file into the failed folder, with a reason file beside it.

    The reason file is ``<final name>.reason.txt``, UTF-8, mode 0o600, or 0o640 and the
    staff group. It is written and synced before the file is moved, so the file never
    sits in the failed folder without its reason. Folders and copies get the modes that
    ``archive_file`` describes.

    Args:
        src: The file in its drop folder.
        rel_path: Its path relative to the drop root, with ``/`` separators.
        failed_dir: The failed folder; created if missing.
        reason: The text of the reason file.
        staff_group: The group that may read what is created, or None.

    Returns:
        The file's new path.

    Raises:
        OSError: The move failed; the source is still in place.
        ValueError: ``rel_path`` is absolute, empty or contains ``..``.
    """
    return _move_into(
        src, rel_path, failed_dir, staff_group=staff_group, reason=reason.encode("utf-8")
    )


def restore_from_failed(failed_path: Path, drop_path: Path) -> None:
    """
    Move a failed file back to its place in the drop folder so it is tried again, and
    remove its reason file. The drop folder's subfolders are created if missing.

    Raises:
        FileExistsError: a file of that name is in the drop folder again already.
        OSError: the move failed; nothing was removed.
    """
    drop_path.parent.mkdir(parents=True, exist_ok=True)
    # link() never replaces an existing file, so a newer upload of the same name is safe.
    os.link(failed_path, drop_path, follow_symlinks=False)
    os.unlink(failed_path)
    reason = failed_path.with_name(failed_path.name + REASON_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        reason.unlink()


def delete_file(src: Path) -> None:
    """
    Delete an uploaded file; a file that is already gone is fine.

    A symbolic link is removed itself, never its target.

    Raises:
        OSError: The file could not be removed, e.g. ``IsADirectoryError`` for a folder.
    """
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass


def _move_into(
    src: Path, rel_path: str, dest_root: Path, *, staff_group: str | None, reason: bytes | None
) -> Path:
    folders, name = _split_rel_path(rel_path)
    gid = _group_id(staff_group)
    before = os.lstat(src)
    _check_movable(src, before)
    dir_fd = _open_mirror_folders(dest_root, folders, gid)
    try:
        placed = _place(src, before, dir_fd, name, gid, reason)
        _fsync_dir(dir_fd)
    except OSError as exc:
        # The error would name a temporary file whose name changes on every try. The
        # folder is what a person has to fix, and it keeps repeats countable in the log.
        raise OSError(exc.errno, exc.strerror or str(exc),
                      str(dest_root.joinpath(*folders))) from exc
    finally:
        os.close(dir_fd)
    _unlink_if_unchanged(src, before)
    return dest_root.joinpath(*folders, placed)


def _split_rel_path(rel_path: str) -> tuple[list[str], str]:
    path = PurePosixPath(rel_path)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise ValueError(
            f"expected a path relative to the drop root without '..', got {rel_path!r}"
        )
    *folders, name = path.parts
    return folders, name


def _group_id(staff_group: str | None) -> int | None:
    if staff_group is None:
        return None
    try:
        return grp.getgrnam(staff_group).gr_gid
    except KeyError:
        raise OSError(
            errno.EINVAL,
            f"group {staff_group!r} does not exist; create it or correct upload.staff_group",
        ) from None


def _check_movable(src: Path, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "a folder is never moved", str(src))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise OSError(errno.EINVAL, "not a regular file or symbolic link", str(src))


# --- Folders ---


def _set_access(fd: int, mode: int, gid: int | None) -> None:
    if gid is not None:
        os.fchown(fd, -1, gid)
    # Set the mode explicitly, because the umask has already narrowed the one
    # passed to mkdir or open.
    os.fchmod(fd, mode)


def _folder_mode(gid: int | None) -> int:
    return 0o700 if gid is None else 0o750


def _file_mode(gid: int | None) -> int:
    return 0o600 if gid is None else 0o640


def _ensure_root(root: Path, gid: int | None) -> None:
    # The root is the operator's own choice, so a symbolic link there is followed.
    if root.is_dir():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(root, _folder_mode(gid))
    except FileExistsError:
        return
    fd = os.open(root, _DIR_FLAGS)
    try:
        _set_access(fd, _folder_mode(gid), gid)
    finally:
        os.close(fd)


def _open_child_folder(parent_fd: int, name: str, gid: int | None) -> int:
    created = True
    try:
        os.mkdir(name, _folder_mode(gid), dir_fd=parent_fd)
    except FileExistsError:
        created = False
    # O_NOFOLLOW makes a symbolic link planted in the mirror fail with ELOOP.
    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    if created:
        try:
            _set_access(fd, _folder_mode(gid), gid)
        except BaseException:
            os.close(fd)
            raise
    return fd


def _open_mirror_folders(root: Path, folders: list[str], gid: int | None) -> int:
    """Create and open ``root/folders...`` one level at a time, without following links."""
    _ensure_root(root, gid)
    fd = os.open(root, _DIR_FLAGS)
    try:
        for name in folders:
            child = _open_child_folder(fd, name, gid)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(dir_fd: int) -> None:
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        # Some network filesystems reject fsync on a folder; the file itself is synced.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


# --- Claiming a free name ---


def _candidate_names(name: str) -> Iterator[str]:
    yield name
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    for number in range(2, _MAX_NAME_TRIES + 1):
        yield f"{stem} ({number}){ext}"


def _discard(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _write_new_file(dir_fd: int, name: str, data: bytes, gid: int | None) -> bool:
    """Create ``name`` with ``data`` and sync it; return False when the name is taken."""
    try:
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        return False
    try:
        _write_all(fd, data)
        _set_access(fd, _file_mode(gid), gid)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _discard(dir_fd, name)
        raise
    os.close(fd)
    return True


def _claim_name(
    dir_fd: int, name: str, put: Callable[[str], None], gid: int | None, reason: bytes | None
) -> str:
    """
    Run ``put(candidate)`` for each candidate name until one does not exist yet.

    ``put`` must raise ``FileExistsError`` instead of replacing a file. With a
    ``reason``, the reason file's name is claimed first and released again when the
    file's own name turns out to be taken.
    """
    for candidate in _candidate_names(name):
        reason_name = candidate + REASON_SUFFIX
        if reason is not None and not _write_new_file(dir_fd, reason_name, reason, gid):
            continue
        try:
            put(candidate)
        except BaseException as exc:
            if reason is not None:
                _discard(dir_fd, reason_name)
            if isinstance(exc, FileExistsError):
                continue
            raise
        return candidate
    raise FileExistsError(errno.EEXIST, f"no free name after {_MAX_NAME_TRIES} tries", name)


# --- Placing the bytes ---


def _place(
    src: Path,
    before: os.stat_result,
    dir_fd: int,
    name: str,
    gid: int | None,
    reason: bytes | None,
) -> str:
    """Link ``src`` into the open folder under a free name, or copy it where links fail."""

    def link_source(candidate: str) -> None:
        os.link(src, candidate, dst_dir_fd=dir_fd, follow_symlinks=False)

    try:
        return _claim_name(dir_fd, name, link_source, gid, reason)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINK_ERRNOS:
            raise
    if stat.S_ISLNK(before.st_mode):
        target = os.readlink(src)
        return _claim_name(
            dir_fd, name, lambda candidate: os.symlink(target, candidate, dir_fd=dir_fd),
            gid, reason,
        )
    temp_name = _copy_to_temp(src, before, dir_fd, gid)
    try:
        return _claim_name(
            dir_fd, name, lambda candidate: _publish(dir_fd, temp_name, candidate), gid, reason
        )
    finally:
        _discard(dir_fd, temp_name)


def _publish(dir_fd: int, temp_name: str, candidate: str) -> None:
    """Give the complete copy ``temp_name`` the name ``candidate``, never replacing one."""
    try:
        os.link(temp_name, candidate, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINK_ERRNOS:
            raise
    # No hard links on this filesystem, and os.rename would replace a file. Claim the
    # name with an empty placeholder, which O_EXCL makes race-free, then rename the
    # copy over the placeholder, which belongs to us.
    os.close(os.open(candidate, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd))
    try:
        os.rename(temp_name, candidate, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _discard(dir_fd, candidate)
        raise


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_bytes(src_fd: int, out_fd: int) -> None:
    while chunk := os.read(src_fd, CHUNK_BYTES):
        _write_all(out_fd, chunk)


def _copy_to_temp(src: Path, before: os.stat_result, dir_fd: int, gid: int | None) -> str:
    """Copy ``src`` into a new hidden file in the open folder, synced; return its name."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        start = os.fstat(src_fd)
        if (start.st_dev, start.st_ino) != (before.st_dev, before.st_ino):
            raise OSError(errno.EAGAIN, "the file was replaced before it was moved", str(src))
        # A short fixed-length name, so a long original name cannot exceed NAME_MAX.
        temp_name = f".coreplus-uploader-{secrets.token_hex(8)}.partial"
        out_fd = os.open(temp_name, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            _fill_copy(src_fd, out_fd, start, gid)
            _check_unchanged(src, src_fd, start)
        except BaseException:
            os.close(out_fd)
            _discard(dir_fd, temp_name)
            raise
        os.close(out_fd)
        return temp_name
    finally:
        os.close(src_fd)


def _fill_copy(src_fd: int, out_fd: int, start: os.stat_result, gid: int | None) -> None:
    _copy_bytes(src_fd, out_fd)
    # Keep the modification time, so the archive shows when the document was made.
    os.utime(out_fd, ns=(start.st_atime_ns, start.st_mtime_ns))
    _set_access(out_fd, _file_mode(gid), gid)
    os.fsync(out_fd)


def _check_unchanged(src: Path, src_fd: int, start: os.stat_result) -> None:
    end = os.fstat(src_fd)
    if (end.st_size, end.st_mtime_ns) != (start.st_size, start.st_mtime_ns):
        raise OSError(
            errno.EAGAIN, "the file changed while it was copied; the copy was discarded", str(src)
        )


def _unlink_if_unchanged(src: Path, before: os.stat_result) -> None:
    """Remove the source, unless another file has taken its name since ``before``."""
    try:
        now = os.lstat(src)
    except FileNotFoundError:
        return
    # NOTE: a file renamed onto src between this lstat and the unlink would still be
    # removed; the window is a few microseconds.
    if (now.st_dev, now.st_ino) == (before.st_dev, before.st_ino):
        os.unlink(src)
