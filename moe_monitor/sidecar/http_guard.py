"""What keeps the sidecar's HTTP edge serving scrapes whatever its clients do (docs/security.md): a connection cap
that makes room by closing idle connections first and then the API connection busy longest (never a scrape's),
a deadline for the first request's headers, a concurrency limit per kind of API request, a progress deadline for
every streamed answer (a client that stops reading is dropped), and logs that cannot be flooded.

node_exporter's rule: scraping is never starved. Every refusal is counted by reason
(`moe_monitor_http_refused_total`) and logged at most once per cause per LOG_EVERY_S with a count of the repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 15.0  # keep-alive: no new request for this long after a response -> closed. Prometheus reuses a
# connection between scrapes; closing it costs one TCP handshake, and Go's client retries a GET on a connection
# the server closed while idle, so 15 s (aiohttp's own default is 75 s) loses no scrape.
HEADER_TIMEOUT_S = 10.0  # a new connection must complete its first request's headers within this (slowloris);
# a real scraper sends them in one packet. Later requests on a kept-alive connection get IDLE_TIMEOUT_S.
MAX_CONNECTIONS = 256  # open connections; at the cap an idle one is closed to admit the new one, else the API
# connection busy longest; when neither exists the new one is closed at once. A few scrapers need a handful.
BACKLOG = 128  # the kernel's queue of connections not yet accepted (aiohttp's default); it holds no descriptors
FD_HEADROOM = 64  # descriptors left to segments, captures and logs: the cap and the accept burst (see
# HttpLimits.sized_to_fd_limit) fit in RLIMIT_NOFILE minus this
MIN_CONNECTIONS = 8  # neither goes below this, however low the descriptor limit
LOG_EVERY_S = 60.0  # a repeated event (an error, a refusal, a cap event) is logged at most once per this per cause

# Per kind of API request: how many run at once (the rest wait ADMISSION_WAIT_S, then get 503 + Retry-After).
# Reads build or inflate MBs off the event loop (the default executor has min(32, cpus + 4) threads); downloads
# stream files; these bounds keep their CPU and memory a small multiple of one request's.
CONCURRENCY = {"read": 4, "download": 2, "trigger": 2}
ADMISSION_WAIT_S = 1.0
PROGRESS_TIMEOUT_S = 10.0  # an answer's next chunk must leave within this (a client that stops reading is dropped)
RESPONSE_DEADLINE_S = 120.0  # a JSON answer (flight record, listing) is sent within this, whatever its size
BODY_TIMEOUT_S = 10.0  # a request body (trigger) must arrive within this
CHUNK = 256 * 1024

REFUSALS = ("unauthorized", "forbidden", "busy", "slow_client", "evicted", "bad_request", "bad_stored_data")


class Refusals:
    """Counted refusals by reason, read by the exporter when it renders (moe_monitor_http_refused_total), and a
    log that says each cause at most once per LOG_EVERY_S, with how many were not said."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({r: 0 for r in REFUSALS})
        self._said: dict[str, float] = {}
        self._unsaid: Counter[str] = Counter()

    def add(self, reason: str, message: str = "", *args) -> None:
        self.counts[reason] += 1
        if message and (repeats := self.due(f"{reason}:{message}")) is not None:
            log.warning(message + more(repeats), *args)

    def due(self, cause: str) -> int | None:
        """None when `cause` was said less than LOG_EVERY_S ago (counted); else how many went unsaid since."""
        now = time.monotonic()
        if len(self._said) > 1000:  # causes whose text is unique each time must not grow these without bound
            self._said = {k: t for k, t in self._said.items() if now - t < LOG_EVERY_S}
            self._unsaid = Counter({k: n for k, n in self._unsaid.items() if k in self._said})
        if now - self._said.get(cause, float("-inf")) < LOG_EVERY_S:
            self._unsaid[cause] += 1
            return None
        self._said[cause] = now
        return self._unsaid.pop(cause, 0)


def more(repeats: int) -> str:
    return f" (and {repeats} more like it since it was last logged; at most one every {LOG_EVERY_S:g} s)" \
        if repeats else ""


class AiohttpErrorFilter(logging.Filter):
    """aiohttp logs every malformed request after a connection's first, and every handler exception, at ERROR with
    a traceback: 8.9 MB of log in 15 s from one client. A client's malformed request becomes one throttled
    warning without a traceback (counted as bad_request); a handler's exception keeps its traceback, throttled."""

    def __init__(self, refusals: Refusals) -> None:
        super().__init__()
        self.refusals = refusals

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not str(record.msg).startswith("Error handling request"):
            return True
        if isinstance(exc, HttpProcessingError):
            self.refusals.counts["bad_request"] += 1
            if (repeats := self.refusals.due(f"bad_request:{type(exc).__name__}")) is not None:
                peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
                log.warning("malformed HTTP request from %s: %s%s", peer,
                            (str(exc).splitlines() or [type(exc).__name__])[0], more(repeats))
            return False
        return self.refusals.due(f"handler:{type(exc).__name__}:{exc}") is not None


