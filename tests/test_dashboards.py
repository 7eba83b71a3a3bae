"""The generated Grafana dashboards: they build, match the committed JSON, and every query is valid PromQL over
documented metrics, scoped by job and instance. Also Grafana's template interpolation (queries.substitute)."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import promql_parser
import pytest

from moe_monitor.mixin import dashboards
from moe_monitor.mixin.queries import (
    ANNOTATION,
    PANEL,
    VARIABLE,
    iter_panels,
    metric_names,
    panel_queries,
    substitute,
    variable_expr,
)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RECORDING_RULES = {
    "moe:step_duration_seconds:p50_rate5m", "moe:step_duration_seconds:p99_rate5m", "moe:step_tokens:rate5m",
    "moe:ep_rank_routed_tokens:rate5m", "moe:layer_ep_rank_imbalance_ratio:rate5m", "moe:routed_assignments:rate5m",
    "moe:worst_layer_imbalance_ratio:max_over_time5m", "moe:deployment_ep_rank_routed_tokens:rate5m",
    "moe:deployment_layer_ep_rank_imbalance_ratio:rate5m", "moe:deployment_expert_routed_tokens:rate5m",
    "moe:deployment_layer_expert_imbalance_ratio:rate5m",
}
PROMETHEUS_BUILTINS = {"up", "ALERTS"}
# Values that survive substitution unchanged, so the scoping check can find them in the parsed matchers.
SAMPLE = {"job": ["moejob"], "instance": ["sidecar-a:9464", "sidecar-b:9464"], "model": ["tiny"],
          "layer": ["1", "3"], "datasource": "prom", "deployment": "inference/dsv3-0", "namespace": "inference"}
SINGLE = {"job": "moejob", "instance": "sidecar-a:9464", "model": "tiny", "layer": "5", "datasource": "prom",
          "deployment": "inference/dsv3-0", "namespace": "inference"}
DEPLOYMENT = "moe-deployment"  # uid of the one dashboard scoped by job and deployment instead of job and instance
# Template variables of each dashboard, in order, and the ones each variable's query uses.
VARIABLES = {"per instance": {"job": set(), "model": {"job"}, "instance": {"job", "model"},
                              "layer": {"job", "instance"}},
             DEPLOYMENT: {"job": set(), "namespace": {"job"}, "deployment": {"job", "namespace"},
                          "layer": {"job", "namespace", "deployment"}}}

BUILT = dashboards.build()


def documented_metrics() -> tuple[set[str], set[str]]:
    """(names, prefixes) of docs/metrics.md: every backquoted moe_* name, histogram series, `prefix_*`."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    names, prefixes = set(), set()
    for token in re.findall(r"`(moe_[a-z0-9_*]+)", text):
        if token.endswith("*"):
            prefixes.add(token.rstrip("*"))
        else:
            names.add(token)
    for row in re.findall(r"^\|\s*`(moe_[a-z0-9_]+)`[^|]*\|\s*histogram", text, re.M):
        names |= {row + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names, prefixes


def all_queries(kinds=(PANEL, ANNOTATION, VARIABLE)):
    return [q for d in BUILT.values() for q in panel_queries(d, kinds)]


def content_panels(d: dict) -> list[dict]:
    return [p for p in iter_panels(d) if p["type"] != "row"]


# -- structure ---------------------------------------------------------------------------------------

def scope(d: dict) -> str:
    """The variable that scopes a dashboard's queries besides job: `deployment` or `instance`."""
    return "deployment" if d["uid"] == DEPLOYMENT else "instance"


def test_four_dashboards_with_stable_uids_tags_refresh_and_time():
    assert set(BUILT) == {"moe-overview.json", "moe-expert-load.json", "moe-kernel-breakdown.json",
                          "moe-deployment.json"}
    uids = {name: d["uid"] for name, d in BUILT.items()}
    assert uids == {"moe-overview.json": "moe-overview", "moe-expert-load.json": "moe-expert-load",
                    "moe-kernel-breakdown.json": "moe-kernel-breakdown", "moe-deployment.json": DEPLOYMENT}
    for d in BUILT.values():
        assert "moe-monitor" in d["tags"] and d["refresh"] and d["time"]["from"].startswith("now-")
        assert d["title"].startswith("MoE ") and d["description"]
    assert dashboards.build() == BUILT, "build() must be deterministic"


def test_committed_json_is_what_build_produces():
    for name, d in BUILT.items():
        path = COMMITTED / name
        assert path.exists(), f"{path} missing: run `make mixin` (moe-monitor mixin build)"
        assert path.read_text() == dashboards.render(d), f"{name} drifted from the code: regenerate it"


def test_panel_ids_and_titles_unique_and_every_panel_in_a_row():
    for d in BUILT.values():
        ids = [p["id"] for p in iter_panels(d)]
        assert len(ids) == len(set(ids)) and 0 not in ids
        titles = [p["title"] for p in content_panels(d)]
        assert len(titles) == len(set(titles)), sorted(t for t in titles if titles.count(t) > 1)
        assert d["panels"][0]["type"] == "row"
        for row in (p for p in d["panels"] if p["type"] == "row"):
            assert row["collapsed"] == bool(row["panels"]), row["title"]


def test_every_panel_has_unit_description_and_the_datasource_variable():
    for d in BUILT.values():
        for p in content_panels(d):
            where = f"{d['title']} / {p['title']}"
            assert p.get("description", "").strip(), where
            assert p["datasource"] == DATASOURCE, where
            assert p["fieldConfig"]["defaults"].get("unit"), where
            assert isinstance(p.get("options"), dict), where
            assert p["targets"], where
            for t in p["targets"]:
                assert t["datasource"] == DATASOURCE and t["refId"], where
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), where


