"""MoE overview: expert balance, EP-rank load, throughput and step time, exporter health, firing alerts."""

from __future__ import annotations

from ..panels import (
    BYTES,
    COUNT,
    PER_SECOND,
    RATIO,
    SCOPE,
    SECONDS,
    SHARE,
    STATE,
    Row,
    data_link,
    heatmap_panel,
    prop,
    query,
    sel,
    stat_panel,
    state_timeline,
    table_panel,
    transform,
    ts,
    value_map,
)
from ..rules import (
    EP_RANK_ROUTED_RATE,
    LAYER_EP_RANK_IMBALANCE,
    ROUTED_ASSIGNMENTS_RATE,
    STEP_DURATION_P50,
    STEP_DURATION_P99,
    STEP_TOKENS_RATE,
    WORST_LAYER_IMBALANCE_MAX,
)
from .common import (
    ALERTS,
    LAYER,
    STEP_TIME,
    UIDS,
    frame,
    link_to,
    opt,
    pad,
    runbook_anchor,
)


def _overview_now(cfg) -> Row:
    thr = opt(cfg, "imbalance_ratio")
    alerts = "|".join(ALERTS)
    runbook = opt(cfg, "runbook_url")
    return Row("Now", [
        stat_panel("Worst-layer imbalance now", "max(c)/mean of the most imbalanced layer in the last closed window "
                   "(1 = balanced, E = everything on one expert). Red from MoeExpertImbalanceSustained's threshold.",
                   RATIO, [query(f"max({sel('moe_worst_layer_imbalance_ratio')})")],
                   steps=((None, "green"), (thr, "red")), decimals=2, links=[link_to("expert_load", "Expert load")]),
        stat_panel("Mean layer imbalance now", "Mean over layers of max(c)/mean in the last window (layers without "
                   "enough assignments skipped).", RATIO,
                   [query(f"avg({sel('moe_mean_layer_imbalance_ratio')})")],
                   steps=((None, "green"), (thr, "red")), decimals=2),
        stat_panel("Hot experts now", "(layer, expert) pairs above hot_multiple × mean (--hot-multiple, default 2) "
                   "in the last window, selected layers and instances.", COUNT,
                   [query(f"sum({sel('moe_layer_hot_experts', LAYER)})")],
                   steps=((None, "green"), (1, "orange"))),
        stat_panel("Dead experts now", "(layer, expert) pairs that received no token in the last window.", COUNT,
                   [query(f"sum({sel('moe_layer_dead_experts', LAYER)})")],
                   steps=((None, "green"), (1, "orange"))),
        stat_panel("Routed assignments/s now", "(token, expert) assignments per second over 5 min (tokens × top_k), "
                   "all layers (recording rule moe:routed_assignments:rate5m).", PER_SECOND,
                   [query(f"sum({sel(ROUTED_ASSIGNMENTS_RATE)})")]),
        stat_panel("Unobservable layers", "MoE layers whose routing moe-monitor cannot see (a fused kernel routes "
                   "internally): their counts stay 0, which is not 'no load'.", COUNT,
                   [query(f"max({sel('moe_monitor_unobservable_layers')})")],
                   steps=((None, "green"), (1, "orange")), graph=False),
        table_panel("Firing and pending MoE alerts", "The mixin's alerts (Prometheus ALERTS series) for the "
                    "selected instances, now. The alert name links to its runbook.", STATE,
                    [query(runbook_anchor(f'max by (alertname, alertstate, severity, instance, layer) '
                                           f'(ALERTS{{alertname=~"{alerts}", {SCOPE}}})'),
                           instant=True, fmt="table")],
                    h=6, transformations=[transform("organize", {
                        "excludeByName": {"Time": True, "Value": True},
                        "indexByName": {"alertname": 0, "alertstate": 1, "severity": 2, "instance": 3, "layer": 4}})],
                    overrides=[("alertname", [prop("links", [data_link(
                                   "Runbook", f"{runbook}#${{__data.fields.runbook}}")])]),
                               ("runbook", [prop("custom.hidden", True)])]),
    ])


