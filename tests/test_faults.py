"""
Faults injected for real while the daemon runs: the stand-in's fault controls, a closed
port, an HTTPS stand-in with an untrusted certificate, tmpfs and read-only mounts, and
awkward files. Each test ends by checking that every document is uploaded exactly once
and byte-identical, is in the failed folder with a reason, or waits in a named state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import os
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from harness import ALPHA, BRAVO, DaemonRunner, Setup, make_setup, wait_until
from standin_helpers import add_faults, received, received_content, set_down, set_up, stats
from structlog.testing import capture_logs

from uploader.constants import State
from uploader.standin import StandIn, StandInSettings, start_standin

SetupFactory = Callable[..., Setup]


def rows_in(setup: Setup, state: str) -> list[Any]:
    return [r for r in setup.rows() if r.state == state]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def mounts() -> Iterator[Callable[..., None]]:
    """Mount helper that unmounts everything it mounted, newest first."""
    mounted: list[Path] = []

    def mount(*args: str, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"mount is not allowed here: {result.stderr.strip()}")
        mounted.append(target)

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


# -- the service misbehaves ------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    {"kind": "status", "status": 429, "retry_after": "1"},
    {"kind": "status", "status": 503, "retry_after": "HTTP-DATE"},
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 502},
    {"kind": "status", "status": 504},
    {"kind": "status", "status": 500, "content_type": "text/html",
     "body": "<html><body><h1>Server Error</h1></body></html>"},
])
async def test_transient_answer_then_one_upload(standin: StandIn, setup_factory: SetupFactory,
                                                fault: dict[str, Any]) -> None:
    """A transient response is retried and the file goes up exactly once."""
    if fault.get("retry_after") == "HTTP-DATE":
        fault = {**fault, "retry_after": email.utils.formatdate(time.time() + 2, usegmt=True)}
    setup = setup_factory()
    await add_faults(standin.url, fault)
    setup.drop("Alpha Person", "letter.txt", b"letter body")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="upload")
        got = await received(standin.url)
        counters = await stats(standin.url)

    assert len(got) == 1
    assert await received_content(standin.url, got[0]["id"]) == b"letter body"
    assert counters["by_status"].get(str(fault["status"])) == 1
    assert setup.rows()[0].attempts == 2
    assert setup.rows()[0].possible_duplicate == 0


async def test_refused_connection_then_service_appears(
        tmp_path: Path, standin_settings: StandInSettings) -> None:
    """With nothing listening the file is deferred; once the service listens it goes up once."""
    port = free_port()
    setup = make_setup(tmp_path, f"http://127.0.0.1:{port}", standin_settings,
                       upload={"max_attempts": 2})
    setup.drop("Alpha Person", "a.txt", b"waiting for the service")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.DEFERRED), what="deferral")
        assert setup.rows()[0].last_error
        standin = await start_standin(standin_settings, port=port)
        try:
            await wait_until(lambda: rows_in(setup, State.UPLOADED), timeout_s=20,
                             what="upload after the service appeared")
            got = await received(standin.url)
        finally:
            await standin.close()

    assert len(got) == 1
    assert stored_bytes_equal(got[0], b"waiting for the service")


def stored_bytes_equal(upload: dict[str, Any], data: bytes) -> bool:
    """Compare the stand-in's stored copy on disk with the expected bytes."""
    return Path(upload["stored_path"]).read_bytes() == data


async def test_outage_keeps_backoff_capped(standin: StandIn, setup_factory: SetupFactory) -> None:
    """During an outage retries stay at the backoff cap; the file goes up soon after recovery."""
    setup = setup_factory(upload={"backoff_max_seconds": 1, "max_attempts": 2})
    await set_down(standin.url, 503)
    setup.drop("Alpha Person", "a.txt", b"outage")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.DEFERRED), what="deferral")
        await asyncio.sleep(6)
        during = (await stats(standin.url))["requests"]
        await set_up(standin.url)
        recovered_at = time.monotonic()
        await wait_until(lambda: rows_in(setup, State.UPLOADED), timeout_s=10, what="recovery")
        recovery_s = time.monotonic() - recovered_at
        got = await received(standin.url)

    # Two tries per cycle, a cycle at most every ~1 s plus the inline wait: no spinning.
    assert during < 30
    assert recovery_s < 4
    assert len(got) == 1
    row = setup.rows()[0]
    assert row.deferrals >= 2


