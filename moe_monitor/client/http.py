"""Bounded HTTP for the clients (`traces`, `eplb`, `top`): every request has a total deadline and every answer
a size cap, checked while it streams in (a declared Content-Length over the cap is refused before reading);
gzip is inflated here, incrementally and capped (the session never inflates on its own: `auto_decompress=False`),
so a gzip bomb costs at most the cap. Every failure is a `ClientError` with a one-line message.

A download (`Client.download`) streams to a file: at most the size the capture's metadata declared, at most
`stall_s` without a byte, and a total deadline that grows with the declared size.

A URL may be given as `host:port` (`normalise_url`: http:// is assumed). The sidecar marks every answer with
`SIDECAR_HEADER`; an error answer without it says that the URL is not a moe-monitor sidecar (a Prometheus, a
proxy's page) rather than only its status."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Awaitable, Callable
from typing import BinaryIO

import aiohttp

from moe_monitor.client.untrusted import printable
from moe_monitor.schema.api import SIDECAR_HEADER

MiB = 1 << 20
DEFAULT_TIMEOUT_S = 30.0  # a JSON answer, whole
JSON_MAX_BYTES = 8 * MiB  # a capture's metadata, the capture list, a trigger's answer
ERROR_MAX_BYTES = 64 << 10  # the body of an error answer (only its message is shown)
DOWNLOAD_MAX_BYTES = 16 << 30  # one trace file, whatever its metadata declares
DOWNLOAD_MIN_RATE = 256 << 10  # bytes/s a download is allowed on top of its base deadline (10 x the timeout)


_STALLED = getattr(aiohttp, "SocketTimeoutError", ())  # aiohttp >= 3.10; older ones say "within N s"


class ClientError(Exception):
    """A request that failed or an answer that cannot be used; the message is one line, safe to print."""

    def __init__(self, message: str):
        super().__init__(printable(message))


def mib(n: float) -> str:
    return f"{n / MiB:g} MiB"


def too_big(what: str, limit: int) -> ClientError:
    return ClientError(f"{what}: the answer exceeds {mib(limit)}")


class Gunzip:
    """Incremental gzip inflation into `out` that stops past `limit` bytes (several members, as `gzip` reads)."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes, out: bytearray) -> None:
        while True:
            if self._d.eof:  # a further member, zero padding, or garbage (the new decompressor says so)
                data = self._d.unused_data + data
                if not data.strip(b"\x00"):
                    return
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            if not data:
                return
            try:  # in pieces of at most 1 MiB: the output grows in place, never a bomb-sized temporary
                out += self._d.decompress(data, min(self.limit - len(out) + 1, MiB))
            except zlib.error as e:
                raise ClientError(f"{self.what}: not valid gzip ({e})") from None
            if len(out) > self.limit:
                raise ClientError(f"{self.what}: more than {mib(self.limit)} once decompressed")
            data = self._d.unconsumed_tail

    def finish(self) -> None:
        if not self._d.eof:
            raise ClientError(f"{self.what}: the gzip stream is truncated")


def gunzip(data: bytes, limit: int, what: str) -> bytearray:
    """`data` inflated, at most `limit` bytes (ClientError beyond, or when it is not complete gzip)."""
    out, z = bytearray(), Gunzip(limit, what)
    z.feed(data, out)
    z.finish()
    return out


async def read_body(resp: aiohttp.ClientResponse, limit: int, what: str, inflate: bool = True) -> bytearray:
    """The body of `resp`, decoded, at most `limit` bytes: ClientError as soon as it is known to be more.
    `inflate`: the session does not decompress (auto_decompress=False), so a gzip Content-Encoding is ours."""
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower() if inflate else "identity"
    if encoding not in ("identity", "", "gzip", "x-gzip"):
        raise ClientError(f"{what}: unsupported Content-Encoding {encoding!r}")
    z = Gunzip(limit, what) if encoding in ("gzip", "x-gzip") else None
    if z is None and resp.content_length is not None and resp.content_length > limit:
        raise too_big(what, limit)
    out, raw = bytearray(), 0
    async for chunk in resp.content.iter_any():
        raw += len(chunk)
        if raw > limit + MiB:  # compressed: also bounded (gzip of random bytes is a little larger)
            raise too_big(what, limit)
        if z is not None:
            z.feed(chunk, out)
        else:
            out += chunk
            if len(out) > limit:
                raise too_big(what, limit)
    if z is not None:
        z.finish()
    return out


def normalise_url(url: str) -> str:
    """A server's base URL: `host:port` gets http://, the trailing slash goes (every client takes it so)."""
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def error_text(body: bytes) -> str:
    """The server's {"error": ...} message, or the first line of a plain body; printable, at most 300 chars."""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return printable(doc["error"], 300)
    except ValueError:
        pass
    text = bytes(body).decode(errors="replace").strip()
    return printable(text.splitlines()[0], 300) if text else ""


def reason(e: BaseException) -> str:
    """Why a connection failed, in a few words."""
    if isinstance(e, aiohttp.ClientConnectorError):
        os_error = e.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        return (getattr(os_error, "strerror", None) or str(os_error) or str(e)).lower()
    return str(e) or type(e).__name__