def _overview_balance(cfg) -> Row:
    thr = opt(cfg, "imbalance_ratio")
    to_load = [link_to("expert_load", "Expert load")]
    return Row("Expert balance", [
        ts("Worst-layer imbalance", "The worst layer's max(c)/mean per window, its 5-minute maximum (recording "
           "rule) and the mean over layers. Dashed: MoeExpertImbalanceSustained's threshold.", RATIO, [
               query(f"max by (instance) ({sel('moe_worst_layer_imbalance_ratio')})", "{{instance}} worst layer"),
               query(f"max by (instance) ({sel(WORST_LAYER_IMBALANCE_MAX)})",
                     "{{instance}} worst layer, 5m max"),
               query(f"avg by (instance) ({sel('moe_mean_layer_imbalance_ratio')})", "{{instance}} mean of layers"),
           ], axis="max / mean", threshold=thr, min_=1, fill=0, links=to_load),
        heatmap_panel("Imbalance by layer", "max(c)/mean of each layer per window (rows: layer index, worst "
                      "instance). A hot band is a layer whose experts are unevenly loaded; empty cells are idle "
                      "windows (NaN).", RATIO,
                      [query(pad(f"max by (layer) ({sel('moe_layer_imbalance_ratio', LAYER)})", "layer"),
                             "{{layer}}")],
                      y_unit="none", y_label="layer", scheme="Reds", links=to_load),
        ts("Hot experts by layer", "Experts above hot_multiple × mean in the last window, per layer (worst "
           "instance).", COUNT, [query(f"max by (layer) ({sel('moe_layer_hot_experts', LAYER)})", "layer {{layer}}")],
           w=8, steps=True, min_=0, fill=0),
        ts("Dead experts by layer", "Experts with no token in the last window, per layer (worst instance). "
           "NaN (gap) when the layer had fewer than --min-window-assignments.", COUNT,
           [query(f"max by (layer) ({sel('moe_layer_dead_experts', LAYER)})", "layer {{layer}}")],
           w=8, steps=True, min_=0, fill=0),
        ts("Top-1 expert share by layer", "Share of the layer's assignments taken by its busiest expert in the "
           "last window (worst instance); uniform routing gives 1/E. Dashed: MoeHotExpert's threshold.", SHARE,
           [query(f"max by (layer) ({sel('moe_layer_top1_share', LAYER)})", "layer {{layer}}")],
           w=8, min_=0, fill=0, threshold=opt(cfg, "hot_expert_share")),
    ])


IMBALANCE_COST = "Time lost to EP-rank imbalance"
EXPERT_TIME_LOST_BY_LAYER = "Expert time lost to EP-rank imbalance by layer"
NEEDS_EP = (IMBALANCE_COST, EXPERT_TIME_LOST_BY_LAYER)  # panels without data where the model has one EP rank


def _overview_ep(cfg) -> Row:
    return Row("EP ranks", [
        ts("Assignments/s by EP rank", "Assignments served by each EP rank under the expert placement (physical "
           "load), selected layers, 5-minute rate (moe:ep_rank_routed_tokens:rate5m). T1 series.", PER_SECOND,
           [query(f"sum by (ep_rank) ({sel(EP_RANK_ROUTED_RATE, LAYER)})", "EP rank {{ep_rank}}")],
           w=8, axis="assignments/s"),
        ts("EP-rank imbalance by layer", "max/mean of the EP-rank loads of each layer over 5 minutes "
           "(moe:layer_ep_rank_imbalance_ratio:rate5m, worst instance): 1 = every rank equally busy. Dashed: "
           "MoeEPRankImbalance's threshold (on the per-window figure).", RATIO,
           [query(f"max by (layer) ({sel(LAYER_EP_RANK_IMBALANCE, LAYER)})", "layer {{layer}}")],
           w=8, min_=1, fill=0, threshold=opt(cfg, "ep_rank_imbalance_ratio")),
        ts("EPLB balancedness", "vLLM EPLB's and SGLang's balancedness over EP ranks in the last window "
           "(mean/max load, 1 = balanced; always 1 with one EP rank). Lowest instance.", SHARE, [
               query(f"min by (instance) ({sel('moe_eplb_balancedness_vllm')})", "{{instance}} vLLM"),
               query(f"min by (instance) ({sel('moe_eplb_balancedness_sglang')})", "{{instance}} SGLang"),
           ], w=8, min_=0, max_=1, fill=0),
        ts(IMBALANCE_COST, "What EP-rank imbalance costs in the last window, as every rank waits at each layer's "
           "combine for the busiest (highest instance). Of step time: the newest analysed capture's expert share s "
           "stretched from the even spread to the busiest rank, s × (Σ max / Σ mean rank load − 1); no line until a "
           "capture was analysed, and the share is as old as that capture (moe_capture_end_timestamp_seconds). Of "
           "expert time: Σ (max − mean) / Σ max over layers, routing only (1 − vLLM's balancedness). Assumes expert "
           "time proportional to a rank's assignments (docs/metrics.md). No series with one EP rank.", SHARE, [
               query(f"max by (instance) ({sel('moe_ep_step_time_lost_ratio')})", "{{instance}} of step time"),
               query(f"max by (instance) ({sel('moe_ep_expert_time_lost_ratio')})", "{{instance}} of expert time"),
           ], min_=0, fill=0),
        ts(EXPERT_TIME_LOST_BY_LAYER, "Fraction of each layer's expert time spent waiting for its busiest EP rank "
           "in the last window, 1 − mean/max of its rank loads (worst instance; 0 = balanced). No series with one "
           "EP rank.", SHARE,
           [query(f"max by (layer) ({sel('moe_layer_ep_expert_time_lost_ratio', LAYER)})", "layer {{layer}}")],
           min_=0, max_=1, fill=0),
    ])


