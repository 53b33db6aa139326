"""
Tests for uploader.credentials: the order of the three sources, file mode checks and
value cleaning, with real files in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from uploader.config import ApiConfig
from uploader.credentials import load_credentials
from uploader.exceptions import CredentialsError

SECRET = "s3cret-value-XYZ"
TOKEN = "token-value-ABC"


def api_config(secret_file: Path | None = None, token_file: Path | None = None) -> ApiConfig:
    return ApiConfig(
        base_url="https://api.coreplus.com.au",
        consumer_id="clinic-consumer",
        issuer="https://clinic.example",
        secret_file=secret_file,
        access_token_file=token_file,
    )


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


@pytest.fixture
def secret_files(tmp_path: Path) -> tuple[Path, Path]:
    """A secret file and a token file, mode 0600, holding other values than the env."""
    return (
        write_secret(tmp_path / "files" / "secret", "file-secret\n"),
        write_secret(tmp_path / "files" / "token", "file-token\n"),
    )


@pytest.fixture
def systemd_dir(tmp_path: Path) -> Path:
    """A $CREDENTIALS_DIRECTORY holding both systemd credentials."""
    folder = tmp_path / "credentials"
    write_secret(folder / "coreplus-secret", "systemd-secret")
    write_secret(folder / "coreplus-access-token", "systemd-token\n")
    return folder


ENV = {"COREPLUS_SECRET": "env-secret", "COREPLUS_ACCESS_TOKEN": "env-token"}


def load_error(api: ApiConfig, environ: dict[str, str]) -> str:
    with pytest.raises(CredentialsError) as caught:
        load_credentials(api, environ)
    return str(caught.value)


class TestSourceOrder:
    def test_systemd_wins(self, systemd_dir: Path, secret_files: tuple[Path, Path]) -> None:
        """systemd credentials win over configured files and the environment."""
        environ = {**ENV, "CREDENTIALS_DIRECTORY": str(systemd_dir)}
        credentials = load_credentials(api_config(*secret_files), environ)
        assert credentials.secret == "systemd-secret"
        assert credentials.access_token == "systemd-token"
        assert credentials.consumer_id == "clinic-consumer"
        assert credentials.source == f"systemd credentials in {systemd_dir}"

    def test_files_before_environment(self, secret_files: tuple[Path, Path]) -> None:
        """Configured files with mode 0600 win over the environment."""
        credentials = load_credentials(api_config(*secret_files), ENV)
        assert credentials.secret == "file-secret"
        assert credentials.access_token == "file-token"
        assert credentials.source == f"files {secret_files[0]} and {secret_files[1]}"

    def test_systemd_without_ours(self, tmp_path: Path, secret_files: tuple[Path, Path]) -> None:
        """A credentials folder without our two names falls through to the files."""
        other = tmp_path / "other-credentials"
        write_secret(other / "unrelated", "x")
        environ = {**ENV, "CREDENTIALS_DIRECTORY": str(other)}
        assert load_credentials(api_config(*secret_files), environ).secret == "file-secret"

    def test_environment_fallback(self) -> None:
        """Without systemd credentials or files, the environment variables are used."""
        credentials = load_credentials(api_config(), ENV)
        assert credentials.secret == "env-secret"
        assert credentials.access_token == "env-token"
        assert credentials.source == "environment"

    def test_missing_everywhere(self) -> None:
        """With no source at all, the error lists the three ways to provide them."""
        message = load_error(api_config(), {})
        assert "coreplus-secret" in message
        assert "$CREDENTIALS_DIRECTORY" in message
        assert "api.secret_file and api.access_token_file" in message
        assert "COREPLUS_SECRET and COREPLUS_ACCESS_TOKEN" in message


class TestFiles:
    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660])
    def test_group_or_other_access(self, tmp_path: Path, mode: int) -> None:
        """A secret file open to group or others is rejected with its mode and chmod 600."""
        secret = write_secret(tmp_path / "secret", SECRET, mode)
        token = write_secret(tmp_path / "token", TOKEN)
        message = load_error(api_config(secret, token), ENV)
        assert str(secret) in message
        assert f"{mode:04o}" in message
        assert f"chmod 600 {secret}" in message
        assert SECRET not in message

    def test_token_file_mode(self, tmp_path: Path) -> None:
        """The access token file is checked as strictly as the secret file."""
        secret = write_secret(tmp_path / "secret", SECRET)
        token = write_secret(tmp_path / "token", TOKEN, 0o644)
        message = load_error(api_config(secret, token), ENV)
        assert "api.access_token_file" in message
        assert f"chmod 600 {token}" in message

    @pytest.mark.parametrize("mode", [0o600, 0o400])
    def test_private_modes_accepted(self, tmp_path: Path, mode: int) -> None:
        """Modes without group or other bits are accepted."""
        secret = write_secret(tmp_path / "secret", SECRET, mode)
        token = write_secret(tmp_path / "token", TOKEN, mode)
        assert load_credentials(api_config(secret, token), {}).secret == SECRET

    def test_missing_file(self, tmp_path: Path) -> None:
        """A configured file that does not exist is an error, not a fall-through to the env."""
        token = write_secret(tmp_path / "token", TOKEN)
        message = load_error(api_config(tmp_path / "absent", token), ENV)
        assert "api.secret_file" in message
        assert "does not exist" in message

    def test_folder_as_file(self, tmp_path: Path) -> None:
        """A configured path that is a folder is rejected."""
        token = write_secret(tmp_path / "token", TOKEN)
        folder = tmp_path / "folder"
        folder.mkdir(mode=0o700)
        assert "not a regular file" in load_error(api_config(folder, token), {})


class TestSystemd:
    def test_one_credential_missing(self, tmp_path: Path) -> None:
        """Only one of the two systemd credentials present is an error naming the missing one."""
        folder = tmp_path / "credentials"
        write_secret(folder / "coreplus-secret", SECRET)
        message = load_error(api_config(), {**ENV, "CREDENTIALS_DIRECTORY": str(folder)})
        assert "coreplus-access-token is missing" in message
        assert "LoadCredential=" in message
        assert SECRET not in message


class TestEnvironment:
    @pytest.mark.parametrize(
        ("environ", "missing"),
        [
            ({"COREPLUS_SECRET": SECRET}, "COREPLUS_ACCESS_TOKEN"),
            ({"COREPLUS_ACCESS_TOKEN": TOKEN}, "COREPLUS_SECRET"),
        ],
    )
    def test_one_variable_missing(self, environ: dict[str, str], missing: str) -> None:
        """Only one of the two variables set is an error naming the other."""
        message = load_error(api_config(), environ)
        assert f"{missing} is not set" in message
        assert SECRET not in message
        assert TOKEN not in message


class TestValues:
    def test_whitespace_stripped(self, tmp_path: Path) -> None:
        """One trailing newline and surrounding whitespace are removed from file values."""
        secret = write_secret(tmp_path / "secret", f"  {SECRET}\n")
        token = write_secret(tmp_path / "token", f"{TOKEN}\r\n")
        credentials = load_credentials(api_config(secret, token), {})
        assert credentials.secret == SECRET
        assert credentials.access_token == TOKEN

    @pytest.mark.parametrize(
        ("environ", "named"),
        [
            ({"COREPLUS_SECRET": "", "COREPLUS_ACCESS_TOKEN": TOKEN}, "COREPLUS_SECRET is empty"),
            ({"COREPLUS_SECRET": SECRET, "COREPLUS_ACCESS_TOKEN": " \n"}, "TOKEN is empty"),
        ],
    )
    def test_empty_value(self, environ: dict[str, str], named: str) -> None:
        """An empty or blank value is rejected, naming where it came from."""
        assert named in load_error(api_config(), environ)

    def test_empty_file(self, tmp_path: Path) -> None:
        """An empty secret file is rejected, naming the file."""
        secret = write_secret(tmp_path / "secret", "\n")
        token = write_secret(tmp_path / "token", TOKEN)
        message = load_error(api_config(secret, token), {})
        assert str(secret) in message
        assert "is empty" in message

    def test_multiline_value(self, tmp_path: Path) -> None:
        """A file holding two lines is rejected without repeating either line."""
        secret = write_secret(tmp_path / "secret", f"{SECRET}\n{TOKEN}\n")
        token = write_secret(tmp_path / "token", TOKEN)
        message = load_error(api_config(secret, token), {})
        assert "more than one line" in message
        assert SECRET not in message
        assert TOKEN not in message

    def test_token_too_long(self) -> None:
        """An access token over 50 characters is rejected without repeating it."""
        long_token = "t" * 51
        environ = {"COREPLUS_SECRET": SECRET, "COREPLUS_ACCESS_TOKEN": long_token}
        message = load_error(api_config(), environ)
        assert "51 characters" in message
        assert "at most 50" in message
        assert long_token not in message

    def test_token_fifty_chars(self) -> None:
        """An access token of exactly 50 characters is accepted."""
        token = "t" * 50
        environ = {"COREPLUS_SECRET": SECRET, "COREPLUS_ACCESS_TOKEN": token}
        assert load_credentials(api_config(), environ).access_token == token

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A secret file that is not UTF-8 is rejected without showing its bytes."""
        secret = tmp_path / "secret"
        secret.write_bytes(b"\xff\xfe-secret")
        secret.chmod(0o600)
        token = write_secret(tmp_path / "token", TOKEN)
        message = load_error(api_config(secret, token), {})
        assert "not UTF-8" in message
        assert str(secret) in message

    def test_repr_hides_values(self) -> None:
        """The repr of loaded credentials contains neither the secret nor the token."""
        environ = {"COREPLUS_SECRET": SECRET, "COREPLUS_ACCESS_TOKEN": TOKEN}
        credentials = load_credentials(api_config(), environ)
        assert SECRET not in repr(credentials)
        assert TOKEN not in repr(credentials)
        assert "environment" in repr(credentials)
