"""
Tests for uploader.sdnotify against real AF_UNIX datagram sockets: a path socket and
an abstract one, as systemd creates them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uploader.sdnotify import MAX_STATUS_CHARS, Notifier, socket_address, watchdog_interval_s


class Listener:
    """A bound datagram socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self, timeout_s: float = 5.0) -> list[str]:
        """The next datagram, split into its lines."""
        self.sock.settimeout(timeout_s)
        return self.sock.recv(65536).decode().split("\n")

    def pending(self) -> bool:
        """Whether a datagram is waiting."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)
        return True


@pytest.fixture
def path_listener() -> Iterator[Listener]:
    """A notify socket bound to a file path (short, because sun_path has 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(folder, "notify")
    sock.bind(path)
    try:
        yield Listener(sock, path)
    finally:
        sock.close()
        shutil.rmtree(folder)


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    """A notify socket in the abstract namespace, named as systemd writes it with '@'."""
    name = f"coreplus-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Listener(sock, "@" + name)
    finally:
        sock.close()


def _notifier(socket_value: str) -> contextlib.closing[Notifier]:
    """Wrap a notifier for NOTIFY_SOCKET=``socket_value`` so it closes when the with block ends."""
    return contextlib.closing(Notifier({"NOTIFY_SOCKET": socket_value}))


class TestAddress:
    def test_address_abstract(self) -> None:
        """An '@' name becomes a NUL-prefixed abstract address."""
        name = "/org/freedesktop/systemd1/notify"
        assert socket_address("@" + name) == "\0" + name

    def test_address_path(self) -> None:
        """An absolute path is used as it is."""
        assert socket_address("/run/systemd/notify") == "/run/systemd/notify"

    @pytest.mark.parametrize("value", ["", "@", "relative/sock", "vsock:2:1234"])
    def test_address_unsupported(self, value: str) -> None:
        """Empty, bare '@', relative and vsock values give no address."""
        assert socket_address(value) is None


class TestWatchdogInterval:
    def test_interval_half_of_usec(self) -> None:
        """WATCHDOG_USEC=60000000 (WatchdogSec=60) gives a keep-alive every 30 s."""
        assert watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 30.0

    def test_interval_own_pid(self) -> None:
        """A WATCHDOG_PID naming this process keeps the watchdog on."""
        env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        assert watchdog_interval_s(env) == 1.0

    def test_interval_other_pid(self) -> None:
        """A WATCHDOG_PID naming another process turns the watchdog off for this one."""
        env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        assert watchdog_interval_s(env) is None

    @pytest.mark.parametrize("value", ["", "0", "-5", "abc", "1.5"])
    def test_interval_invalid(self, value: str) -> None:
        """A missing, zero or malformed WATCHDOG_USEC means no watchdog."""
        assert watchdog_interval_s({"WATCHDOG_USEC": value}) is None


class TestNotifier:
    def test_ready_path_socket(self, path_listener: Listener) -> None:
        """ready() sends READY=1 and the status line in one datagram to a path socket."""
        with _notifier(path_listener.env_value) as notifier:
            assert notifier.ready("Queue 0; uploaded today 0")
        assert path_listener.receive() == ["READY=1", "STATUS=Queue 0; uploaded today 0"]

    def test_status_abstract_socket(self, abstract_listener: Listener) -> None:
        """status() reaches an abstract socket named with '@'."""
        with _notifier(abstract_listener.env_value) as notifier:
            assert notifier.status("Queue 3")
        assert abstract_listener.receive() == ["STATUS=Queue 3"]

    def test_status_one_line(self, path_listener: Listener) -> None:
        """A status with newlines is folded onto one line and capped in length."""
        with _notifier(path_listener.env_value) as notifier:
            notifier.status("first\nSECRET=1\n" + "x" * 1000)
        lines = path_listener.receive()
        assert len(lines) == 1
        assert lines[0].startswith("STATUS=first SECRET=1 xxx")
        assert len(lines[0]) == len("STATUS=") + MAX_STATUS_CHARS
        assert lines[0].endswith("...")

    def test_stopping_message(self, path_listener: Listener) -> None:
        """stopping() sends STOPPING=1 with a status line."""
        with _notifier(path_listener.env_value) as notifier:
            notifier.stopping()
        lines = path_listener.receive()
        assert lines[0] == "STOPPING=1"
        assert lines[1].startswith("STATUS=Stopping")

    def test_no_socket_noop(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and no watchdog is planned."""
        notifier = Notifier({"WATCHDOG_USEC": "1000000"})
        assert not notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog_interval_s is None

    def test_missing_socket_false(self, tmp_path: Path) -> None:
        """A NOTIFY_SOCKET path with no listener returns False and does not raise."""
        with _notifier(str(tmp_path / "gone")) as notifier:
            assert notifier.status("x") is False
            assert notifier.watchdog() is False


class TestWatchdogLoop:
    async def test_loop_sends_keepalives(self, path_listener: Listener) -> None:
        """The loop sends WATCHDOG=1 at once and again after each half interval."""
        env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "100000"}
        notifier = Notifier(env)
        task = asyncio.create_task(notifier.watchdog_loop())
        try:
            first = await asyncio.to_thread(path_listener.receive)
            second = await asyncio.to_thread(path_listener.receive)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            notifier.close()
        assert first == ["WATCHDOG=1"]
        assert second == ["WATCHDOG=1"]

    async def test_blocked_loop_stops_keepalives(self, path_listener: Listener) -> None:
        """While the event loop is blocked no keep-alive is sent; they resume after it."""
        env = {"NOTIFY_SOCKET": path_listener.env_value, "WATCHDOG_USEC": "40000"}
        notifier = Notifier(env)
        task = asyncio.create_task(notifier.watchdog_loop())
        try:
            await asyncio.to_thread(path_listener.receive)
            while path_listener.pending():
                path_listener.receive()
            time.sleep(0.3)  # noqa: ASYNC251 - blocks the loop on purpose, for 15 intervals
            sent_while_blocked = path_listener.pending()
            resumed = await asyncio.to_thread(path_listener.receive)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            notifier.close()
        assert sent_while_blocked is False
        assert resumed == ["WATCHDOG=1"]

    async def test_loop_without_watchdog_returns(self) -> None:
        """Without WATCHDOG_USEC the loop ends at once."""
        await asyncio.wait_for(Notifier({}).watchdog_loop(), 1)
