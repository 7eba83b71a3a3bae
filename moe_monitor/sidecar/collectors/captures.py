"""Triggered profiler captures: outcomes, the one in progress, the last one, the catalog's size."""

from __future__ import annotations

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector


def collect(r: Reading) -> list[Family]:
    c = r.captures
    if c is None:  # captures not configured (the collector is off then)
        return []
    total = family("moe_captures_total")
    for (reason, outcome), count in c.outcomes:
        total.add(count, [("reason", reason), ("outcome", outcome)])
    running = family("moe_capture_in_progress")
    running.add(1 if c.busy else 0)
    out = [total, running]
    if c.profiler_enabled is not None:
        enabled = family("moe_capture_profiler_enabled")
        enabled.add(1 if c.profiler_enabled else 0)
        out.append(enabled)
    if c.last_end is not None:
        d = family("moe_capture_last_duration_seconds")
        d.add(c.last_duration_s or 0.0)
        e = family("moe_capture_last_end_timestamp_seconds")
        e.add(c.last_end)
        out += [d, e]
    n = family("moe_capture_catalog_captures")  # the catalog's own counts: a window never lists the catalog
    n.add(c.catalog_captures)
    b = family("moe_capture_catalog_bytes")
    b.add(c.catalog_bytes)
    damaged = family("moe_capture_catalog_damaged")
    damaged.add(c.catalog_damaged)
    alerts = family("moe_capture_alerts_total")
    for outcome, count in c.alerts:
        alerts.add(count, [("outcome", outcome)])
    return out + [n, b, damaged] + ([alerts] if c.alerts else [])


COLLECTOR = Collector("captures", "t0", collect, enabled=lambda config: config.captures_enabled)
