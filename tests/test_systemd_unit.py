"""
Tests for systemd/coreplus-uploader.service: the settings the daemon relies on, read
with the same parser `check` uses, and systemd-analyze's verify and offline security
review through systemd/verify-unit.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from uploader.check import parse_timespan_s, parse_unit_text, read_unit
from uploader.config import UploadConfig
from uploader.credentials import SYSTEMD_ACCESS_TOKEN_NAME, SYSTEMD_SECRET_NAME

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "coreplus-uploader.service"


def unit_values() -> dict[str, list[str]]:
    return parse_unit_text(UNIT.read_text())


def last(key: str) -> str:
    return unit_values()[key][-1]


class TestUnitSettings:
    @pytest.mark.parametrize(("key", "expected"), [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "60"),
        ("Restart", "on-failure"),
        ("RestartSec", "30"),
        ("StartLimitIntervalSec", "0"),
        ("User", "coreplus-uploader"),
        ("Group", "coreplus-uploader"),
        ("StateDirectory", "coreplus-uploader"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
    ])
    def test_unit_setting(self, key: str, expected: str) -> None:
        """Each setting the issue and the daemon depend on has its expected value."""
        assert last(key) == expected

    def test_unit_stop_timeout(self) -> None:
        """TimeoutStopSec is longer than the default shutdown grace, with room to spare."""
        timeout_s = parse_timespan_s(last("TimeoutStopSec"))
        assert timeout_s is not None
        assert timeout_s >= UploadConfig.shutdown_grace_seconds * 2

    def test_unit_credentials(self) -> None:
        """LoadCredential= names both credentials the daemon reads."""
        unit = read_unit(UNIT)
        assert set(unit.credentials) == {SYSTEMD_SECRET_NAME, SYSTEMD_ACCESS_TOKEN_NAME}
        for name, source in unit.credentials.items():
            assert source == f"/etc/coreplus-uploader/credentials/{name}"

    def test_unit_paths_consistent(self) -> None:
        """The drop root it waits for is inside the paths it may write."""
        unit = read_unit(UNIT)
        assert unit.requires_mounts_for == ("/srv/coreplus/drop",)
        assert unit.read_write_paths == ("/srv/coreplus",)
        assert unit.timeout_stop_s == 90

    def test_unit_allows_chown(self) -> None:
        """chown stays allowed after @privileged is removed, for upload.staff_group."""
        filters = unit_values()["SystemCallFilter"]
        assert filters.index("~@privileged @resources") < filters.index("@chown")

    def test_unit_exec_start(self) -> None:
        """ExecStart runs the daemon with the configuration under /etc."""
        assert last("ExecStart") == ("/usr/local/bin/coreplus-uploader run --config "
                                     "/etc/coreplus-uploader/config.toml")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed; .ci/run installs it")
class TestSystemdAnalyze:
    def test_verify_and_exposure(self) -> None:
        """systemd-analyze verify passes and the offline exposure is at most 2.0."""
        done = subprocess.run([str(SYSTEMD_DIR / "verify-unit")], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
        assert match is not None, done.stdout
        assert float(match.group(1)) <= 2.0

    def test_verify_catches_bad_unit(self, tmp_path: Path) -> None:
        """The same verify rejects a copy with an unknown Type=, so it can fail."""
        broken = tmp_path / "coreplus-uploader.service"
        text = UNIT.read_text().replace("Type=notify", "Type=notifyy")
        broken.write_text(text.replace("/usr/local/bin/coreplus-uploader", "/bin/true"))
        done = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True,
                              text=True, timeout=60)
        assert "notifyy" in done.stderr
