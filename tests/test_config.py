"""
Tests for uploader.config: defaults, every validation rule, path resolution and the
[clients] table, with real TOML files in tmp_path.
"""

from __future__ import annotations

import copy
import dataclasses
import grp
import unicodedata
from pathlib import Path

import pytest

from uploader.config import (
    AlertConfig,
    ApiConfig,
    LedgerConfig,
    LogConfig,
    UploadConfig,
    WatchConfig,
    load_clients,
    load_config,
)
from uploader.exceptions import ConfigError
from uploader.folders import resolve_folder
from uploader.standin import DEMO_CLIENTS

REPO_ROOT = Path(__file__).resolve().parent.parent
GUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
OTHER_GUID = "6fa459ea-ee8a-3ca4-894e-db77e160355e"

# The smallest valid configuration; values are raw TOML.
BASE: dict[str, dict[str, str]] = {
    "api": {
        "base_url": '"https://api.coreplus.com.au"',
        "consumer_id": '"clinic-consumer"',
        "issuer": '"https://clinic.example"',
    },
    "watch": {"root": '"drop"'},
    "upload": {"archive_dir": '"archive"', "failed_dir": '"failed"'},
    "ledger": {"path": '"state/ledger.sqlite3"'},
}


def write_config(
    folder: Path, changes: dict[str, str | None] | None = None, extra: str = ""
) -> Path:
    """Write BASE with ``changes`` (dotted key -> raw TOML, None removes) plus ``extra``."""
    tables = copy.deepcopy(BASE)
    for dotted, raw in (changes or {}).items():
        table, key = dotted.split(".", 1)
        if raw is None:
            tables[table].pop(key, None)
        else:
            tables.setdefault(table, {})[key] = raw
    sections = [
        f"[{table}]\n" + "".join(f"{key} = {raw}\n" for key, raw in keys.items())
        for table, keys in tables.items()
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "uploader.toml"
    path.write_text("\n".join(sections) + extra, encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def existing_group() -> str:
    for name in ("nogroup", "daemon", "users", "root"):
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        return name
    pytest.skip("no well-known group exists on this machine")


class TestDefaults:
    @pytest.mark.parametrize(
        ("attribute", "expected"),
        [
            ("api.version", "v2.1"),
            ("api.client_list_version", "v2"),
            ("api.secret_file", None),
            ("api.access_token_file", None),
            ("api.audience", "https://coreplus.com.au"),
            ("api.max_requests_per_second", 9.0),
            ("api.connect_timeout_seconds", 15.0),
            ("api.idle_timeout_seconds", 60.0),
            ("api.clock_leeway_seconds", 5),
            ("api.auth_probe_seconds", 300),
            ("api.ca_file", None),
            ("api.proxy", None),
            ("watch.settle_seconds", 5.0),
            ("watch.empty_grace_seconds", 60.0),
            ("watch.pdf_wait_seconds", 120.0),
            ("watch.rescan_seconds", 300.0),
            ("watch.force_polling", False),
            ("watch.ignore", ()),
            ("upload.workers", 4),
            ("upload.max_attempts", 5),
            ("upload.backoff_max_seconds", 300.0),
            ("upload.after_success", "archive"),
            ("upload.archive_keep_days", 0),
            ("upload.staff_group", None),
            ("upload.max_file_bytes", 0),
            ("upload.on_uncertain", "retry"),
            ("upload.skip_duplicates", True),
            ("upload.shutdown_grace_seconds", 30.0),
            ("log.format", "auto"),
            ("log.level", "info"),
            ("log.file_names", "show"),
            ("alert.command", None),
            ("alert.smtp_host", None),
            ("alert.smtp_port", 587),
            ("alert.smtp_security", "starttls"),
            ("alert.smtp_user", None),
            ("alert.smtp_password_file", None),
            ("alert.smtp_timeout_seconds", 30.0),
            ("alert.email_from", None),
            ("alert.email_to", ()),
            ("alert.disk_min_free_percent", 5.0),
        ],
    )
    def test_default_value(self, tmp_path: Path, attribute: str, expected: object) -> None:
        """A key left out of the file takes the contract's default, with the right type."""
        config = load_config(write_config(tmp_path))
        table, key = attribute.split(".")
        value = getattr(getattr(config, table), key)
        assert value == expected
        assert type(value) is type(expected)

    def test_default_clients_empty(self, tmp_path: Path) -> None:
        """Without a [clients] table the alias map is empty."""
        assert dict(load_config(write_config(tmp_path)).clients) == {}

    def test_config_path_recorded(self, tmp_path: Path) -> None:
        """Config.path is the absolute path of the file that was read."""
        path = write_config(tmp_path)
        assert load_config(str(path)).path == path

    def test_config_frozen(self, tmp_path: Path) -> None:
        """The loaded configuration and its alias map cannot be changed."""
        config = load_config(write_config(tmp_path, extra=f'[clients]\nSmith = "{GUID}"\n'))
        with pytest.raises(AttributeError):
            config.upload.workers = 9  # type: ignore[misc]
        with pytest.raises(TypeError):
            config.clients["jones"] = GUID  # type: ignore[index]


class TestExampleFile:
    def test_example_loads(self) -> None:
        """config/example.toml is valid and points into the repository's .demo folder."""
        config = load_config(REPO_ROOT / "config" / "example.toml")
        demo = (REPO_ROOT / ".demo").resolve()
        assert config.watch.root == demo / "drop"
        assert config.upload.archive_dir == demo / "archive"
        assert config.upload.failed_dir == demo / "failed"
        assert config.ledger.path == demo / "state" / "ledger.sqlite3"
        assert config.api.secret_file == demo / "state" / "secret"
        assert config.api.access_token_file == demo / "state" / "access-token"
        assert config.api.base_url == "http://127.0.0.1:8765"
        assert config.api.consumer_id == "demo-consumer"
        assert config.watch.settle_seconds == 2.0
        assert len(config.clients) >= 2

    def test_example_clients_in_standin(self) -> None:
        """Every client id in the example is one of the stand-in's demo clients."""
        config = load_config(REPO_ROOT / "config" / "example.toml")
        demo_ids = {client["clientId"].lower() for client in DEMO_CLIENTS}
        assert set(config.clients.values()) <= demo_ids
        assert config.clients["democlient, alpha"] == "54c8f0b4-632b-49af-99e8-cf729198846d"

    def test_example_lists_every_key(self) -> None:
        """Every key of every table appears in the example, so it documents them all."""
        text = (REPO_ROOT / "config" / "example.toml").read_text(encoding="utf-8")
        tables = {
            "api": ApiConfig,
            "watch": WatchConfig,
            "upload": UploadConfig,
            "ledger": LedgerConfig,
            "log": LogConfig,
            "alert": AlertConfig,
        }
        for table, cls in tables.items():
            assert f"[{table}]" in text
            for item in dataclasses.fields(cls):
                assert f"{item.name} = " in text, f"{table}.{item.name}"


class TestValues:
    def test_int_accepted_as_float(self, tmp_path: Path) -> None:
        """An integer where a float is expected is accepted and stored as a float."""
        config = load_config(write_config(tmp_path, {"watch.settle_seconds": "7"}))
        assert config.watch.settle_seconds == 7.0
        assert isinstance(config.watch.settle_seconds, float)

    def test_all_keys_set(self, tmp_path: Path) -> None:
        """Every optional key set to a non-default value is read into its field."""
        group = existing_group()
        changes = {
            "api.version": '"v3"',
            "api.client_list_version": '"v2.5"',
            "api.secret_file": '"secrets/secret"',
            "api.access_token_file": '"/etc/coreplus/token"',
            "api.audience": '"https://aud.example"',
            "api.max_requests_per_second": "0",
            "api.connect_timeout_seconds": "2.5",
            "api.idle_timeout_seconds": "0",
            "api.clock_leeway_seconds": "55",
            "api.auth_probe_seconds": "1",
            "api.ca_file": '"ca.pem"',
            "api.proxy": '"http://proxy.clinic.example:3128"',
            "watch.force_polling": "true",
            "watch.ignore": '["*.bak", "Smith/private"]',
            "upload.workers": "1",
            "upload.after_success": '"delete"',
            "upload.archive_dir": None,
            "upload.archive_keep_days": "30",
            "upload.staff_group": f'"{group}"',
            "upload.max_file_bytes": "1000000",
            "upload.on_uncertain": '"hold"',
            "upload.skip_duplicates": "false",
            "log.format": '"json"',
            "log.level": '"DEBUG"',
            "log.file_names": '"hide"',
        }
        config = load_config(write_config(tmp_path, changes))

        assert config.api.version == "v3"
        assert config.api.client_list_version == "v2.5"
        assert config.api.secret_file == tmp_path / "secrets" / "secret"
        assert config.api.access_token_file == Path("/etc/coreplus/token")
        assert config.api.audience == "https://aud.example"
        assert config.api.max_requests_per_second == 0.0
        assert config.api.connect_timeout_seconds == 2.5
        assert config.api.idle_timeout_seconds == 0.0
        assert config.api.clock_leeway_seconds == 55
        assert config.api.auth_probe_seconds == 1
        assert config.api.ca_file == tmp_path / "ca.pem"
        assert config.api.proxy == "http://proxy.clinic.example:3128"

        assert config.watch.force_polling is True
        assert config.watch.ignore == ("*.bak", "Smith/private")

        assert config.upload.workers == 1
        assert config.upload.after_success == "delete"
        assert config.upload.archive_dir is None
        assert config.upload.archive_keep_days == 30
        assert config.upload.staff_group == group
        assert config.upload.max_file_bytes == 1_000_000
        assert config.upload.on_uncertain == "hold"
        assert config.upload.skip_duplicates is False

        assert config.log.format == "json"
        assert config.log.level == "debug"
        assert config.log.file_names == "hide"


# (changes, expected key in the message, expected fix text in the message)
VALIDATION_CASES: list[tuple[dict[str, str | None], str, str]] = [
    ({"upload.workers": "0"}, "upload.workers", "to 1 or more"),
    ({"upload.max_attempts": "0"}, "upload.max_attempts", "to 1 or more"),
    ({"upload.workers": "2.5"}, "upload.workers", "whole number"),
    ({"upload.workers": "true"}, "upload.workers", "whole number"),
    ({"upload.workers": '"4"'}, "upload.workers", "without quotes"),
    ({"watch.settle_seconds": "-1"}, "watch.settle_seconds", "to 0 or more"),
    ({"watch.settle_seconds": '"5"'}, "watch.settle_seconds", "without quotes"),
    ({"watch.settle_seconds": "true"}, "watch.settle_seconds", "Write a number"),
    ({"watch.settle_seconds": "nan"}, "watch.settle_seconds", "Write a number"),
    ({"watch.rescan_seconds": "inf"}, "watch.rescan_seconds", "Write a number"),
    ({"watch.empty_grace_seconds": "-0.5"}, "watch.empty_grace_seconds", "0 or more"),
    ({"watch.pdf_wait_seconds": "-3"}, "watch.pdf_wait_seconds", "0 or more"),
    ({"upload.backoff_max_seconds": "-1"}, "upload.backoff_max_seconds", "0 or more"),
    ({"upload.shutdown_grace_seconds": "-1"}, "upload.shutdown_grace_seconds", "0 or more"),
    ({"upload.archive_keep_days": "-1"}, "upload.archive_keep_days", "0 or more"),
    ({"upload.max_file_bytes": "-1"}, "upload.max_file_bytes", "0 or more"),
    ({"api.max_requests_per_second": "-1"}, "api.max_requests_per_second", "0 or more"),
    ({"api.connect_timeout_seconds": "-1"}, "api.connect_timeout_seconds", "0 or more"),
    ({"api.idle_timeout_seconds": "-1"}, "api.idle_timeout_seconds", "0 or more"),
    ({"api.clock_leeway_seconds": "56"}, "api.clock_leeway_seconds", "from 0 to 55"),
    ({"api.clock_leeway_seconds": "-1"}, "api.clock_leeway_seconds", "from 0 to 55"),
    ({"api.clock_leeway_seconds": "5.5"}, "api.clock_leeway_seconds", "whole number"),
    ({"api.auth_probe_seconds": "0"}, "api.auth_probe_seconds", "to 1 or more"),
    ({"log.level": '"verbose"'}, "log.level", '"debug", "info", "warning", "error"'),
    ({"log.format": '"text"'}, "log.format", '"auto", "json", "console"'),
    ({"log.file_names": '"off"'}, "log.file_names", '"show", "hide"'),
    ({"upload.after_success": '"move"'}, "upload.after_success", '"archive", "delete", "keep"'),
    ({"upload.on_uncertain": '"skip"'}, "upload.on_uncertain", '"retry", "hold"'),
    ({"watch.force_polling": '"yes"'}, "watch.force_polling", "true or"),
    ({"upload.skip_duplicates": "1"}, "upload.skip_duplicates", "true or"),
    ({"watch.ignore": '"*.bak"'}, "watch.ignore", "list of quoted glob patterns"),
    ({"watch.ignore": '["*.bak", ""]'}, "watch.ignore", "list of quoted glob patterns"),
    ({"watch.ignore": "[1]"}, "watch.ignore", "list of quoted glob patterns"),
    ({"api.base_url": '"http://api.coreplus.com.au"'}, "api.base_url", "https://"),
    ({"api.base_url": '"http://10.0.0.5:8765"'}, "api.base_url", "https://"),
    ({"api.base_url": '"http://localhost.example.com"'}, "api.base_url", "https://"),
    ({"api.base_url": '"https://api.coreplus.com.au/?a=1"'}, "api.base_url", "first ? or #"),
    ({"api.base_url": '"https://api.coreplus.com.au/#top"'}, "api.base_url", "first ? or #"),
    ({"api.base_url": '"https://api.coreplus.com.au?"'}, "api.base_url", "first ? or #"),
    ({"api.base_url": '"ftp://api.coreplus.com.au"'}, "api.base_url", "full URL"),
    ({"api.base_url": '"api.coreplus.com.au"'}, "api.base_url", "full URL"),
    ({"api.base_url": '"https://api.coreplus.com.au:99999"'}, "api.base_url", "port"),
    ({"api.base_url": '""'}, "api.base_url", "Write a value."),
    ({"api.proxy": '""'}, "api.proxy", "remove api.proxy to leave it unset"),
    ({"watch.root": '" "'}, "watch.root", "Write a value."),
    ({"api.base_url": "443"}, "api.base_url", "double quotes"),
    ({"api.issuer": '"clinic.example"'}, "api.issuer", "full URL"),
    ({"api.proxy": '"socks5://proxy.example:1080"'}, "api.proxy", "full URL"),
    ({"api.consumer_id": '"' + "c" * 51 + '"'}, "api.consumer_id", "at most 50"),
    ({"api.consumer_id": '"  "'}, "api.consumer_id", "Write a value"),
    ({"api.version": '"v2/1"'}, "api.version", 'api.version = "v2.1"'),
    ({"api.client_list_version": '"v 2"'}, "api.client_list_version", "e.g."),
    ({"api.audience": '""'}, "api.audience", "remove api.audience"),
    ({"api.consumer_id": '"a\\u0000b"'}, "api.consumer_id", "Remove the \\u0000 escape"),
    ({"watch.root": '"loop/drop"'}, "watch.root", "Correct the path or its links"),
    ({"upload.staff_group": '"no-such-group-zq"'}, "upload.staff_group", "groupadd"),
    ({"api.base_url": None}, "api.base_url", "Add it under [api]"),
    ({"api.consumer_id": None}, "api.consumer_id", "Add it under [api]"),
    ({"api.issuer": None}, "api.issuer", "Add it under [api]"),
    ({"watch.root": None}, "watch.root", "Add it under [watch]"),
    ({"upload.failed_dir": None}, "upload.failed_dir", "Add it under [upload]"),
    ({"ledger.path": None}, "ledger.path", "Add it under [ledger]"),
    ({"upload.archive_dir": None}, "upload.archive_dir", 'set after_success to "delete"'),
    ({"api.secret_file": '"s"'}, "api.access_token_file", "Set api.access_token_file too"),
    ({"api.access_token_file": '"t"'}, "api.secret_file", "Set api.secret_file too"),
    ({"upload.wokers": "4"}, "upload.wokers", "Did you mean upload.workers?"),
    ({"api.base_uri": '"x"'}, "api.base_uri", "Did you mean api.base_url?"),
    ({"upload.archive_dir": '"drop/archive"'}, "upload.archive_dir", "outside watch.root"),
    ({"upload.archive_dir": '"drop"'}, "upload.archive_dir", "outside watch.root"),
    ({"upload.archive_dir": '"."'}, "upload.archive_dir", "does not contain it"),
    ({"upload.failed_dir": '"drop/failed"'}, "upload.failed_dir", "outside watch.root"),
    ({"upload.failed_dir": '".."'}, "upload.failed_dir", "does not contain it"),
    ({"upload.failed_dir": '"archive/failed"'}, "upload.failed_dir", "Keep the two folders"),
    ({"upload.failed_dir": '"archive"'}, "upload.failed_dir", "Keep the two folders"),
    ({"ledger.path": '"drop/ledger.sqlite3"'}, "ledger.path", "state folder of its own"),
    ({"ledger.path": '"archive/ledger.sqlite3"'}, "ledger.path", "state folder of its own"),
    ({"ledger.path": '"failed/x/ledger.sqlite3"'}, "ledger.path", "state folder of its own"),
]


class TestValidation:
    @pytest.mark.parametrize(("changes", "key", "fix"), VALIDATION_CASES)
    def test_invalid_value_rejected(
        self, tmp_path: Path, changes: dict[str, str | None], key: str, fix: str
    ) -> None:
        """An invalid, missing or unknown key raises ConfigError naming the key and the fix."""
        (tmp_path / "loop").symlink_to(tmp_path / "loop")  # for the "loop/drop" case
        message = load_error(write_config(tmp_path, changes))
        assert key in message
        assert fix in message

    @pytest.mark.parametrize(
        ("changes", "shown"),
        [
            ({"upload.workers": "0"}, "= 0 "),
            ({"watch.settle_seconds": "-1"}, "= -1 "),
            ({"watch.rescan_seconds": "inf"}, "= inf "),
            ({"log.level": '"verbose"'}, '= "verbose" '),
            ({"api.base_url": '"http://10.0.0.5:8765"'}, '"http://10.0.0.5:8765"'),
        ],
    )
    def test_message_shows_value(
        self, tmp_path: Path, changes: dict[str, str | None], shown: str
    ) -> None:
        """The message repeats the bad value as it was written."""
        assert shown in load_error(write_config(tmp_path, changes))

    def test_url_password_hidden(self, tmp_path: Path) -> None:
        """A base URL with a password is rejected without repeating the password."""
        message = load_error(
            write_config(tmp_path, {"api.base_url": '"https://user:hunter2@api.example"'})
        )
        assert "api.base_url" in message
        assert "user name or password" in message
        assert "hunter2" not in message

    def test_unknown_table(self, tmp_path: Path) -> None:
        """An unknown table is rejected with the closest known table suggested."""
        message = load_error(write_config(tmp_path, extra="[uplod]\nworkers = 2\n"))
        assert "uplod" in message
        assert "Did you mean [upload]?" in message

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """A key outside any table is rejected as unknown."""
        path = write_config(tmp_path)
        path.write_text("workers = 2\n" + path.read_text(encoding="utf-8"), encoding="utf-8")
        assert "Unknown table or key workers" in load_error(path)

    def test_table_not_a_table(self, tmp_path: Path) -> None:
        """A table name used as a plain key is rejected with the fix."""
        path = write_config(tmp_path)
        path.write_text('log = "debug"\n' + path.read_text(encoding="utf-8"), encoding="utf-8")
        message = load_error(path)
        assert "log" in message
        assert "[log] section" in message

    def test_ledger_path_folder(self, tmp_path: Path) -> None:
        """A ledger.path naming an existing folder is rejected."""
        (tmp_path / "state").mkdir()
        message = load_error(write_config(tmp_path, {"ledger.path": '"state"'}))
        assert "ledger.path" in message
        assert "Name the ledger file itself" in message

    def test_archive_through_symlink(self, tmp_path: Path) -> None:
        """An archive_dir that reaches into the drop root through a symbolic link is rejected."""
        (tmp_path / "drop").mkdir()
        (tmp_path / "shortcut").symlink_to(tmp_path / "drop")
        message = load_error(write_config(tmp_path, {"upload.archive_dir": '"shortcut/archive"'}))
        assert "upload.archive_dir" in message
        assert "outside watch.root" in message

    def test_unused_archive_dir_checked(self, tmp_path: Path) -> None:
        """An archive_dir inside the root is rejected even when after_success is not archive."""
        changes = {"upload.after_success": '"keep"', "upload.archive_dir": '"drop/a"'}
        assert "upload.archive_dir" in load_error(write_config(tmp_path, changes))

    def test_archive_dir_optional_when_deleting(self, tmp_path: Path) -> None:
        """Without archiving, upload.archive_dir may be left out."""
        changes = {"upload.after_success": '"keep"', "upload.archive_dir": None}
        assert load_config(write_config(tmp_path, changes)).upload.archive_dir is None


class TestFileErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing configuration file raises ConfigError naming the path."""
        path = tmp_path / "absent.toml"
        message = load_error(path)
        assert str(path) in message
        assert "not found" in message

    def test_syntax_error_line(self, tmp_path: Path) -> None:
        """A TOML syntax error raises ConfigError naming the path and the line."""
        path = tmp_path / "bad.toml"
        path.write_text('[api]\nbase_url = "https://x"\nconsumer_id = \n', encoding="utf-8")
        message = load_error(path)
        assert str(path) in message
        assert "line 3" in message

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 raises ConfigError naming the path."""
        path = tmp_path / "latin1.toml"
        path.write_bytes('[clients]\n"Café" = "x"\n'.encode("latin-1"))
        message = load_error(path)
        assert str(path) in message
        assert "UTF-8" in message

    def test_folder_as_file(self, tmp_path: Path) -> None:
        """A folder given as the configuration file raises ConfigError naming it."""
        message = load_error(tmp_path)
        assert str(tmp_path) in message
        assert "cannot read" in message


class TestPaths:
    def test_relative_to_config_folder(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Relative paths resolve against the config file's folder, not the current folder."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        changes = {
            "watch.root": '"../drop"',
            "upload.archive_dir": '"../out/archive"',
            "upload.failed_dir": '"failed"',
            "ledger.path": '"/var/lib/coreplus-uploader/ledger.sqlite3"',
        }
        config = load_config(write_config(tmp_path / "etc", changes))
        assert config.watch.root == tmp_path / "drop"
        assert config.upload.archive_dir == tmp_path / "out" / "archive"
        assert config.upload.failed_dir == tmp_path / "etc" / "failed"
        assert config.ledger.path == Path("/var/lib/coreplus-uploader/ledger.sqlite3")

    def test_relative_config_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A relative --config path is made absolute before resolving paths inside it."""
        write_config(tmp_path / "etc")
        monkeypatch.chdir(tmp_path)
        config = load_config("etc/uploader.toml")
        assert config.path == tmp_path / "etc" / "uploader.toml"
        assert config.watch.root == tmp_path / "etc" / "drop"

    def test_home_expanded(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A leading ~ expands to the home folder."""
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        config = load_config(write_config(tmp_path / "etc", {"watch.root": '"~/drop"'}))
        assert config.watch.root == tmp_path / "home" / "drop"

    def test_root_need_not_exist(self, tmp_path: Path) -> None:
        """The drop root and output folders may be missing when the config is loaded."""
        config = load_config(write_config(tmp_path))
        assert not config.watch.root.exists()
        assert config.watch.root == tmp_path / "drop"


class TestBaseUrl:
    @pytest.mark.parametrize(
        ("written", "stored"),
        [
            ("https://api.coreplus.com.au", "https://api.coreplus.com.au"),
            ("https://api.coreplus.com.au/", "https://api.coreplus.com.au"),
            ("https://clinic.coreplus.com.au/api//", "https://clinic.coreplus.com.au/api"),
            ("http://127.0.0.1:8765", "http://127.0.0.1:8765"),
            ("http://127.8.9.10:8765/", "http://127.8.9.10:8765"),
            ("http://localhost:8765", "http://localhost:8765"),
            ("http://LOCALHOST", "http://LOCALHOST"),
            ("http://[::1]:8765", "http://[::1]:8765"),
        ],
    )
    def test_base_url_accepted(self, tmp_path: Path, written: str, stored: str) -> None:
        """https URLs and plain http to loopback are accepted, without a trailing slash."""
        config = load_config(write_config(tmp_path, {"api.base_url": f'"{written}"'}))
        assert config.api.base_url == stored

    @pytest.mark.parametrize(
        "written",
        ["http://192.168.1.20:8765", "http://[::2]:8765", "http://128.0.0.1", "http://example.com"],
    )
    def test_http_non_loopback_rejected(self, tmp_path: Path, written: str) -> None:
        """Plain http to any host that is not loopback is rejected with the https fix."""
        message = load_error(write_config(tmp_path, {"api.base_url": f'"{written}"'}))
        assert "api.base_url" in message
        assert "https://" in message


class TestClients:
    def test_clients_normalised(self, tmp_path: Path) -> None:
        """Aliases are case-folded NFC keys; GUIDs lose braces and are stored lower case."""
        nfd_alias = unicodedata.normalize("NFD", "José Núñez")
        extra = (
            "[clients]\n"
            f'"{nfd_alias}" = "{{{GUID.upper()}}}"\n'
            f'"SMITH, John" = "{OTHER_GUID.upper()}"\n'
        )
        clients = load_config(write_config(tmp_path, extra=extra)).clients
        assert dict(clients) == {"josé núñez": GUID, "smith, john": OTHER_GUID}
        assert "josé núñez" == unicodedata.normalize("NFC", "josé núñez")

    def test_nfd_alias_matches_nfc_folder(self, tmp_path: Path) -> None:
        """An alias written in NFD matches a folder name in NFC, in another case."""
        nfd_alias = unicodedata.normalize("NFD", "Zoë Brontë")
        extra = f'[clients]\n"{nfd_alias}" = "{GUID}"\n'
        clients = load_config(write_config(tmp_path, extra=extra)).clients
        folder_name = unicodedata.normalize("NFC", "ZOË BRONTË")
        result = resolve_folder(folder_name, clients)
        assert result.client_id == GUID
        assert result.rule == "alias"

    def test_same_alias_same_guid(self, tmp_path: Path) -> None:
        """Two spellings of one alias naming the same client are accepted."""
        extra = f'[clients]\n"Smith" = "{GUID}"\n"SMITH" = "{{{GUID.upper()}}}"\n'
        assert dict(load_config(write_config(tmp_path, extra=extra)).clients) == {"smith": GUID}

    def test_alias_conflict(self, tmp_path: Path) -> None:
        """Two spellings of one alias naming different clients are rejected, naming both."""
        nfd = unicodedata.normalize("NFD", "Renée")
        extra = f'[clients]\n"Renée" = "{GUID}"\n"{nfd.upper()}" = "{OTHER_GUID}"\n'
        message = load_error(write_config(tmp_path, extra=extra))
        assert '"Renée"' in message
        assert GUID in message
        assert OTHER_GUID in message
        assert "Remove one of them" in message

    @pytest.mark.parametrize("value", ['"not-a-guid"', "42", f'"{GUID[:-1]}"', f'"{{{GUID}"'])
    def test_invalid_guid(self, tmp_path: Path, value: str) -> None:
        """An alias whose value is not a GUID is rejected, naming the alias."""
        message = load_error(write_config(tmp_path, extra=f'[clients]\n"Smith, John" = {value}\n'))
        assert 'clients."Smith, John"' in message
        assert "Copy the client id from coreplus" in message

    def test_clients_not_table(self, tmp_path: Path) -> None:
        """A [clients] value that is not a table is rejected."""
        path = write_config(tmp_path)
        path.write_text('clients = "x"\n' + path.read_text(encoding="utf-8"), encoding="utf-8")
        assert "[clients] section" in load_error(path)
        with pytest.raises(ConfigError, match=r"\[clients\] section"):
            load_clients(path)

    def test_load_clients_rereads(self, tmp_path: Path) -> None:
        """load_clients returns the [clients] table as it is in the file now."""
        path = write_config(tmp_path, extra=f'[clients]\nSmith = "{GUID}"\n')
        assert dict(load_config(path).clients) == {"smith": GUID}
        write_config(tmp_path, extra=f'[clients]\nJones = "{OTHER_GUID.upper()}"\n')
        assert dict(load_clients(path)) == {"jones": OTHER_GUID}

    def test_load_clients_validates(self, tmp_path: Path) -> None:
        """load_clients applies the same validation as load_config."""
        path = write_config(tmp_path, extra='[clients]\nSmith = "nope"\n')
        with pytest.raises(ConfigError, match="clients.\"Smith\""):
            load_clients(path)

    def test_load_clients_missing_file(self, tmp_path: Path) -> None:
        """load_clients on a missing file raises ConfigError naming the path."""
        path = tmp_path / "gone.toml"
        with pytest.raises(ConfigError, match="not found"):
            load_clients(path)

    def test_load_clients_read_only(self, tmp_path: Path) -> None:
        """The map load_clients returns cannot be changed."""
        path = write_config(tmp_path, extra=f'[clients]\nSmith = "{GUID}"\n')
        clients = load_clients(path)
        with pytest.raises(TypeError):
            clients["x"] = GUID  # type: ignore[index]
        assert dict(clients) == {"smith": GUID}


# A complete e-mail setup; each case below changes or removes one key (raw TOML).
MAIL = {
    "alert.smtp_host": '"smtp.clinic.example"',
    "alert.email_from": '"uploader@clinic.example"',
    "alert.email_to": '["it@clinic.example"]',
}

ALERT_CASES = [
    ({"alert.command": '"/usr/bin/notify \'unclosed"'}, "alert.command", "Close every quote"),
    ({"alert.command": '"   "'}, "alert.command", "Write a value"),
    ({"alert.command": '"bin/notify"'}, "alert.command", "absolute path"),
    ({"alert.command": "[\"/bin/echo\"]"}, "alert.command", "double quotes"),
    ({"alert.smtp_port": "0"}, "alert.smtp_port", "between 1 and 65535"),
    ({"alert.smtp_port": "70000"}, "alert.smtp_port", "between 1 and 65535"),
    ({"alert.smtp_timeout_seconds": "0"}, "alert.smtp_timeout_seconds", "at least 1"),
    ({"alert.disk_min_free_percent": "101"}, "alert.disk_min_free_percent", "between 0 and 100"),
    ({"alert.smtp_security": '"ssl"'}, "alert.smtp_security", '"starttls", "tls", "none"'),
    ({"alert.smtp_host": '"smtp.clinic.example:587"'}, "alert.smtp_host", "alert.smtp_port"),
    ({"alert.smtp_host": '"smtp://x"'}, "alert.smtp_host", "name alone"),
    ({"alert.email_from": '"Uploader <u@clinic.example>"'}, "alert.email_from", "bare address"),
    ({"alert.email_to": '["it@clinic"]'}, "alert.email_to", "bare address"),
    ({"alert.email_to": '"it@clinic.example"'}, "alert.email_to", "quoted e-mail addresses"),
    ({"alert.email_to": None}, "alert.email_to", "Missing required key alert.email_to"),
    ({"alert.email_from": None}, "alert.email_from", "Missing required key alert.email_from"),
    ({"alert.smtp_user": '"it"'}, "alert.smtp_password_file", "Set both"),
    ({"alert.smtp_password_file": '"pw"'}, "alert.smtp_user", "Set both"),
    ({"alert.smtp_security": '"none"', "alert.smtp_user": '"it"',
      "alert.smtp_password_file": '"pw"'}, "alert.smtp_security", '"starttls" or "tls"'),
    ({"alert.smtp_colour": '"red"'}, "alert.smtp_colour", "Did you mean alert.smtp_"),
]


class TestAlertTable:
    def test_alert_all_keys(self, tmp_path: Path) -> None:
        """Every [alert] key is read with its type; relative paths resolve beside the file."""
        changes = {**MAIL, "alert.command": '"/usr/local/bin/page-it --team \'front desk\'"',
                   "alert.smtp_port": "465", "alert.smtp_security": '"tls"',
                   "alert.smtp_user": '"it"', "alert.smtp_password_file": '"smtp-password"',
                   "alert.smtp_timeout_seconds": "12",
                   "alert.email_to": '["it@clinic.example", "pm@clinic.example"]',
                   "alert.disk_min_free_percent": "2.5"}
        alert = load_config(write_config(tmp_path, changes)).alert
        assert alert.command == "/usr/local/bin/page-it --team 'front desk'"
        assert alert.smtp_host == "smtp.clinic.example"
        assert alert.smtp_port == 465
        assert alert.smtp_security == "tls"
        assert alert.smtp_user == "it"
        assert alert.smtp_password_file == tmp_path / "smtp-password"
        assert alert.smtp_timeout_seconds == 12.0
        assert alert.email_from == "uploader@clinic.example"
        assert alert.email_to == ("it@clinic.example", "pm@clinic.example")
        assert alert.disk_min_free_percent == 2.5

    def test_alert_plain_loopback_login(self, tmp_path: Path) -> None:
        """A login without encryption is allowed to a mail server on this machine."""
        changes = {**MAIL, "alert.smtp_host": '"127.0.0.1"', "alert.smtp_security": '"none"',
                   "alert.smtp_user": '"it"', "alert.smtp_password_file": '"pw"'}
        assert load_config(write_config(tmp_path, changes)).alert.smtp_security == "none"

    def test_alert_bare_command(self, tmp_path: Path) -> None:
        """A bare program name is accepted, to be found in PATH when it runs."""
        config = load_config(write_config(tmp_path, {"alert.command": '"logger -t uploader"'}))
        assert config.alert.command == "logger -t uploader"

    @pytest.mark.parametrize("key", ["alert.email_to", "alert.email_from", "alert.smtp_user"])
    def test_alert_mail_key_without_host(self, tmp_path: Path, key: str) -> None:
        """An e-mail key without alert.smtp_host is rejected, naming both keys."""
        raw = {"alert.email_to": '["it@clinic.example"]', "alert.email_from": '"u@clinic.example"',
               "alert.smtp_user": '"it"'}[key]
        changes = {key: raw}
        if key == "alert.smtp_user":
            changes["alert.smtp_password_file"] = '"pw"'
        message = load_error(write_config(tmp_path, changes))
        assert key in message or "alert.smtp_password_file" in message
        assert "alert.smtp_host" in message

    @pytest.mark.parametrize(("changes", "key", "fix"), ALERT_CASES)
    def test_alert_invalid(
        self, tmp_path: Path, changes: dict[str, str | None], key: str, fix: str
    ) -> None:
        """An invalid or incomplete [alert] key raises ConfigError naming the key and the fix."""
        message = load_error(write_config(tmp_path, {**MAIL, **changes}))
        assert key in message
        assert fix in message
