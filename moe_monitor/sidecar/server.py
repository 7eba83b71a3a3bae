"""HTTP edge of the sidecar (aiohttp): /metrics (the exposition built once per window), /healthz, a landing
page, the captures API and the flight recorder (/api/flight), served behind limits (a connection cap, idle and
header timeouts) that keep clients which hold connections from starving the scrapes (issue #14, defect 6).

aiohttp rather than prometheus_client's built-in server because the sidecar grows more routes (the trace
catalog streams files) and aiohttp gives routing, streaming and a production-grade server in one package.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import json
import logging
import math
import resource
import signal
import socket
import time
from dataclasses import dataclass

from aiohttp import web

from .exporter import Exporter
from .flight import FILE as FLIGHT_FILE

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LANDING = """<html><head><title>moe-monitor</title></head><body>
<h1>moe-monitor sidecar</h1><p>Segments: {segment_dir}; window {window}s</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li>
<li><a href="/api/captures">/api/captures</a> (triggered profiler traces)</li>
<li><a href="/api/flight?windows=12">/api/flight</a> (the routing flight recorder)</li></ul></body></html>"""

# HTTP limits (issue #14, defect 6): misbehaving clients must not stop /metrics from answering. The three
# tunable ones are settings too (--http-idle-timeout, --http-header-timeout, --http-max-connections).
IDLE_TIMEOUT_S = 15.0  # keep-alive: no new request for this long after a response -> closed. Prometheus reuses a
# connection between scrapes; closing it costs one TCP handshake, and Go's client retries a GET on a connection
# the server closed while idle, so 15 s (aiohttp's own default is 75 s) loses no scrape.
HEADER_TIMEOUT_S = 10.0  # a new connection must complete its first request's headers within this (slowloris);
# a real scraper sends them in one packet. Later requests on a kept-alive connection get IDLE_TIMEOUT_S.
MAX_CONNECTIONS = 256  # open connections; at the cap the oldest one waiting for a request is closed to admit the
# new one, and when none waits the new one is closed at once. A few scrapers need a handful.
BACKLOG = 128  # the kernel's queue of connections not yet accepted (aiohttp's default); it holds no descriptors
FD_HEADROOM = 64  # descriptors left to segments, captures and logs: the cap and the accept burst (see
# HttpLimits.sized_to_fd_limit) fit in RLIMIT_NOFILE minus this
MIN_CONNECTIONS = 8  # neither goes below this, however low the descriptor limit
SHUTDOWN_TIMEOUT_S = 10.0  # in-flight requests (a trace download) get this long after SIGTERM; aiohttp's 60 s
# would outlast Kubernetes' default 30 s grace period and end in SIGKILL anyway
LOG_EVERY_S = 60.0  # a repeated event-loop error or cap event is logged at most once per this (with a count)


def build_app(exporter: Exporter) -> web.Application:
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

    async def landing(request: web.Request) -> web.Response:
        cfg = exporter.config
        return web.Response(text=LANDING.format(segment_dir=cfg.segment_dir, window=cfg.window_s),
                            content_type="text/html")

    def refused(request: web.Request, what: str) -> web.Response | None:
        """None when the caller may `what` (trigger a capture, download a trace); else the refusal. Every
        decision is logged with the caller's address (an audit trail of who pulled which trace)."""
        cfg, peer = exporter.config, request.remote
        if cfg.api_token:
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(errors="replace"),
                                                                      cfg.api_token.encode()):
                log.info("captures API: %s %s (token)", peer, what)
                return None
            log.warning("captures API: refused %s %s: missing or wrong bearer token", peer, what)
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        if cfg.captures_api_insecure:
            log.warning("captures API: %s %s WITHOUT a token (--captures-api-insecure)", peer, what)
            return None
        log.warning("captures API: refused %s %s: no --api-token is configured", peer, what)
        return web.json_response({"error": "triggering captures and downloading traces are off: start the sidecar "
                                           "with --api-token (or --captures-api-insecure on a trusted network)"},
                                 status=403)

    def catalog_or_503():
        if exporter.catalog is None:
            raise web.HTTPServiceUnavailable(text=json.dumps({"error": "captures are not configured"}),
                                             content_type="application/json")
        return exporter.catalog

    async def list_captures(request: web.Request) -> web.Response:
        return web.json_response({"captures": catalog_or_503().list()})

    async def show_capture(request: web.Request) -> web.Response:
        meta = catalog_or_503().get(request.match_info["id"])
        if meta is None:
            return web.json_response({"error": "no such capture"}, status=404)
        return web.json_response(meta)

    async def download(request: web.Request) -> web.StreamResponse:
        catalog = catalog_or_503()
        denied = refused(request, f"download {request.match_info['id']}/{request.match_info['name']}")
        if denied is not None:
            return denied
        path = catalog.file_path(request.match_info["id"], request.match_info["name"])
        if path is None:
            return web.json_response({"error": "no such capture file"}, status=404)
        disposition = f'attachment; filename="{request.match_info["name"]}"'
        return web.FileResponse(path, headers={"Content-Disposition": disposition})

    async def json_body(request: web.Request, body: bytes, gzipped: bool) -> web.Response:
        """JSON bytes, sent gzipped when the client accepts it (a flight record is large and compresses ~10x).
        (De)compressing MBs runs off the event loop, so /metrics keeps answering meanwhile."""
        accepts = "gzip" in request.headers.get("Accept-Encoding", "")

        def encode() -> bytes:
            if accepts and not gzipped:
                return gzip.compress(body, compresslevel=3)
            return gzip.decompress(body) if gzipped and not accepts else body

        headers = {"Content-Type": "application/json", **({"Content-Encoding": "gzip"} if accepts else {})}
        return web.Response(body=await asyncio.get_running_loop().run_in_executor(None, encode), headers=headers)

    async def flight(request: web.Request) -> web.Response:
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
        # a record is MBs of JSON at scale: built off the event loop, so /metrics keeps answering meanwhile
        body = await asyncio.get_running_loop().run_in_executor(None, exporter.flight_json, last, since)
        return await json_body(request, body, gzipped=False)

    async def capture_flight(request: web.Request) -> web.Response:
        catalog = catalog_or_503()
        path = catalog.file_path(request.match_info["id"], FLIGHT_FILE)
        if path is None:
            return web.json_response({"error": "no such capture, or it has no flight record (the flight recorder "
                                               "was off, or the capture is older than it)"}, status=404)
        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read()

        data = await asyncio.get_running_loop().run_in_executor(None, read)  # MBs at scale: off the event loop
        return await json_body(request, data, gzipped=data[:2] == b"\x1f\x8b")

    async def trigger(request: web.Request) -> web.Response:
        denied = refused(request, "trigger a capture")
        if denied is not None:
            return denied
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError)
            return web.json_response({"error": "body must be UTF-8 JSON: {\"reason\": \"...\"}"}, status=400)
        reason = body.get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
            return web.json_response({"error": "a reason (1-500 characters) is required"}, status=400)
        status, payload = exporter.trigger_manual(reason.strip())
        return web.json_response(payload, status=status)

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_get("/api/captures", list_captures)
    app.router.add_post("/api/captures", trigger)
    app.router.add_get("/api/captures/{id}", show_capture)
    app.router.add_get("/api/captures/{id}/files/{name}", download)
    app.router.add_get("/api/captures/{id}/flight", capture_flight)
    app.router.add_get("/api/flight", flight)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", landing)
    return app