class Admission:
    """A concurrency limit per kind of API request; /metrics and /healthz never wait on it."""

    def __init__(self, refusals: Refusals, limits: dict[str, int] | None = None) -> None:
        self.refusals = refusals
        self.limits = dict(limits or CONCURRENCY)
        self._sems = {k: asyncio.Semaphore(n) for k, n in self.limits.items()}
        self.busy: dict[asyncio.BaseTransport, float] = {}  # API connections now in a request, since when

    @contextlib.asynccontextmanager
    async def slot(self, request: web.Request, kind: str):
        transport = request.transport
        if transport is not None:
            self.busy[transport] = time.monotonic()
        try:
            sem = self._sems[kind]
            try:
                await asyncio.wait_for(sem.acquire(), ADMISSION_WAIT_S)
            except TimeoutError:
                self.refusals.add("busy", "API busy: %d %s requests in progress, more answered 503", self.limits[kind],
                                  kind)
                raise web.HTTPServiceUnavailable(
                    text=f'{{"error": "busy: {self.limits[kind]} {kind} requests in progress; retry"}}',
                    content_type="application/json", headers={"Retry-After": "1"}) from None
            try:
                yield
            finally:
                sem.release()
        finally:
            if transport is not None:
                self.busy.pop(transport, None)


async def stream(request: web.Request, chunks: AsyncIterator[bytes] | Iterable[bytes], refusals: Refusals,
                 headers: dict[str, str], length: int | None = None,
                 deadline_s: float | None = RESPONSE_DEADLINE_S) -> web.StreamResponse:
    """Send `chunks` as the answer; a client that takes more than PROGRESS_TIMEOUT_S for CHUNK bytes, or more than
    `deadline_s` in all, is dropped (its connection aborted): it holds no slot, buffer or descriptor after that."""
    resp = web.StreamResponse(headers=headers)
    if length is not None:
        resp.content_length = length
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    due = None if deadline_s is None else loop.time() + deadline_s

    async def pieces():
        async for chunk in chunks if hasattr(chunks, "__aiter__") else _async(chunks):
            for i in range(0, len(chunk), CHUNK):
                yield chunk[i:i + CHUNK]

    async for piece in pieces():
        timeout = PROGRESS_TIMEOUT_S if due is None else min(PROGRESS_TIMEOUT_S, max(due - loop.time(), 0.0))
        try:
            await asyncio.wait_for(resp.write(piece), timeout)
        except TimeoutError:
            refusals.add("slow_client", "dropped a client that stopped reading its answer (%s %s)", request.method,
                         request.path)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("slow client dropped") from None
    await resp.write_eof()
    return resp


async def _async(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


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
    """A connection over the cap with none to make way: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):  # a TCP server's are: released now, not after a lingering close
            transport.abort()
        else:
            transport.close()


class ConnectionGuard:
    """The protocol factory handed to `loop.create_server`: aiohttp's own (runner.server), behind a connection cap
    and a deadline for the first request's headers. At the cap it closes, to admit the new connection, the oldest
    idle one, else the API connection busy longest (busy API requests are bounded by Admission, so these are
    clients holding answers they do not read): a scrape always finds room. aiohttp has no cap."""

    def __init__(self, server: web.Server, cap: int, header_timeout_s: float, admission: Admission,
                 refusals: Refusals) -> None:
        self.server, self.cap, self.header_timeout_s = server, cap, header_timeout_s
        self.admission, self.refusals = admission, refusals

    def __call__(self) -> asyncio.Protocol:
        live = [(h, h.transport) for h in self.server.connections if h.transport is not None]  # oldest first
        if len(live) >= self.cap:
            idle = next((h for h, _ in live if _waiting_for_request(h)), None)
            if idle is not None:
                idle.force_close()
                self.refusals.add("evicted", "HTTP connection cap (%d) reached: closing idle connections to admit "
                                  "new ones", self.cap)
            else:
                busy = self.admission.busy
                oldest = min(((h, t) for h, t in live if t in busy), key=lambda ht: busy[ht[1]], default=None)
                if oldest is None:
                    self.refusals.add("evicted", "HTTP connection cap (%d) reached with every connection busy: "
                                      "refusing new ones", self.cap)
                    return _Refused()
                busy.pop(oldest[1], None)
                oldest[1].abort()
                self.refusals.add("evicted", "HTTP connection cap (%d) reached: dropping the API connections busy "
                                  "longest to admit new ones", self.cap)
        handler = self.server()
        asyncio.get_running_loop().call_later(self.header_timeout_s, self.headers_due, handler)
        return handler

    @staticmethod
    def headers_due(handler: web.RequestHandler) -> None:
        if handler.transport is not None and getattr(handler, "_request_count", 1) == 0 and \
                _waiting_for_request(handler):
            log.debug("closing a connection that sent no complete request headers in time")
            handler.force_close()


class LoopErrorLog:
    """The event loop's exception handler, logging each kind of error at most once per LOG_EVERY_S with a count of
    the repeats. When accept() fails with EMFILE, CPython before gh-151615 reports it up to `backlog` times per
    wake-up and reschedules as often: unthrottled, that writes hundreds of MB a minute and starves /metrics."""

    def __init__(self, refusals: Refusals) -> None:
        self.refusals = refusals

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        key = f"loop:{type(exc).__name__}:{exc}" if exc is not None else f"loop:{context.get('message')}"
        repeats = self.refusals.due(key)
        if repeats is not None:
            loop.default_exception_handler({**context, "message": f"{context.get('message')}{more(repeats)}"})
