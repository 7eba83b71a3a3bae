"""The three Grafana dashboards of the moe-monitor mixin, built with grafana-foundation-sdk's typed builders.

`build(cfg)` returns {file name: dashboard JSON dict}; `moe-monitor mixin build` writes them to
grafana/dashboards/ (json.dumps(d, indent=2, sort_keys=True) + "\\n"; `python -m moe_monitor.mixin.dashboards`
does the same). Metric names and labels are those of docs/metrics.md; the `moe:*` series are the mixin's
recording rules. Every query is scoped by the `job` and `instance` template variables (panels.sel).

- MoE overview: expert balance, EP-rank load, throughput and step time, exporter health, firing alerts.
- MoE expert load: the per-window expert-load histogram per layer, per-expert load (T2), top experts.
- MoE kernel breakdown: where the profiled step's device time goes, over captures, the capture catalog, the
  regression detector.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from .config import MixinConfig
from .panels import (AGO_MS, BYTES, COUNT, ID, PER_SECOND, RATIO, SCOPE, SECONDS, SHARE, STATE, TIMESTAMP_MS,
                     Row, annotation, assemble, bar_gauge, data_link, datasource_variable, heatmap_panel, link,
                     prop, query, query_variable, sel, stat_panel, state_timeline, table_panel, transform, ts,
                     value_map)
from .rules import (EP_RANK_ROUTED_RATE, LAYER_EP_RANK_IMBALANCE, ROUTED_ASSIGNMENTS_RATE, STEP_DURATION_P50,
                    STEP_DURATION_P99, STEP_TOKENS_RATE, WORST_LAYER_IMBALANCE_MAX)

UIDS = {"overview": "moe-overview", "expert_load": "moe-expert-load", "kernel": "moe-kernel-breakdown"}
TAGS = ["moe-monitor", "moe", "vllm"]
ALERTS = ("MoeExpertImbalanceSustained", "MoeHotExpert", "MoeDeadExperts", "MoeEPRankImbalance",
          "MoeStepTimeRegression", "MoeSidecarDown", "MoeSegmentsStale", "MoeCapturesFailing",
          "MoeProfilerDisabled")
LAYER = 'layer=~"$layer"'
TOP1 = 'rank="1"'
STEP_TIME = 'signal="step_time"'
IMBALANCE = 'signal="worst_layer_imbalance_ratio"'
# Settings that are not MixinConfig fields (a config object may also lack some of those: _opt falls back).
DEFAULTS = {
    "detector_imbalance_threshold": 4.0,  # the sidecar's --imbalance-threshold default
    "stale_after_s": 30.0,  # the sidecar's --stale-after default
    "trace_api_url": "http://{instance}",  # where a browser reaches a sidecar's trace API; {instance}: its label
    "refresh": "30s",
}


def _opt(cfg, name: str):
    """cfg.<name>, else the MixinConfig default, else DEFAULTS[name]."""
    for source in (cfg, MixinConfig):
        value = getattr(source, name, None)
        if value not in (None, ""):
            return value
    return DEFAULTS[name]


def _runbook_anchor(expr: str) -> str:
    """Add a `runbook` label to ALERTS series: the alert name in lower case (rules.py's runbook_url anchor)."""
    for name in ALERTS:
        expr = f'label_replace({expr}, "runbook", "{name.lower()}", "alertname", "{name}")'
    return expr


def _pad(expr: str, label: str, digits: int = 2) -> str:
    """label_replace calls that left-pad the numeric `label` with zeros (heatmap rows sort as text)."""
    for width in range(1, digits):
        zeros = "0" * (digits - width)
        expr = f'label_replace({expr}, "{label}", "{zeros}$1", "{label}", "([0-9]{{{width}}})")'
    return expr


# -- shared parts ------------------------------------------------------------------------------------

def variables(cfg) -> list:
    selector = str(_opt(cfg, "selector")).strip().rstrip(",")
    return [
        datasource_variable(),
        query_variable("job", "Job", f"label_values(moe_monitor_build_info{{{selector}}}, job)",
                       f"Prometheus jobs scraping moe-monitor sidecars (the mixin's selector {{{selector}}})"),
        query_variable("model", "Model", 'label_values(moe_model_info{job=~"$job"}, model)',
                       "Served MoE model (moe_model_info): narrows the instances"),
        query_variable("instance", "Instance",
                       'label_values(moe_model_info{job=~"$job", model=~"$model"}, instance)',
                       "Sidecars serving the model within the time range (host:port of the scrape target)"),
        query_variable("layer", "Layer",
                       'label_values(moe_layer_observable{job=~"$job", instance=~"$instance"}, layer)',
                       "MoE layer index (moe_layer_observable)", sort=dm.VariableSort.NUMERICAL_ASC),
    ]


def annotations() -> list:
    names = "|".join(ALERTS)
    return [
        annotation("Profiler captures", f"{captures_in('2m')} > 0",
                   "purple", title="capture: {{reason}} → {{outcome}}", text="{{instance}}",
                   tags="reason,outcome"),
        annotation("Capture end (exact time)",
                   f"max by (instance) ({sel('moe_capture_last_end_timestamp_seconds')}) * 1000", "blue",
                   title="capture ended", text="{{instance}}", value_is_time=True, enable=False),
        annotation("MoE alerts firing", f'ALERTS{{alertname=~"{names}", alertstate="firing", {SCOPE}}}',
                   "red", title="{{alertname}}", text="{{instance}} layer {{layer}}", tags="alertname,severity",
                   enable=False),
    ]


def _dashboard(uid: str, title: str, description: str, cfg, rows: list[Row], time_from: str) -> dict:
    d = (db.Dashboard(title).uid(uid).description(description).tags(TAGS).refresh(_opt(cfg, "refresh"))
         .time(time_from, "now").timezone("browser").editable().tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .timepicker(db.TimePicker().refresh_intervals(["10s", "30s", "1m", "5m", "15m", "1h"]))
         .variables(variables(cfg)).annotations(annotations())
         .link(db.DashboardLink("MoE dashboards").type(dm.DashboardLinkType.DASHBOARDS).tags(["moe-monitor"])
               .as_dropdown(True).include_vars(True).keep_time(True).target_blank(False).icon("external link")
               .tooltip("The other moe-monitor dashboards")))
    d = assemble(d, rows)
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def _to(key: str, title: str) -> db.DashboardLink:
    return link(title, f"/d/{UIDS[key]}")


# -- MoE overview ------------------------------------------------------------------------------------

def _overview_now(cfg) -> Row:
    thr = _opt(cfg, "imbalance_ratio")
    alerts = "|".join(ALERTS)
    runbook = _opt(cfg, "runbook_url")
    return Row("Now", [
        stat_panel("Worst-layer imbalance now", "max(c)/mean of the most imbalanced layer in the last closed window "
                   "(1 = balanced, E = everything on one expert). Red from MoeExpertImbalanceSustained's threshold.",
                   RATIO, [query(f"max({sel('moe_worst_layer_imbalance_ratio')})")],
                   steps=((None, "green"), (thr, "red")), decimals=2, links=[_to("expert_load", "Expert load")]),
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
                    [query(_runbook_anchor(f'max by (alertname, alertstate, severity, instance, layer) '
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
    thr = _opt(cfg, "imbalance_ratio")
    to_load = [_to("expert_load", "Expert load")]
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
                      [query(_pad(f"max by (layer) ({sel('moe_layer_imbalance_ratio', LAYER)})", "layer"),
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
           w=8, min_=0, fill=0, threshold=_opt(cfg, "hot_expert_share")),
    ])


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
           w=8, min_=1, fill=0, threshold=_opt(cfg, "ep_rank_imbalance_ratio")),
        ts("EPLB balancedness", "vLLM EPLB's and SGLang's balancedness over EP ranks in the last window "
           "(mean/max load, 1 = balanced; always 1 with one EP rank). Lowest instance.", SHARE, [
               query(f"min by (instance) ({sel('moe_eplb_balancedness_vllm')})", "{{instance}} vLLM"),
               query(f"min by (instance) ({sel('moe_eplb_balancedness_sglang')})", "{{instance}} SGLang"),
           ], w=8, min_=0, max_=1, fill=0),
    ])


def _overview_steps(cfg) -> Row:
    to_kernel = [_to("kernel", "Kernel breakdown")]
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
        ts("Engine steps/s by phase", "Engine steps per second by phase: the batch mix the step times below "
           "come from.", PER_SECOND,
           [query(f"sum by (phase) (rate({sel('moe_step_duration_seconds_count')}[$__rate_interval]))", "{{phase}}")],
           w=8, axis="steps/s", stack=True),
        ts("Step time p50 by phase and tokens per step", "Median engine-step wall time per (phase, scheduled-"
           "token bucket) over 5 minutes (moe:step_duration_seconds:p50_rate5m); the slowest instance when "
           "several are selected. Compare like with like: a batch-mix shift moves steps between buckets.",
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
           w=24, table_legend=True, fill=0, threshold=_opt(cfg, "step_time_ratio"), links=to_kernel),
    ])