@pytest.mark.parametrize("policy,expected_state,copies", [
    ("retry", State.UPLOADED, 2),
    ("hold", State.HELD, 1),
])
async def test_lost_answer_after_store(standin: StandIn, setup_factory: SetupFactory,
                                       policy: str, expected_state: str, copies: int) -> None:
    """A stored file whose response is lost is retried and flagged, or held, per on_uncertain."""
    setup = setup_factory(upload={"on_uncertain": policy, "backoff_max_seconds": 1})
    await add_faults(standin.url, {"kind": "reset_after_store"})
    setup.drop("Alpha Person", "lost.txt", b"answer lost")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, expected_state), timeout_s=20,
                         what=expected_state)
        await asyncio.sleep(1.5)
        got = await received(standin.url)

    row = setup.rows()[0]
    assert row.state == expected_state
    assert row.possible_duplicate == 1
    assert len(got) == copies
    assert all(stored_bytes_equal(u, b"answer lost") for u in got)
    kept_in_drop = (setup.root / "Alpha Person" / "lost.txt").exists()
    assert kept_in_drop == (policy == "hold")


@pytest.mark.parametrize("fault", [
    {"kind": "bad_json_200"},
    {"kind": "wrong_size_200"},
    {"kind": "slow", "seconds": 4},
])
async def test_unusable_answer_is_uncertain(standin: StandIn, setup_factory: SetupFactory,
                                            fault: dict[str, Any]) -> None:
    """A 200 without JSON, a wrong size, or a response past the idle timeout is held as uncertain."""
    setup = setup_factory(upload={"on_uncertain": "hold"}, api={"idle_timeout_seconds": 1})
    await add_faults(standin.url, fault)
    setup.drop("Alpha Person", "doc.txt", b"stored but unconfirmed")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.HELD), timeout_s=20, what="held")

    row = setup.rows()[0]
    assert row.possible_duplicate == 1
    assert row.remote_id is None
    assert (setup.root / "Alpha Person" / "doc.txt").read_bytes() == b"stored but unconfirmed"


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_refusal_pauses_with_causes(standin: StandIn, setup_factory: SetupFactory,
                                               status: int) -> None:
    """401 and 403 log one service.paused naming the causes, fail nothing, and resume."""
    setup = setup_factory()
    await add_faults(standin.url, {"kind": "status", "status": status})
    setup.drop("Alpha Person", "a.txt", b"paused file")
    with capture_logs() as logs:
        async with DaemonRunner(setup):
            await wait_until(lambda: rows_in(setup, State.UPLOADED), what="resume")
    paused = [e for e in logs if e["event"] == "service.paused"]

    assert len(paused) == 1
    text = paused[0]["message"] + paused[0]["action"]
    for cause in ("access token", "Setup > Add-Ons", "consumer id", "sandbox", "clock"):
        assert cause in text
    assert any(e["event"] == "service.resumed" for e in logs)
    assert rows_in(setup, State.FAILED) == []
    assert len(await received(standin.url)) == 1


@pytest.fixture
async def https_standin(standin_settings: StandInSettings,
                        tls_files: SimpleNamespace) -> AsyncIterator[StandIn]:
    """A stand-in serving HTTPS with the self-signed test certificate, closed at teardown."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    secure = await start_standin(standin_settings, ssl_context=context)
    try:
        yield secure
    finally:
        await secure.close()


async def test_untrusted_certificate_pauses(tmp_path: Path, standin_settings: StandInSettings,
                                            https_standin: StandIn) -> None:
    """An HTTPS stand-in whose certificate does not verify pauses uploads, and no file fails."""
    setup = make_setup(tmp_path, https_standin.url, standin_settings)
    setup.drop("Alpha Person", "a.txt", b"tls")
    with capture_logs() as logs:
        async with DaemonRunner(setup) as runner:
            await wait_until(lambda: getattr(getattr(runner.daemon, "gate", None),
                                             "paused", False), what="pause")
            await asyncio.sleep(0.5)
    assert [r.state for r in setup.rows()] == [State.QUEUED]
    assert len(https_standin.state.received) == 0
    paused = [e for e in logs if e["event"] == "service.paused"]
    assert "api.ca_file" in paused[0]["action"]


async def test_trusted_with_ca_file_uploads(tmp_path: Path, standin_settings: StandInSettings,
                                            tls_files: SimpleNamespace,
                                            https_standin: StandIn) -> None:
    """With api.ca_file naming the stand-in's certificate, the same upload succeeds."""
    setup = make_setup(tmp_path, https_standin.url, standin_settings,
                       api={"ca_file": str(tls_files.cert)})
    setup.drop("Alpha Person", "a.txt", b"tls ok")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="upload")
    assert len(https_standin.state.received) == 1


