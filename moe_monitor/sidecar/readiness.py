"""Is the sidecar ready (`/readyz`), and what its log says about the segment directory. Pure: the exporter hands
in what its last window read (`SegmentsSeen`) and the time.

Ready means the window loop runs (an exposition built within the last few windows) and at least one segment of
the served model is fresh. Not ready, with the reason: no exposition yet, the loop stopped or stuck, the segment
directory missing, no segment in it yet, or every segment stale. `/healthz` only says that the process answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

LOOP_SLACK_S = 10.0  # a window may take this long beyond 3 windows before the loop counts as stuck
REPEAT_S = 300.0  # a warning about the segment directory is repeated this often while it lasts
EMPTY_AFTER_S = 60.0  # an existing directory without a segment for this long is worth a warning


@dataclass(frozen=True)
class SegmentsSeen:
    """What one window's read found in the segment directory."""

    at: float  # wall-clock time of the read
    dir_exists: bool
    total: int  # segment files
    fresh: int  # readable, of the served model, published within --stale-after
    newest_age_s: float | None  # since the newest publish of a readable segment

    @classmethod
    def of(cls, statuses, at: float, dir_exists: bool, stale_after_s: float) -> SegmentsSeen:
        ages = [s.age_s(at) for s in statuses if s.snapshot is not None]
        fresh = sum(1 for s in statuses if s.snapshot is not None and not s.ignored and s.age_s(at) <= stale_after_s)
        return cls(at, dir_exists, len(statuses), fresh, max(0.0, min(ages)) if ages else None)


def _segments_problem(seen: SegmentsSeen, segment_dir: str, stale_after_s: float) -> str | None:
    if not seen.dir_exists:
        return (f"the segment directory {segment_dir} does not exist (vLLM with moe-monitor creates it; its "
                "MOE_MONITOR_SEGMENT_DIR must name the directory --segment-dir names)")
    if seen.total == 0:
        return (f"no segment in {segment_dir} yet (vLLM with moe-monitor writes one per rank once its workers "
                "have started)")
    if seen.fresh == 0:
        newest = "none readable" if seen.newest_age_s is None else f"the newest published {seen.newest_age_s:.0f} s ago"
        return (f"no fresh segment in {segment_dir}: {seen.total} segments, {newest} (--stale-after "
                f"{stale_after_s:g} s: is vLLM running?)")
    return None


def readiness(now: float, seen: SegmentsSeen | None, built_at: float | None, loop_alive: bool, window_s: float,
              stale_after_s: float, segment_dir: str) -> tuple[bool, str]:
    """(ready, why): `/readyz`'s answer. `built_at`: the newest exposition's time (None: none yet)."""
    if built_at is None or seen is None:
        return False, "no exposition yet: the first window failed to build (see the sidecar's log)"
    if not loop_alive:
        return False, "the window loop has stopped (see the sidecar's log)"
    age = now - built_at
    if age > 3 * window_s + LOOP_SLACK_S:
        return False, (f"the window loop has built nothing for {age:.0f} s ({window_s:g} s windows): stuck or "
                       "failing (moe_monitor_window_errors_total, the sidecar's log)")
    problem = _segments_problem(seen, segment_dir, stale_after_s)
    if problem is not None:
        return False, problem
    return True, f"{seen.fresh} of {seen.total} segments fresh, the last window built {max(age, 0.0):.1f} s ago"


class SegmentDirLog:
    """What the log says about the segment directory: a warning at once when it is missing, after EMPTY_AFTER_S
    when it holds no segment, and as soon as every segment is stale; each repeated every REPEAT_S while it lasts,
    and one line when segments are read again after a warning."""

    def __init__(self, segment_dir: str, stale_after_s: float, repeat_s: float = REPEAT_S,
                 empty_after_s: float = EMPTY_AFTER_S):
        self.segment_dir, self.stale_after_s = segment_dir, stale_after_s
        self.repeat_s, self.empty_after_s = repeat_s, empty_after_s
        self._state: str | None = None
        self._since = 0.0
        self._warned_at: float | None = None  # the last warning about the current state
        self._warned = False  # a warning since segments were last read

    def observe(self, seen: SegmentsSeen) -> tuple[int, str] | None:
        """(log level, message) to log for this window, or None."""
        state = "missing" if not seen.dir_exists else "empty" if seen.total == 0 else "stale" if not seen.fresh \
            else "ok"
        if state != self._state:
            self._state, self._since, self._warned_at = state, seen.at, None
            if state == "ok" and self._warned:
                self._warned = False
                return logging.INFO, f"reading segments in {self.segment_dir} again: {seen.fresh} fresh"
        if state == "ok" or (state == "empty" and seen.at - self._since < self.empty_after_s):
            return None
        if self._warned_at is not None and seen.at - self._warned_at < self.repeat_s:
            return None
        self._warned_at, self._warned = seen.at, True
        problem = _segments_problem(seen, self.segment_dir, self.stale_after_s)
        if state == "empty":
            problem = (f"no segment in {self.segment_dir} after {seen.at - self._since:.0f} s (is vLLM running with "
                       f"moe-monitor installed and MOE_MONITOR_SEGMENT_DIR={self.segment_dir}?)")
        return logging.WARNING, f"{problem}; /readyz answers 503 (logged every {self.repeat_s:.0f} s while this lasts)"