UP_MAP = {"0": ("down", "red"), "1": ("up", "green")}


def _overview_health(cfg) -> Row:
    stale = _opt(cfg, "stale_after_s")
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
    return _dashboard(UIDS["overview"], "MoE overview",
                      "Expert balance, EP-rank load, step time and the health of moe-monitor's sidecars.",
                      cfg, rows, "now-3h")


# -- MoE expert load ---------------------------------------------------------------------------------

LOAD_BUCKETS = "sum by (le) (increase({}[$__rate_interval]))"


def _per_expert(rate_range: str) -> str:
    """Each expert's load ÷ the layer's mean over `rate_range` (c_e / mean, as moe_expert_load_ratio)."""
    per_expert = (f"sum by (layer, expert) (increase({sel('moe_expert_routed_tokens_total', LAYER)}"
                  f"[{rate_range}]))")
    return f"{per_expert} / ignoring (expert) group_left avg by (layer) ({per_expert})"


def _load_histogram(cfg) -> list[Row]:
    buckets = sel("moe_expert_load_ratio_bucket", LAYER)
    describe = ("One observation per expert per closed window of c_e/mean (load ÷ the layer's mean); cells: "
                "expert-windows per interval. The bottom row (le 0) is dead experts, rows above 2× are hot ones. "
                "Windows with too few assignments are not observed. T1 (--no-load-histogram turns it off).")
    return [
        Row("Expert-load histogram", [
            heatmap_panel("Expert load, selected layers", describe, COUNT,
                          [query(LOAD_BUCKETS.format(buckets), "{{le}}", fmt="heatmap")],
                          y_unit=RATIO, y_label="load / mean", w=24, h=9, le_buckets=True),
        ]),
        # One panel per layer (61 for DeepSeek-V3): collapsed, so they load only when opened.
        Row("Expert-load histogram per layer", collapsed=True, panels=[
            heatmap_panel("Layer $layer: expert load", describe, COUNT,
                          [query(LOAD_BUCKETS.format(buckets), "{{le}}", fmt="heatmap")],
                          y_unit=RATIO, y_label="load / mean", w=8, h=8, le_buckets=True)
            .repeat("layer").repeat_direction("h"),
        ]),
    ]


