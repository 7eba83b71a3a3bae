"""MoE deployment: one model whose ranks span several sidecars (one per node), from the deployment recording rules.

Each sidecar sees only its node's ranks, so the deployment's EP-rank and expert load is the sum over the sidecars
that share the deployment label (`deployment_label` of the mixin config; docs/ep.md, "Deployments larger than one
node"). Every query is scoped by `job=~"$job"`, each of `deployment_scope_labels` (`namespace=~"$namespace"`: two
namespaces may serve deployments of the same name, which the deployment rules keep apart) and
`<deployment label>=~"$deployment"` (not by instance). A setup whose targets have no namespace label gets an empty
`$namespace`, and `namespace=~""` matches the series without it.
"""

from __future__ import annotations

from grafana_foundation_sdk.models import dashboard as dm

from ..panels import (
    COUNT,
    PER_SECOND,
    RATIO,
    SHARE,
    Row,
    annotation,
    bar_gauge,
    datasource_variable,
    heatmap_panel,
    query,
    query_variable,
    stat_panel,
    table_panel,
    transform,
    ts,
)
from ..rules import (
    DEPLOYMENT_EP_EXPERT_TIME_LOST,
    DEPLOYMENT_EP_RANK_ROUTED_RATE,
    DEPLOYMENT_EXPERT_ROUTED_RATE,
    DEPLOYMENT_LAYER_EP_RANK_IMBALANCE,
    DEPLOYMENT_LAYER_EXPERT_IMBALANCE,
)
from .common import LAYER, UIDS, frame, link_to, opt, pad

ALERT = "MoeDeploymentEPRankImbalance"
EXPERT_TIME_LOST = "Expert time lost to EP-rank imbalance (deployment)"
T2_ALL = ("Needs `moe-monitor serve --expert-series all` on every sidecar of the deployment (T2; the rule "
          "moe:deployment_expert_routed_tokens:rate5m sums them).")


def label(cfg) -> str:
    return str(opt(cfg, "deployment_label"))


def scope(cfg) -> list[str]:
    """The deployment scope labels (namespace), each one a dashboard variable of the same name."""
    return list(opt(cfg, "deployment_scope_labels"))


def scoped(cfg, upto: int | None = None) -> str:
    """`job=~"$job", namespace=~"$namespace"`: the matchers every query of this dashboard starts with (with `upto`,
    only the first `upto` scope labels: what a scope variable's own list is narrowed by)."""
    return ", ".join(['job=~"$job"', *(f'{n}=~"${n}"' for n in scope(cfg)[:upto])])


def dsel(cfg, metric: str, *matchers: str) -> str:
    """`metric{job=~"$job", namespace=~"$namespace", <deployment label>=~"$deployment", <deployment label>!="",
    <matchers>}`. The `!=""` keeps sidecars outside any deployment out when the variable is empty (no deployment in
    this Prometheus): `=~""` alone would match every unlabelled sidecar (`moe-monitor demo`'s would show as
    "Sidecars up 1")."""
    d = label(cfg)
    return f'{metric}{{{scoped(cfg)}, {d}=~"$deployment", {d}!=""{"".join(", " + m for m in matchers)}}}'


def scope_variable_query(cfg, i: int) -> str:
    """The values of the i-th scope label among the sidecars of the chosen job and earlier scope labels (a namespace
    list narrowed by the chosen cluster, with deployment_scope_labels [cluster, namespace])."""
    return f'label_values(moe_monitor_build_info{{{scoped(cfg, i)}, {label(cfg)}!=""}}, {scope(cfg)[i]})'


def template(cfg) -> list:
    selector = str(opt(cfg, "selector")).strip().rstrip(",")
    d = label(cfg)
    return [
        datasource_variable(),
        query_variable("job", "Job", f"label_values(moe_monitor_build_info{{{selector}}}, job)",
                       f"Prometheus jobs scraping moe-monitor sidecars (the mixin's selector {{{selector}}})"),
        *(query_variable(n, n.capitalize(), scope_variable_query(cfg, i),
                         f"The deployment's `{n}` (the mixin's deployment_scope_labels): deployments of the same "
                         f"name in two of them are two deployments. Empty where the sidecars carry no `{n}`.",
                         multi=False, include_all=False) for i, n in enumerate(scope(cfg))),
        query_variable("deployment", "Deployment",
                       f'label_values(moe_monitor_build_info{{{scoped(cfg)}, {d}!=""}}, {d})',
                       f"One model served by several sidecars (one per node): the sidecars' `{d}` target label",
                       multi=False, include_all=False),
        query_variable("layer", "Layer",
                       f'label_values(moe_layer_observable{{{scoped(cfg)}, {d}=~"$deployment", {d}!=""}}, layer)',
                       "MoE layer index (moe_layer_observable)", sort=dm.VariableSort.NUMERICAL_ASC),
    ]


