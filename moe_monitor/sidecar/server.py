"""HTTP edge of the sidecar (aiohttp): /metrics (the exposition built once per window), /healthz (the process
answers), /readyz (the window loop runs and fresh segments are there, else 503 and why), a landing page, the
captures API, the flight recorder (/api/flight) and Alertmanager's webhook (/api/alerts), served behind limits (a
connection cap, idle and header timeouts) that keep clients which hold connections from starving the scrapes
(docs/security.md). Every answer carries `X-Moe-Monitor: <version>`, by which the clients tell the sidecar from any
other server.

aiohttp rather than prometheus_client's built-in server because the sidecar grows more routes (the trace
catalog streams files) and aiohttp gives routing, streaming and a production-grade server in one package.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import math
import os
import resource
import signal
import socket
import zlib

from aiohttp import web

from moe_monitor import __version__
from moe_monitor.capture import alerts as am
from moe_monitor.capture.capturer import Capturer
from moe_monitor.capture.catalog import Catalog
from moe_monitor.schema.api import SIDECAR_HEADER
from moe_monitor.schema.flight_record import FILE as FLIGHT_FILE
from moe_monitor.schema.flight_record import MAX_JSON_BYTES, FlightError

from .exporter import Exporter
from .forward import Forwarder
from .http_guard import (
    BACKLOG,
    BODY_TIMEOUT_S,
    CHUNK,
    PROGRESS_TIMEOUT_S,
    Admission,
    AiohttpErrorFilter,
    ConnectionGuard,
    HttpLimits,
    LoopErrorLog,
    Refusals,
    stream,
)

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LANDING = """<html><head><title>moe-monitor</title></head><body>
<h1>moe-monitor sidecar</h1><p>Segments: {segment_dir}; window {window}s</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li>
<li><a href="/readyz">/readyz</a> (503 and why while the sidecar has nothing fresh to serve)</li>
<li><a href="/api/captures">/api/captures</a> (triggered profiler traces)</li>
<li><a href="/api/flight?windows=12">/api/flight</a> (the routing flight recorder)</li>
<li>POST /api/alerts: Alertmanager's webhook (alerts become captures)</li></ul></body></html>"""

SHUTDOWN_TIMEOUT_S = 10.0  # in-flight requests (a trace download) get this long after SIGTERM; aiohttp's 60 s
# would outlast Kubernetes' default 30 s grace period and end in SIGKILL anyway
ADMISSION = web.AppKey("admission", Admission)