T2_ALL = ("Needs the per-expert tier: `moe-monitor serve --expert-series all` (T2, L × E series; dropped first "
          "when --max-series is exceeded).")


def _per_expert_row(cfg) -> Row:
    return Row("Per expert (T2: --expert-series all)", collapsed=True, panels=[
        heatmap_panel("Layer $layer: load by expert", "Each expert's assignments ÷ the layer's mean per interval "
                      "(1 = its fair share); rows: expert id. " + T2_ALL, RATIO,
                      [query(_pad(_per_expert("$__rate_interval"), "expert", 3), "{{expert}}")],
                      y_unit="none", y_label="expert", w=12, h=10, scheme="Reds")
        .repeat("layer").repeat_direction("h"),
    ])


def _top_experts(cfg) -> Row:
    t2_all = T2_ALL
    return Row("Top experts", [
            table_panel("Hottest experts over the time range", "The 5 busiest experts of each layer over the "
                        "dashboard's time range, as load ÷ the layer's mean. " + t2_all, RATIO,
                        [query(f"topk by (layer) (5, {_per_expert('$__range')})", instant=True, fmt="table")],
                        w=12, h=10, sort_by="load / mean",
                        transformations=[transform("organize", {"excludeByName": {"Time": True},
                                                                "renameByName": {"Value": "load / mean"}})]),
            table_panel("Top experts in the last window (T2: --expert-series top)", "The top-K experts of each "
                        "layer in the last closed window: load rank, logical expert id and share of the layer's "
                        "load. Needs `moe-monitor serve --expert-series top`.", SHARE, [
                            query(f"max by (instance, layer, rank) ({sel('moe_layer_top_expert_id', LAYER)})",
                                  instant=True, fmt="table"),
                            query(f"max by (instance, layer, rank) ({sel('moe_layer_top_expert_share', LAYER)})",
                                  instant=True, fmt="table"),
                        ], w=12, h=10,
                        transformations=[transform("merge", {}), transform("organize", {
                            "excludeByName": {"Time": True},
                            "renameByName": {"Value #A": "expert", "Value #B": "share"}})],
                        overrides=[("expert", [prop("unit", ID), prop("decimals", 0)])]),
            state_timeline("Top-1 expert per layer (T2: --expert-series top)", "Logical id of each layer's "
                           "busiest expert per window: a long bar is one expert staying hot. Needs "
                           "`--expert-series top`.", ID,
                           [query(f"max by (layer) ({sel('moe_layer_top_expert_id', LAYER, TOP1)})",
                                  "layer {{layer}}")],
                           w=24, h=8, color="palette-classic-by-name"),
    ])


