"""Metric families of one exposition, by tier. Pure: readings and statistics in, Family objects out.
Every name, label and formula here is documented in docs/metrics.md."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np
from prometheus_client.utils import floatToGoString

from moe_monitor import __version__
from moe_monitor.channel import LAYER_UNOBSERVABLE, PHASES, Snapshot
from moe_monitor.stats.imbalance import LayerStats, rank_imbalance, sglang_balancedness, vllm_balancedness

from .aggregate import Totals
from .exposition import DenseLabels, Family
from .windows import Window

LOAD_RATIO_BUCKETS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, float("inf"))
READ_ERROR_KINDS = ("io", "truncated", "magic", "version", "corrupt", "oversized", "torn")
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class SegmentStatus:
    name: str
    snapshot: Snapshot | None
    error: str | None  # SegmentError.kind of the last read, None when it read fine
    counted: bool = False


@dataclass
class LoadHistogram:
    """Cumulative per-layer histogram of expert load / mean load, one observation per expert per window."""

    layer_ids: tuple[int, ...] = ()
    buckets: np.ndarray | None = None  # [L, B] non-cumulative
    sums: np.ndarray | None = None  # [L]

    def observe(self, window: Window, stats: LayerStats) -> None:
        layers = tuple(int(x) for x in window.layer_ids)
        if layers != self.layer_ids:
            self.layer_ids = layers
            self.buckets = np.zeros((len(layers), len(LOAD_RATIO_BUCKETS)), dtype=np.int64)
            self.sums = np.zeros(len(layers))
        ok = ~np.isnan(stats.imbalance_ratio)  # tiny windows are not observed (see stats.imbalance)
        if not ok.any():
            return
        c = window.counts[ok].astype(np.float64)
        ratio = c / (c.sum(axis=1, keepdims=True) / c.shape[1])
        idx = np.searchsorted(np.asarray(LOAD_RATIO_BUCKETS), ratio, side="left")
        rows = np.repeat(np.flatnonzero(ok), c.shape[1])
        np.add.at(self.buckets, (rows, idx.reshape(-1)), 1)
        self.sums[ok] += ratio.sum(axis=1)


_DENSE = DenseLabels()  # label strings of dense families: rendered once per shape, reused every window


def _layers(layer_ids) -> tuple[str, ...]:
    return _layer_strings(tuple(int(x) for x in layer_ids))


@functools.lru_cache(maxsize=64)
def _layer_strings(layer_ids: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(map(str, layer_ids))


def _layer_family(name: str, help_text: str, layer_ids, values, kind: str = "gauge") -> Family:
    f = Family(name, kind, help_text)
    f.add_dense(_DENSE.get(name, ("layer",), (_layers(layer_ids),)), np.asarray(values))
    return f


def routing_t2_all(totals: Totals) -> list[Family]:
    f = Family("moe_expert_routed_tokens_total", "counter", "Tokens routed to a logical expert (one per token "
               "per top-k slot; computed tokens only). Summed over DP ranks, TP duplicates counted once.", tier="t2")
    if totals.counts is not None:
        experts = tuple(map(str, range(totals.counts.shape[1])))
        f.add_dense(_DENSE.get(f.name, ("layer", "expert"), (_layers(totals.layer_ids), experts)), totals.counts)
    return [f]


def routing_t2_top(window: Window | None, k: int) -> list[Family]:
    ids = Family("moe_layer_top_expert_id", "gauge", "Logical id of the expert at this load rank (1 = most "
                 "loaded) in the last closed window; the rank label is stable, the expert id is the value.",
                 tier="t2")
    share = Family("moe_layer_top_expert_share", "gauge", "Share of the layer's window load on the expert at "
                   "this load rank.", tier="t2")
    if window is not None:
        k = min(k, window.counts.shape[1])
        order = np.argsort(-window.counts, axis=1, kind="stable")[:, :k]
        totals = window.counts.sum(axis=1)
        for row, layer in enumerate(window.layer_ids):
            if totals[row] == 0:
                continue
            for rank, expert in enumerate(order[row], start=1):
                ids.add(int(expert), [("layer", int(layer)), ("rank", rank)])
                share.add(float(window.counts[row, expert] / totals[row]), [("layer", int(layer)), ("rank", rank)])
    return [ids, share]


def layer_t0(window: Window | None, stats: LayerStats | None, rank_load: np.ndarray | None) -> list[Family]:
    if window is None or stats is None:
        return []
    ids = window.layer_ids
    out = [
        _layer_family("moe_layer_window_routed_tokens", "Assignments routed in the last closed window.", ids,
                      stats.tokens.astype(np.int64)),
        _layer_family("moe_layer_imbalance_ratio", "max / mean expert load in the last closed window (1 = "
                      "balanced). NaN when the window had too few assignments.", ids, stats.imbalance_ratio),
        _layer_family("moe_layer_balancedness", "mean / max expert load in the last closed window (1 = "
                      "balanced).", ids, stats.balancedness),
        _layer_family("moe_layer_load_cv", "Coefficient of variation (population std / mean) of expert load.",
                      ids, stats.cv),
        _layer_family("moe_layer_load_entropy", "Shannon entropy of the expert-load distribution / log(experts) "
                      "(1 = uniform).", ids, stats.entropy),
        _layer_family("moe_layer_top1_share", "Share of the window's assignments on the most loaded expert.",
                      ids, stats.top1_share),
        _layer_family("moe_layer_topk_share", "Share of the window's assignments on the top_k most loaded "
                      "experts (top_k of the model's routing).", ids, stats.topk_share),
        _layer_family("moe_layer_dead_experts", "Experts with no assignment in the last closed window.", ids,
                      stats.dead_experts),
        _layer_family("moe_layer_hot_experts", "Experts whose window load exceeds the hot multiple of the mean.",
                      ids, stats.hot_experts),
    ]
    if rank_load is not None:
        out.append(_layer_family("moe_layer_ep_rank_imbalance_ratio", "max / mean EP-rank load in the last "
                                 "closed window (1 = balanced ranks).", ids, rank_imbalance(rank_load)))
    return out


def model_t0(window: Window | None, stats: LayerStats | None, rank_load: np.ndarray | None,
             window_s: float) -> list[Family]:
    length = Family("moe_window_length_seconds", "gauge", "Configured window length.")
    length.add(window_s)
    out = [length]
    if window is None or stats is None:
        return out
    end = Family("moe_window_end_timestamp_seconds", "gauge", "End of the last closed window (unix time).")
    end.add(window.end)
    tokens = Family("moe_window_routed_tokens", "gauge", "Assignments routed in the last closed window, all "
                    "layers.")
    tokens.add(int(stats.tokens.sum()))
    out += [end, tokens]
    ratio = stats.imbalance_ratio
    if not np.isnan(ratio).all():
        worst = int(np.nanargmax(ratio))
        f = Family("moe_worst_layer_imbalance_ratio", "gauge", "Largest per-layer imbalance ratio in the last "
                   "closed window; the layer label names it.")
        f.add(float(ratio[worst]), [("layer", int(window.layer_ids[worst]))])
        m = Family("moe_mean_layer_imbalance_ratio", "gauge", "Mean of the per-layer imbalance ratios.")
        m.add(float(np.nanmean(ratio)))
        out += [f, m]
    if rank_load is not None:
        v = Family("moe_eplb_balancedness_vllm", "gauge", "vLLM EPLB's balancedness over EP ranks: sum over "
                   "layers of mean rank load / sum over layers of max rank load.")
        v.add(vllm_balancedness(rank_load))
        s = Family("moe_eplb_balancedness_sglang", "gauge", "SGLang's balancedness over EP ranks: mean over "
                   "layers of (mean + 1e-5) / (max + 1e-5) of the rank loads.")
        s.add(sglang_balancedness(rank_load))
        out += [v, s]
    return out


def rank_t1(layer_ids, cumulative_rank_load: np.ndarray) -> list[Family]:
    f = Family("moe_ep_rank_routed_tokens_total", "counter", "Assignments served by each EP rank (physical "
               "load) under the expert placement; replicated experts split their tokens evenly.", tier="t1")
    ranks = tuple(map(str, range(cumulative_rank_load.shape[1])))
    f.add_dense(_DENSE.get(f.name, ("layer", "ep_rank"), (_layers(layer_ids), ranks)), cumulative_rank_load)
    return [f]


def load_histogram_t1(h: LoadHistogram) -> list[Family]:
    f = Family("moe_expert_load_ratio", "histogram", "Expert load / mean expert load of the layer, one "
               "observation per expert per closed window (the expert-load heatmap).", tier="t1")
    if h.buckets is None:
        return [f]
    les = tuple(floatToGoString(b) for b in LOAD_RATIO_BUCKETS)
    cumulative = np.cumsum(h.buckets, axis=1)
    layers = _layers(h.layer_ids)
    # Grouped by suffix rather than by layer: the text format allows it, and each group is one dense block.
    f.add_dense(_DENSE.get(f.name + "_bucket", ("layer", "le"), (layers, les)), cumulative)
    f.add_dense(_DENSE.get(f.name + "_sum", ("layer",), (layers,)), h.sums)
    f.add_dense(_DENSE.get(f.name + "_count", ("layer",), (layers,)), cumulative[:, -1])
    return [f]


def steps_t0(totals: Totals) -> list[Family]:
    hist = Family("moe_step_duration_seconds", "histogram", "Engine step wall time in the worker (execute_model "
                  "to sampled tokens), by phase and tokens-per-step bucket (tokens_le: upper bound).")
    tokens = Family("moe_step_tokens_total", "counter", "Tokens computed in engine steps, by phase.")
    if totals.step_hist is None:
        return [hist, tokens]
    les = [floatToGoString(b) for b in totals.duration_bounds]
    for p, phase in enumerate(PHASES):
        for t, bound in enumerate(totals.token_bounds):
            row = totals.step_hist[p, t]
            if not row.any():
                continue
            tl = "+Inf" if int(bound) == INT64_MAX else str(int(bound))
            for le, c in zip(les, np.cumsum(row)):
                hist.add(int(c), [("phase", phase), ("tokens_le", tl), ("le", le)], suffix="_bucket")
            hist.add(float(totals.step_seconds[p, t]), [("phase", phase), ("tokens_le", tl)], suffix="_sum")
            hist.add(int(row.sum()), [("phase", phase), ("tokens_le", tl)], suffix="_count")
        tokens.add(int(totals.step_tokens[p].sum()), [("phase", phase)])
    return [hist, tokens]


def model_info(statuses: list[SegmentStatus], totals: Totals) -> list[Family]:
    counted = [s.snapshot for s in statuses if s.counted]
    observable = Family("moe_layer_observable", "gauge", "1 when moe-monitor sees this MoE layer's routing; 0 "
                        "when a fused kernel routes internally and its counts stay zero.")
    unobservable: list[int] = []
    if counted:  # a layer is unobservable if any counted rank cannot see it
        ids = np.concatenate([s.layer_ids for s in counted])
        blind = np.concatenate([(s.layer_flags & LAYER_UNOBSERVABLE) != 0 for s in counted])
        layers, inverse = np.unique(ids, return_inverse=True)
        hidden = np.zeros(len(layers), dtype=bool)
        np.logical_or.at(hidden, inverse, blind)
        observable.add_dense(_DENSE.get(observable.name, ("layer",), (_layers(layers),)), (~hidden).astype(np.int64))
        unobservable = layers[hidden].tolist()
    n = Family("moe_monitor_unobservable_layers", "gauge", "MoE layers whose routing moe-monitor cannot see.")
    n.add(len(unobservable))
    out = [observable, n]
    if counted:
        h = counted[0].header
        info = Family("moe_model_info", "gauge", "The served MoE model, as the plugin saw it.")
        info.add(1, [("model", h.model), ("moe_layers", len(totals.layer_ids)), ("experts", h.shape.num_experts),
                     ("top_k", h.top_k)])
        out.append(info)
    return out


def health(statuses: list[SegmentStatus], now: float, stale_after_s: float, read_errors: Counter,
           restarts: int) -> list[Family]:
    up = Family("moe_monitor_segment_up", "gauge", "1 when the rank's segment was read and is fresh.")
    age = Family("moe_monitor_snapshot_age_seconds", "gauge", "Seconds since the rank last published, at the "
                 "last window boundary.")
    info = Family("moe_monitor_rank_info", "gauge", "Ranks of each segment; counted=false marks a TP duplicate "
                  "whose identical routing is not added again.")
    publish_errors = Family("moe_monitor_plugin_publish_errors_total", "counter", "Snapshots the plugin failed "
                            "to publish (as reported by its next successful one).")
    states = Counter({"fresh": 0, "stale": 0, "unreadable": 0})
    for s in statuses:
        if s.snapshot is None:
            states["unreadable"] += 1
            up.add(0, [("segment", s.name)])
            continue
        h = s.snapshot.header
        seconds = max(0.0, now - h.updated_unix_ns / 1e9)
        fresh = seconds <= stale_after_s
        states["fresh" if fresh else "stale"] += 1
        up.add(1 if fresh else 0, [("segment", s.name)])
        age.add(seconds, [("segment", s.name)])
        r = h.ranks
        info.add(1, [("segment", s.name), ("model", h.model), ("dp_rank", r.dp_rank), ("pp_rank", r.pp_rank),
                     ("tp_rank", r.tp_rank), ("ep_rank", r.ep_rank), ("counted", "true" if s.counted else "false")])
        publish_errors.add(h.publish_errors, [("segment", s.name)])
    segments = Family("moe_monitor_segments", "gauge", "Segments in the directory by state.")
    for state in sorted(states):
        segments.add(states[state], [("state", state)])
    errors = Family("moe_monitor_segment_read_errors_total", "counter", "Failed segment reads by kind.")
    for kind in READ_ERROR_KINDS:
        errors.add(read_errors[kind], [("kind", kind)])
    restarts_f = Family("moe_monitor_rank_restarts_total", "counter", "vLLM rank restarts seen (new segment "
                        "generation); counts before a restart are carried, not lost.")
    restarts_f.add(restarts)
    build = Family("moe_monitor_build_info", "gauge", "moe-monitor version.")
    build.add(1, [("version", __version__)])
    return [up, age, info, publish_errors, segments, errors, restarts_f, build]


def capture_t0(latest) -> list[Family]:
    """Gauges of the newest analysed profiler capture (docs/breakdown.md has the rows)."""
    errors = Family("moe_capture_analysis_errors_total", "counter", "Profiler captures that could not be analysed.")
    errors.add(latest.errors)
    out = [errors]
    result, capture = latest.result, latest.capture
    if result is None or capture is None:
        return out
    info = Family("moe_capture_info", "gauge", "The newest analysed profiler capture: its file prefix and ranks.")
    info.add(1, [("capture", capture.prefix.rstrip("_") or "unnamed"), ("ranks", len(result["ranks"]))])
    end = Family("moe_capture_end_timestamp_seconds", "gauge", "When the newest analysed capture's last file was "
                 "written (unix time).")
    end.add(capture.end)
    seconds = Family("moe_capture_device_seconds", "gauge", "Device time of the capture by category (all ranks).")
    share = Family("moe_capture_share", "gauge", "Share of the capture's device time by category.")
    for category, row in result["categories"].items():
        seconds.add(row["us"] / 1e6, [("category", category)])
        share.add(row["share"], [("category", category)])
    idle = Family("moe_capture_idle_seconds", "gauge", "Device idle time between kernels inside engine steps.")
    idle.add(result["idle_us"] / 1e6)
    out += [info, end, seconds, share, idle]
    blocks = result["moe_blocks"]
    if blocks["count"]:
        pre = Family("moe_capture_moe_preamble_seconds", "gauge", "Per MoE layer (mean): device time from the "
                     "layer's input norm to the first expert GEMM.")
        pre.add(blocks["preamble_us"] / 1e6)
        first = Family("moe_capture_first_expert_gemm_seconds", "gauge", "Per MoE layer (mean): the first expert "
                       "GEMM kernel.")
        first.add(blocks["first_expert_us"] / 1e6)
        out += [pre, first]
    return out


def detector_t0(detector, now: float) -> list[Family]:
    state = Family("moe_detector_state", "gauge", "Regression detector state (1 for the current one).")
    current = detector.state(now)
    for name in ("warmup", "armed", "cooldown", "budget_exhausted"):
        state.add(1 if name == current else 0, [("state", name)])
    baseline = Family("moe_detector_baseline", "gauge", "Baseline of each detector signal (median of recent "
                      "windows): step time in seconds per phase/tokens bucket, worst-layer imbalance ratio.")
    for (signal, phase, tokens), value in sorted(detector.baselines.items()):
        baseline.add(value, [("signal", signal), ("phase", phase), ("tokens_le", tokens)])
    cur = Family("moe_detector_current", "gauge", "The last closed window's value of each detector signal.")
    for (signal, phase, tokens), value in sorted(detector.currents.items()):
        cur.add(value, [("signal", signal), ("phase", phase), ("tokens_le", tokens)])
    return [state, baseline, cur]


def capturer_t0(capturer, catalog) -> list[Family]:
    total = Family("moe_captures_total", "counter", "Profiler captures by reason (step_time, imbalance, manual) "
                   "and outcome (ok, partial, no_trace, profiler_disabled, start_failed, over_quota, skipped_busy).")
    for (reason, outcome), n in sorted(capturer.outcomes.items()):
        total.add(n, [("reason", reason), ("outcome", outcome)])
    running = Family("moe_capture_in_progress", "gauge", "1 while a capture is running.")
    running.add(1 if capturer.busy else 0)
    out = [total, running]
    if capturer.profiler_enabled is not None:
        enabled = Family("moe_capture_profiler_enabled", "gauge", "0 when vLLM answered /start_profile with 404 "
                         "(started without --profiler-config).")
        enabled.add(1 if capturer.profiler_enabled else 0)
        out.append(enabled)
    if capturer.last_end is not None:
        d = Family("moe_capture_last_duration_seconds", "gauge", "Duration of the last capture, start to stored.")
        d.add(capturer.last_duration_s)
        e = Family("moe_capture_last_end_timestamp_seconds", "gauge", "When the last capture ended (unix time).")
        e.add(capturer.last_end)
        out += [d, e]
    stored = catalog.list()
    n = Family("moe_capture_catalog_captures", "gauge", "Captures in the trace catalog.")
    n.add(len(stored))
    b = Family("moe_capture_catalog_bytes", "gauge", "Bytes in the trace catalog (never above --max-capture-bytes).")
    b.add(sum(x.get("total_bytes", 0) for x in stored))
    return out + [n, b]