def notes(cfg) -> list:
    return [annotation(f"{ALERT} firing", f'ALERTS{{alertname="{ALERT}", alertstate="firing", {scoped(cfg)}, '
                       f'{label(cfg)}=~"$deployment"}}', "red", title="{{alertname}}",
                       text="{{" + label(cfg) + "}}", tags="alertname,severity")]


def _now(cfg) -> Row:
    ep_thr = opt(cfg, "ep_rank_imbalance_ratio")
    rate = dsel(cfg, DEPLOYMENT_EP_RANK_ROUTED_RATE, LAYER)
    imbalance = dsel(cfg, DEPLOYMENT_LAYER_EP_RANK_IMBALANCE, LAYER)
    up = dsel(cfg, "up")
    return Row("Deployment now", [
        stat_panel("Worst-layer EP-rank imbalance (deployment)", "max/mean of the EP-rank loads of the worst "
                   "selected layer over 5 minutes, every sidecar of the deployment summed "
                   "(moe:deployment_layer_ep_rank_imbalance_ratio:rate5m). Red from MoeDeploymentEPRankImbalance's "
                   "threshold.", RATIO, [query(f"max({imbalance})")],
                   steps=((None, "green"), (ep_thr, "red")), decimals=2,
                   links=[link_to("overview", "Per instance")]),
        # The recording rule sums every layer; the panel recomputes it from the rate rule over the selected layers.
        stat_panel(EXPERT_TIME_LOST, "Share of the deployment's expert time that EP ranks spend waiting at each "
                   "selected layer's combine for the busiest rank, over 5 minutes, every sidecar of the deployment "
                   "summed: 1 − Σ mean / Σ max of the layers' EP-rank loads (0 = balanced; each layer weighs as its "
                   f"busiest rank). With every layer selected it is {DEPLOYMENT_EP_EXPERT_TIME_LOST}, the "
                   "deployment's moe_ep_expert_time_lost_ratio. Routing only: assumes expert time proportional to a "
                   "rank's assignments (docs/metrics.md).", SHARE,
                   [query(f"1 - sum(avg by (layer) ({rate})) / sum(max by (layer) ({rate}))")], decimals=1),
        stat_panel("Worst-layer expert imbalance (deployment, T2)", "max/mean of the expert loads of the worst "
                   "selected layer over 5 minutes, summed over the deployment. " + T2_ALL, RATIO,
                   [query(f"max({dsel(cfg, DEPLOYMENT_LAYER_EXPERT_IMBALANCE, LAYER)})")],
                   steps=((None, "green"), (opt(cfg, "imbalance_ratio"), "red")), decimals=2),
        stat_panel("Assignments/s (deployment)", "(token, expert) assignments per second over 5 minutes, selected "
                   "layers, all sidecars of the deployment.", PER_SECOND, [query(f"sum({rate})")]),
        stat_panel("Sidecars up", "Sidecars of the deployment that answer scrapes, of those Prometheus knows. A "
                   "node whose sidecar is down is missing from every figure here (its ranks' tokens are not "
                   "summed), and MoeDeploymentEPRankImbalance says nothing meanwhile.", COUNT,
                   [query(f"sum({up})", "up"), query(f"count({up})", "scraped")], graph=False),
        table_panel("Worst layers (deployment)", "The 5 layers with the largest EP-rank max/mean over 5 minutes, "
                    "summed over the deployment: where rebalancing (EPLB) pays first.", RATIO,
                    [query(f"topk(5, {imbalance})", instant=True, fmt="table")], w=4, h=4,
                    sort_by="EP-rank max/mean",
                    transformations=[transform("organize", {
                        "excludeByName": {"Time": True, "job": True, label(cfg): True},
                        "renameByName": {"Value": "EP-rank max/mean"}})]),
    ])