async def test_clock_skew_is_logged(tmp_path: Path, standin_settings: StandInSettings) -> None:
    """A service clock 30 s ahead gives one clock.skew event; the upload still succeeds."""
    settings = dataclasses.replace(standin_settings, clock_offset_s=30)
    skewed = await start_standin(settings)
    try:
        setup = make_setup(tmp_path, skewed.url, settings)
        setup.drop("Alpha Person", "a.txt", b"skew")
        setup.drop("Alpha Person", "b.txt", b"skew two")
        with capture_logs() as logs:
            async with DaemonRunner(setup):
                await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 2,
                                 what="uploads")
    finally:
        await skewed.close()
    skew = [e for e in logs if e["event"] == "clock.skew"]

    assert len(skew) == 1
    assert 25 <= skew[0]["skew_seconds"] <= 35


async def test_rejections_in_a_row_pause(standin: StandIn, setup_factory: SetupFactory) -> None:
    """Five 404s in a row for different clients pause every upload as a configuration error."""
    setup = setup_factory(upload={"workers": 1}, api={"auth_probe_seconds": 30})
    await add_faults(standin.url, {"kind": "status", "status": 404, "times": 5})
    folders = [f"C{i} [{cid}]" for i, cid in enumerate(
        ["54c8f0b4-632b-49af-99e8-cf729198846d", "0ed45329-5157-40a6-b055-8d5ccf67fc9e",
         "ea531246-5e35-4e32-bd38-ce7cfaf7fa6f", "9a64543a-354b-455e-96b6-0a717b847c14",
         "b780aa53-cdfd-4111-8495-3f49e0ab8e70", "9286e110-faec-443e-9942-e1f9787cd403"])]
    for index, folder in enumerate(folders):
        setup.drop(folder, f"f{index}.txt", f"file {index}".encode())
    async with DaemonRunner(setup) as runner:
        await wait_until(lambda: len(rows_in(setup, State.FAILED)) == 5, what="5 failures")
        await wait_until(lambda: runner.daemon.gate.paused, what="pause")
        await asyncio.sleep(1.0)

    assert len(rows_in(setup, State.QUEUED)) == 1
    assert await received(standin.url) == []


# -- the environment -------------------------------------------------------------------


