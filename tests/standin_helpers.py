"""
Calls to the stand-in's control endpoints, for tests that drive it over HTTP.

Each function opens its own short-lived aiohttp session, so it can be called
from any test without sharing a session with the code under test.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def _request(method: str, url: str, json_body: Any = None) -> bytes:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=json_body) as response:
            body = await response.read()
            if response.status >= 400:
                raise AssertionError(
                    f"stand-in control request {method} {url} failed: "
                    f"{response.status} {body[:500]!r}"
                )
            return body


async def _json(method: str, url: str, json_body: Any = None) -> Any:
    return json.loads(await _request(method, url, json_body))


async def add_faults(base_url: str, *faults: dict[str, Any]) -> None:
    """
    Queue faults for the next File requests.

    Example: ``await add_faults(url, {"kind": "status", "status": 503})``.
    """
    await _json("POST", f"{base_url}/_standin/faults", {"faults": list(faults)})


async def received(base_url: str) -> list[dict[str, Any]]:
    """Return the stored uploads in arrival order."""
    result: list[dict[str, Any]] = await _json("GET", f"{base_url}/_standin/received")
    return result


async def received_content(base_url: str, upload_id: str) -> bytes:
    """Return the stored bytes of one upload."""
    return await _request("GET", f"{base_url}/_standin/received/{upload_id}/content")


async def stats(base_url: str) -> dict[str, Any]:
    """Return the request counters: requests, by_status, auth_failures, rate_limited, max_window."""
    result: dict[str, Any] = await _json("GET", f"{base_url}/_standin/stats")
    return result


async def reset(base_url: str) -> None:
    """Clear received uploads, counters, faults and down mode."""
    await _json("POST", f"{base_url}/_standin/reset")


async def set_down(base_url: str, status: int = 503, retry_after: str | None = None) -> None:
    """Make every API request return ``status`` until :func:`set_up`."""
    await _json("POST", f"{base_url}/_standin/down", {"status": status, "retry_after": retry_after})


async def set_up(base_url: str) -> None:
    """End down mode."""
    await _json("POST", f"{base_url}/_standin/up")


async def replace_clients(base_url: str, clients: list[dict[str, Any]]) -> None:
    """Replace the stand-in's client list."""
    await _json("PUT", f"{base_url}/_standin/clients", clients)
