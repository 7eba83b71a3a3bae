"""What the dashboards share: uids, tags, template variables, annotations, the dashboard frame."""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from moe_monitor.detect.detector import DetectorConfig
from moe_monitor.sidecar.config import SidecarConfig

from ..config import MixinConfig
from ..panels import (
    SCOPE,
    Row,
    annotation,
    assemble,
    datasource_variable,
    link,
    query_variable,
    sel,
)

UIDS = {"overview": "moe-overview", "expert_load": "moe-expert-load", "kernel": "moe-kernel-breakdown",
        "deployment": "moe-deployment"}
TAGS = ["moe-monitor", "moe", "vllm"]
ALERTS = ("MoeExpertImbalanceSustained", "MoeHotExpert", "MoeDeadExperts", "MoeEPRankImbalance",
          "MoeDeploymentEPRankImbalance", "MoeStepTimeRegression", "MoeSidecarDown", "MoeSegmentsStale",
          "MoeLayerSilent", "MoeCapturesFailing", "MoeProfilerDisabled", "MoeEplbRearrangementStalled")
LAYER = 'layer=~"$layer"'
TOP1 = 'rank="1"'
STEP_TIME = 'signal="step_time"'
IMBALANCE = 'signal="worst_layer_imbalance_ratio"'
# Settings that are not MixinConfig fields (a config object may also lack some of those: opt falls back).
DEFAULTS = {
    "detector_imbalance_threshold": DetectorConfig().imbalance_abs,  # the sidecar's --imbalance-threshold default
    "stale_after_s": SidecarConfig().stale_after_s,  # the sidecar's --stale-after default
    "trace_api_url": "http://{instance}",  # where a browser reaches a sidecar's trace API; {instance}: its label
    "refresh": "30s",
}


def opt(cfg, name: str):
    """cfg.<name>, else the MixinConfig default, else DEFAULTS[name]."""
    for source in (cfg, MixinConfig):
        value = getattr(source, name, None)
        if value not in (None, ""):
            return value
    return DEFAULTS[name]


def runbook_anchor(expr: str) -> str:
    """Add a `runbook` label to ALERTS series: the alert name in lower case (rules.py's runbook_url anchor)."""
    for name in ALERTS:
        expr = f'label_replace({expr}, "runbook", "{name.lower()}", "alertname", "{name}")'
    return expr


def pad(expr: str, label: str, digits: int = 2) -> str:
    """label_replace calls that left-pad the numeric `label` with zeros (heatmap rows sort as text)."""
    for width in range(1, digits):
        zeros = "0" * (digits - width)
        expr = f'label_replace({expr}, "{label}", "{zeros}$1", "{label}", "([0-9]{{{width}}})")'
    return expr


# -- shared parts ------------------------------------------------------------------------------------

def variables(cfg) -> list:
    selector = str(opt(cfg, "selector")).strip().rstrip(",")
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


def frame(uid: str, title: str, description: str, cfg, rows: list[Row], time_from: str, *,
          template: list | None = None, notes: list | None = None) -> dict:
    """The dashboard: `template` variables (default: the per-instance ones) and `notes` annotations (default:
    captures and alerts of the selected instances) around the rows."""
    d = (db.Dashboard(title).uid(uid).description(description).tags(TAGS).refresh(opt(cfg, "refresh"))
         .time(time_from, "now").timezone("browser").editable().tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .timepicker(db.TimePicker().refresh_intervals(["10s", "30s", "1m", "5m", "15m", "1h"]))
         .variables(variables(cfg) if template is None else template)
         .annotations(annotations() if notes is None else notes)
         .link(db.DashboardLink("MoE dashboards").type(dm.DashboardLinkType.DASHBOARDS).tags(["moe-monitor"])
               .as_dropdown(True).include_vars(True).keep_time(True).target_blank(False).icon("external link")
               .tooltip("The other moe-monitor dashboards")))
    d = assemble(d, rows)
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def link_to(key: str, title: str) -> db.DashboardLink:
    return link(title, f"/d/{UIDS[key]}")


# -- MoE overview ------------------------------------------------------------------------------------


def captures_in(range_: str, by: str = "instance, reason, outcome") -> str:
    """Captures counted in the last `range_` by (reason, outcome). A (reason, outcome) series is born at 1 on its
    first capture, which increase() cannot see: a series that did not exist `range_` ago counts whole."""
    total = sel("moe_captures_total")
    return (f"sum by ({by}) ((increase({total}[{range_}]) and {total} offset {range_}) "
            f"or ({total} unless {total} offset {range_}))")
