"""
A plain sequential coreplus File client, the yardstick for the daemon's throughput.

It sends one file at a time, signs a new HS256 token for every request as coreplus's
documentation describes, and builds each body with requests_toolbelt's
MultipartEncoder. It shares no code with the ``uploader`` package, so the comparison
measures the daemon against an independent client. It keeps one HTTP connection open
(a ``requests.Session``), which makes it a stronger baseline than a new connection
per file.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jwt
import requests
from requests_toolbelt import MultipartEncoder

#: File endpoint path; the version is part of the path.
FILE_PATH = "/API/Core/v2.1/File/"

#: Seconds each token's nbf lies in the past, so a clock slightly ahead still passes.
LEEWAY_S = 5

#: Seconds from nbf to exp; coreplus expects exactly one minute.
LIFETIME_S = 60


@dataclass(frozen=True)
class Account:
    """
    The address and credentials one clinic's add-on uses to call coreplus.
    """

    base_url: str
    consumer_id: str
    secret: str
    access_token: str
    issuer: str
    audience: str = "https://coreplus.com.au"


class UploadRejectedError(RuntimeError):
    """
    The service did not confirm an upload with 200 and the file's size.
    """


def sign_request(account: Account, method: str, url: str) -> str:
    """Return a token valid for one minute for exactly this method and URL."""
    not_before_s = int(time.time()) - LEEWAY_S
    claims = {
        "iss": account.issuer,
        "aud": account.audience,
        "nbf": not_before_s,
        "exp": not_before_s + LIFETIME_S,
        "consumerId": account.consumer_id,
        "accessToken": account.access_token,
        "url": url,
        "httpMethod": method,
    }
    return jwt.encode(claims, account.secret, algorithm="HS256")


def upload_file(http: requests.Session, account: Account, path: Path, client_id: str) -> str:
    """
    Upload one file to a client's record and return the id coreplus gave it.

    Raises:
        UploadRejectedError: Any response other than 200 with the right size.
        requests.RequestException: The connection failed.
    """
    url = account.base_url + FILE_PATH
    size = path.stat().st_size
    fields = {"name": path.name, "primaryDomainKey": client_id, "size": str(size),
              "entity": "Client", "parentFolderId": None, "isFolder": False}
    with open(path, "rb") as content:
        body = MultipartEncoder(fields=[
            ("json", (None, json.dumps(fields), "text/plain")),
            ("file", (path.name, content, "text/plain")),
        ])
        headers = {"Authorization": f"JwToken {sign_request(account, 'POST', url)}",
                   "Content-Type": body.content_type}
        response = http.post(url, data=body, headers=headers, timeout=60)
    if response.status_code != 200 or response.json().get("size") != size:
        raise UploadRejectedError(
            f"{path.name}: HTTP {response.status_code} {response.text[:200]!r}")
    return str(response.json()["id"])


def upload_all(account: Account, files: list[tuple[Path, str]]) -> float:
    """
    Upload ``(path, client id)`` pairs one after another.

    Returns:
        The wall-clock seconds taken.
    """
    start = time.monotonic()
    with requests.Session() as http:
        for path, client_id in files:
            upload_file(http, account, path, client_id)
    return time.monotonic() - start



def upload_parallel(account: Account, files: list[tuple[Path, str]], clients: int) -> float:
    """
    Run ``clients`` sequential clients at once, each on its own share of ``files``.

    This shows how fast ``clients`` uploads in flight can go on this machine when
    nothing else happens between them.

    Returns:
        The wall-clock seconds taken.
    """
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        shares = [pool.submit(upload_all, account, files[i::clients]) for i in range(clients)]
        for share in shares:
            share.result()
    return time.monotonic() - start
