"""The sidecar's window loop: at every window boundary one pass of the stages (stages/: read, window, ep_load,
flight, detect, breakdown, render) builds one frozen `Reading` and renders the exposition once; scrapes serve
its bytes and the HTTP thread never runs any of this. A stage that fails is counted and logged, the previous
figures stay served, and the loop goes on at the next boundary. The parts are made by wiring.build."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from .config import SidecarConfig
from .readiness import SegmentsSeen, readiness
from .stages import Tick
from .stages.render import Exposition, apply_budget
from .windows import Window, next_boundary

if TYPE_CHECKING:
    from .wiring import Parts

__all__ = ["Exporter", "Exposition", "apply_budget"]


class Exporter:
    def __init__(self, config: SidecarConfig, parts: Parts, clock=time.time):
        """`parts`: as wiring.build makes them (the one place that makes them)."""
        self.config, self._clock, self.parts = config, clock, parts
        self.source, self.detector, self.control = parts.source, parts.detector, parts.control
        self.capturer, self.catalog, self.captures = parts.capturer, parts.catalog, parts.latest
        self.flight = parts.flight.recorder
        self._lock = threading.Lock()
        self._exposition: Exposition | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop ---------------------------------------------------------------------------------
    def tick(self, boundary: float | None = None) -> Exposition:
        """One pass: read, close the window ending at `boundary` (None: just refresh), render. Returns the
        exposition. Raises only when reading the segments or rendering fails (the caller keeps the previous one)."""
        exposition = self.parts.pipeline.run(Tick(boundary))
        with self._lock:
            self._exposition = exposition
        return exposition

    def latest(self) -> Exposition | None:
        """The newest exposition; None until one has been built. Never builds one (the HTTP thread must not
        run the window loop's work)."""
        with self._lock:
            return self._exposition

    def safe_tick(self, boundary: float | None = None) -> bool:
        try:
            self.tick(boundary)
            return True
        except Exception:  # noqa: BLE001 - logged by the stage; keep serving the last exposition
            return False

    def run_forever(self) -> None:
        while not self._stop.is_set():
            boundary = next_boundary(self._clock(), self.config.window_s)
            if self._stop.wait(max(0.0, boundary - self._clock())):
                return
            self.safe_tick(boundary)

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run_forever, name="moe-monitor-windows", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()

    # -- what the HTTP edge asks ------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /readyz: the window loop runs and fresh segments are there (readiness.py)."""
        exposition, cfg = self.latest(), self.config
        return readiness(self._clock(), self.seen, exposition.built_at if exposition else None,
                         self._thread is not None and self._thread.is_alive(), cfg.window_s, cfg.stale_after_s,
                         cfg.segment_dir)

    def trigger_manual(self, reason: str) -> tuple[int, dict]:
        return self.control.manual(reason)

    def alerts(self, note, forwarded: dict | None = None) -> list[dict]:
        """What was done with each alert of an Alertmanager notification (capture/control.py); `forwarded`: those
        sent on to a peer (sidecar/forward.py)."""
        return self.control.alerts(note, self.config.alert_instance_set, forwarded)

    def flight_json(self, last: int | None = None, since: float | None = None, gzipped: bool = False) -> bytes:
        return self.parts.flight.body(last, since, gzipped)

    @property
    def seen(self) -> SegmentsSeen | None:
        """What the last pass's read found (/readyz, the log)."""
        return self.parts.read.seen

    @property
    def errors(self) -> Counter[str]:
        """Stage errors by moe_monitor_window_errors_total row."""
        return self.parts.pipeline.report.errors

    @property
    def window(self) -> Window | None:
        return self.parts.window.window

    @property
    def model(self) -> str:
        return self.parts.flight.model

    @property
    def http_refusals(self) -> dict[str, int]:
        return self.parts.render.http_refusals

    @http_refusals.setter
    def http_refusals(self, counts: dict[str, int]) -> None:  # server.build_app's Refusals, exported
        self.parts.render.http_refusals = counts