def test_template_variables_are_chained():
    for d in BUILT.values():
        needs = VARIABLES.get(d["uid"], VARIABLES["per instance"])
        variables = d["templating"]["list"]
        assert [v["name"] for v in variables] == ["datasource", *needs]
        assert [v["id"] for v in variables] == ["datasource", *needs]  # Grafana keys variables by id
        assert variables[0]["type"] == "datasource" and variables[0]["query"] == "prometheus"
        defined = {"datasource"}
        for v in variables[1:]:
            used = set(re.findall(r"\$\{?(\w+)", v["query"]))
            assert used == needs[v["name"]], v["name"]
            assert used <= defined, f"{v['name']} refers to a variable defined after it"
            assert v["datasource"] == DATASOURCE and v["refresh"] == 2
            if v["name"] in ("namespace", "deployment"):  # one deployment at a time: its panels sum its sidecars
                assert not v["multi"] and not v["includeAll"]
            else:
                assert v["multi"] and v["includeAll"] and "allValue" not in v
            defined.add(v["name"])
        layer = variables[-1]
        assert layer["sort"] == 3  # numerical


def test_dashboards_link_to_each_other():
    uids = {d["uid"] for d in BUILT.values()}
    for d in BUILT.values():
        dropdown = [lk for lk in d["links"] if lk["type"] == "dashboards"]
        assert dropdown and dropdown[0]["tags"] == ["moe-monitor"] and dropdown[0]["includeVars"]
        for p in content_panels(d):
            for lk in p.get("links") or []:
                target = re.fullmatch(r"/d/([\w-]+)", lk["url"])
                assert target and target.group(1) in uids, lk
    overview = BUILT["moe-overview.json"]
    linked = {lk["url"] for p in content_panels(overview) for lk in p.get("links") or []}
    assert linked == {"/d/moe-expert-load", "/d/moe-kernel-breakdown"}


def test_repeated_panels_repeat_over_a_defined_variable():
    repeated = [(d, p) for d in BUILT.values() for p in content_panels(d) if p.get("repeat")]
    assert len(repeated) >= 2
    for _d, p in repeated:
        assert p["repeat"] == "layer" and "$layer" in p["title"]


# -- queries -----------------------------------------------------------------------------------------