@dataclass(frozen=True)
class HttpLimits:
    idle_timeout_s: float = IDLE_TIMEOUT_S
    header_timeout_s: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    @classmethod
    def of(cls, cfg) -> HttpLimits:
        return cls(cfg.http_idle_timeout_s, cfg.http_header_timeout_s, cfg.http_max_connections)

    def sized_to_fd_limit(self) -> tuple[int, int]:
        """(connection cap, accept burst) that fit the process's descriptor limit: a connection flood must run
        into the cap, not into EMFILE (which fails every accept, segment read and capture alike). asyncio
        accepts up to `burst` connections per wake-up before any of them reaches the cap, so both come out of
        the budget, RLIMIT_NOFILE - FD_HEADROOM, a quarter of it at most to the burst."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections, BACKLOG
        budget = soft - FD_HEADROOM
        burst = max(MIN_CONNECTIONS, min(BACKLOG, budget // 4))
        return max(MIN_CONNECTIONS, min(self.max_connections, budget - burst)), burst


def _waiting_for_request(handler: web.RequestHandler) -> bool:
    """The connection is idle or its request headers are incomplete: nothing is lost by closing it. This is the
    test aiohttp itself applies before expiring a keep-alive connection (RequestHandler._process_keepalive); it
    has no public accessor. Should a release rename the attribute, this answers False: we then close nothing
    early and aiohttp's keepalive_timeout still applies."""
    waiter = getattr(handler, "_waiter", None)
    return waiter is not None and not waiter.done()


