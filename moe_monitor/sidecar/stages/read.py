"""Stage `read`: every segment read once (segments.py), what was found noted for /readyz and the log."""

from __future__ import annotations

import logging
import os

from ..config import SidecarConfig
from ..readiness import SegmentDirLog, SegmentsSeen
from ..reading import Reading, frozen
from ..segments import SegmentSource
from .base import Tick

log = logging.getLogger(__name__)


class Read:
    name = errors_as = "read"
    required = True

    def __init__(self, config: SidecarConfig, source: SegmentSource, clock):
        self.config, self.source, self._clock = config, source, clock
        self._dir_log = SegmentDirLog(config.segment_dir, config.stale_after_s)
        self.seen: SegmentsSeen | None = None  # what the last pass found (/readyz)

    def run(self, tick: Tick) -> Reading:
        cfg = self.config
        statuses, totals = self.source.read(self._clock())
        now = self._clock()
        self.seen = SegmentsSeen.of(statuses, now, os.path.isdir(cfg.segment_dir), cfg.stale_after_s)
        said = self._dir_log.observe(self.seen)
        if said is not None:
            log.log(*said)
        return Reading(now, cfg, tuple(statuses), totals, frozen(self.source.read_errors),
                       self.source.aggregator.restarts, boundary=tick.boundary, seen=self.seen)

    def fallback(self, tick: Tick) -> Reading:
        raise AssertionError("a required stage has no fallback")