def _balance_rows(cfg) -> Row:
    thr = _opt(cfg, "imbalance_ratio")

    def per_layer(metric: str, agg: str = "max") -> list:
        return [query(f"{agg} by (layer) ({sel(metric, LAYER)})", "layer {{layer}}")]

    worst = " Worst instance when several are selected."
    return Row("Balance statistics per layer (T0)", [
        ts("Imbalance (max/mean)", "max(c)/mean per layer in the last window. Dashed: "
           "MoeExpertImbalanceSustained's threshold." + worst, RATIO, per_layer("moe_layer_imbalance_ratio"), w=8, threshold=thr, min_=1, fill=0),
        ts("Top-1 share", "The busiest expert's share of the layer's assignments. Dashed: MoeHotExpert's "
           "threshold." + worst, SHARE, per_layer("moe_layer_top1_share"), w=8, min_=0, fill=0,
           threshold=_opt(cfg, "hot_expert_share")),
        ts("Top-k share", "Share of the top_k busiest experts (top_k of the model's routing)." + worst, SHARE,
           per_layer("moe_layer_topk_share"), w=8, min_=0, fill=0),
        ts("Load coefficient of variation", "std(c)/mean over the layer's experts (population std); 0 = "
           "uniform." + worst, "none", per_layer("moe_layer_load_cv"), w=8, min_=0, fill=0),
        ts("Load entropy (normalised)", "-Σ p log p / log E: 100 % = uniform routing." + " Lowest instance.",
           SHARE, per_layer("moe_layer_load_entropy", "min"), w=8, min_=0, max_=1, fill=0),
        ts("Window assignments", "Assignments (tokens × top_k) per layer in the last window, summed over "
           "instances; below --min-window-assignments the ratios above are NaN.", COUNT,
           per_layer("moe_layer_window_routed_tokens", "sum"), w=8, min_=0, fill=0),
    ])


def expert_load(cfg=None) -> dict:
    overall, per_layer = _load_histogram(cfg)
    rows = [overall, _balance_rows(cfg), _top_experts(cfg), per_layer, _per_expert_row(cfg)]
    return _dashboard(UIDS["expert_load"], "MoE expert load",
                      "How tokens spread over experts, per layer: the expert-load histogram, per-expert load and "
                      "the hottest experts.", cfg, rows, "now-3h")


# -- MoE kernel breakdown ----------------------------------------------------------------------------

CAPTURE_INFO = sel("moe_capture_info")


