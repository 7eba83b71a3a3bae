"""A hostile stand-in for a sidecar (or a Prometheus) that the client tests point the real CLI at: it answers
each path with whatever the test sets (`HostileServer.on(pattern, handler)`), including answers no honest
server sends: a byte every 2 s, a 1 GiB body (streamed, never allocated), a gzip bomb, ids and file names that
name paths outside the client's --out, strings holding terminal escape sequences."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

from aiohttp import web

MiB = 1 << 20
GiB = 1 << 30


class HostileServer:
    """An aiohttp server on 127.0.0.1 (a free port) in its own thread. `on(regex, handler)` answers the paths
    the regex matches (the newest rule first); anything else is a 404."""

    def __init__(self) -> None:
        self.rules: list[tuple[re.Pattern, object]] = []
        self.seen: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def on(self, pattern: str, handler) -> HostileServer:
        self.rules.insert(0, (re.compile(pattern), handler))
        return self

    def reset(self) -> None:
        self.rules.clear()
        self.seen.clear()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.raw_path)
        for pattern, handler in self.rules:
            if pattern.fullmatch(request.path):
                return await handler(request)
        return web.json_response({"error": "not here"}, status=404)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, handle_signals=False)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


# A small launcher runs the command and reports its child's peak RSS: measured from this (big, forking) test
# process, a child's ru_maxrss would start at this process' size, which a fork's child inherits.
_LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
sys.stderr.write(f"\\nMAXRSS_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n")
sys.exit(code)
"""


def run_measured(argv: list[str], kill_after: float = 120) -> tuple[int, str, str, float, float]:
    """Run `argv`: (exit code, stdout, stderr, peak RSS in MB of that process, seconds). Killed after
    `kill_after` seconds (a hang shows up as a failed run, never as a hung test)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command it runs
        out, err = proc.communicate()
        return -9, out.decode(errors="replace"), err.decode(errors="replace"), 0.0, time.monotonic() - start
    err, _, peak = err.decode(errors="replace").rpartition("\nMAXRSS_KB ")
    return proc.returncode, out.decode(errors="replace"), err, int(peak) / 1024, time.monotonic() - start


# -- answers -------------------------------------------------------------------------------------------------

def json_answer(doc, status: int = 200):
    async def handler(request):
        return web.json_response(doc, status=status)
    return handler


def raw_answer(body: bytes, status: int = 200, headers: dict | None = None):
    async def handler(request):
        return web.Response(body=body, status=status, headers=headers or {"Content-Type": "application/json"})
    return handler


def stream_answer(body: bytes, announce: int | None = None):
    """`body` sent chunked (no Content-Length), or announced as `announce` bytes and the connection dropped
    after `body`."""
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if announce is not None:
            resp.content_length = announce
        await resp.prepare(request)
        await resp.write(body)
        if announce is not None:
            request.transport.close()
        return resp
    return handler


def drip(head: bytes = b'{"captures": [', every_s: float = 2.0, forever_s: float = 600.0):
    """Headers at once, then `head`, then one space every `every_s`: a per-read timeout never fires."""
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(head)
        try:
            for _ in range(int(forever_s / every_s)):
                await asyncio.sleep(every_s)
                await resp.write(b" ")
        except (ConnectionError, RuntimeError):  # the client gave up: what it should do
            pass
        return resp
    return handler


def huge(total: int = GiB, head: bytes = b'{"captures": ["', fill: bytes = b"a", headers: dict | None = None,
         announce: bool = False):
    """`total` bytes streamed in 1 MiB chunks of one preallocated buffer (a valid JSON start, then filler);
    chunked, or with `announce` a Content-Length."""
    chunk = fill * MiB

    async def handler(request):
        resp = web.StreamResponse(headers=headers or {"Content-Type": "application/json"})
        if announce:
            resp.content_length = total
        await resp.prepare(request)
        try:
            await resp.write(head)
            sent = len(head)
            while sent < total:
                n = min(MiB, total - sent)
                await resp.write(chunk[:n] if n < MiB else chunk)
                sent += n
        except (ConnectionError, RuntimeError):
            pass
        return resp
    return handler


def gzip_bomb(size: int = 2 * GiB, head: bytes = b"", block: bytes = b" ") -> bytes:
    """A gzip member that inflates to `head` + `size` bytes of `block` (default: JSON whitespace, so a client
    that peeks at the first byte is not spared the cap), ~1/1000 of that compressed. Built by compressing one
    MiB once: after a full flush deflate restarts from scratch, so the same compressed block repeats."""
    fill = block * MiB
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [first.compress(head), first.flush(zlib.Z_FULL_FLUSH)]
    one = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeated = one.compress(fill) + one.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    blocks = size // MiB
    for _ in range(blocks):
        crc = zlib.crc32(fill, crc)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc & 0xFFFFFFFF, (len(head) + blocks * MiB) & 0xFFFFFFFF)
    return header + b"".join(body) + repeated * blocks + end + trailer