def _overview_steps(cfg) -> Row:
    to_kernel = [link_to("kernel", "Kernel breakdown")]
    bucket = "{{phase}} ≤{{tokens_le}} tokens"
    return Row("Throughput and step time", [
        ts("Routed assignments/s by instance", "(token, expert) assignments per second, all layers, 5-minute rate "
           "(moe:routed_assignments:rate5m).", PER_SECOND,
           [query(f"sum by (instance) ({sel(ROUTED_ASSIGNMENTS_RATE)})", "{{instance}}")],
           w=8, axis="assignments/s"),
        ts("Tokens computed/s by phase", "Tokens computed in engine steps per second by step phase (prefill, "
           "decode, mixed), 5-minute rate (moe:step_tokens:rate5m).", PER_SECOND,
           [query(f"sum by (phase) ({sel(STEP_TOKENS_RATE)})", "{{phase}}")],
           w=8, axis="tokens/s", stack=True),
        ts("Engine steps/s by phase", "Engine steps per second by phase (every step, moe_steps_total): the batch "
           "mix the step times below come from.", PER_SECOND,
           [query(f"sum by (phase) (rate({sel('moe_steps_total')}[$__rate_interval]))", "{{phase}}")],
           w=8, axis="steps/s", stack=True),
        ts("Step time p50 by phase and tokens per step", "Median engine-step wall time per (phase, scheduled-"
           "token bucket) over 5 minutes (moe:step_duration_seconds:p50_rate5m, over the steps the plugin "
           "timed: a pseudo-random sample on CUDA); the slowest instance when several are selected. Compare like "
           "with like: a batch-mix shift moves steps between buckets.",
           SECONDS, [query(f"max by (phase, tokens_le) ({sel(STEP_DURATION_P50)})", bucket)],
           table_legend=True, fill=0, links=to_kernel),
        ts("Step time p99 by phase and tokens per step", "99th percentile engine-step wall time per (phase, "
           "token bucket) over 5 minutes (moe:step_duration_seconds:p99_rate5m); slowest instance.", SECONDS,
           [query(f"max by (phase, tokens_le) ({sel(STEP_DURATION_P99)})", bucket)],
           table_legend=True, fill=0, links=to_kernel),
        ts("Step time vs baseline (detector)", "Per (phase, token bucket): the last window's mean step time "
           "divided by the detector's baseline (median of recent windows); like with like, so a batch-mix shift "
           "does not move it. Dashed: MoeStepTimeRegression's threshold.", RATIO,
           [query(f"max by (phase, tokens_le) ({sel('moe_detector_current', STEP_TIME)} / "
                  f"{sel('moe_detector_baseline', STEP_TIME)})", bucket)],
           w=24, table_legend=True, fill=0, threshold=opt(cfg, "step_time_ratio"), links=to_kernel),
    ])


UP_MAP = {"0": ("down", "red"), "1": ("up", "green")}