def captures_in(range_: str, by: str = "instance, reason, outcome") -> str:
    """Captures counted in the last `range_` by (reason, outcome). A (reason, outcome) series is born at 1 on its
    first capture, which increase() cannot see: a series that did not exist `range_` ago counts whole."""
    total = sel("moe_captures_total")
    return (f"sum by ({by}) ((increase({total}[{range_}]) and {total} offset {range_}) "
            f"or ({total} unless {total} offset {range_}))")


def _with_capture(expr: str) -> str:
    """Attach the capture id of moe_capture_info to a per-instance capture gauge."""
    return f"({expr} * on (job, instance) group_left (capture) {CAPTURE_INFO})"


def _latest(cfg) -> Row:
    trace_api = _opt(cfg, "trace_api_url").format(instance="${__field.labels.instance}")
    meta = data_link("Capture metadata (trace API)", f"{trace_api}/api/captures/${{__field.labels.capture}}")
    return Row("Latest capture", [
        stat_panel("Latest capture", "Id of the newest analysed profiler capture (the catalog id for "
                   "sidecar-triggered captures); click for its metadata from the sidecar's trace API.", STATE,
                   [query(f"max by (instance, capture) ({CAPTURE_INFO})", "{{capture}}", instant=True)],
                   w=8, graph=False, text_mode="name")
        .data_links([db.DashboardLink(meta["title"]).url(meta["url"]).target_blank(True)]),
        stat_panel("Capture ended", "When the newest analysed capture's last file was written.", AGO_MS,
                   [query(f"max({sel('moe_capture_end_timestamp_seconds')}) * 1000")], graph=False),
        stat_panel("Idle between kernels", "Device idle time between kernels inside the captured engine steps "
                   "(launch gaps), all ranks.", SECONDS, [query(f"sum({sel('moe_capture_idle_seconds')})")],
                   graph=False),
        stat_panel("MoE pre-amble per layer", "Mean per MoE layer: input norm → first expert GEMM (norm, gate "
                   "GEMM, top-k, quantisation, align/sort).", SECONDS,
                   [query(f"avg({sel('moe_capture_moe_preamble_seconds')})")], graph=False),
        stat_panel("First expert GEMM per layer", "Mean per MoE layer: the first expert GEMM, to compare with "
                   "the pre-amble.", SECONDS, [query(f"avg({sel('moe_capture_first_expert_gemm_seconds')})")],
                   graph=False),
        bar_gauge("Share of device time by category", "Latest capture: gate, experts, align_permute, attention, "
                  "all_to_all, other and the other categories of docs/breakdown.md, as shares of the capture's "
                  "device time (mean over the selected instances).", SHARE,
                  [query(f"sort_desc(avg by (category) ({sel('moe_capture_share')}))", "{{category}}", instant=True)],
                  max_=1, h=9),
        bar_gauge("Device time by category", "Latest capture: device seconds by category, all ranks, summed over "
                  "the selected instances.", SECONDS,
                  [query(f"sort_desc(sum by (category) ({sel('moe_capture_device_seconds')}))", "{{category}}",
                         instant=True)], h=9),
    ])


def _over_captures(cfg) -> Row:
    return Row("Over captures", [
        ts("Share of device time over captures", "Each category's share of device time; the value changes when a "
           "newer capture is analysed (annotations mark captures).", SHARE,
           [query(f"avg by (category) ({sel('moe_capture_share')})", "{{category}}")],
           stack=True, steps=True, min_=0, max_=1, fill=60, table_legend=True, calcs=["lastNotNull"]),
        ts("Device time over captures", "Device seconds of each category per capture, all ranks.", SECONDS,
           [query(f"sum by (category) ({sel('moe_capture_device_seconds')})", "{{category}}")],
           stack=True, steps=True, min_=0, fill=60, table_legend=True, calcs=["lastNotNull"]),
        ts("MoE pre-amble vs first expert GEMM", "Per MoE layer (mean): norm → first expert GEMM against the "
           "first expert GEMM itself. A pre-amble as long as the GEMM is routing overhead worth fusing.", SECONDS, [
               query(f"avg({sel('moe_capture_moe_preamble_seconds')})", "pre-amble"),
               query(f"avg({sel('moe_capture_first_expert_gemm_seconds')})", "first expert GEMM"),
           ], steps=True, min_=0, fill=0),
        ts("Idle between kernels over captures", "Device idle time inside the captured engine steps, per capture.",
           SECONDS,
           [query(f"sum by (instance) ({sel('moe_capture_idle_seconds')})", "{{instance}}")],
           steps=True, min_=0, fill=0),
    ])


