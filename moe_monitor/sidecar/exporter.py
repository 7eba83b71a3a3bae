"""The sidecar's window loop: at every window boundary build one `Reading` (segments, totals, the closed window
and its statistics, detection), run the collectors over it and render the exposition once (plain and gzipped).
Scrapes serve those bytes; the HTTP thread never runs any of this.

Each stage is guarded: a stage that fails is counted in `moe_monitor_window_errors_total{stage}` and logged,
the previous figures stay served, and the loop goes on at the next boundary.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from moe_monitor.breakdown.latest import CatalogLatest, LatestBreakdown
from moe_monitor.capture.capturer import CaptureConfig, Capturer
from moe_monitor.capture.catalog import Catalog, Retention
from moe_monitor.capture.control import CaptureControl
from moe_monitor.detect.detector import Detector
from moe_monitor.stats.imbalance import LayerStats, layer_stats
from moe_monitor.stats.placement import Placement, PlacementError, RankLoadLedger, contiguous, load_placement

from .collectors import ALL, Collector, Runner
from .config import SidecarConfig
from .exposition import Family, render
from .flight import FlightRecorder
from .once import OncePerCause
from .readiness import SegmentDirLog, SegmentsSeen, readiness
from .reading import DetectorView, Reading
from .segments import SegmentSource
from .vocabulary import family
from .windows import LoadHistogram, Window, Windower, next_boundary

log = logging.getLogger(__name__)
TIER_ORDER = ("t0", "t1", "t2")
STAGES = ("read", "window", "detect", "breakdown", "render")


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


class Exporter:
    def __init__(self, config: SidecarConfig, clock=time.time, process_metrics: bool = True,
                 collectors: tuple[Collector, ...] = ALL):
        self.config, self._clock = config, clock
        self.source = SegmentSource(config.segment_dir, config.max_segment_bytes, config.stale_after_s)
        self.seen: SegmentsSeen | None = None  # what the last window's read found (/readyz, the log)
        self._dir_log = SegmentDirLog(config.segment_dir, config.stale_after_s)
        self.windower = Windower(config.window_s)
        self.load_histogram = LoadHistogram()
        self._placement_file = load_placement(config.placement_file) if config.placement_file else None
        self.runner = Runner(collectors)
        self.errors: Counter[str] = Counter()
        self._logged = OncePerCause()
        self._process = CollectorRegistry(auto_describe=False)  # the sidecar's own CPU, memory, fds
        if process_metrics:
            ProcessCollector(namespace="moe_monitor", registry=self._process)
        self.detector = Detector(config.detector)
        self.capturer: Capturer | None = None
        self.catalog: Catalog | None = None
        self.captures: CatalogLatest | LatestBreakdown | None
        if config.captures_enabled and config.vllm_url and config.profile_dir:  # (the first says the others)
            self.catalog = Catalog(config.capture_dir, Retention(config.max_captures, config.max_capture_bytes,
                                                                 config.max_capture_age_s))
            self.capturer = Capturer(CaptureConfig(vllm_url=config.vllm_url, profile_dir=config.profile_dir,
                                                   api_key=config.vllm_api_key, iterations=config.capture_iterations,
                                                   timeout_s=config.capture_timeout_s, run_s=config.capture_run_s),
                                     self.catalog, expected_ranks=lambda: self.control.ranks, clock=clock)
            self.captures = CatalogLatest(self.catalog)
        else:
            self.captures = LatestBreakdown(config.profile_dir, clock=clock) if config.profile_dir else None
        self.control: CaptureControl = CaptureControl(self.detector, self.capturer, config.vllm_url, clock)
        self.flight = FlightRecorder(config.flight_windows, config.flight_max_bytes)
        self.control.flight = self._flight_file if self.flight.enabled else None
        self.model = ""
        self.window: Window | None = None
        self._stats: LayerStats | None = None
        self._window_load = None
        self._placement_warning: str | None = None
        self._ledger = RankLoadLedger()  # cumulative EP-rank load, attributed under the placement of its time
        self._cumulative_load = None  # the ledger's load after this tick's read; None when there is no placement
        self._at_close: tuple[int, np.ndarray] | None = None  # (ledger resets, load) at the last window boundary
        self._lock = threading.Lock()
        self._exposition: Exposition | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.http_refusals: dict[str, int] = {}  # the HTTP edge's refusals by reason (server.build_app sets it)

    # -- the loop ---------------------------------------------------------------------------------
    def tick(self, boundary: float | None = None) -> Exposition:
        """Read, close the window ending at `boundary` (None: just refresh), render. Returns the exposition.
        Raises only when reading the segments or rendering fails (the caller keeps the previous one)."""
        start = time.perf_counter()
        statuses, totals = self._stage("read", self.source.read, self._clock(), required=True)
        now = self._clock()
        self.seen = SegmentsSeen.of(statuses, now, os.path.isdir(self.config.segment_dir), self.config.stale_after_s)
        said = self._dir_log.observe(self.seen)
        if said is not None:
            log.log(*said)
        self._cumulative_load = self._stage("window", self._attribute, statuses, totals)
        if boundary is not None:
            self._stage("window", self._close_window, boundary, statuses, totals)
        if self.captures is not None:
            self._stage("breakdown", self.captures.poll)
        reading = self._reading(statuses, totals, now)
        exposition = self._stage("render", self._render, reading, start, required=True)
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
        except Exception:  # noqa: BLE001 - logged by _stage; keep serving the last exposition
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

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /readyz: the window loop runs and fresh segments are there (readiness.py)."""
        exposition, cfg = self.latest(), self.config
        return readiness(self._clock(), self.seen, exposition.built_at if exposition else None,
                         self._thread is not None and self._thread.is_alive(), cfg.window_s, cfg.stale_after_s,
                         cfg.segment_dir)

    def stop(self) -> None:
        self._stop.set()

    def trigger_manual(self, reason: str) -> tuple[int, dict]:
        return self.control.manual(reason)

    # -- stages -----------------------------------------------------------------------------------
    def _stage(self, name: str, fn, *args, required: bool = False):
        try:
            result = fn(*args)
        except Exception as e:
            self.errors[name] += 1
            if self._logged.first(name, type(e).__name__):  # counted every window, logged once per cause
                log.exception("window stage %r failed; the previous figures stay served (counted in "
                              "moe_monitor_window_errors_total, logged again only for another error)", name)
            if required:
                raise
            return None
        self._logged.recovered(name)
        return result

    def _close_window(self, boundary: float, statuses, totals) -> None:
        window = self.windower.close(boundary, totals)
        if window is None:
            return
        stats = layer_stats(window.counts, top_k=self._top_k(statuses), hot_multiple=self.config.hot_multiple,
                            min_assignments=self.config.min_window_assignments)
        self.window, self._stats = window, stats
        if self.config.load_histogram:
            self.load_histogram.observe(window, stats.imbalance_ratio)
        counted = [s.snapshot for s in statuses if s.counted]
        self.model = counted[0].header.model if counted else self.model
        self._window_load = self._window_rank_load(statuses, window)  # once per window: the flight record and
        if self.flight.enabled:  # every reading until the next window use it
            self.flight.record(window, self._window_load)
        ranks = sum(1 for s in statuses if s.snapshot is not None and not s.ignored)
        self._stage("detect", self.control.observe, window, stats, ranks)

    def _reading(self, statuses, totals, now: float) -> Reading:
        window_load, cumulative_load = (None, None) if self._cumulative_load is None else (
            self._window_load, self._cumulative_load)
        d = self.detector
        return Reading(now, self.config, tuple(statuses), totals, dict(self.source.read_errors),
                       self.source.aggregator.restarts, self.window, self._stats, window_load, cumulative_load,
                       self.load_histogram.copy(), DetectorView(d.state(now), dict(d.baselines), dict(d.currents)),
                       self.captures, self.capturer, self.catalog)

    def _render(self, reading: Reading, start: float) -> Exposition:
        families, collector_health = self.runner.run(reading)
        kept, series, truncated = apply_budget(families, self.config.max_series)
        kept += collector_health + self._self_metrics(series, truncated, time.perf_counter() - start)
        body = render(kept) + generate_latest(self._process)
        return Exposition(body, reading.now)

    # -- pieces -----------------------------------------------------------------------------------
    def _top_k(self, statuses) -> int:
        counted = [s.snapshot for s in statuses if s.counted]
        return counted[0].header.top_k if counted else 1

    def placement(self, statuses, num_experts: int) -> Placement | None:
        """The live placement the ranks publish (vLLM's EPLB), else --placement, else vLLM's contiguous one. None
        when none fits, or when the placement a rank publishes was refused (it does not fit its header): the
        sidecar does not split the counts under a placement it knows to be other than the one in force."""
        ranks = max((s.snapshot.header.ranks.ep_size for s in statuses if s.counted), default=1)
        live = next((s.snapshot for s in statuses if s.counted and s.snapshot.physical_to_logical is not None), None)
        if live is not None:  # checked against its own header's ep_size when it was read
            return Placement(live.header.ranks.ep_size, live.physical_to_logical.astype(np.int64))
        if any(r.section == "physical_to_logical" for s in statuses if s.counted for r in s.snapshot.refused):
            return None
        if self._placement_file:
            return self._placement_file
        try:
            return contiguous(num_experts, ranks)
        except PlacementError:
            return None

    def _window_rank_load(self, statuses, window):
        """The window's EP-rank load: the ledger's growth since the previous boundary (each tick's new counts
        under the placement in force at that tick), or, right after the ledger started afresh, the window's
        counts under the current placement."""
        cumulative, previous = self._cumulative_load, self._at_close
        self._at_close = None if cumulative is None else (self._ledger.resets, cumulative)
        if cumulative is not None and previous is not None and previous[0] == self._ledger.resets \
                and previous[1].shape == cumulative.shape:
            return cumulative - previous[1]
        try:
            placement = self.placement(statuses, window.counts.shape[1])
            return placement.rank_load(window.counts) if placement is not None else None
        except PlacementError:
            return None  # logged once by _attribute

    def _flight_file(self, trigger: float):
        """The flight record a capture stores: the windows are taken now (on the window thread, when the capture
        starts), gzipped later on the capture's thread (0.14 s at 61 x 256 x 120 windows)."""
        return self.flight.snapshot(model=self.model, trigger=trigger).gzipped

    def flight_json(self, last: int | None = None, since: float | None = None, gzipped: bool = False) -> bytes:
        return self.flight.body(self.model, last, since, gzipped)

    def _attribute(self, statuses, totals):
        """Attribute the counts that arrived since the last tick to EP ranks: as the plugin attributed them where
        every counted segment publishes its EP-rank load (exact EPLB epochs), else under the current placement. The
        cumulative load (RankLoadLedger: it never goes down, whichever source a tick has), or None when there is
        neither (logged once per cause)."""
        if totals.counts is None:
            return None
        published = totals.rank_load
        if published is not None and not (np.isfinite(published).all() and (published >= 0).all()):
            self._warn_placement("a segment's published EP-rank load is negative or not finite; the sidecar splits "
                                 "the counts under the published placement itself")
            published = None
        placement = self.placement(statuses, totals.counts.shape[1])
        if placement is None and published is None:
            return None
        try:
            return self._ledger.update(totals.counts, placement, published)
        except PlacementError as e:
            self._warn_placement(f"expert placement does not fit the model ({e}): no EP-rank metrics")
            return None

    def _warn_placement(self, message: str) -> None:
        if self._placement_warning != message:  # once per cause, not every window
            log.warning("%s", message)
        self._placement_warning = message

    def _self_metrics(self, series: dict[str, int], truncated: bool, seconds: float) -> list[Family]:
        errors = family("moe_monitor_window_errors_total")
        for stage in STAGES:
            errors.add(self.errors[stage], [("stage", stage)])
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
