"""HTTP edge of the sidecar (aiohttp): /metrics, /healthz and a landing page.

aiohttp rather than prometheus_client's built-in server because the sidecar grows more routes (the trace
catalog streams files) and aiohttp gives routing, streaming and a production-grade server in one package.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .collector import MoECollector

log = logging.getLogger(__name__)

LANDING = """<html><head><title>moe-monitor</title></head><body>
<h1>moe-monitor sidecar</h1><p>Segments: {segment_dir}</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li></ul></body></html>"""


def build_app(collector: MoECollector, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry or CollectorRegistry(auto_describe=False)
    registry.register(collector)

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.get_running_loop().run_in_executor(None, encoder, registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def landing(request: web.Request) -> web.Response:
        return web.Response(text=LANDING.format(segment_dir=collector.segment_dir), content_type="text/html")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", landing)
    return app


def serve(collector: MoECollector, host: str, port: int) -> None:
    log.info("moe-monitor sidecar listening on http://%s:%d/metrics, reading %s", host, port,
             collector.segment_dir)
    web.run_app(build_app(collector), host=host, port=port, print=None, access_log=None)
