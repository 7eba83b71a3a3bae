"""T0: vLLM's EPLB rearrangements per rank (the segments' eplb_health extension): how many, the last one's time
and duration, the configured interval, vLLM's steps-since-rearrangement counter and how far past due it is. No
series for a rank whose vLLM runs without EPLB (its segment has no such record)."""

from __future__ import annotations

import math

from moe_monitor.channel.layout import EPLB_ASYNC, EPLB_HOOKED, EPLB_IN_PROGRESS

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector

NAMES = ("moe_eplb_info", "moe_eplb_rearrangements_total", "moe_eplb_rearrangements_started_total",
         "moe_eplb_layer_commits_total", "moe_eplb_rearrangement_seconds_total",
         "moe_eplb_last_rearrangement_timestamp_seconds", "moe_eplb_last_rearrangement_duration_seconds",
         "moe_eplb_rearrangement_interval_steps", "moe_eplb_steps_since_rearrangement",
         "moe_eplb_rearrangement_overdue_steps", "moe_eplb_rearrangement_in_progress_seconds")


def overdue_steps(steps_since: int, interval: int) -> int:
    """Steps since the next rearrangement was due: vLLM starts one when its counter reaches the interval, and
    the counter passes it only while an async rearrangement has not finished."""
    return max(0, steps_since - interval)


def in_progress_seconds(now: float, flags: int, last_start_unix_ns: int) -> float:
    if not flags & EPLB_IN_PROGRESS or not last_start_unix_ns:
        return 0.0
    return max(0.0, now - last_start_unix_ns / 1e9)


def collect(r: Reading) -> list[Family]:
    rows = [(s.name, s.snapshot.eplb_health) for s in r.statuses
            if s.snapshot is not None and s.ignored is None and s.snapshot.eplb_health is not None]
    if not rows:
        return []
    f = {name: family(name) for name in NAMES}
    for segment, e in rows:
        lab = [("segment", segment)]
        f["moe_eplb_info"].add(1, lab + [("mode", "async" if e.flags & EPLB_ASYNC else "sync"),
                                         ("timed", "true" if e.flags & EPLB_HOOKED else "false")])
        f["moe_eplb_rearrangements_total"].add(e.rearrangements, lab)
        f["moe_eplb_rearrangements_started_total"].add(e.started, lab)
        f["moe_eplb_layer_commits_total"].add(e.layer_commits, lab)
        f["moe_eplb_rearrangement_seconds_total"].add(e.duration_s_total, lab)
        if e.rearrangements and e.last_end_unix_ns:
            f["moe_eplb_last_rearrangement_timestamp_seconds"].add(e.last_end_unix_ns / 1e9, lab)
        if e.rearrangements and not math.isnan(e.last_duration_s):
            f["moe_eplb_last_rearrangement_duration_seconds"].add(e.last_duration_s, lab)
        f["moe_eplb_rearrangement_interval_steps"].add(e.step_interval, lab)
        f["moe_eplb_steps_since_rearrangement"].add(e.steps_since, lab)
        f["moe_eplb_rearrangement_overdue_steps"].add(overdue_steps(e.steps_since, e.step_interval), lab)
        f["moe_eplb_rearrangement_in_progress_seconds"].add(
            in_progress_seconds(r.now, e.flags, e.last_start_unix_ns), lab)
    return [x for x in f.values() if x.series]


COLLECTOR = Collector("eplb", "t0", collect)
