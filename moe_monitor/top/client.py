"""Polls one sidecar over HTTP (aiohttp, already the sidecar's dependency): /metrics, and for the sidecar on
screen /api/flight and /api/captures. Every failure becomes a one-line reason in `core.Fetched`, never an
exception: an unreachable sidecar is something `top` shows, then retries."""

from __future__ import annotations

import json
import time

import aiohttp
import msgspec

from .core import Fetched

DEFAULT_TIMEOUT_S = 5.0


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _why(e: BaseException, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(e, aiohttp.ClientConnectorError):
        os_error = e.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        return (getattr(os_error, "strerror", None) or str(os_error) or str(e)).lower()
    return str(e) or type(e).__name__


def _message(body: bytes) -> str:
    """The sidecar's {"error": ...} text, or the first line of a plain body."""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"]
    except ValueError:
        pass
    text = body.decode(errors="replace").strip()
    return text.splitlines()[0][:200] if text else ""


async def _get(session: aiohttp.ClientSession, url: str, headers: dict, timeout: float) -> tuple[int, bytes]:
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status, await r.read()


async def fetch(session: aiohttp.ClientSession, url: str, token: str | None = None, flight_windows: int | None = None,
                captures: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> Fetched:
    """One poll: /metrics, then (when asked) /api/flight?windows=N and /api/captures. A sidecar that cannot be
    reached, or whose /metrics fails, is asked nothing more."""
    at = time.time()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        status, body = await _get(session, url + "/metrics", headers, timeout)
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        return Fetched(at, error=f"cannot reach {url}: {_why(e, timeout)}", unreachable=True)
    if status != 200:
        hint = {503: " (the sidecar has not built its first exposition; see its log)",
                404: " (is --url the sidecar's base URL, without /metrics?)"}.get(status, "")
        return Fetched(at, error=f"GET {url}/metrics answered {status}: {_message(body)}{hint}")
    out = Fetched(at, metrics=body.decode(errors="replace"))
    if flight_windows:
        out.asked_flight = True
        try:
            status, body = await _get(session, f"{url}/api/flight?windows={int(flight_windows)}", headers, timeout)
            if status == 200:
                doc = msgspec.json.decode(body)
                if not isinstance(doc, dict) or not isinstance(doc.get("windows"), list):
                    raise ValueError("not a flight record")
                out.flight = doc
            elif status == 404:
                out.flight_error = (f"this sidecar has no flight recorder: /api/flight answered 404 "
                                    f"({_message(body) or 'not found'}). Start it with --flight-minutes > 0 for "
                                    "the heat map; the other views do not need it.")
            else:
                out.flight_error = f"/api/flight answered {status}: {_message(body)}"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, msgspec.DecodeError) as e:
            out.flight_error = f"/api/flight: {_why(e, timeout)}"
    if captures:
        out.asked_captures = True
        try:
            status, body = await _get(session, url + "/api/captures", headers, timeout)
            if status == 200:
                listed = msgspec.json.decode(body).get("captures")
                if not isinstance(listed, list):
                    raise ValueError("no captures list")
                out.captures = listed
            elif status == 503:
                out.captures_error = ("captures are not configured on this sidecar (they need --vllm-url and "
                                      "--profile-dir)")
            else:
                out.captures_error = f"/api/captures answered {status}: {_message(body)}"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError, msgspec.DecodeError) as e:
            out.captures_error = f"/api/captures: {_why(e, timeout)}"
    return out
