"""Stage `render`: the collectors run over the reading (collectors/), the series budget applied (T2, then T1
dropped), the loop's own figures added, and the exposition rendered once; scrapes serve its bytes."""

from __future__ import annotations

import functools
import gzip
import time
from collections import Counter
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest

from ..collectors import Runner
from ..exposition import Family, family, render
from ..flight import FlightRecorder
from ..reading import Reading
from .base import ERROR_ROWS, StageReport

TIER_ORDER = ("t0", "t1", "t2")


@dataclass
class Exposition:
    body: bytes
    built_at: float

    @functools.cached_property
    def gzipped(self) -> bytes:
        """Compressed on the first scrape that asks for gzip, then cached: with windows shorter than the scrape
        interval most expositions are never scraped (3 ms of CPU saved per 1 s window at 61 x 256 x 16 with
        all expert series: benchmarks/sidecar_scale.py)."""
        return gzip.compress(self.body, compresslevel=1)


class Render:
    name = errors_as = "render"
    required = True

    def __init__(self, runner: Runner, report: StageReport, flight: FlightRecorder, process: CollectorRegistry):
        self.runner, self.report, self.flight, self.process = runner, report, flight, process
        self.http_refusals: dict[str, int] = {}  # the HTTP edge's refusals by reason (server.build_app sets it)

    def run(self, r: Reading) -> Exposition:
        families, (success, duration) = self.runner.run(r)
        self.report.add_to(success, duration)
        kept, series, truncated = apply_budget(families, r.config.max_series)
        kept += [success, duration] + self._self_metrics(series, truncated, time.perf_counter() - self.report.started)
        return Exposition(render(kept) + generate_latest(self.process), r.now)

    def fallback(self, r: Reading) -> Exposition:
        raise AssertionError("a required stage has no fallback")

    def _self_metrics(self, series: dict[str, int], truncated: bool, seconds: float) -> list[Family]:
        errors = family("moe_monitor_window_errors_total")
        for row in ERROR_ROWS:
            errors.add(self.report.errors[row], [("stage", row)])
        s = family("moe_monitor_series")
        for tier in TIER_ORDER:
            s.add(series.get(tier, 0), [("tier", tier)])
        t = family("moe_monitor_series_truncated")
        t.add(1 if truncated else 0)
        d = family("moe_monitor_build_duration_seconds")
        d.add(seconds)
        fw, fb = family("moe_monitor_flight_windows"), family("moe_monitor_flight_bytes")
        fw.add(len(self.flight))
        fb.add(self.flight.nbytes)
        refused = family("moe_monitor_http_refused_total")
        for reason, n in sorted(self.http_refusals.items()):
            refused.add(n, [("reason", reason)])
        return [errors, s, t, d, fw, fb] + ([refused] if self.http_refusals else [])


def apply_budget(families: list[Family], max_series: int) -> tuple[list[Family], dict[str, int], bool]:
    """Drop whole tiers, T2 first then T1, until the series fit the budget. T0 is never dropped."""
    series: Counter[str] = Counter()
    for f in families:
        series[f.tier] += f.series
    dropped: set[str] = set()
    total = sum(series.values())
    for tier in ("t2", "t1"):
        if total <= max_series:
            break
        dropped.add(tier)
        total -= series[tier]
    return [f for f in families if f.tier not in dropped], dict(series), bool(dropped)
