"""
The command line: parse arguments, load configuration, set up logging, run a command
and turn its outcome into an exit code. Only this module exits or prints errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from uploader import __version__, export, status
from uploader.config import Config, load_config
from uploader.constants import ExitCode, State
from uploader.credentials import load_credentials
from uploader.daemon import Daemon, RunOptions
from uploader.exceptions import ConfigError, LedgerError
from uploader.ledger import DISPOSITION_RETRIED, Ledger
from uploader.logs import configure_logging

DEFAULT_CONFIG = Path("/etc/coreplus-uploader/config.toml")

#: Name of the key file that ``log.file_names = "hide"`` uses, beside the ledger.
NAME_KEY_FILE = "log-name-key"


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for every command."""
    parser = argparse.ArgumentParser(
        prog="coreplus-uploader",
        description="Upload documents dropped into per-client folders to coreplus.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, *, json_flag: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                         help=f"configuration file (default: {DEFAULT_CONFIG})")
        if json_flag:
            sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sub

    command("run", "run the daemon: watch the drop root and upload settled files",
            json_flag=False)
    imp = command("import", "upload everything in the drop root once, then exit",
                  json_flag=False)
    imp.add_argument("--dry-run", action="store_true",
                     help="list what would be uploaded; change nothing")
    imp.add_argument("--report", type=Path, metavar="FILE",
                     help="write a CSV line per file handled to FILE (created with mode 0600)")
    imp.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                     help="how long to wait for deferred files before exiting with 75 "
                     "(default: 600); uploads still in flight then get up to "
                     "upload.shutdown_grace_seconds more to finish")
    command("status", "show the daemon's state and every file that needs attention")
    check = command("check", "check the configuration, permissions, ledger and clock")
    check.add_argument("--online", action="store_true",
                       help="also sign one request to coreplus, look up every mapped client "
                       "id, and log in to the alert mail server")
    check.add_argument("--unit", type=Path, metavar="FILE",
                       help="systemd unit to compare with (default: the installed "
                       "coreplus-uploader.service)")
    retry = command("retry", "put failed, deferred, held or uncertain files back in the queue")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="ledger row ids")
    retry.add_argument("--all", action="store_true", help="every such file")
    forget = command("forget", "let the same bytes be uploaded again for a path")
    forget.add_argument("path", help="path relative to the drop root, or absolute under it")
    ledger = command("ledger", "export or back up the ledger")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    exp = ledger_commands.add_parser("export", help="write the audit trail as CSV")
    exp.add_argument("--format", choices=["csv"], default="csv")
    exp.add_argument("--output", type=Path, metavar="FILE",
                     help="write to FILE (mode 0600) instead of stdout")
    backup = ledger_commands.add_parser("backup", help="copy the ledger consistently")
    backup.add_argument("file", type=Path)
    for sub in (exp, backup):
        # Accept the options after the subcommand too, as `COMMAND --config FILE` reads;
        # SUPPRESS keeps a value given before the subcommand from being reset.
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help=f"configuration file (default: {DEFAULT_CONFIG})")
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print JSON for scripts")

    from uploader import standin

    stand_in = commands.add_parser("stand-in", help="run the local imitation of coreplus",
                                   description="Run the local imitation of the coreplus API "
                                   "for tests and the demo.")
    standin.add_arguments(stand_in)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "stand-in":
        from uploader import standin

        return standin.run_from_args(args)
    if args.command == "check":
        return _check(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"coreplus-uploader: configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    handlers: dict[str, Callable[[argparse.Namespace, Config], int]] = {
        "run": _run, "import": _import, "status": _status, "retry": _retry,
        "forget": _forget, "ledger": _ledger,
    }
    try:
        return handlers[args.command](args, config)
    except ConfigError as exc:
        print(f"coreplus-uploader: configuration error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except LedgerError as exc:
        print(f"coreplus-uploader: {exc}", file=sys.stderr)
        return ExitCode.LEDGER_UNAVAILABLE


# -- run and import ----------------------------------------------------------------------


def _setup_logging(config: Config) -> None:
    hide_key = name_key(config) if config.log.file_names == "hide" else None
    configure_logging(format=config.log.format, level=config.log.level, hide_key=hide_key)


def name_key(config: Config) -> bytes:
    """Return the HMAC key for hidden file names, created owner-only beside the ledger."""
    path = config.ledger.path.parent / NAME_KEY_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


def _run(args: argparse.Namespace, config: Config) -> int:
    credentials = load_credentials(config.api)
    _setup_logging(config)
    return asyncio.run(Daemon(config, credentials).run())


def _import(args: argparse.Namespace, config: Config) -> int:
    if args.dry_run:
        from uploader.importer import dry_run

        _setup_logging(config)
        return dry_run(config, sys.stdout)
    credentials = load_credentials(config.api)
    _setup_logging(config)
    started = time.time()
    progress = _ProgressBar() if sys.stderr.isatty() else None
    options = RunOptions(oneshot=True, import_timeout_s=args.timeout,
                         on_progress=progress.update if progress else None)
    try:
        code = asyncio.run(Daemon(config, credentials, options).run())
    finally:
        if progress is not None:
            progress.close()
    if args.report is not None:
        _write_report(config, args.report, started)
    print(_import_summary(config, started, code))
    return code


def _import_summary(config: Config, since: float, code: int) -> str:
    """Summarise what this import did, by state, in one line for scripts and cron mail."""
    ledger = Ledger.open(config.ledger.path, readonly=True)
    try:
        counts: dict[str, int] = {}
        for row in ledger.all_rows():
            if row.updated_at >= since:
                counts[row.state] = counts.get(row.state, 0) + 1
    finally:
        ledger.close()
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no files"
    return f"Import finished (exit {code}): {parts}."


class _ProgressBar:
    """A tqdm bar on stderr that follows files reaching a final state."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=0, unit="file", desc="Uploading", file=sys.stderr)

    def update(self, uploader: object, found: int) -> None:
        counters = uploader.counters  # type: ignore[attr-defined]
        done = counters.uploaded + counters.duplicate + counters.failed + counters.held
        self._bar.total = max(found, done)
        self._bar.n = done
        self._bar.set_postfix(uploaded=counters.uploaded, duplicate=counters.duplicate,
                              failed=counters.failed, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _write_report(config: Config, output: Path, since: float) -> None:
    ledger = Ledger.open(config.ledger.path, readonly=True)
    try:
        rows = [r for r in ledger.all_rows() if r.updated_at >= since]
        export.export_to(rows, output)
    finally:
        ledger.close()


# -- commands that read or change the ledger ------------------------------------------------


def _status(args: argparse.Namespace, config: Config) -> int:
    report = status.collect(config.ledger.path)
    if args.json:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(status.render_text(report))
    return ExitCode.OK


def _check(args: argparse.Namespace) -> int:
    from uploader import check

    report = check.run_check(args.config, online=args.online, unit_path=args.unit)
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(check.render_text(report))
    return report.exit_code()


def _retry(args: argparse.Namespace, config: Config) -> int:
    if not args.ids and not args.all:
        print("coreplus-uploader: give row ids (see `status`) or --all", file=sys.stderr)
        return ExitCode.USAGE
    ledger = Ledger.open(config.ledger.path, create=False)
    try:
        wanted = None if args.all else set(args.ids)
        restored, problems = _restore_failed(ledger, config, wanted)
        changed = ledger.requeue(None if args.all else args.ids)
    finally:
        ledger.close()
    unknown = [f"#{row_id} is not a failed, deferred, held or uncertain file "
               "(see `coreplus-uploader status`)"
               for row_id in sorted(wanted or ()) if row_id not in changed]
    for problem in problems + unknown:
        print(f"coreplus-uploader: {problem}", file=sys.stderr)
    _print_result(args, {"requeued": changed, "restored": restored, "problems": problems},
                  f"Put {len(changed)} file(s) back in the queue: {changed or 'none'}. "
                  f"Moved {len(restored)} failed file(s) back to their drop folders: "
                  f"{restored or 'none'}.")
    if unknown:
        return ExitCode.USAGE
    return ExitCode.FILES_FAILED if problems else ExitCode.OK


def _restore_failed(ledger: Ledger, config: Config,
                    wanted: set[int] | None) -> tuple[list[int], list[str]]:
    """
    Move failed files back into their drop folders, where the daemon treats them as a new
    attempt. Their rows stay ``failed`` as history.
    """
    from uploader import disposal

    restored, problems = [], []
    for row in ledger.rows_in_state(State.FAILED):
        if wanted is not None and row.id not in wanted:
            continue
        if wanted is not None:
            wanted.discard(row.id)
        if not row.final_path:
            continue
        try:
            disposal.restore_from_failed(Path(row.final_path), config.watch.root / row.rel_path_str)
        except OSError as exc:
            problems.append(f"could not move #{row.id} {row.final_path} back to the drop "
                            f"folder: {exc}. Move it back by hand.")
            continue
        ledger.update(row.id, disposition=DISPOSITION_RETRIED, final_path=None)
        restored.append(row.id)
    return restored, problems


def _forget(args: argparse.Namespace, config: Config) -> int:
    path = Path(args.path)
    if path.is_absolute():
        try:
            path = path.relative_to(config.watch.root)
        except ValueError:
            print(f"coreplus-uploader: {args.path} is not under the drop root "
                  f"{config.watch.root}", file=sys.stderr)
            return ExitCode.USAGE
    ledger = Ledger.open(config.ledger.path, create=False)
    try:
        count = ledger.forget(os.fsencode(path.as_posix()))
    finally:
        ledger.close()
    if not count:
        print(f"coreplus-uploader: the ledger has no rows for {path.as_posix()}; give the "
              "path relative to the drop root, as `status` shows it", file=sys.stderr)
        return ExitCode.USAGE
    _print_result(args, {"forgotten": count, "path": path.as_posix()},
                  f"Marked {count} ledger row(s) for {path.as_posix()} as forgotten.")
    return ExitCode.OK


def _ledger(args: argparse.Namespace, config: Config) -> int:
    ledger = Ledger.open(config.ledger.path, create=False, readonly=True)
    try:
        if args.ledger_command == "export":
            count = export.export_to(ledger.all_rows(), args.output)
            if args.output is not None:
                _print_result(args, {"rows": count, "output": str(args.output)},
                              f"Wrote {count} rows to {args.output}.")
        else:
            ledger.backup(args.file)
            _print_result(args, {"backup": str(args.file)}, f"Wrote a copy to {args.file}.")
    except FileExistsError as exc:
        print(f"coreplus-uploader: {exc.filename} exists already; choose a new file name",
              file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"coreplus-uploader: cannot write {exc.filename or 'the output file'}: "
              f"{exc.strerror or exc}. Check that the folder exists and is writable.",
              file=sys.stderr)
        return ExitCode.USAGE
    finally:
        ledger.close()
    return ExitCode.OK


def _print_result(args: argparse.Namespace, data: dict[str, object], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data))
    else:
        print(text)