def _captures(cfg) -> Row:
    trace_api = _opt(cfg, "trace_api_url").format(instance="${__data.fields.instance}")
    in_range = "[$__range:]"

    def share(category: str) -> str:
        gauge = _with_capture(sel("moe_capture_share", f'category="{category}"'))
        return f"max by (instance, capture) (max_over_time({gauge}{in_range}))"

    return Row("Captures", [
        table_panel("Captures in the time range", "Every capture that was the newest analysed one during the "
                    "time range: id, ranks, end time and its experts and all_to_all shares. The id links to its "
                    "metadata on the sidecar's trace API (GET /api/captures/<id>), the instance to the list of all "
                    "captures there; pull the files with `moe-monitor traces pull <id>`.", SHARE, [
                        query(f"max by (instance, capture, ranks) (max_over_time({CAPTURE_INFO}[$__range]))",
                              instant=True, fmt="table"),
                        query(f"max by (instance, capture) (max_over_time("
                              f"{_with_capture(sel('moe_capture_end_timestamp_seconds'))}{in_range})) * 1000",
                              instant=True, fmt="table"),
                        query(share("experts"), instant=True, fmt="table"),
                        query(share("all_to_all"), instant=True, fmt="table"),
                    ], h=8, sort_by="ended",
                    transformations=[transform("merge", {}), transform("organize", {
                        "excludeByName": {"Time": True, "Value #A": True},
                        "indexByName": {"capture": 0, "instance": 1, "ranks": 2, "Value #B": 3, "Value #C": 4,
                                        "Value #D": 5},
                        "renameByName": {"Value #B": "ended", "Value #C": "experts share",
                                         "Value #D": "all_to_all share"}})],
                    overrides=[
                        ("capture", [prop("links", [data_link("Capture metadata (trace API)",
                                                              f"{trace_api}/api/captures/${{__value.raw}}")])]),
                        ("instance", [prop("links", [data_link("All captures on this sidecar",
                                                               "http://${__value.raw}/api/captures")])]),
                        ("ended", [prop("unit", TIMESTAMP_MS)]),
                        ("ranks", [prop("unit", COUNT)]),
                    ]),
        ts("Captures by reason and outcome", "Profiler captures per interval by reason (step_time, imbalance, "
           "manual) and outcome (ok, partial, no_trace, profiler_disabled, start_failed, over_quota, "
           "skipped_busy).", COUNT,
           [query(captures_in("$__rate_interval", "reason, outcome"), "{{reason}} → {{outcome}}")],
           bars=True, stack=True, min_=0),
        bar_gauge("Capture count by reason and outcome", "Captures by reason and outcome over the dashboard's time "
                  "range.",
                  COUNT, [query(f"sort_desc(round({captures_in('$__range', 'reason, outcome')}))",
                                "{{reason}} → {{outcome}}", instant=True)]),
        stat_panel("Profiler enabled in vLLM", "0 when vLLM answered /start_profile with 404 (started without "
                   "--profiler-config); empty until the first capture.", STATE,
                   [query(f"min({sel('moe_capture_profiler_enabled')})")], graph=False,
                   mappings=value_map({"0": ("disabled", "red"), "1": ("enabled", "green")}),
                   steps=((None, "red"), (1, "green"))),
        stat_panel("Last capture duration", "Duration of the last capture, start to stored.", SECONDS,
                   [query(f"max({sel('moe_capture_last_duration_seconds')})")], graph=False),
        stat_panel("Last capture ended", "When the last capture (any outcome but skipped_busy) ended.", AGO_MS,
                   [query(f"max({sel('moe_capture_last_end_timestamp_seconds')}) * 1000")], graph=False),
        stat_panel("Catalog captures", "Captures held in the trace catalog (--max-captures).", COUNT,
                   [query(f"sum({sel('moe_capture_catalog_captures')})")], graph=False),
        stat_panel("Catalog size", "Bytes in the trace catalog (never above --max-capture-bytes).", BYTES,
                   [query(f"sum({sel('moe_capture_catalog_bytes')})")], graph=False),
        stat_panel("Analysis errors", "Captures that could not be analysed over the time range.", COUNT,
                   [query(f"sum(increase({sel('moe_capture_analysis_errors_total')}[$__range]))")], graph=False,
                   steps=((None, "green"), (1, "red")), decimals=0),
        state_timeline("Capture in progress", "1 while the sidecar runs a profiler capture (steps recorded under "
                       "the profiler are slower; the detector ignores those windows).", STATE,
                       [query(f"max by (instance) ({sel('moe_capture_in_progress')})", "{{instance}}")],
                       mappings=value_map({"0": ("idle", "transparent"), "1": ("capturing", "purple")}),
                       steps=((None, "transparent"), (1, "purple")), w=24, h=5),
    ])