def build_app(exporter: Exporter, refusals: Refusals | None = None) -> web.Application:
    refusals = refusals or Refusals()
    exporter.http_refusals = refusals.counts  # exported as moe_monitor_http_refused_total
    admission = Admission(refusals)
    stored = StoredFlight(refusals)

    async def metrics(request: web.Request) -> web.Response:
        exposition = exporter.latest()
        if exposition is None:
            return web.Response(status=503, text="no exposition yet: the first window failed to build (see the "
                                                  "sidecar's log); retried every window\n")
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            resp = web.Response(body=exposition.gzipped, headers={"Content-Encoding": "gzip"})
        else:
            resp = web.Response(body=exposition.body)
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ready, why = exporter.readiness()
        return web.Response(status=200 if ready else 503, text=f"{'ready' if ready else 'not ready'}: {why}\n")

    async def landing(request: web.Request) -> web.Response:
        cfg = exporter.config
        return web.Response(text=LANDING.format(segment_dir=html.escape(cfg.segment_dir), window=cfg.window_s),
                            content_type="text/html")

    def refused(request: web.Request) -> web.Response | None:
        """None when the caller may use the API; else the refusal. One rule: every /api/ route needs the bearer
        token when one is set; without one, the API is off unless --captures-api-insecure opens it to all."""
        cfg = exporter.config
        if cfg.api_token:
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(errors="replace"),
                                                                      cfg.api_token.encode()):
                return None
            refusals.add("unauthorized", "API: refused %s %s %s: missing or wrong bearer token", request.remote,
                         request.method, request.path)
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        if cfg.captures_api_insecure:
            return None
        refusals.add("forbidden", "API: refused %s %s %s: no --api-token is configured", request.remote,
                     request.method, request.path)
        return web.json_response({"error": "the API is off: start the sidecar with --api-token (or "
                                           "--captures-api-insecure on a trusted network)"}, status=403)

    @web.middleware
    async def guard(request: web.Request, handler):
        if not request.path.startswith("/api/"):
            return await handler(request)
        denied = refused(request)
        if denied is not None:
            return denied
        cfg = exporter.config
        kind = "download" if "/files/" in request.path else "trigger" if request.method == "POST" else "read"
        if kind != "read":  # the audit trail: who pulled which trace, who asked for a capture
            log.info("API: %s %s %s%s", request.remote, request.method, request.path,
                     "" if cfg.api_token else " WITHOUT a token (--captures-api-insecure)")
        async with admission.slot(request, kind):
            return await handler(request)

    def catalog_or_503() -> Catalog:
        if exporter.catalog is None:
            raise web.HTTPServiceUnavailable(text=json.dumps({"error": "captures are not configured"}),
                                             content_type="application/json")
        return exporter.catalog

    def capturer() -> Capturer:
        """With the catalog: the exporter makes both or neither (call catalog_or_503 first)."""
        assert exporter.capturer is not None
        return exporter.capturer

    async def off_loop(func, *args):
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

    def json_answer(gzipped: bool = False) -> dict[str, str]:
        return {"Content-Type": "application/json", **({"Content-Encoding": "gzip"} if gzipped else {})}

    async def list_captures(request: web.Request) -> web.StreamResponse:
        def listing() -> bytes:
            catalog = catalog_or_503()
            running = capturer().running()  # before the catalog: a capture is in one or the other
            captures = catalog.list()  # the newest, at most catalog.LIST_LIMIT
            if running and any(c["id"] == running["id"] for c in captures[:1]):
                running = None  # it ended in between: its outcome is listed
            captures = ([running] if running else []) + captures
            total = catalog.count + catalog.records + bool(running)
            return json.dumps({"captures": captures, "total": total,
                               "left_out": max(total - len(captures), 0)}).encode()

        body = await off_loop(listing)
        return await stream(request, [body], refusals, json_answer(), len(body))

    async def show_capture(request: web.Request) -> web.Response:
        catalog, capture_id = catalog_or_503(), request.match_info["id"]
        meta = capturer().running(capture_id) or await off_loop(catalog.get, capture_id)
        if meta is None:
            return web.json_response({"error": "no such capture"}, status=404)
        return web.json_response(meta)

    async def download(request: web.Request) -> web.StreamResponse:
        catalog, name = catalog_or_503(), request.match_info["name"]
        path = await off_loop(catalog.file_path, request.match_info["id"], name)
        if path is None:
            return web.json_response({"error": "no such capture file"}, status=404)
        try:
            f = await off_loop(open, path, "rb")
        except OSError:
            return web.json_response({"error": "no such capture file"}, status=404)
        with f:
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Disposition": f'attachment; filename="{name}"'}
            return await stream(request, off_loop_iter(_chunks(f)), refusals, headers, os.fstat(f.fileno()).st_size,
                                deadline_s=None)

    async def flight(request: web.Request) -> web.StreamResponse:
        if not exporter.flight.enabled:
            return web.json_response({"error": "the flight recorder is off (--flight-minutes 0)"}, status=404)
        try:
            last = int(request.query["windows"]) if "windows" in request.query else None
            since = float(request.query["since"]) if "since" in request.query else None
            if (last is not None and last < 1) or (since is not None and not math.isfinite(since)):
                raise ValueError
        except ValueError:
            return web.json_response({"error": "windows must be an integer >= 1 and since a unix time in seconds"},
                                     status=400)
        gz = accepts_gzip(request)
        # built off the event loop, and kept: clients asking for the same view in one window share one answer
        body = await off_loop(exporter.flight_json, last, since, gz)
        return await stream(request, [body], refusals, json_answer(gz), len(body))

    async def capture_flight(request: web.Request) -> web.StreamResponse:
        capture_id = request.match_info["id"]
        path = await off_loop(catalog_or_503().file_path, capture_id, FLIGHT_FILE)
        if path is None:
            return web.json_response({"error": "no such capture, or it has no flight record (the flight recorder "
                                               "was off, or the capture is older than it)"}, status=404)
        try:
            gzipped = await off_loop(stored.check, path)  # inflated once, with a bound, before any byte is sent
        except FlightError as e:
            refusals.add("bad_stored_data", "capture %s: its stored flight record is unusable: %s", capture_id, e)
            return web.json_response({"error": f"capture {capture_id}: its stored flight record is unusable: {e}"},
                                     status=500)
        gz = gzipped and accepts_gzip(request)
        headers = json_answer(gz)
        return await stream(request, stored.chunks(path, inflate=gzipped and not gz), refusals, headers)

    async def trigger(request: web.Request) -> web.Response:
        try:
            raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S) if request.can_read_body else b"{}"
        except TimeoutError:
            refusals.add("bad_request", "API: %s sent no complete trigger body in %g s", request.remote,
                         BODY_TIMEOUT_S)
            return web.json_response({"error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"},
                                     status=408, headers={"Connection": "close"})
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past Python's recursion limit
            return web.json_response({"error": "body must be UTF-8 JSON: {\"reason\": \"...\"}"}, status=400)
        reason = body.get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
            return web.json_response({"error": "a reason (1-500 characters) is required"}, status=400)
        status, payload = exporter.trigger_manual(reason.strip())
        return web.json_response(payload, status=status)

    forwarder = Forwarder.of(exporter.config)  # --alert-peers, parsed once

    async def alerts(request: web.Request) -> web.Response:
        """Alertmanager's webhook (payload version 4): a capture for the firing alerts of ours, within the capture
        budget (capture/alerts.py, docs/incidents.md); the answer says what was done with each alert. A body that
        is not such a notification changes nothing."""
        if request.method != "POST":
            return web.json_response({"error": "POST an Alertmanager webhook notification (payload version 4) here"},
                                     status=405, headers={"Allow": "POST"})
        raw = await read_body(request, am.MAX_BODY_BYTES, refusals)
        if isinstance(raw, web.Response):
            return raw
        try:
            note = am.parse(raw)
        except am.PayloadError as e:
            refusals.add("bad_request", "API: refused a notification on /api/alerts from %s: %s", request.remote, e)
            return web.json_response({"error": f"not an Alertmanager webhook notification: {e}"}, status=400)
        if exporter.capturer is None:
            return web.json_response({"error": "captures are not configured: start the sidecar with --vllm-url and "
                                               "--profile-dir"}, status=503)
        # other instances' alerts go on to their peer first (--alert-peers); a failed one answers 502, so that
        # Alertmanager sends the notification again (safe: each sidecar deduplicates, capture/control.py)
        forwarded = await forwarder.forward(note, request.headers.get(am.FORWARDED_BY))
        answer = {"alerts": await off_loop(exporter.alerts, note, forwarded)}
        failed = any(outcome == am.FORWARD_FAILED for outcome, _ in forwarded.values())
        return web.json_response(answer, status=502 if failed else 200)

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SIDECAR_HEADER] = __version__

    app = web.Application(client_max_size=64 * 1024, middlewares=[guard])
    app.on_response_prepare.append(mark)
    app[ADMISSION] = admission
    app.router.add_get("/api/captures", list_captures)
    app.router.add_post("/api/captures", trigger)
    app.router.add_get("/api/captures/{id}", show_capture)
    app.router.add_get("/api/captures/{id}/files/{name}", download)
    app.router.add_get("/api/captures/{id}/flight", capture_flight)
    app.router.add_get("/api/flight", flight)
    app.router.add_route("*", "/api/alerts", alerts)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/", landing)
    return app