def _overview_health(cfg) -> Row:
    stale = opt(cfg, "stale_after_s")
    return Row("Exporter health", [
        state_timeline("Scrape up", "Prometheus' `up` for the sidecar targets: 0 when the scrape failed.", STATE,
                       [query(sel("up"), "{{instance}}")], mappings=value_map(UP_MAP),
                       steps=((None, "red"), (1, "green"))),
        state_timeline("Segments up", "1 when the rank's shared-memory segment was read and is fresh "
                       "(moe_monitor_segment_up), per instance and segment (dp-pp-tp).", STATE,
                       [query(f"max by (instance, segment) ({sel('moe_monitor_segment_up')})",
                              "{{instance}} {{segment}}")],
                       mappings=value_map(UP_MAP), steps=((None, "red"), (1, "green"))),
        ts("Segments by state", "Segment files by state: fresh, stale (no snapshot for --stale-after), "
           "unreadable.", COUNT, [query(f"sum by (state) ({sel('moe_monitor_segments')})", "{{state}}")],
           w=8, stack=True, min_=0, steps=True),
        ts("Snapshot age", "Seconds since each rank last published, at the last window boundary. Dashed: "
           "--stale-after.", SECONDS,
           [query(f"max by (instance, segment) ({sel('moe_monitor_snapshot_age_seconds')})",
                  "{{instance}} {{segment}}")],
           w=8, threshold=stale, min_=0, fill=0),
        ts("Segment read errors/s by kind", "Failed segment reads per second by kind (io, truncated, magic, "
           "version, corrupt, oversized, torn); one per failed read, per window while a bad file stays.",
           PER_SECOND,
           [query(f"sum by (kind) (rate({sel('moe_monitor_segment_read_errors_total')}[$__rate_interval]))",
                  "{{kind}}")],
           w=8, axis="errors/s", min_=0),
        ts("Plugin publish errors and rank restarts", "Snapshots the plugin failed to write (per segment) and "
           "vLLM rank restarts seen by the sidecar, per interval.", COUNT, [
               query(f"sum by (instance, segment) (increase({sel('moe_monitor_plugin_publish_errors_total')}"
                     f"[$__rate_interval]))", "publish errors {{instance}} {{segment}}"),
               query(f"sum by (instance) (increase({sel('moe_monitor_rank_restarts_total')}[$__rate_interval]))",
                     "rank restarts {{instance}}"),
           ], w=8, bars=True, min_=0),
        ts("Series per tier", "Series per cardinality tier in the exposition, before the --max-series budget "
           "cut (T0 per layer, T1 layer × EP rank, T2 layer × expert).", COUNT,
           [query(f"sum by (tier) ({sel('moe_monitor_series')})", "{{tier}}")], w=8, stack=True, min_=0),
        ts("Exposition build duration", "Time the sidecar took to build the last exposition (once per window).",
           SECONDS, [query(f"max by (instance) ({sel('moe_monitor_build_duration_seconds')})", "{{instance}}")],
           w=8, min_=0, fill=0),
        ts("Sidecar CPU", "CPU of the sidecar process (1 = one core busy).", SHARE,
           [query(f"rate({sel('moe_monitor_process_cpu_seconds_total')}[$__rate_interval])", "{{instance}}")],
           w=6, min_=0, fill=0),
        ts("Sidecar memory", "Resident memory of the sidecar process.", BYTES,
           [query(sel("moe_monitor_process_resident_memory_bytes"), "{{instance}}")], w=6, min_=0, fill=0),
        stat_panel("Series budget truncation", "1 when the --max-series budget dropped T2 and then T1 series.",
                   STATE, [query(f"max({sel('moe_monitor_series_truncated')})")], w=6, h=8, graph=False,
                   mappings=value_map({"0": ("within budget", "green"), "1": ("tiers dropped", "red")}),
                   steps=((None, "green"), (1, "red"))),
        stat_panel("Sidecar version", "moe-monitor version of the selected sidecars (moe_monitor_build_info).",
                   STATE, [query(f"count by (version) ({sel('moe_monitor_build_info')})", "{{version}}", instant=True)],
                   w=6, h=8, graph=False, text_mode="name"),
        state_timeline("Layer observable", "1 when moe-monitor sees the layer's routing; 0 when a fused kernel "
                       "routes internally or the tapped router never ran in a real step (its counts stay 0).",
                       STATE, [query(f"min by (layer) ({sel('moe_layer_observable', LAYER)})", "layer {{layer}}")],
                       w=24, mappings=value_map({"0": ("not observable", "orange"), "1": ("observed", "green")}),
                       steps=((None, "orange"), (1, "green"))),
    ])


def overview(cfg=None) -> dict:
    rows = [_overview_now(cfg), _overview_balance(cfg), _overview_ep(cfg), _overview_steps(cfg),
            _overview_health(cfg)]
    return frame(UIDS["overview"], "MoE overview",
                      "Expert balance, EP-rank load, step time and the health of moe-monitor's sidecars.",
                      cfg, rows, "now-3h")


# -- MoE expert load ---------------------------------------------------------------------------------
