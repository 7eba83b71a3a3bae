"""Polls one sidecar over HTTP (aiohttp, already the sidecar's dependency): /metrics, and for the sidecar on
screen /api/flight and /api/captures. Every failure becomes a one-line reason in `core.Fetched`, never an
exception: an unreachable sidecar is something `top` shows, then retries.

Nothing the sidecar sends is trusted: each body is read with a cap (`moe_monitor.client.read_body`: /metrics
16 MiB, a flight record 64 MiB, the capture list 8 MiB; gzip inflated with the same cap), the whole request
within the deadline, and bodies are parsed on a worker thread so that the event loop, which also reads the
keyboard, never waits for a big one."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec

from moe_monitor.client import JSON_MAX_BYTES, ClientError, normalise_url, read_body
from moe_monitor.client.http import ERROR_MAX_BYTES, error_text, reason
from moe_monitor.schema import flight_record
from moe_monitor.schema.api import SIDECAR_HEADER

from .core import Fetched, MetricsError, parse_metrics

DEFAULT_TIMEOUT_S = 5.0
METRICS_MAX_BYTES = 16 << 20  # a sidecar at DeepSeek-V3 scale with every per-expert series serves ~2 MB
FLIGHT_MAX_BYTES = 64 << 20  # the windows of the longest span (120) at that scale, with room


__all__ = ["fetch", "normalise_url"]
NOT_A_SIDECAR = f"this is not a moe-monitor sidecar (its answers carry no {SIDECAR_HEADER} header)"


def _why(e: BaseException, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s"
    return reason(e)


async def _get(session: aiohttp.ClientSession, url: str, headers: dict, timeout: float,
               limit: int, identified: list | None = None) -> tuple[int, bytes]:
    """(status, body): the body at most `limit` bytes (an error answer's: its first 64 KiB). `identified` gets
    whether the answer carried the sidecar's header."""
    inflate = not session.auto_decompress  # app.py's session leaves gzip to read_body (capped)
    async with session.get(url, headers={**headers, "Accept-Encoding": "gzip"},
                           timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        if identified is not None:
            identified.append(SIDECAR_HEADER in r.headers)
        if r.status != 200:
            try:
                return r.status, await read_body(r, ERROR_MAX_BYTES, url, inflate)
            except ClientError:
                return r.status, b""
        return r.status, await read_body(r, limit, url, inflate)


def _metrics(body: bytes, at: float):
    """(text, Scrape) of an exposition; on a worker thread (seconds for a big one)."""
    text = bytes(body).decode(errors="replace")
    return text, parse_metrics(text, at)


async def fetch(session: aiohttp.ClientSession, url: str, token: str | None = None, flight_windows: int | None = None,
                captures: bool = False, timeout: float = DEFAULT_TIMEOUT_S) -> Fetched:
    """One poll: /metrics, then (when asked) /api/flight?windows=N and /api/captures. A sidecar that cannot be
    reached, or whose /metrics fails, is asked nothing more."""
    at = time.time()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    identified: list[bool] = []
    try:
        status, body = await _get(session, url + "/metrics", headers, timeout, METRICS_MAX_BYTES, identified)
    except ClientError as e:
        return Fetched(at, error=f"GET {e}")
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
        return Fetched(at, error=f"cannot reach {url}: {_why(e, timeout)}", unreachable=True)
    if status != 200:
        hint = {503: " (the sidecar has not built its first exposition; see its log)",
                404: " (is --url the sidecar's base URL, without /metrics?)"}.get(status, "")
        hint += "" if identified[0] else f"; {NOT_A_SIDECAR}"
        return Fetched(at, error=f"GET {url}/metrics answered {status}: {error_text(body)}{hint}")
    try:
        text, scrape = await asyncio.to_thread(_metrics, body, at)
    except MetricsError as e:
        return Fetched(at, error=str(e) if identified[0] else f"{url}: {NOT_A_SIDECAR}: {e}")
    if not identified[0] and not any(name.startswith("moe_") for name in scrape.samples):
        return Fetched(at, error=f"{url}: {NOT_A_SIDECAR}, and its /metrics has no moe_ series (a Prometheus?)")
    out = Fetched(at, metrics=text, scrape=scrape)
    if flight_windows:
        out.asked_flight = True
        try:
            status, body = await _get(session, f"{url}/api/flight?windows={int(flight_windows)}", headers, timeout,
                                      FLIGHT_MAX_BYTES)
            if status == 200:
                out.flight = await asyncio.to_thread(flight_record.parse, body)  # FlightError is a ValueError
            elif status == 404:
                out.flight_error = (f"this sidecar has no flight recorder: /api/flight answered 404 "
                                    f"({error_text(body) or 'not found'}). Start it with --flight-minutes > 0 for "
                                    "the heat map; the other views do not need it.")
            else:
                out.flight_error = f"/api/flight answered {status}: {error_text(body)}"
        except ClientError as e:
            out.flight_error = str(e)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, msgspec.DecodeError) as e:
            out.flight_error = f"/api/flight: {_why(e, timeout)}"
    if captures:
        out.asked_captures = True
        try:
            status, body = await _get(session, url + "/api/captures", headers, timeout, JSON_MAX_BYTES)
            if status == 200:
                listed = (await asyncio.to_thread(msgspec.json.decode, body)).get("captures")
                if not isinstance(listed, list):
                    raise ValueError("no captures list")
                out.captures = listed
            elif status == 503:
                out.captures_error = ("captures are not configured on this sidecar (they need --vllm-url and "
                                      "--profile-dir)")
            else:
                out.captures_error = f"/api/captures answered {status}: {error_text(body)}"
        except ClientError as e:
            out.captures_error = str(e)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError, msgspec.DecodeError) as e:
            out.captures_error = f"/api/captures: {_why(e, timeout)}"
    return out
