"""Health of the segments (up, age, ranks, read errors, ignored ones, refused sections, restarts) and the build
info."""

from __future__ import annotations

from collections import Counter

from moe_monitor import __version__
from moe_monitor.schema.vocabulary import SEGMENT_READ_ERRORS, SEGMENT_STATES

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector


def collect(r: Reading) -> list[Family]:
    up, age = family("moe_monitor_segment_up"), family("moe_monitor_snapshot_age_seconds")
    info, publish_errors = family("moe_monitor_rank_info"), family("moe_monitor_plugin_publish_errors_total")
    ignored, refused = family("moe_monitor_segments_ignored"), family("moe_monitor_segment_sections_refused")
    states = Counter({s: 0 for s in SEGMENT_STATES})
    for s in r.statuses:
        age_s = s.age_s(r.now)
        if s.snapshot is None or age_s is None:
            states["unreadable"] += 1
            up.add(0, [("segment", s.name)])
            continue
        h = s.snapshot.header
        seconds = max(0.0, age_s)
        fresh = seconds <= r.config.stale_after_s
        states["fresh" if fresh else "stale"] += 1
        up.add(1 if fresh else 0, [("segment", s.name)])
        age.add(seconds, [("segment", s.name)])
        rk = h.ranks
        info.add(1, [("segment", s.name), ("model", h.model), ("dp_rank", rk.dp_rank), ("pp_rank", rk.pp_rank),
                     ("tp_rank", rk.tp_rank), ("ep_rank", rk.ep_rank), ("counted", "true" if s.counted else "false")])
        publish_errors.add(h.publish_errors, [("segment", s.name)])
        if s.ignored:
            ignored.add(1, [("segment", s.name), ("reason", s.ignored)])
        for x in s.snapshot.refused:
            refused.add(1, [("segment", s.name), ("section", x.section), ("reason", x.reason)])
    segments = family("moe_monitor_segments")
    for state in sorted(states):
        segments.add(states[state], [("state", state)])
    errors = family("moe_monitor_segment_read_errors_total")
    for kind in SEGMENT_READ_ERRORS:
        errors.add(r.read_errors.get(kind, 0), [("kind", kind)])
    restarts = family("moe_monitor_rank_restarts_total")
    restarts.add(r.restarts)
    build = family("moe_monitor_build_info")
    build.add(1, [("version", __version__)])
    out = [up, age, info, publish_errors, segments, errors, restarts, build]
    out[5:5] = [f for f in (ignored, refused) if f.series]
    return out


COLLECTOR = Collector("health", "t0", collect)
