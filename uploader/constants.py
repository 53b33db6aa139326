"""
Names and numbers that users, scripts and several modules rely on.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """
    The state of one file version in the ledger, as ``status`` and logs print it.
    """

    WAITING = "waiting"
    """Seen, not settled yet."""
    QUEUED = "queued"
    """Settled and hashed, waiting for a worker."""
    UPLOADING = "uploading"
    """An attempt is in flight; written before the first byte is sent."""
    UPLOADED = "uploaded"
    """The service responded 200 with a matching size."""
    DUPLICATE = "duplicate"
    """The same bytes were already uploaded for this client; nothing was sent."""
    DEFERRED = "deferred"
    """A transient failure; ``next_attempt_at`` is when to try again."""
    UNCERTAIN = "uncertain"
    """The body was sent but no valid response came back."""
    HELD = "held"
    """Needs a person: see ``last_error``."""
    FAILED = "failed"
    """Permanent: the file was moved to the failed folder with a reason file."""
    VANISHED = "vanished"
    """The file disappeared before it was uploaded; nothing more to do."""


#: States in which the file is still expected in its drop folder and the daemon
#: still has work to do.
ACTIVE_STATES = frozenset(
    {State.WAITING, State.QUEUED, State.UPLOADING, State.DEFERRED, State.UNCERTAIN, State.HELD}
)

#: States that `retry` may put back in the queue.
RETRYABLE_BY_USER = frozenset({State.FAILED, State.DEFERRED, State.HELD, State.UNCERTAIN})


class ExitCode:
    """
    Process exit codes, fixed because scripts and systemd act on them.
    """

    OK = 0
    FILES_FAILED = 1
    USAGE = 2
    LEDGER_UNAVAILABLE = 3
    TEMPORARY = 75  # EX_TEMPFAIL from sysexits.h


#: The JSON ``entity`` value for client files; coreplus supports no other today.
ENTITY_CLIENT = "Client"

#: Path of the File endpoint under the base URL; ``{version}`` is ``api.version``.
FILE_PATH_TEMPLATE = "/API/Core/{version}/File/"

#: Path of the Client list endpoint; ``{version}`` is ``api.client_list_version``.
CLIENT_LIST_PATH_TEMPLATE = "/API/Core/{version}/Client/"

#: Seconds between a token's nbf and exp; coreplus expects exactly one minute.
TOKEN_LIFETIME_S = 60

#: coreplus allows 10 requests per second per consumer.
SERVICE_RATE_LIMIT_PER_S = 10

#: Bytes read from disk per chunk when hashing or streaming a file.
CHUNK_BYTES = 256 * 1024

#: Maximum wait a worker spends between tries inside one attempt cycle. Longer
#: waits (a long Retry-After, an outage) go through the ``deferred`` state instead,
#: so a worker is never parked on one file.
INLINE_RETRY_MAX_WAIT_S = 10.0

#: How many "other 4xx" responses in a row, for different clients, pause every
#: upload as a suspected configuration error (wrong base URL or version).
CONFIG_ERROR_PAUSE_AFTER = 5

#: A repeated log condition is logged once, then its count every this many seconds.
REPEAT_LOG_INTERVAL_S = 600.0

#: Server Date headers further than this from the local clock emit ``clock.skew``.
CLOCK_SKEW_WARN_S = 5.0

#: How often the daemon looks for rows changed by other commands (retry, forget).
LEDGER_POLL_INTERVAL_S = 1.0

#: Name of the plain-text status file for reception staff, in the drop root.
STATUS_FILE_NAME = "UPLOAD-STATUS.txt"
