"""
End-to-end tests of the daemon: real files in a temporary drop root, the real watcher,
a real SQLite ledger and real HTTP over loopback to the stand-in.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable

from harness import ALPHA, BRAVO, CHARLIE, DaemonRunner, Setup, wait_until
from standin_helpers import add_faults, received, received_content, stats

from uploader.constants import State
from uploader.standin import StandIn

SetupFactory = Callable[..., Setup]


def by_state(setup: Setup, state: str) -> list[str]:
    return [r.display_path for r in setup.rows() if r.state == state]


async def test_dropped_file_arrives_once(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A file dropped into an alias folder arrives once, with exact bytes, claims and headers."""
    setup = setup_factory()
    data = os.urandom(70_000)
    async with DaemonRunner(setup):
        await asyncio.sleep(0.3)
        setup.drop("Alpha Person", "referral.pdf", data + b"\n%%EOF\n")
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
        got = await received(standin.url)

    assert len(got) == 1
    upload = got[0]
    assert upload["clientId"] == ALPHA
    assert upload["name"] == "referral.pdf"
    assert upload["sha256"] == hashlib.sha256(data + b"\n%%EOF\n").hexdigest()
    assert await received_content(standin.url, upload["id"]) == data + b"\n%%EOF\n"
    assert upload["claims"]["httpMethod"] == "POST"
    assert upload["claims"]["url"] == f"{standin.url}/API/Core/v2.1/File/"
    assert upload["claims"]["exp"] - upload["claims"]["nbf"] == 60
    assert upload["json"] == {"name": "referral.pdf", "primaryDomainKey": ALPHA,
                              "size": str(len(data) + 7), "entity": "Client", "isFolder": False}
    row = setup.rows()[0]
    assert row.remote_id == upload["id"]
    assert row.disposition == "archived"
    assert (setup.archive / "Alpha Person" / "referral.pdf").read_bytes() == data + b"\n%%EOF\n"
    assert not (setup.root / "Alpha Person" / "referral.pdf").exists()
    assert (setup.root / "Alpha Person").is_dir()


async def test_slow_writer_uploads_complete_file(standin: StandIn,
                                                  setup_factory: SetupFactory) -> None:
    """A file written in pieces over three seconds goes up once, complete."""
    setup = setup_factory(watch={"settle_seconds": 1.0})
    pieces = [os.urandom(10_000) for _ in range(8)]
    async with DaemonRunner(setup):
        path = setup.root / "Bravo Person" / "scan.tiff"
        path.parent.mkdir(parents=True)
        with open(path, "wb") as out:
            for piece in pieces:
                out.write(piece)
                out.flush()
                await asyncio.sleep(0.4)
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
        await asyncio.sleep(1.5)
        got = await received(standin.url)

    assert len(got) == 1
    assert await received_content(standin.url, got[0]["id"]) == b"".join(pieces)


async def test_renamed_temp_file_uploads_final_name(standin: StandIn,
                                                     setup_factory: SetupFactory) -> None:
    """A file written as .part then renamed goes up once, under its final name only."""
    setup = setup_factory()
    async with DaemonRunner(setup):
        await asyncio.sleep(0.3)
        temp = setup.drop("Alpha Person", "letter.docx.part", b"draft")
        await asyncio.sleep(1.0)
        with open(temp, "ab") as out:
            out.write(b" and the rest")
        temp.rename(temp.with_name("letter.docx"))
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
        await asyncio.sleep(1.0)
        got = await received(standin.url)

    assert [u["name"] for u in got] == ["letter.docx"]
    assert await received_content(standin.url, got[0]["id"]) == b"draft and the rest"
    assert all("part" not in r.display_path for r in setup.rows())


async def test_ignored_names_never_upload(standin: StandIn, setup_factory: SetupFactory) -> None:
    """Built-in and configured ignore patterns keep files out of coreplus and the ledger."""
    setup = setup_factory(watch={"ignore": ["*.bak", "Alpha Person/private/*"]})
    ignored = ["~$draft.docx", ".hidden", "Thumbs.db", "x.tmp", "._mac.pdf", "y.crdownload",
               "notes.bak", "private/secret.pdf", "@eaDir/thumb.jpg", "desktop.ini"]
    for name in ignored:
        setup.drop("Alpha Person", name, b"ignored " + name.encode())
    setup.drop("Alpha Person", "real.txt", b"real")
    async with DaemonRunner(setup):
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
        await asyncio.sleep(1.0)
        got = await received(standin.url)

    assert [u["name"] for u in got] == ["real.txt"]
    assert [r.display_path for r in setup.rows()] == ["Alpha Person/real.txt"]