class _Refused(asyncio.Protocol):
    """A connection over the cap with none idle to make way: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # the descriptor is released now, not after a lingering close


class _ConnectionGuard:
    """The protocol factory handed to `loop.create_server`: aiohttp's own (runner.server), behind a connection cap
    and a deadline for the first request's headers. aiohttp has no cap; its keepalive_timeout covers the time
    after a response, and a connection that never sends a request only in its newest releases."""

    def __init__(self, server: web.Server, cap: int, header_timeout_s: float) -> None:
        self.server, self.cap, self.header_timeout_s = server, cap, header_timeout_s
        self.evicted = self.refused = 0
        self.reported = float("-inf")

    def __call__(self) -> asyncio.Protocol:
        live = [h for h in self.server.connections if h.transport is not None]  # oldest first
        if len(live) >= self.cap:
            idle = next((h for h in live if _waiting_for_request(h)), None)
            if idle is None:
                self.refused += 1
                self.report()
                return _Refused()
            idle.force_close()
            self.evicted += 1
            self.report()
        handler = self.server()
        asyncio.get_running_loop().call_later(self.header_timeout_s, self.headers_due, handler)
        return handler

    @staticmethod
    def headers_due(handler: web.RequestHandler) -> None:
        if handler.transport is not None and getattr(handler, "_request_count", 1) == 0 and \
                _waiting_for_request(handler):
            log.debug("closing a connection that sent no complete request headers in time")
            handler.force_close()

    def report(self) -> None:
        now = time.monotonic()
        if now - self.reported >= LOG_EVERY_S:
            log.warning("HTTP connection cap (%d) reached: %d idle connections closed to admit new ones, %d new "
                        "ones refused (none idle) since the last such warning (at most one every %g s)", self.cap,
                        self.evicted, self.refused, LOG_EVERY_S)
            self.evicted = self.refused = 0
            self.reported = now


class _LoopErrorLog:
    """The event loop's exception handler, logging each kind of error at most once per LOG_EVERY_S with a count of
    the repeats. When accept() fails with EMFILE, CPython before gh-151615 reports it up to `backlog` times per
    wake-up and reschedules as often: unthrottled that wrote hundreds of MB a minute and starved /metrics."""

    def __init__(self) -> None:
        self.last: dict[tuple, float] = {}
        self.repeats: dict[tuple, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        key = (type(exc), str(exc)) if exc is not None else (None, context.get("message"))
        now = time.monotonic()
        if len(self.last) > 1000:  # errors whose text is unique each time must not grow these without bound
            self.last = {k: t for k, t in self.last.items() if now - t < LOG_EVERY_S}
            self.repeats = {k: n for k, n in self.repeats.items() if k in self.last}
        if now - self.last.get(key, float("-inf")) < LOG_EVERY_S:
            self.repeats[key] = self.repeats.get(key, 0) + 1
            return
        self.last[key] = now
        repeats = self.repeats.pop(key, 0)
        if repeats:
            context = {**context, "message": f"{context.get('message')} (and {repeats} more like it since it was "
                                             f"last logged; at most one every {LOG_EVERY_S:g} s)"}
        loop.default_exception_handler(context)


async def _serve_http(app: web.Application, host: str, port: int, limits: HttpLimits) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_LoopErrorLog())
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cap, burst = limits.sized_to_fd_limit()
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout_s,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        # asyncio takes `backlog` both for listen() and for the accepts per wake-up: the burst here, and the
        # kernel's queue (no descriptors) set back to BACKLOG below, so that a burst of clients is not dropped.
        listener = await loop.create_server(_ConnectionGuard(runner.server, cap, limits.header_timeout_s), host,
                                            port, backlog=burst)
        for s in listener.sockets:
            with socket.fromfd(s.fileno(), s.family, s.type) as same_socket:
                same_socket.listen(BACKLOG)
        try:
            log.info("HTTP limits: %d connections, %d accepts at a time (RLIMIT_NOFILE %d), first request's "
                     "headers within %gs, idle connections closed after %gs", cap, burst,
                     resource.getrlimit(resource.RLIMIT_NOFILE)[0], limits.header_timeout_s, limits.idle_timeout_s)
            await stop.wait()
        finally:
            listener.close()
    finally:
        await runner.cleanup()


def serve(exporter: Exporter, limits: HttpLimits | None = None) -> None:
    """Serve until SIGTERM/SIGINT. `limits` default to the config's. Raises OSError if the port cannot be
    bound."""
    cfg = exporter.config
    exporter.safe_tick()  # the first exposition exists before the port opens (or the log says why not)
    exporter.start()
    if exporter.catalog is not None and not cfg.api_token:
        if cfg.captures_api_insecure:
            log.warning("INSECURE: anyone who reaches %s:%d can trigger profiler captures and download traces "
                        "(--captures-api-insecure without --api-token)", cfg.host, cfg.port)
        else:
            log.warning("triggering captures and downloading traces answer 403 until --api-token is set; "
                        "listing captures and /metrics stay open")
    log.info("moe-monitor sidecar listening on http://%s:%d/metrics, reading %s, %gs windows", cfg.host, cfg.port,
             cfg.segment_dir, cfg.window_s)
    asyncio.run(_serve_http(build_app(exporter), cfg.host, cfg.port, limits or HttpLimits.of(cfg)))