async def test_missing_root_is_waited_for(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A drop root missing at start is waited for; files in it go up once it appears."""
    setup = setup_factory()
    setup.root.rmdir()
    async with DaemonRunner(setup) as runner:
        await asyncio.sleep(1.0)
        assert not runner.task.done()  # type: ignore[union-attr]
        setup.drop("Alpha Person", "late.txt", b"root came back")
        await wait_until(lambda: rows_in(setup, State.UPLOADED), timeout_s=20, what="upload")

    assert len(await received(standin.url)) == 1


async def test_root_deleted_and_recreated(standin: StandIn, setup_factory: SetupFactory) -> None:
    """After rm -rf of the drop root and mkdir again, new files go up within seconds."""
    setup = setup_factory(watch={"rescan_seconds": 300})
    async with DaemonRunner(setup):
        await asyncio.sleep(0.5)
        subprocess.run(["rm", "-rf", str(setup.root)], check=True)
        await asyncio.sleep(1.0)
        setup.root.mkdir()
        await asyncio.sleep(6.0)
        setup.drop("Bravo Person", "after.txt", b"after the new root")
        await wait_until(lambda: rows_in(setup, State.UPLOADED), timeout_s=8,
                         what="upload long before the next rescan")

    assert [u["name"] for u in await received(standin.url)] == ["after.txt"]


async def test_root_removed_and_recreated(standin: StandIn, setup_factory: SetupFactory) -> None:
    """After the drop root is removed and made again, the watcher returns; nothing re-uploads."""
    setup = setup_factory(upload={"after_success": "keep"})
    setup.drop("Alpha Person", "first.txt", b"first")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="first upload")
        subprocess.run(["mv", str(setup.root), str(setup.tmp / "away")], check=True)
        await asyncio.sleep(1.0)
        subprocess.run(["mv", str(setup.tmp / "away"), str(setup.root)], check=True)
        await asyncio.sleep(7.0)
        setup.drop("Bravo Person", "second.txt", b"second")
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 2, timeout_s=20,
                         what="second upload")

    got = await received(standin.url)
    assert sorted(u["name"] for u in got) == ["first.txt", "second.txt"]
    assert [r.state for r in setup.rows()] == [State.UPLOADED, State.UPLOADED]


async def test_read_only_archive_keeps_row(standin: StandIn, setup_factory: SetupFactory,
                                           mounts: Callable[..., None]) -> None:
    """
    A read-only archive leaves the rows uploaded and the files in place, with no second
    upload and one log line that names the archive folder.
    """
    setup = setup_factory(watch={"rescan_seconds": 1})
    (setup.archive / "Alpha Person").mkdir(parents=True)
    mounts("--bind", "-o", "ro", str(setup.archive), target=setup.archive)
    names = ["a.txt", "b.txt", "c.txt"]
    for name in names:
        setup.drop("Alpha Person", name, f"cannot archive {name}".encode())
    with capture_logs() as logs:
        async with DaemonRunner(setup):
            await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 3, what="uploads")
            await asyncio.sleep(3.0)

    rows = setup.rows()
    assert [r.disposition for r in rows] == ["pending"] * 3
    for name in names:
        assert (setup.root / "Alpha Person" / name).read_bytes() == \
            f"cannot archive {name}".encode()
    assert len(await received(standin.url)) == 3
    failures = [e for e in logs if e["event"] == "move.failed"]
    assert len(failures) == 1
    assert str(setup.archive / "Alpha Person") in failures[0]["error"]
    assert ".partial" not in failures[0]["error"]


async def test_file_removed_before_archive(standin: StandIn,
                                          setup_factory: SetupFactory) -> None:
    """A file removed before the response arrives is uploaded once, logged as not archived."""
    setup = setup_factory()
    await add_faults(standin.url, {"kind": "slow", "seconds": 2})
    path = setup.drop("Alpha Person", "gone.txt", b"removed by someone")
    with capture_logs() as logs:
        async with DaemonRunner(setup):
            await wait_until(lambda: rows_in(setup, State.UPLOADING), what="upload in flight")
            await asyncio.sleep(0.5)
            path.unlink()
            await wait_until(lambda: [r.disposition for r in setup.rows()] == ["deleted"],
                             what="the move recorded")

    assert [r.state for r in setup.rows()] == [State.UPLOADED]
    got = await received(standin.url)
    assert [g["name"] for g in got] == ["gone.txt"]
    assert await received_content(standin.url, got[0]["id"]) == b"removed by someone"
    warnings = [e for e in logs if e["event"] == "move.failed"]
    assert len(warnings) == 1
    assert warnings[0]["path"] == "Alpha Person/gone.txt"
    assert not (setup.archive / "Alpha Person" / "gone.txt").exists()


async def test_full_archive_disk_keeps_row(standin: StandIn, setup_factory: SetupFactory,
                                           mounts: Callable[..., None]) -> None:
    """An archive on a full tmpfs leaves the file in the drop folder, uploaded once."""
    setup = setup_factory()
    mounts("-t", "tmpfs", "-o", "size=64k", "tmpfs", target=setup.archive)
    data = os.urandom(300_000)
    setup.drop("Alpha Person", "big.bin", data)
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="upload")
        await wait_until(lambda: setup.rows()[0].disposition == "pending", what="pending move")

    assert (setup.root / "Alpha Person" / "big.bin").read_bytes() == data
    assert len(await received(standin.url)) == 1
    assert list(setup.archive.rglob("*.bin")) == []


# -- odd and hostile input ---------------------------------------------------------------


async def test_empty_file_fails_after_grace(standin: StandIn,
                                            setup_factory: SetupFactory) -> None:
    """A file that stays empty past empty_grace_seconds fails with a reason file."""
    setup = setup_factory(watch={"empty_grace_seconds": 1.5})
    setup.drop("Alpha Person", "blank.pdf", b"")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.FAILED), what="failure")

    reason = (setup.failed / "Alpha Person" / "blank.pdf.reason.txt").read_text()
    assert "empty" in reason
    assert (setup.failed / "Alpha Person" / "blank.pdf").read_bytes() == b""
    assert await received(standin.url) == []


async def test_empty_file_filled_in_time(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A scanner's empty placeholder filled within the grace goes up with its content."""
    setup = setup_factory(watch={"empty_grace_seconds": 5})
    path = setup.drop("Alpha Person", "scan.txt", b"")
    async with DaemonRunner(setup):
        await asyncio.sleep(1.5)
        path.write_bytes(b"the scan")
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="upload")
        got = await received(standin.url)

    assert len(got) == 1
    assert await received_content(standin.url, got[0]["id"]) == b"the scan"