async def test_files_present_at_start_upload(standin: StandIn,
                                              setup_factory: SetupFactory) -> None:
    """Files that arrived while the daemon was down go up when it starts."""
    setup = setup_factory()
    setup.drop("Alpha Person", "a.txt", b"alpha")
    setup.drop(f"Chan, Mei [{CHARLIE.upper()}]", "sub/b.txt", b"charlie")
    setup.drop(BRAVO, "c.txt", b"bravo")
    async with DaemonRunner(setup):
        await wait_until(lambda: len(by_state(setup, State.UPLOADED)) == 3, what="3 uploads")
        got = await received(standin.url)

    assert sorted((u["clientId"], u["name"]) for u in got) == sorted(
        [(ALPHA, "a.txt"), (CHARLIE, "b.txt"), (BRAVO, "c.txt")])
    assert (setup.archive / f"Chan, Mei [{CHARLIE.upper()}]" / "sub" / "b.txt").read_bytes() \
        == b"charlie"


async def test_same_bytes_twice_is_duplicate(standin: StandIn,
                                             setup_factory: SetupFactory) -> None:
    """The same bytes twice for one client give one upload and one duplicate row."""
    setup = setup_factory()
    setup.drop("Alpha Person", "one.txt", b"same bytes")
    setup.drop("Alpha Person", "two.txt", b"same bytes")
    setup.drop("Bravo Person", "three.txt", b"same bytes")
    async with DaemonRunner(setup):
        await wait_until(lambda: len(by_state(setup, State.UPLOADED)) == 2
                         and len(by_state(setup, State.DUPLICATE)) == 1, what="outcomes")
        got = await received(standin.url)

    assert sorted(u["clientId"] for u in got) == sorted([ALPHA, BRAVO])
    rows = {r.display_path: r for r in setup.rows()}
    duplicate = next(r for r in rows.values() if r.state == State.DUPLICATE)
    original = rows[next(p for p in rows if rows[p].id == duplicate.duplicate_of)]
    assert original.client_id == ALPHA
    assert duplicate.remote_id == original.remote_id
    assert duplicate.disposition == "archived"


async def test_unmapped_folder_is_reported(standin: StandIn,
                                           setup_factory: SetupFactory) -> None:
    """An unmapped folder and a root file are recorded as unmapped; nothing goes up."""
    setup = setup_factory()
    setup.drop("Somebody Unknown", "letter.txt", b"who?")
    (setup.root / "loose.txt").write_bytes(b"no folder")
    setup.drop("Alpha Person", "ok.txt", b"ok")
    async with DaemonRunner(setup) as runner:
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
        await asyncio.sleep(0.5)
        ledger = runner.daemon.rt.ledger.sync
        unmapped = {u["path"] for u in await runner.daemon.rt.ledger.call(ledger.unmapped)}
        got = await received(standin.url)

    assert [u["name"] for u in got] == ["ok.txt"]
    assert unmapped == {"Somebody Unknown", "loose.txt"}
    assert (setup.root / "Somebody Unknown" / "letter.txt").read_bytes() == b"who?"
    assert (setup.root / "loose.txt").exists()


async def test_transient_faults_then_one_upload(standin: StandIn,
                                                setup_factory: SetupFactory) -> None:
    """After a 503 and a connection reset, the file goes up exactly once."""
    setup = setup_factory()
    await add_faults(standin.url, {"kind": "status", "status": 503, "retry_after": "1"},
                     {"kind": "reset_before_body"})
    # Large enough that the stand-in's reset arrives while the body is still being sent,
    # because a small body may already sit whole in the socket buffer ("uncertain").
    body = os.urandom(24 * 1024 * 1024)
    setup.drop("Alpha Person", "report.txt", body)
    async with DaemonRunner(setup):
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
        got = await received(standin.url)
        counters = await stats(standin.url)

    assert len(got) == 1
    assert await received_content(standin.url, got[0]["id"]) == body
    assert counters["by_status"].get("503") == 1
    row = setup.rows()[0]
    assert row.attempts == 3
    assert row.possible_duplicate == 0


