"""
``import --dry-run``: walk the drop root and list what an import would do with each
file, without hashing, uploading or changing the ledger.
"""

from __future__ import annotations

import os
from typing import TextIO

from uploader.config import Config
from uploader.constants import ExitCode
from uploader.folders import IgnoreRules, resolve_folder, split_drop_path
from uploader.ledger import Ledger
from uploader.status import printable
from uploader.watcher import scan_tree


def plan(config: Config) -> list[tuple[str, str, str]]:
    """
    Decide per file: (path, client or "", what would happen).

    Raises:
        OSError: the drop root cannot be read.
    """
    result = scan_tree(config.watch.root, IgnoreRules(config.watch.ignore))
    ledger = Ledger.open(config.ledger.path, readonly=True) if config.ledger.path.exists() else None
    lines = []
    try:
        for rel in result.files:
            lines.append(_plan_one(rel, config, ledger))
    finally:
        if ledger is not None:
            ledger.close()
    for rel, kind in result.skipped:
        lines.append((rel, "", f"skip: {kind}"))
    return lines


def _plan_one(rel: str, config: Config, ledger: Ledger | None) -> tuple[str, str, str]:
    folder, _ = split_drop_path(rel)
    if folder is None:
        return rel, "", "unmapped: files directly in the drop root belong to no client"
    resolution = resolve_folder(folder, config.clients)
    if resolution.client_id is None:
        return rel, "", f"unmapped: {resolution.problem}"
    if ledger is not None:
        row = ledger.find_live(os.fsencode(rel))
        st = os.lstat(config.watch.root / rel)
        if row is not None and (row.size, row.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return rel, resolution.client_id, f"already in the ledger: {row.state}"
    if st_size(config, rel) == 0:
        return rel, resolution.client_id, (
            f"wait: empty; fails after {config.watch.empty_grace_seconds:g} s if still empty")
    return rel, resolution.client_id, "upload"


def st_size(config: Config, rel: str) -> int:
    """Return the size of a file under the drop root, or -1 when it is gone."""
    try:
        return os.lstat(config.watch.root / rel).st_size
    except OSError:
        return -1


def dry_run(config: Config, out: TextIO) -> int:
    """Print the plan, one tab-separated line per file, and a summary."""
    try:
        lines = plan(config)
    except OSError as exc:
        out.write(f"The drop root {config.watch.root} cannot be read: {exc}\n")
        return ExitCode.TEMPORARY
    for rel, client, action in lines:
        shown = printable(os.fsencode(rel).decode("utf-8", "replace"))
        out.write(f"{action}\t{client}\t{shown}\n")
    uploads = sum(1 for _, _, action in lines if action == "upload")
    out.write(f"{uploads} of {len(lines)} files would be uploaded.\n")
    return ExitCode.OK
