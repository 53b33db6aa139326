"""
Tests for uploader.auth: token claims, signing and the Authorization header.
"""

from __future__ import annotations

import jwt
import pytest

from uploader.auth import authorization_header, build_claims, mint_token
from uploader.credentials import Credentials

CREDENTIALS = Credentials(
    consumer_id="consumer-123",
    secret="s3cret-for-tests-0123456789abcdefghijkl",
    access_token="access-456",
)
ISSUER = "https://clinic.example.com.au"
AUDIENCE = "https://coreplus.com.au"
URL = "https://api.example.test/API/Core/v2/Client/?pageNumber=1&pageSize=50"


def _decode(token: str, secret: str = CREDENTIALS.secret) -> dict[str, object]:
    # Times are checked by the tests themselves, so PyJWT only verifies the signature.
    return jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        audience=AUDIENCE,
        options={"verify_exp": False, "verify_nbf": False},
    )


def _claims(method: str, now_s: float, leeway_s: int) -> dict[str, object]:
    return build_claims(
        credentials=CREDENTIALS, issuer=ISSUER, audience=AUDIENCE, method=method, url=URL,
        now_s=now_s, leeway_s=leeway_s,
    )


def _mint(
    method: str,
    leeway_s: int,
    now_s: float | None = None,
    *,
    url: str = URL,
    credentials: Credentials = CREDENTIALS,
) -> str:
    """Mint a token with the test issuer and audience. ``now_s=None`` uses the real clock."""
    return mint_token(
        credentials=credentials, issuer=ISSUER, audience=AUDIENCE, method=method, url=url,
        leeway_s=leeway_s, now_s=now_s,
    )


def test_claims_exact_values() -> None:
    """Claims for a GET at 1700000000.9 s with 5 s leeway are exactly as coreplus expects."""
    claims = _claims("get", now_s=1_700_000_000.9, leeway_s=5)
    assert claims == {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "nbf": 1_699_999_995,
        "exp": 1_700_000_055,
        "consumerId": "consumer-123",
        "accessToken": "access-456",
        "url": URL,
        "httpMethod": "GET",
    }


def test_claims_times_are_integers() -> None:
    """nbf and exp are ints exactly 60 s apart even when now has a fraction."""
    claims = _claims("POST", now_s=12.75, leeway_s=0)
    assert type(claims["nbf"]) is int
    assert type(claims["exp"]) is int
    assert claims["nbf"] == 12
    assert claims["exp"] - claims["nbf"] == 60


def test_token_verifies_with_pyjwt() -> None:
    """A minted token carries HS256 in its header and verifies with the consumer secret."""
    token = _mint("post", leeway_s=5, now_s=1_700_000_000)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = _decode(token)
    assert claims["url"] == URL
    assert claims["httpMethod"] == "POST"
    assert claims["nbf"] == 1_699_999_995
    assert claims["exp"] == 1_700_000_055


def test_token_wrong_secret_fails() -> None:
    """Verifying with another secret fails, so the signature really uses the secret."""
    token = _mint("GET", leeway_s=0, now_s=1_700_000_000)
    with pytest.raises(jwt.InvalidSignatureError):
        _decode(token, secret="another-secret-0123456789abcdefghijklmn")


def test_token_fresh_per_request() -> None:
    """Two requests (different URL, or a later time) get two different tokens."""
    first = _mint("POST", leeway_s=5, now_s=100)
    other_url = _mint("POST", leeway_s=5, now_s=100, url=URL + "x")
    later = _mint("POST", leeway_s=5, now_s=101)
    assert len({first, other_url, later}) == 3


def test_token_default_clock_is_now() -> None:
    """Without now_s the token is valid now, so PyJWT's own time checks pass."""
    token = _mint("GET", leeway_s=5)
    claims = jwt.decode(token, CREDENTIALS.secret, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["exp"] - claims["nbf"] == 60


def test_token_short_secret_no_warning() -> None:
    """A short vendor-issued secret signs without a warning (warnings are errors in tests)."""
    short = Credentials(consumer_id="c", secret="short", access_token="t")
    token = _mint("GET", leeway_s=0, now_s=0, credentials=short)
    assert token.count(".") == 2


def test_authorization_header_format() -> None:
    """The header is the word JwToken, one space, then the token."""
    assert authorization_header("abc.def.ghi") == "JwToken abc.def.ghi"
