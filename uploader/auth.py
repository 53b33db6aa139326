"""
Sign the per-request JSON Web Tokens that coreplus expects.

coreplus binds each token to one request: the ``url`` and ``httpMethod`` claims name
the request, and ``nbf``/``exp`` allow one minute. So a token is minted for every
request and every retry, and is never cached or reused.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jwt

from uploader.constants import TOKEN_LIFETIME_S
from uploader.credentials import Credentials

#: The only signing algorithm coreplus accepts.
TOKEN_ALGORITHM = "HS256"

# PyJWT 2.10 and later warn when an HMAC key is shorter than the hash (32 bytes for
# HS256). coreplus issues the secret and the clinic cannot choose its length, so the
# warning would only be noise in every log line.
_KEY_LENGTH_WARNING: type[Warning] | None = getattr(jwt, "InsecureKeyLengthWarning", None)

#: The scheme word of the Authorization header; coreplus requires exactly one space after it.
AUTHORIZATION_SCHEME = "JwToken"


def build_claims(
    *,
    credentials: Credentials,
    issuer: str,
    audience: str,
    method: str,
    url: str,
    now_s: float,
    leeway_s: int,
) -> dict[str, Any]:
    """
    Build the claims of a token for one request.

    Args:
        credentials: The consumer id and access token to put in the claims.
        issuer: The ``iss`` claim, the integrator's web site URL.
        audience: The ``aud`` claim.
        method: The HTTP method of the request; it is sent in upper case.
        url: The exact URL requested, query string included.
        now_s: The current time in UTC unix seconds.
        leeway_s: Seconds to set ``nbf`` in the past, so that a local clock slightly
            ahead of the service's clock does not make the token not yet valid.

    Returns:
        The claims, with integer ``nbf`` and ``exp`` exactly ``TOKEN_LIFETIME_S`` apart.
    """
    not_before_s = int(now_s) - leeway_s
    return {
        "iss": issuer,
        "aud": audience,
        "nbf": not_before_s,
        "exp": not_before_s + TOKEN_LIFETIME_S,
        "consumerId": credentials.consumer_id,
        "accessToken": credentials.access_token,
        "url": url,
        "httpMethod": method.upper(),
    }


def mint_token(
    *,
    credentials: Credentials,
    issuer: str,
    audience: str,
    method: str,
    url: str,
    leeway_s: int,
    now_s: float | None = None,
) -> str:
    """
    Sign a new token for one request with the consumer secret (HS256).

    Args:
        credentials: The consumer id, secret and access token.
        issuer: The ``iss`` claim.
        audience: The ``aud`` claim.
        method: The HTTP method of the request.
        url: The exact URL requested, query string included.
        leeway_s: Seconds to set ``nbf`` in the past.
        now_s: The current UTC unix time; ``time.time()`` when None.

    Returns:
        The compact serialised token.
    """
    claims = build_claims(
        credentials=credentials,
        issuer=issuer,
        audience=audience,
        method=method,
        url=url,
        now_s=time.time() if now_s is None else now_s,
        leeway_s=leeway_s,
    )
    with warnings.catch_warnings():
        if _KEY_LENGTH_WARNING is not None:
            warnings.simplefilter("ignore", _KEY_LENGTH_WARNING)
        return jwt.encode(claims, credentials.secret, algorithm=TOKEN_ALGORITHM)


def authorization_header(token: str) -> str:
    """
    Return the value of the Authorization header that carries ``token``.
    """
    return f"{AUTHORIZATION_SCHEME} {token}"
