"""MoE expert load: the per-window expert-load histogram per layer, per-expert load (T2), top experts."""

from __future__ import annotations

from ..panels import (
    COUNT,
    ID,
    RATIO,
    SHARE,
    Row,
    heatmap_panel,
    prop,
    query,
    sel,
    state_timeline,
    table_panel,
    transform,
    ts,
)
from .common import LAYER, TOP1, UIDS, frame, opt, pad

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


T2_TOP = ("Needs the top-K gauges: `moe-monitor serve --expert-series top` (2 × layers × K series, K from "
          "--top-experts) or `all`, which exports them next to the per-expert counters.")


def _per_expert_row(cfg) -> Row:
    return Row("Per expert (T2: --expert-series all)", collapsed=True, panels=[
        heatmap_panel("Layer $layer: load by expert", "Each expert's assignments ÷ the layer's mean per interval "
                      "(1 = its fair share); rows: expert id. " + T2_ALL, RATIO,
                      [query(pad(_per_expert("$__rate_interval"), "expert", 3), "{{expert}}")],
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
            table_panel("Top experts in the last window (T2: --expert-series top or all)", "The top-K experts of "
                        "each layer in the last closed window: load rank, logical expert id and share of the layer's "
                        "load. " + T2_TOP, SHARE, [
                            query(f"max by (instance, layer, rank) ({sel('moe_layer_top_expert_id', LAYER)})",
                                  instant=True, fmt="table"),
                            query(f"max by (instance, layer, rank) ({sel('moe_layer_top_expert_share', LAYER)})",
                                  instant=True, fmt="table"),
                        ], w=12, h=10,
                        transformations=[transform("merge", {}), transform("organize", {
                            "excludeByName": {"Time": True},
                            "renameByName": {"Value #A": "expert", "Value #B": "share"}})],
                        overrides=[("expert", [prop("unit", ID), prop("decimals", 0)])]),
            state_timeline("Top-1 expert per layer (T2: --expert-series top or all)", "Logical id of each "
                           "layer's busiest expert per window: a long bar is one expert staying hot. " + T2_TOP, ID,
                           [query(f"max by (layer) ({sel('moe_layer_top_expert_id', LAYER, TOP1)})",
                                  "layer {{layer}}")],
                           w=24, h=8, color="palette-classic-by-name"),
    ])


def _balance_rows(cfg) -> Row:
    thr = opt(cfg, "imbalance_ratio")

    def per_layer(metric: str, agg: str = "max") -> list:
        return [query(f"{agg} by (layer) ({sel(metric, LAYER)})", "layer {{layer}}")]

    worst = " Worst instance when several are selected."
    return Row("Balance statistics per layer (T0)", [
        ts("Imbalance (max/mean)", "max(c)/mean per layer in the last window. Dashed: "
           "MoeExpertImbalanceSustained's threshold." + worst, RATIO, per_layer("moe_layer_imbalance_ratio"), w=8,
           threshold=thr, min_=1, fill=0),
        ts("Top-1 share", "The busiest expert's share of the layer's assignments. Dashed: MoeHotExpert's "
           "threshold." + worst, SHARE, per_layer("moe_layer_top1_share"), w=8, min_=0, fill=0,
           threshold=opt(cfg, "hot_expert_share")),
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
    return frame(UIDS["expert_load"], "MoE expert load",
                      "How tokens spread over experts, per layer: the expert-load histogram, per-expert load and "
                      "the hottest experts.", cfg, rows, "now-3h")


# -- MoE kernel breakdown ----------------------------------------------------------------------------
