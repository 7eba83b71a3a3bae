"""Triggered profiler captures: outcomes, the one in progress, the last one, the catalog's size."""

from __future__ import annotations

from ..exposition import Family
from ..reading import Reading
from ..vocabulary import family
from .base import Collector


def collect(r: Reading) -> list[Family]:
    capturer = r.capturer
    total = family("moe_captures_total")
    for (reason, outcome), n in sorted(capturer.outcomes.items()):
        total.add(n, [("reason", reason), ("outcome", outcome)])
    running = family("moe_capture_in_progress")
    running.add(1 if capturer.busy else 0)
    out = [total, running]
    if capturer.profiler_enabled is not None:
        enabled = family("moe_capture_profiler_enabled")
        enabled.add(1 if capturer.profiler_enabled else 0)
        out.append(enabled)
    if capturer.last_end is not None:
        d = family("moe_capture_last_duration_seconds")
        d.add(capturer.last_duration_s)
        e = family("moe_capture_last_end_timestamp_seconds")
        e.add(capturer.last_end)
        out += [d, e]
    n = family("moe_capture_catalog_captures")  # the catalog's own counts: a window never lists the catalog
    n.add(r.catalog.count)
    b = family("moe_capture_catalog_bytes")
    b.add(r.catalog.total_bytes)
    damaged = family("moe_capture_catalog_damaged")
    damaged.add(len(r.catalog.damaged))
    return out + [n, b, damaged]


COLLECTOR = Collector("captures", "t0", collect, enabled=lambda config: config.captures_enabled)
