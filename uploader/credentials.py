"""
Load the consumer secret and access token from the sources the contract names,
in its order, and keep them out of every repr, log line and ledger row.

The sources, first found wins, and both values always come from the same one:

1. systemd credentials ``coreplus-secret`` and ``coreplus-access-token`` in
   ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=`` in the unit);
2. the files named by ``api.secret_file`` and ``api.access_token_file``, which must
   not be readable or writable by group or others;
3. the environment variables ``COREPLUS_SECRET`` and ``COREPLUS_ACCESS_TOKEN``.

No message raised here contains a secret or token value.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from uploader.exceptions import CredentialsError

if TYPE_CHECKING:
    from uploader.config import ApiConfig

#: systemd credential names, as ``LoadCredential=`` or ``SetCredential=`` give them.
SYSTEMD_SECRET_NAME = "coreplus-secret"
SYSTEMD_ACCESS_TOKEN_NAME = "coreplus-access-token"

#: Environment variables of the last source.
SECRET_ENV = "COREPLUS_SECRET"
ACCESS_TOKEN_ENV = "COREPLUS_ACCESS_TOKEN"

#: coreplus issues access tokens of at most 50 characters.
MAX_ACCESS_TOKEN_CHARS = 50


@dataclass(frozen=True)
class Credentials:
    """
    What a coreplus token is signed with and carries.

    ``secret`` and ``access_token`` never appear in ``repr`` so that a logged object
    cannot leak them.
    """

    consumer_id: str
    secret: str = field(repr=False)
    access_token: str = field(repr=False)
    source: str = "unknown"
    """Which source supplied the secret and token, for `check` to print."""


def _clean(raw: str, what: str, fix: str) -> str:
    """Strip surrounding whitespace and reject values that cannot be right."""
    value = raw.strip()
    if not value:
        raise CredentialsError(f"{what} is empty. {fix}")
    if any(char in value for char in "\r\n"):
        raise CredentialsError(
            f"{what} contains more than one line. It must contain only the value. {fix}"
        )
    return value


def _check_token_length(token: str, what: str) -> None:
    if len(token) > MAX_ACCESS_TOKEN_CHARS:
        raise CredentialsError(
            f"{what} has {len(token)} characters; coreplus access tokens have at most "
            f"{MAX_ACCESS_TOKEN_CHARS}. Copy the access token again from coreplus "
            "(Setup > Add-Ons)."
        )


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise CredentialsError(
            f"{what} {path} cannot be read by user {_user_name()}. "
            f"Make that user its owner (chown {_user_name()} {path})."
        ) from None
    except OSError as exc:
        raise CredentialsError(f"{what} {path} cannot be read: {exc.strerror}.") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{what} {path} is not UTF-8 text. Write the value again.") from None


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _from_systemd(environ: Mapping[str, str]) -> tuple[str, str, str] | None:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    folder = Path(directory)
    secret_path = folder / SYSTEMD_SECRET_NAME
    token_path = folder / SYSTEMD_ACCESS_TOKEN_NAME
    present = [path.exists() for path in (secret_path, token_path)]
    if not any(present):
        return None
    if not all(present):
        missing = SYSTEMD_ACCESS_TOKEN_NAME if present[0] else SYSTEMD_SECRET_NAME
        raise CredentialsError(
            f"systemd credential {missing} is missing from {folder}, although the other "
            "one is there. Add it to the unit (LoadCredential=) so both come from systemd."
        )
    fix = "Write the value into the credential again."
    secret = _clean(_read_text(secret_path, "Credential"), f"Credential {secret_path}", fix)
    token = _clean(_read_text(token_path, "Credential"), f"Credential {token_path}", fix)
    _check_token_length(token, f"Credential {token_path}")
    return secret, token, f"systemd credentials in {folder}"


def _check_private(path: Path, key: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CredentialsError(
            f"{key} names {path}, which does not exist. Create it containing only the "
            f"value (mode 600), or remove {key} from the configuration."
        ) from None
    if not stat.S_ISREG(mode):
        raise CredentialsError(f"{key} names {path}, which is not a regular file.")
    if mode & 0o077:
        raise CredentialsError(
            f"{key} names {path}, whose mode {stat.S_IMODE(mode):04o} lets group or others "
            f"access it. Run: chmod 600 {path}"
        )


def _from_files(api: ApiConfig) -> tuple[str, str, str] | None:
    if api.secret_file is None or api.access_token_file is None:
        return None
    _check_private(api.secret_file, "api.secret_file")
    _check_private(api.access_token_file, "api.access_token_file")
    fix = "Write the value into the file again."
    secret_what = f"api.secret_file {api.secret_file}"
    token_what = f"api.access_token_file {api.access_token_file}"
    secret = _clean(_read_text(api.secret_file, "api.secret_file"), secret_what, fix)
    token = _clean(_read_text(api.access_token_file, "api.access_token_file"), token_what, fix)
    _check_token_length(token, token_what)
    return secret, token, f"files {api.secret_file} and {api.access_token_file}"


def _from_environment(environ: Mapping[str, str]) -> tuple[str, str, str] | None:
    secret_raw = environ.get(SECRET_ENV)
    token_raw = environ.get(ACCESS_TOKEN_ENV)
    if secret_raw is None and token_raw is None:
        return None
    if secret_raw is None or token_raw is None:
        missing = SECRET_ENV if secret_raw is None else ACCESS_TOKEN_ENV
        raise CredentialsError(
            f"The environment variable {missing} is not set, although the other one is. "
            "Set both, or neither."
        )
    fix = "Set it to the value from coreplus."
    secret = _clean(secret_raw, f"The environment variable {SECRET_ENV}", fix)
    token = _clean(token_raw, f"The environment variable {ACCESS_TOKEN_ENV}", fix)
    _check_token_length(token, f"The environment variable {ACCESS_TOKEN_ENV}")
    return secret, token, "environment"


_NOT_FOUND_MESSAGE = (
    "No coreplus secret and access token were found. Provide them in one of these ways: "
    f"(1) systemd credentials {SYSTEMD_SECRET_NAME} and {SYSTEMD_ACCESS_TOKEN_NAME} "
    "(LoadCredential= in the unit, read from $CREDENTIALS_DIRECTORY); "
    "(2) api.secret_file and api.access_token_file in the configuration, each file "
    "owned by the daemon's user with mode 600; "
    f"(3) the environment variables {SECRET_ENV} and {ACCESS_TOKEN_ENV}."
)


def load_credentials(api: ApiConfig, environ: Mapping[str, str] = os.environ) -> Credentials:
    """
    Load the consumer secret and access token from the first source that has them.

    Args:
        api: The ``[api]`` configuration, for the consumer id and the file paths.
        environ: The environment to read ``CREDENTIALS_DIRECTORY`` and the variables
            from.

    Returns:
        The credentials, with ``source`` naming where they came from.

    Raises:
        CredentialsError: No source has them, or a source has only one of the two.
            Also raised when a configured file is missing, unreadable or open to
            group or others, and when a value is empty, spans several lines, or is
            an access token over 50 characters.
    """
    found = _from_systemd(environ) or _from_files(api) or _from_environment(environ)
    if found is None:
        raise CredentialsError(_NOT_FOUND_MESSAGE)
    secret, token, source = found
    return Credentials(
        consumer_id=api.consumer_id, secret=secret, access_token=token, source=source
    )
