"""MoE kernel breakdown: where the profiled step's device time goes, over captures, the capture catalog, the
regression detector."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db

from moe_monitor.schema.vocabulary import CAPTURE_OUTCOMES, DETECTOR_STATES

from ..panels import (
    AGO_MS,
    BYTES,
    COUNT,
    RATIO,
    SECONDS,
    SHARE,
    STATE,
    TIMESTAMP_MS,
    Row,
    bar_gauge,
    data_link,
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
from .common import IMBALANCE, STEP_TIME, UIDS, captures_in, frame, opt

CAPTURE_INFO = sel("moe_capture_info")


def _with_capture(expr: str) -> str:
    """Attach the capture id of moe_capture_info to a per-instance capture gauge."""
    return f"({expr} * on (job, instance) group_left (capture) {CAPTURE_INFO})"


def _latest(cfg) -> Row:
    trace_api = opt(cfg, "trace_api_url").format(instance="${__field.labels.instance}")
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
                  "all_to_all, monitoring (moe-monitor's own kernels), other and the other categories of "
                  "docs/breakdown.md, as shares of the capture's device time (mean over the selected instances).",
                  SHARE,
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
    trace_api = opt(cfg, "trace_api_url").format(instance="${__data.fields.instance}")
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
           "manual) and outcome (" + ", ".join(CAPTURE_OUTCOMES) + ").", COUNT,
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





def _detector(cfg) -> Row:
    thr = opt(cfg, "detector_imbalance_threshold")
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
           "(p90) of recent windows' mean step time (baseline) and the last window's (current). "
           "A regression is current > baseline × (1 + --step-margin) for --consecutive-windows windows.", SECONDS, [
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
    return frame(UIDS["kernel"], "MoE kernel breakdown",
                      "Where the profiled engine step's device time goes (gate, experts, align/permute, attention, "
                      "all-to-all, ...), over captures, the capture catalog and the regression detector.",
                      cfg, rows, "now-24h")
