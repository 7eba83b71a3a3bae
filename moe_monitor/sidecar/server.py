"""HTTP edge of the sidecar (aiohttp): /metrics (the exposition built once per window), /healthz and a
landing page.

aiohttp rather than prometheus_client's built-in server because the sidecar grows more routes (the trace
catalog streams files) and aiohttp gives routing, streaming and a production-grade server in one package.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .exporter import Exporter

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LANDING = """<html><head><title>moe-monitor</title></head><body>
<h1>moe-monitor sidecar</h1><p>Segments: {segment_dir}; window {window}s</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li></ul></body></html>"""


def build_app(exporter: Exporter) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        exposition = exporter.latest()
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

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", landing)
    return app


def serve(exporter: Exporter) -> None:
    cfg = exporter.config
    exporter.start()
    log.info("moe-monitor sidecar listening on http://%s:%d/metrics, reading %s, %gs windows", cfg.host, cfg.port,
             cfg.segment_dir, cfg.window_s)
    web.run_app(build_app(exporter), host=cfg.host, port=cfg.port, print=None, access_log=None)