async def test_file_deleted_before_settle(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A file removed before it settles ends as vanished; nothing is sent."""
    setup = setup_factory(watch={"settle_seconds": 2})
    async with DaemonRunner(setup):
        await asyncio.sleep(0.3)
        path = setup.drop("Alpha Person", "gone.txt", b"short-lived")
        await wait_until(lambda: setup.rows(), what="detection")
        path.unlink()
        await wait_until(lambda: rows_in(setup, State.VANISHED), what="vanished")

    assert await received(standin.url) == []


async def test_folder_moved_in_with_files(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A whole folder moved into the drop root uploads every file inside it."""
    setup = setup_factory()
    outside = setup.tmp / "prepared" / "Bravo Person"
    (outside / "sub").mkdir(parents=True)
    for index in range(3):
        (outside / "sub" / f"n{index}.txt").write_bytes(f"note {index}".encode())
    async with DaemonRunner(setup):
        await asyncio.sleep(0.5)
        (outside).rename(setup.root / "Bravo Person")
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 3, what="3 uploads")

    got = await received(standin.url)
    assert sorted(u["name"] for u in got) == ["n0.txt", "n1.txt", "n2.txt"]
    assert {u["clientId"] for u in got} == {BRAVO}


async def test_file_renamed_into_folder(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A file renamed from an unmapped folder into a client folder goes up for that client."""
    setup = setup_factory()
    setup.drop("Nobody", "moved.txt", b"moved in")
    async with DaemonRunner(setup):
        await asyncio.sleep(1.0)
        (setup.root / "Alpha Person").mkdir()
        (setup.root / "Nobody" / "moved.txt").rename(setup.root / "Alpha Person" / "moved.txt")
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="upload")

    got = await received(standin.url)
    assert [(u["clientId"], u["name"]) for u in got] == [(ALPHA, "moved.txt")]


async def test_drop_folder_renamed_while_waiting(standin: StandIn,
                                                 setup_factory: SetupFactory) -> None:
    """Files waiting in a renamed drop folder go to the client its new name gives."""
    setup = setup_factory(watch={"settle_seconds": 2})
    setup.drop("Alpha Person", "w.txt", b"follow the folder")
    async with DaemonRunner(setup):
        await asyncio.sleep(0.6)
        (setup.root / "Alpha Person").rename(setup.root / "Bravo Person")
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="upload")
        await asyncio.sleep(1.0)

    got = await received(standin.url)
    assert [(u["clientId"], u["name"]) for u in got] == [(BRAVO, "w.txt")]


async def test_special_files_are_skipped(standin: StandIn, setup_factory: SetupFactory) -> None:
    """FIFOs, sockets, devices and symlinks are skipped, never opened; regular files go up."""
    setup = setup_factory()
    folder = setup.root / "Alpha Person"
    folder.mkdir()
    os.mkfifo(folder / "pipe.pdf")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock"))
    secret = setup.tmp / "outside.txt"
    secret.write_bytes(b"outside the drop root")
    (folder / "link.txt").symlink_to(secret)
    outside_dir = setup.tmp / "outside-dir"
    outside_dir.mkdir()
    (outside_dir / "inner.txt").write_bytes(b"behind a folder link")
    (folder / "linked-dir").symlink_to(outside_dir)
    os.mknod(folder / "null.pdf", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    setup.drop("Alpha Person", "real.txt", b"regular")
    try:
        async with DaemonRunner(setup):
            await wait_until(lambda: rows_in(setup, State.UPLOADED), what="upload")
            await asyncio.sleep(1.0)
    finally:
        server.close()

    got = await received(standin.url)
    assert [u["name"] for u in got] == ["real.txt"]
    assert [r.display_path for r in setup.rows()] == ["Alpha Person/real.txt"]


NAMES = [
    ("Zoë O'Brien – referral.txt", "Zoë O'Brien – referral.txt"),
    ("診療記録.txt", "診療記録.txt"),
    ('say "hi"; ok.txt', 'say "hi"; ok.txt'),
    ("back\\slash.txt", "back\\slash.txt"),
    ("line\nbreak\r.txt", "line break .txt"),
    ("x" * 251 + ".txt", "x" * 251 + ".txt"),
]


async def test_awkward_names_arrive(standin: StandIn, setup_factory: SetupFactory) -> None:
    """Non-ASCII, quotes, semicolons, CR/LF, long and non-UTF-8 names reach the service."""
    setup = setup_factory()
    folder = setup.root / "Alpha Person"
    folder.mkdir()
    for index, (name, _) in enumerate(NAMES):
        (folder / name).write_bytes(f"content {index}".encode())
    bad = os.fsencode(folder) + b"/caf\xe9 \xff.txt"
    with open(bad, "wb") as out:
        out.write(b"latin-1 name")
    async with DaemonRunner(setup):
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == len(NAMES) + 1,
                         what="every name uploaded",
                         describe=lambda: [(r.state, r.display_path) for r in setup.rows()])
        got = await received(standin.url)

    by_name = {u["name"]: u for u in got}
    for index, (_, sent) in enumerate(NAMES):
        assert await received_content(standin.url, by_name[sent]["id"]) == (
            f"content {index}".encode())
    assert await received_content(standin.url, by_name["caf\ufffd \ufffd.txt"]["id"]) == (
        b"latin-1 name")
    raw = [r.rel_path for r in setup.rows()]
    assert b"Alpha Person/caf\xe9 \xff.txt" in raw


async def test_name_reused_over_time(standin: StandIn, setup_factory: SetupFactory) -> None:
    """One name used again with new content uploads both versions and archives both."""
    setup = setup_factory()
    async with DaemonRunner(setup):
        setup.drop("Alpha Person", "scan.txt", b"monday")
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 1, what="first")
        setup.drop("Alpha Person", "scan.txt", b"tuesday")
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 2, what="second")

    got = await received(standin.url)
    assert [await received_content(standin.url, u["id"]) for u in got] == [b"monday", b"tuesday"]
    assert (setup.archive / "Alpha Person" / "scan.txt").read_bytes() == b"monday"
    assert (setup.archive / "Alpha Person" / "scan (2).txt").read_bytes() == b"tuesday"


async def test_full_ledger_disk_recovers(standin: StandIn, setup_factory: SetupFactory,
                                         mounts: Callable[..., None], tmp_path: Path) -> None:
    """With the ledger's disk full the daemon keeps running; once space is back, files go up once."""
    ledger_dir = tmp_path / "ledgerfs"
    mounts("-t", "tmpfs", "-o", "size=2m", "tmpfs", target=ledger_dir)
    setup = setup_factory(ledger={"path": str(ledger_dir / "ledger.sqlite3")},
                          watch={"rescan_seconds": 1})
    setup.ledger = ledger_dir / "ledger.sqlite3"
    async with DaemonRunner(setup) as runner:
        setup.drop("Alpha Person", "before.txt", b"before the disk filled")
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 1, what="first upload")
        filler = ledger_dir / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        for index in range(5):
            setup.drop("Alpha Person", f"during{index}.txt", os.urandom(2000))
        await asyncio.sleep(4.0)
        assert not runner.task.done()  # type: ignore[union-attr]
        filler.unlink()
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 6, timeout_s=30,
                         what="uploads after space returned")

    got = await received(standin.url)
    assert sorted(u["name"] for u in got) == sorted(
        ["before.txt"] + [f"during{index}.txt" for index in range(5)])