def _ep_ranks(cfg) -> Row:
    rate = dsel(cfg, DEPLOYMENT_EP_RANK_ROUTED_RATE, LAYER)
    return Row("EP ranks (deployment)", [
        ts("Assignments/s by EP rank (deployment)", "Assignments each EP rank serves, selected layers, 5-minute "
           "rate, summed over the deployment's sidecars (moe:deployment_ep_rank_routed_tokens:rate5m): each sidecar "
           "reports the load its node's ranks put on every EP rank.", PER_SECOND,
           [query(f"sum by (ep_rank) ({rate})", "EP rank {{ep_rank}}")], w=8, axis="assignments/s"),
        ts("EP-rank imbalance by layer (deployment)", "max/mean of the deployment's EP-rank loads of each layer "
           "over 5 minutes (moe:deployment_layer_ep_rank_imbalance_ratio:rate5m): 1 = every rank equally busy. "
           "Dashed: MoeDeploymentEPRankImbalance's threshold.", RATIO,
           [query(f"max by (layer) ({dsel(cfg, DEPLOYMENT_LAYER_EP_RANK_IMBALANCE, LAYER)})", "layer {{layer}}")],
           w=8, min_=1, fill=0, threshold=opt(cfg, "ep_rank_imbalance_ratio")),
        bar_gauge("EP-rank load ÷ mean now (deployment)", "Each EP rank's assignments over 5 minutes ÷ the mean "
                  "rank, selected layers summed: the bar above 1 is the rank every step waits for.", RATIO,
                  [query(f"sum by (ep_rank) ({rate}) / scalar(avg(sum by (ep_rank) ({rate})))", "EP rank {{ep_rank}}",
                         instant=True)], w=8, steps=((None, "green"), (opt(cfg, "ep_rank_imbalance_ratio"), "red"))),
        ts("Assignments/s routed by each sidecar's ranks", "Assignments per second that each node's ranks route "
           "(its sidecar's counters, selected layers): how evenly requests reach the nodes (data parallelism).",
           PER_SECOND, [query(f"sum by (instance) (rate({dsel(cfg, 'moe_ep_rank_routed_tokens_total', LAYER)}"
                              f"[$__rate_interval]))", "{{instance}}")],
           w=24, axis="assignments/s", stack=True),
    ])


def _experts(cfg) -> Row:
    def expert_load(matcher: str) -> str:  # each expert's load ÷ the mean expert (1 = its fair share)
        per_expert = f"sum by (expert) ({dsel(cfg, DEPLOYMENT_EXPERT_ROUTED_RATE, matcher)})"
        return f"{per_expert} / scalar(avg({per_expert}))"

    return Row("Experts (deployment, T2: --expert-series all)", collapsed=True, panels=[
        ts("Expert imbalance by layer (deployment)", "max/mean of each layer's expert loads over 5 minutes, summed "
           "over the deployment (moe:deployment_layer_expert_imbalance_ratio:rate5m). " + T2_ALL, RATIO,
           [query(f"max by (layer) ({dsel(cfg, DEPLOYMENT_LAYER_EXPERT_IMBALANCE, LAYER)})", "layer {{layer}}")],
           w=24, min_=1, fill=0, threshold=opt(cfg, "imbalance_ratio")),
        heatmap_panel("Layer $layer: load by expert (deployment)", "Each expert's assignments over 5 minutes ÷ "
                      "the layer's mean expert, summed over the deployment; rows: expert id. " + T2_ALL, RATIO,
                      [query(pad(expert_load(LAYER), "expert", 3), "{{expert}}")],
                      y_unit="none", y_label="expert", w=12, h=10, scheme="Reds")
        .repeat("layer").repeat_direction("h"),
    ])


def deployment(cfg=None) -> dict:
    rows = [_now(cfg), _ep_ranks(cfg), _experts(cfg)]
    return frame(UIDS["deployment"], "MoE deployment",
                 "One model served by several sidecars (one per node): EP-rank and expert load summed over the "
                 "deployment's sidecars.", cfg, rows, "now-3h", template=template(cfg), notes=notes(cfg))