async def test_rejected_file_goes_to_failed(standin: StandIn,
                                            setup_factory: SetupFactory) -> None:
    """A 400 moves the file to the failed folder with a reason file naming the response."""
    setup = setup_factory()
    await add_faults(standin.url, {"kind": "status", "status": 400,
                                  "body": '{"statusMessages":[{"message":"bad file"}]}',
                                  "content_type": "application/json"})
    setup.drop("Alpha Person", "bad.txt", b"rejected bytes")
    async with DaemonRunner(setup):
        await wait_until(lambda: by_state(setup, State.FAILED), what="failure")

    failed = setup.failed / "Alpha Person" / "bad.txt"
    assert failed.read_bytes() == b"rejected bytes"
    reason = (setup.failed / "Alpha Person" / "bad.txt.reason.txt").read_text()
    assert "HTTP 400" in reason
    assert "bad file" in reason
    assert "What to do" in reason
    assert not (setup.root / "Alpha Person" / "bad.txt").exists()
    assert await received(standin.url) == []


async def test_401_pauses_then_resumes(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A 401 pauses uploads without failing the file; a later probe resumes them."""
    setup = setup_factory()
    await add_faults(standin.url, {"kind": "status", "status": 401})
    setup.drop("Alpha Person", "a.txt", b"first")
    async with DaemonRunner(setup) as runner:
        await wait_until(lambda: runner.daemon.gate.paused if hasattr(runner.daemon, "gate")
                         else False, what="pause")
        assert by_state(setup, State.FAILED) == []
        assert by_state(setup, State.QUEUED) == ["Alpha Person/a.txt"]
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="resume and upload")
        assert not runner.daemon.gate.paused

    assert len(await received(standin.url)) == 1


async def test_restart_does_not_upload_again(standin: StandIn,
                                             setup_factory: SetupFactory) -> None:
    """With after_success = keep, a restart finds the kept file and sends nothing."""
    setup = setup_factory(upload={"after_success": "keep"})
    setup.drop("Alpha Person", "kept.txt", b"keep me")
    async with DaemonRunner(setup):
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
    async with DaemonRunner(setup):
        await asyncio.sleep(2.0)

    assert len(await received(standin.url)) == 1
    assert [r.state for r in setup.rows()] == [State.UPLOADED]
    assert (setup.root / "Alpha Person" / "kept.txt").read_bytes() == b"keep me"


async def test_import_uploads_and_exits(standin: StandIn, setup_factory: SetupFactory) -> None:
    """One-pass mode uploads what is there and returns 0."""
    setup = setup_factory()
    for index in range(5):
        setup.drop("Bravo Person", f"f{index}.txt", f"file {index}".encode())
    runner = DaemonRunner(setup, oneshot=True)
    async with runner:
        code = await asyncio.wait_for(runner.task, 30)  # type: ignore[arg-type]

    assert code == 0
    assert len(await received(standin.url)) == 5
    assert len(by_state(setup, State.UPLOADED)) == 5


async def test_pdf_waits_for_eof_marker(standin: StandIn, setup_factory: SetupFactory) -> None:
    """A PDF without %%EOF waits; once the scanner finishes it, the whole file goes up."""
    setup = setup_factory(watch={"pdf_wait_seconds": 30})
    async with DaemonRunner(setup):
        path = setup.drop("Alpha Person", "scan.pdf", b"%PDF-1.7 page one\n")
        await asyncio.sleep(2.0)
        assert await received(standin.url) == []
        with open(path, "ab") as out:
            out.write(b"page two\n%%EOF\n")
        await wait_until(lambda: by_state(setup, State.UPLOADED), what="upload")
        got = await received(standin.url)

    assert len(got) == 1
    assert await received_content(standin.url, got[0]["id"]) == (
        b"%PDF-1.7 page one\npage two\n%%EOF\n")
