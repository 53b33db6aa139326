"""
Load the consumer secret and access token from the sources the contract names,
in its order, and keep them out of every repr, log line and ledger row.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