async def read_body(request: web.Request, limit: int, refusals: Refusals) -> bytes | web.Response:
    """The whole request body, at most `limit` bytes within BODY_TIMEOUT_S; else the refusal (413, 408), counted.
    Read from the stream, so the application's client_max_size (a trigger's 64 KiB) does not apply."""
    if request.content_length is not None and request.content_length > limit:
        refusals.add("bad_request", "API: %s declared a body over %d bytes", request.remote, limit)
        return web.json_response({"error": f"the body is over {limit} bytes"}, status=413,
                                 headers={"Connection": "close"})

    async def whole() -> bytes | None:
        chunks, size = [], 0
        while chunk := await request.content.read(CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(whole(), BODY_TIMEOUT_S)
    except TimeoutError:
        refusals.add("bad_request", "API: %s sent no complete body in %g s", request.remote, BODY_TIMEOUT_S)
        return web.json_response({"error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"},
                                 status=408, headers={"Connection": "close"})
    if raw is None:
        refusals.add("bad_request", "API: %s sent a body over %d bytes", request.remote, limit)
        return web.json_response({"error": f"the body is over {limit} bytes"}, status=413,
                                 headers={"Connection": "close"})
    return raw


def accepts_gzip(request: web.Request) -> bool:
    return "gzip" in request.headers.get("Accept-Encoding", "")


class StoredFlight:
    """A capture's stored flight record, served as it is (gzip to a client that accepts it) or inflated on the
    way out. The catalog is on disk, writable by others: a record is inflated once, in chunks, with a bound
    (flight_record.MAX_JSON_BYTES) before it is served, and the verdict kept per file version, so a small file that
    inflates to gigabytes costs at most one bounded pass, not the sidecar's memory (docs/security.md)."""

    def __init__(self, refusals: Refusals) -> None:
        self.refusals = refusals
        self._verdicts: dict[tuple, bool | str] = {}  # per file version: gzip or not, or why it is unusable

    def check(self, path: str) -> bool:
        """True if the file is gzip, False if plain JSON; FlightError when it is neither, truncated or too large."""
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size, st.st_ino)
        if key not in self._verdicts:
            if len(self._verdicts) > 256:
                self._verdicts.clear()
            try:
                self._verdicts[key] = self._inspect(path)
            except FlightError as e:
                self._verdicts[key] = str(e)
        verdict = self._verdicts[key]
        if isinstance(verdict, str):
            raise FlightError(verdict)
        return verdict

    @staticmethod
    def _inspect(path: str) -> bool:
        """Whether the file is gzip, after one bounded pass over what it inflates to."""
        size, first, last = 0, b"", b""
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        for piece in StoredFlight._inflated(path):
            size += len(piece)
            if size > MAX_JSON_BYTES:
                raise FlightError(f"it inflates to more than {MAX_JSON_BYTES >> 20} MiB")
            first = first or piece.lstrip()[:1]
            last = piece.rstrip()[-1:] or last
        if (first, last) != (b"{", b"}"):
            raise FlightError("it is not a JSON object")
        return gzipped

    @staticmethod
    def _inflated(path: str):
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != b"\x1f\x8b":
                yield from _chunks(f)
                return
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
            for data in _chunks(f):
                while data:
                    yield inflater.decompress(data, CHUNK)
                    data = inflater.unconsumed_tail
                if inflater.eof:
                    break
            if not inflater.eof:
                raise FlightError("its gzip stream is truncated")

    async def chunks(self, path: str, inflate: bool):
        try:
            async for piece in off_loop_iter(self._inflated(path) if inflate else _file_chunks(path)):
                if piece:
                    yield piece
        except (FlightError, OSError) as e:  # changed on disk since it was checked: cut the answer short
            self.refusals.add("bad_stored_data", "a stored flight record changed while it was served: %s", e)
            raise ConnectionResetError(str(e)) from None


