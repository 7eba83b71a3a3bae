"""A webhook receiver for Alertmanager: records every notification and hands it to a callback.

The demo prints the alerts it receives; the end-to-end test asserts on them. Alertmanager's webhook payload
(version 4): {"status": "firing"|"resolved", "alerts": [{"status", "labels", "annotations", ...}], ...}.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertSink:
    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 on_alert: Callable[[dict], None] | None = None):
        self.notifications: list[dict] = []
        self._lock = threading.Lock()
        self._callback_lock = threading.Lock()  # one notification's callbacks at a time (no interleaved output)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                if self.path != "/alerts":
                    self.send_error(404, "the receiver listens on /alerts")
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    alerts = body["alerts"]
                except (ValueError, KeyError, TypeError):
                    self.send_error(400, "expected an Alertmanager webhook payload")
                    return
                with sink._lock:
                    sink.notifications.append(body)
                if on_alert is not None:
                    with sink._callback_lock:
                        for alert in alerts:
                            on_alert(alert)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):  # quiet: the callback reports what matters
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}/alerts"
        # close() waits for the loop's next poll: 0.5 s by default, at every sink a test or the demo closes
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="alert-sink", daemon=True)
        self._thread.start()

    def alerts(self, name: str | None = None, status: str | None = None) -> list[dict]:
        """Every alert received so far (one entry per alert per notification), optionally filtered."""
        with self._lock:
            out = [a for n in self.notifications for a in n.get("alerts", [])]
        return [a for a in out if (name is None or a["labels"].get("alertname") == name)
                and (status is None or a.get("status") == status)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def describe(alert: dict) -> str:
    labels = alert.get("labels", {})
    where = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity"))
    summary = alert.get("annotations", {}).get("summary", "")
    return f"{alert.get('status', '?').upper():8s} {labels.get('alertname', '?')} [{where}] {summary}"
