"""Stage `breakdown`: the newest profiler capture looked up (capture/latest.py: the catalog's index brought up
to date once; or breakdown/latest.py: vLLM's profile directory listed once, and a new capture analysed off this
thread), and the breakdown and the captures' figures copied into the reading."""

from __future__ import annotations

from dataclasses import replace

from moe_monitor.breakdown.latest import BreakdownSource
from moe_monitor.capture.capturer import Capturer
from moe_monitor.capture.catalog import Catalog

from ..reading import BreakdownView, CapturesView, Reading


class PollBreakdown:
    name = errors_as = "breakdown"
    required = False

    def __init__(self, latest: BreakdownSource | None, capturer: Capturer | None,
                 catalog: Catalog | None):
        self.latest, self.capturer, self.catalog = latest, capturer, catalog

    def run(self, r: Reading) -> Reading:
        if self.latest is not None:
            self.latest.poll()
        return self.fallback(r)

    def fallback(self, r: Reading) -> Reading:
        captures = CapturesView.of(self.capturer, self.catalog) if self.capturer is not None else None
        return replace(r, breakdown=BreakdownView.of(self.latest) if self.latest is not None else None,
                       captures=captures)
