"""Prometheus collector: each scrape reads every segment, folds them, and yields fresh metric families.

Reading on scrape (as node_exporter does) keeps /metrics exactly as fresh as the segments; a segment that
cannot be read never fails the scrape: it shows up in the health metrics instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from moe_monitor import __version__
from moe_monitor.channel import LAYER_UNOBSERVABLE, PHASES, SegmentError, Snapshot, list_segments, read_segment

from .aggregate import Aggregator, Totals

log = logging.getLogger(__name__)


@dataclass
class SegmentStatus:
    name: str
    snapshot: Snapshot | None
    error: str | None  # SegmentError.kind of the last read, None when it read fine
    counted: bool = False


class MoECollector(Collector):
    def __init__(self, segment_dir: str, stale_after_s: float = 30.0, max_payload: int | None = None,
                 clock=time.time):
        self.segment_dir = segment_dir
        self.stale_after_s = stale_after_s
        self.max_payload = max_payload
        self._clock = clock
        self._aggregator = Aggregator()
        self._read_errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._logged: set[tuple[str, str]] = set()

    def read(self) -> tuple[list[SegmentStatus], Totals]:
        statuses = []
        for path in list_segments(self.segment_dir):
            name = os.path.basename(path).removesuffix(".moeseg")
            kwargs = {"max_payload": self.max_payload} if self.max_payload else {}
            try:
                statuses.append(SegmentStatus(name, read_segment(path, **kwargs), None))
                self._logged = {x for x in self._logged if x[0] != path}
            except FileNotFoundError:
                continue  # removed between listing and reading
            except SegmentError as e:
                self._read_errors[e.kind] += 1
                statuses.append(SegmentStatus(name, None, e.kind))
                if (path, e.kind) not in self._logged:  # once per path and kind, not every scrape
                    self._logged.add((path, e.kind))
                    log.warning("cannot read segment %s (%s): %s", path, e.kind, e)
        counted = self._aggregator.update({s.name: s.snapshot for s in statuses if s.snapshot is not None})
        for s in statuses:
            s.counted = counted.get(s.name, False)
        return statuses, self._aggregator.totals()

    def collect(self):
        start = time.perf_counter()
        with self._lock:
            statuses, totals = self.read()
            now = self._clock()
            yield from self._routing(statuses, totals)
            yield from self._steps(totals)
            yield from self._health(statuses, now)
        yield _gauge("moe_monitor_collect_duration_seconds", "Time this scrape spent reading and folding "
                     "segments.", value=time.perf_counter() - start)

    def _routing(self, statuses: list[SegmentStatus], totals: Totals):
        tokens = CounterMetricFamily("moe_expert_routed_tokens", "Tokens routed to a logical expert: one per "
                                     "token per top-k slot, computed tokens only (prefix-cache hits are not "
                                     "routed). Summed over DP ranks, TP duplicates counted once.",
                                     labels=["layer", "expert"])
        for layer in sorted(totals.counts):
            for expert, value in enumerate(totals.counts[layer]):
                tokens.add_metric([str(layer), str(expert)], int(value))
        yield tokens

        counted = [s.snapshot for s in statuses if s.counted]
        observable = GaugeMetricFamily("moe_layer_observable", "1 when moe-monitor sees this MoE layer's "
                                       "routing; 0 when a fused kernel routes internally and its counts "
                                       "stay zero.", labels=["layer"])
        unobservable = set()
        for snap in counted:
            for layer, flags in zip(snap.layer_ids, snap.layer_flags):
                observable.add_metric([str(layer)], 0 if flags & LAYER_UNOBSERVABLE else 1)
                if flags & LAYER_UNOBSERVABLE:
                    unobservable.add(int(layer))
        yield observable
        yield _gauge("moe_monitor_unobservable_layers", "MoE layers whose routing moe-monitor cannot see.",
                     value=len(unobservable))
        if counted:
            h = counted[0].header
            info = GaugeMetricFamily("moe_model_info", "The served MoE model, as the plugin saw it.",
                                     labels=["model", "moe_layers", "experts", "top_k"])
            info.add_metric([h.model, str(len(totals.counts)), str(h.shape.num_experts), str(h.top_k)], 1)
            yield info

    def _steps(self, totals: Totals):
        hist = HistogramMetricFamily("moe_step_duration_seconds", "Engine step wall time in the worker "
                                     "(execute_model to sampled tokens), by phase and tokens-per-step bucket "
                                     "(tokens_le: upper bound).", labels=["phase", "tokens_le"], unit="")
        step_tokens = CounterMetricFamily("moe_step_tokens", "Tokens computed in engine steps, by phase.",
                                          labels=["phase"])
        if totals.step_hist is not None:
            dbounds = [floatToGoString(b) for b in totals.duration_bounds]
            for p, phase in enumerate(PHASES):
                for t, tbound in enumerate(totals.token_bounds):
                    row = totals.step_hist[p, t]
                    if not row.any():
                        continue
                    cumulative = np.cumsum(row)
                    hist.add_metric([phase, _tokens_le(tbound)], list(zip(dbounds, (int(c) for c in cumulative))),
                                    float(totals.step_seconds[p, t]))
                step_tokens.add_metric([phase], int(totals.step_tokens[p].sum()))
        yield hist
        yield step_tokens

    def _health(self, statuses: list[SegmentStatus], now: float):
        up = GaugeMetricFamily("moe_monitor_segment_up", "1 when the rank's segment was read and is fresh.",
                               labels=["segment"])
        age = GaugeMetricFamily("moe_monitor_snapshot_age_seconds", "Seconds since the rank last published.",
                                labels=["segment"])
        info = GaugeMetricFamily("moe_monitor_rank_info", "Ranks of each segment; counted=false marks a TP "
                                 "duplicate whose identical routing is not added again.",
                                 labels=["segment", "model", "dp_rank", "pp_rank", "tp_rank", "ep_rank",
                                         "counted"])
        publish_errors = CounterMetricFamily("moe_monitor_plugin_publish_errors", "Snapshots the plugin failed "
                                             "to publish (as reported by its next successful one).",
                                             labels=["segment"])
        states = Counter({"fresh": 0, "stale": 0, "unreadable": 0})
        for s in statuses:
            if s.snapshot is None:
                states["unreadable"] += 1
                up.add_metric([s.name], 0)
                continue
            h = s.snapshot.header
            seconds = max(0.0, now - h.updated_unix_ns / 1e9)
            fresh = seconds <= self.stale_after_s
            states["fresh" if fresh else "stale"] += 1
            up.add_metric([s.name], 1 if fresh else 0)
            age.add_metric([s.name], seconds)
            r = h.ranks
            info.add_metric([s.name, h.model, str(r.dp_rank), str(r.pp_rank), str(r.tp_rank), str(r.ep_rank),
                             "true" if s.counted else "false"], 1)
            publish_errors.add_metric([s.name], h.publish_errors)
        ranks = GaugeMetricFamily("moe_monitor_segments", "Segments in the directory by state.",
                                  labels=["state"])
        for state, n in sorted(states.items()):
            ranks.add_metric([state], n)
        errors = CounterMetricFamily("moe_monitor_segment_read_errors", "Failed segment reads by kind "
                                     "(io, truncated, magic, version, corrupt, oversized, torn).",
                                     labels=["kind"])
        for kind in ("io", "truncated", "magic", "version", "corrupt", "oversized", "torn"):
            errors.add_metric([kind], self._read_errors[kind])
        yield from (up, age, info, publish_errors, ranks, errors)
        yield CounterMetricFamily("moe_monitor_rank_restarts", "vLLM rank restarts seen (new segment "
                                  "generation); counts before a restart are carried, not lost.",
                                  value=self._aggregator.restarts)
        build = GaugeMetricFamily("moe_monitor_build_info", "moe-monitor version.", labels=["version"])
        build.add_metric([__version__], 1)
        yield build


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _tokens_le(bound) -> str:
    return "+Inf" if int(bound) == np.iinfo(np.int64).max else str(int(bound))
