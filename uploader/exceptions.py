"""
The exception tree. Each class has one meaning, so callers catch exactly what they
can handle; the classification of service responses into these types lives in
``uploader.client``.
"""

from __future__ import annotations


class UploaderError(Exception):
    """
    Base class for every error this package raises on purpose.
    """


class ConfigError(UploaderError):
    """
    The configuration is invalid; the message names the key, the value and the fix.
    """


class CredentialsError(ConfigError):
    """
    The consumer secret or access token is missing or unsafe to use.
    """


class LedgerError(UploaderError):
    """
    The ledger cannot be used; the CLI exits with code 3.
    """


class LedgerLockedError(LedgerError):
    """
    Another process holds the ledger's lock.
    """


class LedgerDamagedError(LedgerError):
    """
    The ledger file exists but is not a valid ledger.
    """


class UploadError(UploaderError):
    """
    Base class for the outcome of one upload attempt that was not a success.

    Attributes:
        status: The HTTP status, or None when no response came back.
        body: The start of the response's body, for the reason file and logs.
        retry_after_s: Seconds the service asked us to wait, if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.retry_after_s = retry_after_s


class RetryableUploadError(UploadError):
    """
    Transient: 408, 429, 5xx, or a connection that failed before the body was sent.
    """


class UncertainUploadError(UploadError):
    """
    The whole body was sent but no valid response came back, so the service may have
    stored the file.
    """


class ServicePausedError(UploadError):
    """
    Every upload must pause: 401, 403 or a TLS certificate error.
    """


class PermanentUploadError(UploadError):
    """
    The service rejected this file (any other 4xx); retrying cannot help.
    """


class FileChangedError(UploaderError):
    """
    The file changed while it was being hashed or sent; it goes back to waiting.
    """


class FileVanishedError(UploaderError):
    """
    The file disappeared before or during its upload.
    """
