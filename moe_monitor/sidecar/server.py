"""HTTP edge of the sidecar (aiohttp): /metrics (the exposition built once per window), /healthz and a
landing page.

aiohttp rather than prometheus_client's built-in server because the sidecar grows more routes (the trace
catalog streams files) and aiohttp gives routing, streaming and a production-grade server in one package.
"""

from __future__ import annotations

import hmac
import json
import logging

from aiohttp import web

from .exporter import Exporter

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LANDING = """<html><head><title>moe-monitor</title></head><body>
<h1>moe-monitor sidecar</h1><p>Segments: {segment_dir}; window {window}s</p>
<ul><li><a href="/metrics">/metrics</a></li><li><a href="/healthz">/healthz</a></li>
<li><a href="/api/captures">/api/captures</a> (triggered profiler traces)</li></ul></body></html>"""


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
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{request.match_info["name"]}"'})

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
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", landing)
    return app


def serve(exporter: Exporter) -> None:
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
    web.run_app(build_app(exporter), host=cfg.host, port=cfg.port, print=None, access_log=None)