class Client:
    """One server (a sidecar, or Prometheus) at `base_url` (`host:port` is http://host:port). Synchronous calls
    (each runs its own event loop), each bounded by `timeout` seconds in total; `name` is how errors call the
    server; `sidecar`: its error answers must carry SIDECAR_HEADER, else it is "not a moe-monitor sidecar"."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 name: str = "the sidecar", sidecar: bool = True):
        self.base_url, self.token, self.timeout, self.name = normalise_url(base_url), token, float(timeout), name
        self.sidecar = sidecar

    def _headers(self, accept: str) -> dict:
        return {"Accept-Encoding": accept, **({"Authorization": f"Bearer {self.token}"} if self.token else {})}

    async def _call(self, method: str, path: str, what: str, read: Callable[[aiohttp.ClientResponse],
                    Awaitable], timeout: aiohttp.ClientTimeout, body: dict | None = None,
                    accept: str = "gzip"):
        url = self.base_url + path
        try:
            async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=True) as session, \
                    session.request(method, url, json=body, headers=self._headers(accept)) as resp:
                if resp.status >= 400:
                    try:
                        message = error_text(await read_body(resp, ERROR_MAX_BYTES, what))
                    except ClientError:
                        message = ""
                    answered = f"{url} answered {resp.status}: {message or resp.reason}"
                    if self.sidecar and SIDECAR_HEADER not in resp.headers:
                        raise ClientError(f"{what}: {self.base_url} is not a moe-monitor sidecar ({answered}, "
                                          f"without the {SIDECAR_HEADER} header every sidecar answer carries)")
                    raise ClientError(f"{what}: {answered}")
                return await read(resp)
        except TimeoutError as e:  # the total deadline, or (downloads) no byte for sock_read seconds
            if isinstance(e, _STALLED) and timeout.sock_read:
                raise ClientError(f"{what}: {url} sent nothing for {timeout.sock_read:g} s") from None
            raise ClientError(f"{what}: no complete answer from {url} within {timeout.total:g} s") from None
        except aiohttp.ClientPayloadError as e:
            raise ClientError(f"{what}: the answer from {url} was cut short ({e})") from None
        except aiohttp.InvalidURL:
            raise ClientError(f"{what}: {url!r} is not a valid URL") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise ClientError(f"{what}: cannot reach {self.name} at {self.base_url}: {reason(e)}") from None

    def _run(self, *args, **kw):
        return asyncio.run(self._call(*args, **kw))

    def _json_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout)

    def get_bytes(self, path: str, what: str, limit: int = JSON_MAX_BYTES) -> bytearray:
        """The answer's body (gzip inflated), at most `limit` bytes, within the timeout."""
        return self._run("GET", path, what, lambda r: read_body(r, limit, what), self._json_timeout())

    def _json(self, method: str, path: str, what: str, expect: tuple[str, ...], limit: int,
              body: dict | None = None) -> dict:
        data = self._run(method, path, what, lambda r: read_body(r, limit, what), self._json_timeout(), body)
        try:
            doc = json.loads(data)
        except ValueError:
            if self.sidecar:
                raise ClientError(f"{what}: {self.base_url} is not a moe-monitor sidecar (its answer is not JSON)") \
                    from None
            raise ClientError(f"{what}: {self.base_url} did not answer JSON: is it {self.name}?") from None
        missing = [k for k in expect if not isinstance(doc, dict) or k not in doc]
        if missing:
            raise ClientError(f"{what}: {self.base_url} is not a moe-monitor sidecar (its answer has no "
                              f"{', '.join(missing)})")
        return doc

    def get_json(self, path: str, what: str, expect: tuple[str, ...] = (), limit: int = JSON_MAX_BYTES) -> dict:
        """A JSON object answer holding the keys `expect` ("not a moe-monitor sidecar" otherwise)."""
        return self._json("GET", path, what, expect, limit)

    def post_json(self, path: str, body: dict, what: str, expect: tuple[str, ...] = ()) -> dict:
        return self._json("POST", path, what, expect, JSON_MAX_BYTES, body)

    def download(self, path: str, what: str, sink: BinaryIO, declared: int) -> int:
        """Stream the answer into `sink`: exactly `declared` bytes (the capture's metadata), or ClientError
        (more, fewer, no byte for 2 x the timeout, past 10 x the timeout + declared / 256 KiB/s)."""
        if declared > DOWNLOAD_MAX_BYTES:
            raise ClientError(f"{what}: its metadata declares {declared} bytes, more than the "
                              f"{mib(DOWNLOAD_MAX_BYTES)} a trace file may have")
        timeout = aiohttp.ClientTimeout(total=10 * self.timeout + declared / DOWNLOAD_MIN_RATE,
                                        sock_connect=self.timeout, sock_read=2 * self.timeout)

        async def stream(resp: aiohttp.ClientResponse) -> int:
            if resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("identity", ""):
                raise ClientError(f"{what}: encoded ({resp.headers['Content-Encoding']}) though asked for none")
            if resp.content_length is not None and resp.content_length != declared:
                raise ClientError(f"{what}: {resp.content_length} bytes announced, its metadata declares "
                                  f"{declared}")
            got = 0
            async for chunk in resp.content.iter_any():
                got += len(chunk)
                if got > declared:
                    raise ClientError(f"{what}: more than the {declared} bytes its metadata declares")
                sink.write(chunk)
            if got != declared:
                raise ClientError(f"{what}: cut short at {got} of {declared} bytes")
            return got

        return self._run("GET", path, what, stream, timeout, accept="identity")