def test_panel_queries_cover_every_target_annotation_and_variable():
    for d in BUILT.values():
        targets = sum(len(p.get("targets") or []) for p in content_panels(d))
        assert len(panel_queries(d, [PANEL])) == targets
        assert len(panel_queries(d, [ANNOTATION])) == len(d["annotations"]["list"])
        assert len(panel_queries(d, [VARIABLE])) == len(d["templating"]["list"]) - 1  # all but the data source


def test_panel_queries_reach_panels_inside_collapsed_rows():
    d = {"title": "t", "panels": [
        {"type": "row", "title": "r", "collapsed": True, "panels": [
            {"type": "timeseries", "title": "inner", "targets": [{"refId": "A", "expr": "up"}]}]},
        {"type": "stat", "title": "outer", "targets": [{"refId": "B", "expr": "up", "instant": True}]}],
        "annotations": {"list": [{"name": "a", "expr": "ALERTS"}]},
        "templating": {"list": [{"type": "query", "name": "job", "query": "label_values(up, job)"},
                                {"type": "datasource", "name": "ds", "query": "prometheus"}]}}
    got = [(q.panel, q.ref_id, q.kind, q.instant) for q in panel_queries(d)]
    assert got == [("inner", "A", PANEL, False), ("outer", "B", PANEL, True), ("a", "Anno", ANNOTATION, False),
                   ("job", "Var", VARIABLE, False)]


@pytest.mark.parametrize("values", [SAMPLE, SINGLE], ids=["multi", "single"])
def test_every_query_parses_after_substitution(values):
    for q in all_queries():
        expr = substitute(q.expr, values, rate_interval="1m", range_="6h", interval="15s")
        assert "$__" not in expr and "${" not in expr, (q.panel, expr)
        try:
            promql_parser.parse(expr)
        except ValueError as e:
            pytest.fail(f"{q.dashboard} / {q.panel} / {q.ref_id}: {e}\n{expr}")