DETECTOR_STATES = ("warmup", "armed", "cooldown", "budget_exhausted")


def _detector(cfg) -> Row:
    thr = _opt(cfg, "detector_imbalance_threshold")
    coded = " or ".join(f"{i} * " + sel("moe_detector_state", f'state="{s}"')
                        for i, s in enumerate(DETECTOR_STATES, start=1))
    colors = ("blue", "green", "yellow", "red")
    key = "{{phase}} ≤{{tokens_le}}"
    return Row("Regression detector", [
        state_timeline("Detector state", "warmup (first windows), armed (may fire), cooldown (after a capture), "
                       "budget_exhausted (--max-captures-per-hour reached).", STATE,
                       [query(f"sum by (instance) ({coded})", "{{instance}}")], w=24, h=5,
                       mappings=value_map({str(i): (s, c) for i, (s, c) in
                                           enumerate(zip(DETECTOR_STATES, colors), start=1)})),
        ts("Step time: baseline vs current", "Per (phase, tokens-per-step bucket): the --step-baseline-quantile "
           "(p90) of recent windows' mean step time (baseline) and the last window's (current). A regression is current > baseline × "
           "(1 + --step-margin) for --consecutive-windows windows.", SECONDS, [
               query(f"max by (phase, tokens_le) ({sel('moe_detector_baseline', STEP_TIME)})",
                     f"baseline {key}"),
               query(f"max by (phase, tokens_le) ({sel('moe_detector_current', STEP_TIME)})",
                     f"current {key}"),
           ], table_legend=True, fill=0, min_=0),
        ts("Worst-layer imbalance: baseline vs current", "The detector's imbalance signal: recent median and the "
           "last window's worst-layer max/mean. Dashed: the sidecar's default --imbalance-threshold (4).", RATIO, [
               query(f"max by (instance) ({sel('moe_detector_baseline', IMBALANCE)})",
                     "baseline {{instance}}"),
               query(f"max by (instance) ({sel('moe_detector_current', IMBALANCE)})",
                     "current {{instance}}"),
           ], threshold=thr, fill=0, min_=1),
    ])


def kernel_breakdown(cfg=None) -> dict:
    rows = [_latest(cfg), _over_captures(cfg), _captures(cfg), _detector(cfg)]
    return _dashboard(UIDS["kernel"], "MoE kernel breakdown",
                      "Where the profiled engine step's device time goes (gate, experts, align/permute, attention, "
                      "all-to-all, ...), over captures, the capture catalog and the regression detector.",
                      cfg, rows, "now-24h")


# -- entry points ------------------------------------------------------------------------------------

def build(cfg=None) -> dict[str, dict]:
    """{file name: dashboard JSON dict} for grafana/dashboards/."""
    return {
        "moe-overview.json": overview(cfg),
        "moe-expert-load.json": expert_load(cfg),
        "moe-kernel-breakdown.json": kernel_breakdown(cfg),
    }


def render(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def write(directory: str | Path, cfg=None) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in build(cfg).items():
        path = out / name
        path.write_text(render(dashboard))
        written.append(path)
    return written


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "grafana" / "dashboards")
    for p in write(target):
        print(p)