def _chunks(f):
    """An open file's bytes, CHUNK at a time."""
    while piece := f.read(CHUNK):
        yield piece


def _file_chunks(path: str):
    with open(path, "rb") as f:
        yield from _chunks(f)


async def off_loop_iter(pieces):
    """A blocking iterator (file reads, inflation) driven from the executor, a piece at a time."""
    loop = asyncio.get_running_loop()
    try:
        while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
            yield piece
    finally:
        pieces.close()


async def _serve_http(app: web.Application, host: str, port: int, limits: HttpLimits, refusals: Refusals,
                      bound=lambda: None, serving=lambda: None) -> None:
    """Bind the port, call `bound()`, start serving, call `serving()`, serve until SIGTERM/SIGINT: nothing
    runs or is announced before the port is ours. Raises OSError when the port cannot be bound."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrorLog(refusals))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cap, burst = limits.sized_to_fd_limit()
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout_s,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    assert runner.server is not None  # made by setup()
    admission = app[ADMISSION]
    try:
        # asyncio takes `backlog` both for listen() and for the accepts per wake-up: the burst here, and the
        # kernel's queue (no descriptors) set back to BACKLOG below, so that a burst of clients is not dropped.
        guard = ConnectionGuard(runner.server, cap, limits.header_timeout_s, admission, refusals)
        listener = await loop.create_server(guard, host, port, backlog=burst, start_serving=False)  # bound only
        try:
            bound()
            await listener.start_serving()
            for s in listener.sockets:
                with socket.fromfd(s.fileno(), s.family, s.type) as same_socket:
                    same_socket.listen(BACKLOG)
            log.info("HTTP limits: %d connections, %d accepts at a time (RLIMIT_NOFILE %d), first request's "
                     "headers within %gs, idle connections closed after %gs; API requests at once: %s; answers "
                     "dropped after %gs without progress", cap, burst, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                     limits.header_timeout_s, limits.idle_timeout_s,
                     ", ".join(f"{n} {k}" for k, n in admission.limits.items()), PROGRESS_TIMEOUT_S)
            serving()
            await stop.wait()
        finally:
            listener.close()
    finally:
        await runner.cleanup()


def access_summary(cfg) -> tuple[int, str]:
    """The start-up line that says what is open to whom (log level, text)."""
    where = f"{cfg.host}:{cfg.port}"
    open_part = f"/metrics, /healthz, /readyz and / are open to anyone who reaches {where}"
    if cfg.api_token:
        return logging.INFO, f"access: {open_part}; every /api/ route (captures, traces, flight record) needs the " \
                             "bearer token (--api-token)"
    if cfg.captures_api_insecure:
        return logging.WARNING, f"INSECURE access: {open_part}, and so is every /api/ route: anyone can list " \
                                "captures, read flight records, download traces and trigger profiler captures " \
                                "(--captures-api-insecure without --api-token)"
    return logging.WARNING, f"access: {open_part}; every /api/ route (captures, traces, flight record) answers " \
                            "403 until --api-token is set"


def serve(exporter: Exporter, limits: HttpLimits | None = None) -> None:
    """Serve until SIGTERM/SIGINT. `limits` default to the config's. Raises OSError if the port cannot be
    bound."""
    cfg = exporter.config
    refusals = Refusals()
    logging.getLogger("aiohttp.server").addFilter(AiohttpErrorFilter(refusals))

    def bound() -> None:  # the port is ours: the first exposition exists before it accepts (or the log says why)
        exporter.safe_tick()
        exporter.start()

    def serving() -> None:
        log.log(*access_summary(cfg))
        log.info("moe-monitor sidecar listening on http://%s:%d/metrics, reading %s, %gs windows", cfg.host,
                 cfg.port, cfg.segment_dir, cfg.window_s)

    app = build_app(exporter, refusals)
    asyncio.run(_serve_http(app, cfg.host, cfg.port, limits or HttpLimits.of(cfg), refusals, bound, serving))