async def test_share_unmounted_and_remounted(standin: StandIn, setup_factory: SetupFactory,
                                             mounts: Callable[..., None], tmp_path: Path) -> None:
    """A drop root that is unmounted and mounted again: the watcher returns, nothing re-uploads."""
    backing = tmp_path / "share"
    backing.mkdir()
    setup = setup_factory(upload={"after_success": "keep"}, watch={"rescan_seconds": 1})
    mounts("--bind", str(backing), target=setup.root)
    setup.drop("Alpha Person", "kept.txt", b"stays on the share")
    async with DaemonRunner(setup):
        await wait_until(lambda: rows_in(setup, State.UPLOADED), what="first upload")
        subprocess.run(["umount", str(setup.root)], check=True)
        await asyncio.sleep(3.0)
        subprocess.run(["mount", "--bind", str(backing), str(setup.root)], check=True)
        await asyncio.sleep(4.0)
        setup.drop("Bravo Person", "new.txt", b"after the remount")
        await wait_until(lambda: len(rows_in(setup, State.UPLOADED)) == 2, timeout_s=20,
                         what="upload after the remount")
        await asyncio.sleep(2.0)

    got = await received(standin.url)
    assert sorted(u["name"] for u in got) == ["kept.txt", "new.txt"]
    assert [r.state for r in setup.rows()] == [State.UPLOADED, State.UPLOADED]