def test_every_selector_is_scoped_by_job_and_instance_or_deployment():
    values = {"job": ["J"], "instance": ["I"], "model": ["M"], "layer": ["L"], "datasource": "prom", "deployment": "D"}
    for d in BUILT.values():
        scoped_by = {"instance": ("instance", "I"), "deployment": ("deployment", "D")}[scope(d)]
        for q in panel_queries(d, [PANEL, ANNOTATION]):
            expr = promql_parser.parse(substitute(q.expr, values))
            selectors = []
            promql_parser.walk(expr, lambda n, selectors=selectors:
                               selectors.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
            assert selectors, q
            for s in selectors:
                matchers = {(m.name, str(m.op), m.value) for m in s.matchers.matchers}
                assert {("job", str(promql_parser.MatchOp.Re), "J"),
                        (scoped_by[0], str(promql_parser.MatchOp.Re), scoped_by[1])} <= matchers, \
                    f"{q.dashboard} / {q.panel}: {s}"


def test_every_metric_is_documented_or_a_recording_rule():
    names, prefixes = documented_metrics()
    assert "moe_expert_load_ratio_bucket" in names and "moe_monitor_process_" in prefixes
    used = set()
    for q in all_queries():
        used |= metric_names(substitute(q.expr, SAMPLE))
    unknown = {n for n in used - names - RECORDING_RULES - PROMETHEUS_BUILTINS
               if not any(n.startswith(p) for p in prefixes)}
    assert not unknown, f"not in docs/metrics.md nor a recording rule: {sorted(unknown)}"
    assert RECORDING_RULES <= used, f"recording rules not used: {sorted(RECORDING_RULES - used)}"


def test_per_layer_series_are_filtered_by_the_layer_variable():
    per_layer = re.compile(r"^moe(_layer_|_expert_|_ep_rank_|:ep_rank_|:layer_|:deployment_)")
    values = {"job": ["J"], "instance": ["I"], "model": ["M"], "layer": ["L"], "datasource": "prom", "deployment": "D"}
    checked = 0
    for q in all_queries([PANEL]):
        selectors = []
        promql_parser.walk(promql_parser.parse(substitute(q.expr, values)),
                           lambda n, selectors=selectors:
                           selectors.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
        for s in selectors:
            if per_layer.match(s.name or ""):
                checked += 1
                assert ("layer", "L") in {(m.name, m.value) for m in s.matchers.matchers}, (q.dashboard, q.panel)
    assert checked > 20


def test_alert_table_covers_the_mixin_alerts_and_links_to_their_runbooks():
    from moe_monitor.mixin.config import MixinConfig
    from moe_monitor.mixin.rules import rules_document

    rules = {r["alert"]: r["annotations"]["runbook_url"] for g in rules_document(MixinConfig())["groups"]
             for r in g["rules"] if "alert" in r}
    assert set(dashboards.ALERTS) == set(rules)
    overview = BUILT["moe-overview.json"]
    table = next(p for p in content_panels(overview) if "ALERTS" in p["targets"][0]["expr"])
    assert table["targets"][0]["instant"]
    anchors = dict((name, anchor) for anchor, name in
                   re.findall(r'"runbook", "([^"]+)", "alertname", "([^"]+)"', table["targets"][0]["expr"]))
    link = table["fieldConfig"]["overrides"][0]["properties"][0]["value"][0]["url"]
    for name, runbook_url in rules.items():
        assert link.replace("${__data.fields.runbook}", anchors[name]) == runbook_url


def test_expert_load_histogram_is_a_heatmap_of_increases_of_buckets():
    load = BUILT["moe-expert-load.json"]
    heatmaps = [p for p in content_panels(load) if p["type"] == "heatmap"
                and "moe_expert_load_ratio_bucket" in p["targets"][0]["expr"]]
    assert heatmaps and any(p.get("repeat") == "layer" for p in heatmaps)
    for p in heatmaps:
        t = p["targets"][0]
        assert t["format"] == "heatmap" and "increase(" in t["expr"] and "[$__rate_interval]" in t["expr"]
        assert p["options"]["calculate"] is False
    t2 = [p for p in content_panels(load) if "moe_expert_routed_tokens_total" in p["targets"][0]["expr"]]
    assert t2 and all("--expert-series all" in p["description"] for p in t2)


def test_capture_table_links_to_the_sidecar_trace_api_route():
    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.server import build_app

    app = build_app(SimpleNamespace(config=SidecarConfig()))  # only its routes are read
    routes = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    assert "/api/captures/{id}" in routes and "/api/captures" in routes
    kernel = BUILT["moe-kernel-breakdown.json"]
    table = next(p for p in content_panels(kernel) if p["title"] == "Captures in the time range")
    links = {o["matcher"]["options"]: o["properties"][0]["value"][0]["url"]
             for o in table["fieldConfig"]["overrides"] if o["properties"][0]["id"] == "links"}
    assert links["capture"] == "http://${__data.fields.instance}/api/captures/${__value.raw}"
    assert links["instance"] == "http://${__value.raw}/api/captures"
    assert "max_over_time(moe_capture_info{" in table["targets"][0]["expr"]  # the id: moe_capture_info{capture}


def test_capture_annotations_on_every_per_instance_dashboard():
    for d in BUILT.values():
        if scope(d) != "instance":
            continue  # the deployment view's only annotation is its alert (test_deployment_dashboard_*)
        exprs = [a["expr"] for a in d["annotations"]["list"]]
        assert any("moe_captures_total" in e for e in exprs)
        assert any("moe_capture_last_end_timestamp_seconds" in e for e in exprs)


def test_config_is_honoured():
    from moe_monitor.mixin.config import MixinConfig

    cfg = MixinConfig(selector='job="vllm-moe", namespace="inference"', runbook_url="https://runbooks.example/moe",
                      imbalance_ratio=3.0, hot_expert_share=0.3, ep_rank_imbalance_ratio=1.7, step_time_ratio=1.8)
    panels = {p["title"]: p for d in dashboards.build(cfg).values() for p in content_panels(d)}
    job = dashboards.build(cfg)["moe-overview.json"]["templating"]["list"][1]
    assert job["query"] == 'label_values(moe_monitor_build_info{job="vllm-moe", namespace="inference"}, job)'
    alerts = panels["Firing and pending MoE alerts"]
    assert alerts["fieldConfig"]["overrides"][0]["properties"][0]["value"][0]["url"].startswith(cfg.runbook_url)
    for title, value in [("Worst-layer imbalance", 3.0), ("Top-1 expert share by layer", 0.3),
                         ("EP-rank imbalance by layer", 1.7), ("Step time vs baseline (detector)", 1.8)]:
        assert panels[title]["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == value, title
        assert panels[title]["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "dashed"
    assert dashboards.build(MixinConfig()) == BUILT  # None means the defaults
    assert dashboards.build(SimpleNamespace()) == BUILT  # a config lacking fields: their defaults


def test_deployment_dashboard_reads_the_deployment_rules_by_the_configured_label():
    from moe_monitor.mixin.config import MixinConfig
    from moe_monitor.mixin.dashboards.deployment import EXPERT_TIME_LOST
    from moe_monitor.mixin.rules import DEPLOYMENT_EP_EXPERT_TIME_LOST, DEPLOYMENT_EP_RANK_ROUTED_RATE, rules_document

    deployment_records = {r["record"] for g in rules_document(MixinConfig())["groups"] for r in g["rules"]
                          if ":deployment_" in r.get("record", "")}
    d = BUILT["moe-deployment.json"]
    used = set()
    for q in panel_queries(d, [PANEL]):
        used |= metric_names(substitute(q.expr, SAMPLE))
    # The expert-time-lost record sums every layer (no layer label, so no $layer filter): its panel computes the
    # same from the EP-rank rates of the selected layers, and names the record in its description.
    assert deployment_records - {DEPLOYMENT_EP_EXPERT_TIME_LOST} <= used, \
        f"not on the deployment dashboard: {deployment_records - used}"
    (lost,) = [p for p in content_panels(d) if p["title"] == EXPERT_TIME_LOST]
    assert DEPLOYMENT_EP_EXPERT_TIME_LOST in lost["description"]
    assert metric_names(substitute(lost["targets"][0]["expr"], SAMPLE)) == {DEPLOYMENT_EP_RANK_ROUTED_RATE}
    (alert,) = d["annotations"]["list"]
    assert 'alertname="MoeDeploymentEPRankImbalance"' in alert["expr"] and alert["enable"]

    cfg = MixinConfig(deployment_label="lws_group", ep_rank_imbalance_ratio=1.7)
    other = dashboards.build(cfg)["moe-deployment.json"]
    variable = next(v for v in other["templating"]["list"] if v["name"] == "deployment")
    assert variable["query"] == \
        'label_values(moe_monitor_build_info{job=~"$job", namespace=~"$namespace", lws_group!=""}, lws_group)'
    for q in panel_queries(other, [PANEL, ANNOTATION]):
        assert 'lws_group=~"$deployment"' in q.expr and not re.search(r"\bdeployment(=~|!=|=)", q.expr), q
    # every selector of a query is scoped by the deployment scope labels (namespace): two namespaces may each
    # have a deployment of the same name (the deployment rules keep them apart, so must the dashboard)
    for q in panel_queries(d, [PANEL, ANNOTATION]):
        selectors = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*\{[^}]*\}", q.expr)
        assert selectors and all('namespace=~"$namespace"' in sel for sel in selectors), q
    scoped = dashboards.build(MixinConfig(deployment_scope_labels=("cluster", "namespace")))["moe-deployment.json"]
    assert [v["name"] for v in scoped["templating"]["list"]] == \
        ["datasource", "job", "cluster", "namespace", "deployment", "layer"]
    # each scope variable lists the values under the ones chosen before it: the namespaces of the chosen cluster
    queries = {v["name"]: v["query"] for v in scoped["templating"]["list"]}
    assert queries["cluster"] == 'label_values(moe_monitor_build_info{job=~"$job", deployment!=""}, cluster)'
    assert queries["namespace"] == \
        'label_values(moe_monitor_build_info{job=~"$job", cluster=~"$cluster", deployment!=""}, namespace)'
    assert 'cluster=~"$cluster", namespace=~"$namespace"' in queries["deployment"]
    unscoped = dashboards.build(MixinConfig(deployment_scope_labels=()))["moe-deployment.json"]
    assert [v["name"] for v in unscoped["templating"]["list"]] == ["datasource", "job", "deployment", "layer"]
    assert not any("$namespace" in q.expr for q in panel_queries(unscoped))
    panels = {p["title"]: p for p in content_panels(other)}
    imbalance = panels["EP-rank imbalance by layer (deployment)"]["fieldConfig"]["defaults"]
    assert imbalance["thresholds"]["steps"][-1]["value"] == 1.7
    assert imbalance["custom"]["thresholdsStyle"]["mode"] == "dashed"


# -- substitute ----------------------------------------------------------------------------------------

def test_substitute_single_and_multi_values():
    assert substitute('up{job=~"$job"}', {"job": "a"}) == 'up{job=~"a"}'
    assert substitute('up{job=~"${job}"}', {"job": ["a", "b"]}) == 'up{job=~"(a|b)"}'
    assert substitute('up{job=~"$job"}', {"job": ["a"]}) == 'up{job=~"a"}'
    # multi values are regex-escaped for a PromQL string (backslashes doubled), single ones are not
    assert substitute('up{instance=~"$instance"}', {"instance": ["10.0.0.1:9464", "h:1"]}) == \
        'up{instance=~"(10\\\\.0\\\\.0\\\\.1:9464|h:1)"}'
    assert substitute('up{instance=~"$instance"}', {"instance": "10.0.0.1:9464"}) == 'up{instance=~"10.0.0.1:9464"}'
    assert substitute('up{instance=~"$instance"}', {"instance": "10.0.0.1:9464"}, multi=["instance"]) == \
        'up{instance=~"10\\\\.0\\\\.0\\\\.1:9464"}'
    assert substitute("x{a='$v'}", {"v": "it's"}) == "x{a='it\\\\'s'}"
    parsed = promql_parser.parse(substitute('up{instance=~"$i"}', {"i": ["10.0.0.1:9464", "b"]}))
    assert parsed.matchers.matchers[0].value == "(10\\.0\\.0\\.1:9464|b)"  # what Prometheus sees


def test_substitute_builtins_like_grafana():
    expr = "rate(x[$__rate_interval]) $__interval $__interval_ms $__range $__range_s $__range_ms ${__range}"
    assert substitute(expr, {}, rate_interval="2m", range_="1h", interval="30s") == \
        "rate(x[2m]) 30s 30000 3600s 3600 3600000 3600s"
    assert substitute("[$__range:]", {}) == "[300s:]"  # defaults: range 5m
    assert substitute("[$__rate_interval]", {}) == "[1m]"


def test_substitute_formats_and_unknowns():
    v = {"layer": ["1", "2"], "one": "a.b"}
    assert substitute("${layer:regex}", v) == "(1|2)"
    assert substitute("${one:regex}", v) == "a\\.b"
    assert substitute("${layer:pipe}", v) == "1|2"
    assert substitute("${layer:csv}", v) == "1,2"
    assert substitute("${layer:raw}", v) == "1,2"
    assert substitute("${layer:glob}", v) == "{1,2}"
    assert substitute("${layer:json}", v) == '["1","2"]'
    assert substitute("${layer:queryparam}", v) == "var-layer=1&var-layer=2"
    assert substitute("${layer:singlequote}", v) == "'1','2'"
    assert substitute("[[layer]] [[layer:pipe]]", v) == "(1|2) 1|2"
    # label_replace's $1, an unknown variable and a field path are left/handled like Grafana does
    assert substitute('label_replace(x, "l", "0$1", "l", "([0-9])") $nope ${nope}', v) == \
        'label_replace(x, "l", "0$1", "l", "([0-9])") $nope ${nope}'
    assert substitute("$layer$one", v) == "(1|2)a.b"


def test_variable_expr():
    assert variable_expr('label_values(moe_model_info{job=~"$job"}, model)') == ('moe_model_info{job=~"$job"}', "model")
    assert variable_expr("label_values(job)") == ('{job!=""}', "job")
    assert variable_expr("query_result(sum(up))") == ("sum(up)", None)
