"""The sidecar's core loop: at every window boundary read all segments, fold them, close the window,
compute its statistics, and build the whole exposition once (plain and gzipped). Scrapes serve those bytes.

A segment that cannot be read never stops the loop: it shows up in the health metrics instead.
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

from moe_monitor.breakdown.latest import Capture, LatestBreakdown
from moe_monitor.capture.capturer import CaptureConfig, Capturer
from moe_monitor.capture.catalog import Catalog, Retention
from moe_monitor.detect.detector import Detector
from moe_monitor.detect.signals import signals_of
from moe_monitor.channel import SegmentError, list_segments, read_segment
from moe_monitor.stats.imbalance import layer_stats
from moe_monitor.stats.placement import Placement, PlacementError, contiguous, load_placement

from . import metrics as m
from .aggregate import Aggregator, Totals
from .config import SidecarConfig
from .exposition import Family, render
from .windows import Window, Windower, next_boundary

log = logging.getLogger(__name__)
TIER_ORDER = ("t0", "t1", "t2")


class SegmentSource:
    """Reads every segment of a directory and folds them into monotonic totals."""

    def __init__(self, segment_dir: str, max_payload: int | None = None):
        self.segment_dir = segment_dir
        self.max_payload = max_payload
        self.aggregator = Aggregator()
        self.read_errors: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()

    def read(self) -> tuple[list[m.SegmentStatus], Totals]:
        statuses = []
        kwargs = {"max_payload": self.max_payload} if self.max_payload else {}
        for path in list_segments(self.segment_dir):
            # the label must be valid UTF-8 even for a file name that is not (shown with U+FFFD)
            name = os.path.basename(path).removesuffix(".moeseg").encode("utf-8", "surrogateescape").decode(
                "utf-8", "replace")
            try:
                statuses.append(m.SegmentStatus(name, read_segment(path, **kwargs), None))
                self._logged = {x for x in self._logged if x[0] != path}
            except FileNotFoundError:
                continue  # removed between listing and reading
            except SegmentError as e:
                self.read_errors[e.kind] += 1
                statuses.append(m.SegmentStatus(name, None, e.kind))
                if (path, e.kind) not in self._logged:  # once per path and kind, not every window
                    self._logged.add((path, e.kind))
                    log.warning("cannot read segment %s (%s): %s", path, e.kind, e)
        counted = self.aggregator.update({s.name: s.snapshot for s in statuses if s.snapshot is not None})
        for s in statuses:
            s.counted = counted.get(s.name, False)
        return statuses, self.aggregator.totals()


@dataclass(frozen=True)
class Exposition:
    body: bytes
    gzipped: bytes
    built_at: float


class Exporter:
    def __init__(self, config: SidecarConfig, clock=time.time, process_metrics: bool = True):
        self.config = config
        self.source = SegmentSource(config.segment_dir, config.max_segment_bytes)
        self.windower = Windower(config.window_s)
        self.load_histogram = m.LoadHistogram()
        self._clock = clock
        self._placement_file = load_placement(config.placement_file) if config.placement_file else None
        self.window: Window | None = None
        self._stats = None
        self._process = CollectorRegistry(auto_describe=False)  # the sidecar's own CPU, memory, fds
        if process_metrics:
            ProcessCollector(namespace="moe_monitor", registry=self._process)
        self._lock = threading.Lock()
        self._exposition: Exposition | None = None
        self.detector = Detector(config.detector)
        self.capturer = self.catalog = None
        if config.vllm_url and config.profile_dir:
            self.catalog = Catalog(config.capture_dir, Retention(config.max_captures, config.max_capture_bytes,
                                                                 config.max_capture_age_s))
            self.capturer = Capturer(CaptureConfig(config.vllm_url, config.profile_dir, config.vllm_api_key,
                                                   config.capture_iterations, config.capture_timeout_s,
                                                   run_s=config.capture_run_s),
                                     self.catalog, expected_ranks=self._expected_ranks, clock=clock)
            self.captures = CatalogLatest(self.catalog)
        else:
            self.captures = LatestBreakdown(config.profile_dir, clock=clock) if config.profile_dir else None
        self._ranks = 1
        self._stop = threading.Event()

    # -- the loop ---------------------------------------------------------------------------------
    def tick(self, boundary: float | None = None) -> Exposition:
        """Read, close the window ending at `boundary` (None: just refresh), render. Returns the exposition."""
        start = time.perf_counter()
        statuses, totals = self.source.read()
        now = self._clock()
        if boundary is not None:
            window = self.windower.close(boundary, totals)
            if window is not None:
                self.window = window
                self._stats = layer_stats(window.counts, top_k=self._top_k(statuses),
                                          hot_multiple=self.config.hot_multiple,
                                          min_assignments=self.config.min_window_assignments)
                if self.config.load_histogram:
                    self.load_histogram.observe(window, self._stats)
                self._detect(window, statuses)
        if self.captures is not None:
            self.captures.poll()
        families = self._families(statuses, totals, now)
        kept, series, truncated = apply_budget(families, self.config.max_series)
        kept += self._self_metrics(series, truncated, time.perf_counter() - start)
        body = render(kept) + generate_latest(self._process)
        exposition = Exposition(body, gzip.compress(body, compresslevel=1), now)
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
        except Exception:  # noqa: BLE001 - keep serving the last exposition, try again next window
            log.exception("building the exposition failed; serving the previous one")
            return False

    def run_forever(self) -> None:
        while not self._stop.is_set():
            boundary = next_boundary(self._clock(), self.config.window_s)
            if self._stop.wait(max(0.0, boundary - self._clock())):
                return
            self.safe_tick(boundary)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="moe-monitor-windows", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    # -- detection and captures -------------------------------------------------------------------
    def _expected_ranks(self) -> int:
        return self._ranks

    def _detect(self, window: Window, statuses) -> None:
        self._ranks = max(1, sum(1 for s in statuses if s.snapshot is not None))
        capturer = self.capturer
        if capturer is not None and (capturer.busy or (capturer.last_end or 0) > window.start):
            return  # the profiler slows the steps it records: those windows are neither evidence nor baseline
        decision = self.detector.observe(signals_of(window, self._stats))
        if decision is None:
            return
        if capturer is None:
            log.warning("regression detected (captures not configured): %s", decision.evidence())
            self.detector.record_capture(window.end)  # cooldown and budget also pace the log
        elif capturer.trigger(decision.reason, decision.evidence(), self._context(window)) is not None:
            log.warning("regression detected, capturing: %s", decision.evidence())
            self.detector.record_capture(window.end)

    def _context(self, window: Window | None) -> dict:
        ctx = {"vllm_url": self.config.vllm_url}
        if window is not None and self._stats is not None:
            ctx["window"] = {"start": window.start, "end": window.end,
                             "layers": [int(x) for x in window.layer_ids],
                             "imbalance_ratio": [None if np.isnan(x) else float(x) for x in self._stats.imbalance_ratio],
                             "top1_share": [None if np.isnan(x) else float(x) for x in self._stats.top1_share],
                             "routed_tokens": [int(x) for x in self._stats.tokens]}
        return ctx

    def trigger_manual(self, reason: str) -> tuple[int, dict]:
        """(HTTP status, body) of a manual capture request; manual captures obey the same budget."""
        now = self._clock()
        if self.capturer is None:
            return 503, {"error": "captures are not configured: start the sidecar with --vllm-url and --profile-dir"}
        if not self.detector.allow_manual(now):
            return 429, {"error": "capture budget exhausted (--max-captures-per-hour)"}
        capture_id = self.capturer.trigger("manual", {"reason": "manual", "note": reason}, self._context(self.window))
        if capture_id is None:
            return 409, {"error": "a capture is already running"}
        self.detector.record_capture(now)
        return 202, {"id": capture_id}

    # -- pieces -----------------------------------------------------------------------------------
    def _top_k(self, statuses) -> int:
        counted = [s.snapshot for s in statuses if s.counted]
        return counted[0].header.top_k if counted else 1

    def placement(self, statuses, num_experts: int) -> Placement | None:
        if self._placement_file:
            return self._placement_file
        ranks = max((s.snapshot.header.ranks.ep_size for s in statuses if s.snapshot is not None), default=1)
        try:
            return contiguous(num_experts, ranks)
        except PlacementError:
            return None

    def _families(self, statuses, totals: Totals, now: float) -> list[Family]:
        cfg = self.config
        window, stats = self.window, self._stats
        layers = totals.layer_ids
        placement = None
        if totals.counts is not None:
            placement = self.placement(statuses, totals.counts.shape[1])
        window_rank_load = cumulative_rank_load = None
        if placement is not None:
            try:
                if window is not None:
                    window_rank_load = placement.rank_load(window.counts)
                cumulative_rank_load = placement.rank_load(totals.counts)
            except PlacementError as e:
                log.warning("expert placement does not fit the model (%s): no EP-rank metrics", e)
        families = m.model_info(statuses, totals)
        families += m.layer_t0(window, stats, window_rank_load)
        families += m.model_t0(window, stats, window_rank_load, cfg.window_s)
        families += m.steps_t0(totals)
        if cfg.rank_series and cumulative_rank_load is not None:
            families += m.rank_t1(layers, cumulative_rank_load)
        if cfg.load_histogram:
            families += m.load_histogram_t1(self.load_histogram)
        if cfg.expert_series == "all":
            families += m.routing_t2_all(totals)
        elif cfg.expert_series == "top":
            families += m.routing_t2_top(window, cfg.top_experts)
        if self.captures is not None:
            families += m.capture_t0(self.captures)
        families += m.detector_t0(self.detector, self._clock())
        if self.capturer is not None:
            families += m.capturer_t0(self.capturer, self.catalog)
        families += m.health(statuses, now, cfg.stale_after_s, self.source.read_errors,
                             self.source.aggregator.restarts)
        return families

    def _self_metrics(self, series: dict[str, int], truncated: bool, seconds: float) -> list[Family]:
        s = Family("moe_monitor_series", "gauge", "Series in this exposition by tier (before the budget cut).")
        for tier in TIER_ORDER:
            s.add(series.get(tier, 0), [("tier", tier)])
        t = Family("moe_monitor_series_truncated", "gauge", "1 when the series budget (--max-series) dropped "
                   "T2 and then T1 families from this exposition.")
        t.add(1 if truncated else 0)
        d = Family("moe_monitor_build_duration_seconds", "gauge", "Time the last exposition took to build "
                   "(read segments, fold, statistics, render).")
        d.add(seconds)
        return [s, t, d]


def apply_budget(families: list[Family], max_series: int) -> tuple[list[Family], dict[str, int], bool]:
    """Drop whole tiers, T2 first then T1, until the series fit the budget. T0 is never dropped."""
    series = Counter()
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


class CatalogLatest:
    """The newest catalogued capture with a breakdown, in LatestBreakdown's shape (for capture_t0)."""

    def __init__(self, catalog: Catalog):
        self.catalog, self.errors = catalog, 0
        self.capture: Capture | None = None
        self.result: dict | None = None

    def poll(self, background: bool = True) -> None:
        import json

        for meta in self.catalog.list():
            path = self.catalog.file_path(meta["id"], "breakdown.json")
            if path is None:
                continue
            if self.capture is None or self.capture.prefix != meta["id"]:
                self.result = None
                try:
                    with open(path, "rb") as f:
                        result = json.load(f)
                    if not valid_breakdown(result):
                        raise ValueError("not a breakdown (categories, ranks, idle_us, moe_blocks)")
                    self.result = result
                except (OSError, ValueError) as e:  # a damaged capture: counted, not retried, nothing exported
                    self.errors += 1
                    log.warning("capture %s: cannot use its breakdown.json: %s", meta["id"], e)
                try:
                    self.capture = Capture(meta["id"], tuple(f["name"] for f in meta["files"]),
                                           float(meta["created"]))
                except (KeyError, TypeError, ValueError) as e:
                    self.errors, self.result = self.errors + 1, None
                    self.capture = Capture(meta["id"], (), 0.0)
                    log.warning("capture %s: damaged metadata: %r", meta["id"], e)
            return


def valid_breakdown(result) -> bool:
    """The shape capture_t0 reads (what breakdown.analyze writes)."""
    try:
        return (all(isinstance(row["us"], (int, float)) and isinstance(row["share"], (int, float))
                    for row in result["categories"].values())
                and isinstance(result["ranks"], list) and isinstance(result["idle_us"], (int, float))
                and isinstance(result["moe_blocks"]["count"], int)
                and (result["moe_blocks"]["count"] == 0
                     or all(isinstance(result["moe_blocks"][k], (int, float))
                            for k in ("preamble_us", "first_expert_us"))))
    except (KeyError, TypeError, AttributeError):
        return False
