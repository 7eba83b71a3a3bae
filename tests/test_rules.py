"""The alerting and recording rules (moe_monitor/mixin): promtool accepts them, its unit tests (tests/rules/)
cover every alert, every expression parses and names only documented metrics, runbook links resolve, config
overrides fail clearly, and the committed generated files are what the code generates (no drift)."""

from __future__ import annotations

import collections
import concurrent.futures
import glob
import itertools
import os
import re
import shutil
import subprocess
import textwrap

import promql_parser
import pytest
import yaml
from click.testing import CliRunner

from moe_monitor.cli import main
from moe_monitor.mixin import build
from moe_monitor.mixin.config import ConfigError, MixinConfig, config_from_dict, load_config
from moe_monitor.mixin.rules import check_rule_order, rules_document

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_TESTS = sorted(glob.glob(os.path.join(REPO, "tests", "rules", "*.yml")))
ALERTS = ["MoeExpertImbalanceSustained", "MoeHotExpert", "MoeDeadExperts", "MoeEPRankImbalance",
          "MoeDeploymentEPRankImbalance", "MoeStepTimeRegression", "MoeSidecarDown", "MoeSegmentsStale",
          "MoeLayerSilent", "MoeCapturesFailing", "MoeProfilerDisabled", "MoeEplbRearrangementStalled"]
RECORDS = ["moe:step_duration_seconds:p50_rate5m", "moe:step_duration_seconds:p99_rate5m", "moe:step_tokens:rate5m",
           "moe:ep_rank_routed_tokens:rate5m", "moe:layer_ep_rank_imbalance_ratio:rate5m",
           "moe:routed_assignments:rate5m", "moe:worst_layer_imbalance_ratio:max_over_time5m",
           "moe:deployment_ep_rank_routed_tokens:rate5m", "moe:deployment_layer_ep_rank_imbalance_ratio:rate5m",
           "moe:deployment_ep_expert_time_lost_ratio:rate5m", "moe:deployment_expert_routed_tokens:rate5m",
           "moe:deployment_layer_expert_imbalance_ratio:rate5m"]
DEFAULT_CONFIG = MixinConfig()


def promtool(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool missing: scripts/setup-env installs Debian's prometheus package (CI has it)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def generated_tree(tmp_path, cfg: MixinConfig = DEFAULT_CONFIG) -> str:
    """The generated files for cfg under tmp_path, laid out as in the repository."""
    build.write({k: v for k, v in build.generate(cfg).items() if not k.startswith(build.DASHBOARD_DIR)},
                str(tmp_path))
    return str(tmp_path)


def all_rules(cfg: MixinConfig = DEFAULT_CONFIG) -> list[dict]:
    return [r for g in rules_document(cfg)["groups"] for r in g["rules"]]


def alerts(cfg: MixinConfig = DEFAULT_CONFIG) -> list[dict]:
    return [r for r in all_rules(cfg) if "alert" in r]


def records(cfg: MixinConfig = DEFAULT_CONFIG) -> list[dict]:
    return [r for r in all_rules(cfg) if "record" in r]


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        elif isinstance(node, promql_parser.MatrixSelector):
            found.append(node.vector_selector)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


# -- promtool ------------------------------------------------------------------------------------------

def test_promtool_accepts_the_generated_rule_file(tmp_path):
    path = os.path.join(generated_tree(tmp_path), build.RULES_FILE)
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDS)} rules found" in result.stdout


def unit_tests_against_the_code(tmp_path) -> list[str]:
    """tests/rules/*.yml copied beside rules generated now (not the committed file: the drift test checks that)."""
    root = generated_tree(tmp_path)
    os.makedirs(os.path.join(root, "tests", "rules"))
    for path in UNIT_TESTS:
        shutil.copy(path, os.path.join(root, "tests", "rules"))
    return sorted(glob.glob(os.path.join(root, "tests", "rules", "*.yml")))


@pytest.mark.slow
def test_promtool_unit_tests_pass_against_the_code(tmp_path):
    result = promtool("test", "rules", *unit_tests_against_the_code(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


REPEATS = 30


@pytest.mark.slow
def test_every_promtool_unit_test_file_passes_30_times_in_a_row(tmp_path):
    """Issue #23: promtool evaluates rule groups in Go map order (random per run), so a result that depends on the
    order fails some runs only. Each file, 30 runs: 30 passes required (a 1-in-10 flake survives with p = 4 %)."""
    files = unit_tests_against_the_code(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = list(pool.map(lambda f: (f, promtool("test", "rules", f)), files * REPEATS))
    failed = collections.Counter(os.path.basename(f) for f, r in runs if r.returncode != 0)
    first = next((r.stdout + r.stderr for _, r in runs if r.returncode != 0), "")
    assert not failed, f"failures in {REPEATS} runs per file: {dict(failed)}; the first:\n{first}"


@pytest.mark.slow
@pytest.mark.parametrize("order", list(itertools.permutations(
    [g["name"] for g in rules_document(DEFAULT_CONFIG)["groups"]])), ids="|".join)
def test_promtool_unit_tests_pass_whatever_order_the_groups_run_in(tmp_path, order):
    """The deterministic form of the repeat check: every order of the groups, set with promtool's
    group_eval_order. A real Prometheus runs groups concurrently at their own offsets, so no order may matter."""
    files = unit_tests_against_the_code(tmp_path)
    for path in files:
        with open(path) as f:
            doc = yaml.safe_load(f)
        doc["group_eval_order"] = list(order)
        with open(path, "w") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_rule_reading_a_record_of_another_group_or_a_later_one_is_refused():
    check_rule_order(rules_document(DEFAULT_CONFIG))  # the shipped rules
    doc = {"groups": [{"name": "a", "rules": [{"record": "moe:x:rate5m", "expr": "rate(moe_x_total[5m])"}]},
                      {"name": "b", "rules": [{"alert": "X", "expr": "moe:x:rate5m > 1"}]}]}
    with pytest.raises(ValueError, match="X \\(group b\\) reads moe:x:rate5m, recorded in group a"):
        check_rule_order(doc)
    doc = {"groups": [{"name": "a", "rules": [{"alert": "X", "expr": "max(moe:x:rate5m) > 1"},
                                              {"record": "moe:x:rate5m", "expr": "rate(moe_x_total[5m])"}]}]}
    with pytest.raises(ValueError, match="recorded later in the same group"):
        check_rule_order(doc)
    # a longer name that merely starts with a recorded one is not a read of it
    doc = {"groups": [{"name": "a", "rules": [{"record": "moe:x:rate5m", "expr": "rate(moe_x_total[5m])"}]},
                      {"name": "b", "rules": [{"alert": "X", "expr": "moe:x:rate5m_other > 1"}]}]}
    check_rule_order(doc)


def test_unit_tests_cover_every_alert_firing_and_silent():
    firing, silent = set(), set()
    for path in UNIT_TESTS:
        with open(path) as f:
            doc = yaml.safe_load(f)
        assert doc["rule_files"] == ["../../deploy/prometheus/rules/moe-monitor.rules.yml"], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert set(ALERTS) == {r["alert"] for r in all_rules() if "alert" in r}
    assert firing >= set(ALERTS), f"no test where these fire: {set(ALERTS) - firing}"
    assert silent >= set(ALERTS), f"no test where these stay silent or resolve: {set(ALERTS) - silent}"


E2E_TOML = """
# What an end-to-end test with `moe-monitor serve --window 2`, a 1 s scrape and 1 s rule evaluation can use.
rate_window = "6s"
imbalance_for = "4s"
min_expert_load = 0
"""


def test_a_short_override_fires_imbalance_within_20_seconds(tmp_path):
    """The e2e override: 2 s windows scraped every second, balanced until t=30 s, hot after; firing by 50 s."""
    cfg_path = tmp_path / "e2e.toml"
    cfg_path.write_text(E2E_TOML)
    root = generated_tree(tmp_path, load_config(str(cfg_path)))
    series = {  # one sample per second: a 2 s window's value is scraped twice
        "moe_layer_imbalance_ratio": "1.1x30 3x60",
        "moe_layer_top1_share": "0.1375x30 0.375x60",
        "moe_layer_window_routed_tokens": "300x90",
    }
    test = {
        "rule_files": [os.path.join(root, build.RULES_FILE)],
        "evaluation_interval": "1s",
        "tests": [{
            "interval": "1s",
            "input_series": [{"series": f'{name}{{job="moe-monitor", instance="sidecar:9464", layer="0"}}',
                              "values": values} for name, values in series.items()],
            "alert_rule_test": [
                {"eval_time": "30s", "alertname": "MoeExpertImbalanceSustained", "exp_alerts": []},
                {"eval_time": "45s", "alertname": "MoeExpertImbalanceSustained", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "job": "moe-monitor", "instance": "sidecar:9464"},
                    "exp_annotations": alert_annotations("MoeExpertImbalanceSustained", "sidecar:9464", "3",
                                                         load_config(str(cfg_path)))}]},
            ],
        }],
    }
    (tmp_path / "e2e_test.yml").write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(tmp_path / "e2e_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def alert_annotations(name: str, instance: str, value: str, cfg: MixinConfig) -> dict:
    rule = next(r for r in alerts(cfg) if r["alert"] == name)
    return {k: v.replace("{{ $labels.instance }}", instance).replace("{{ $value | humanize }}", value)
            for k, v in rule["annotations"].items()}


# -- expressions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", all_rules(), ids=lambda r: r.get("alert") or r["record"])
def test_every_expression_parses(rule):
    promql_parser.parse(rule["expr"])


def documented_metrics() -> set[str]:
    with open(os.path.join(REPO, "docs", "metrics.md")) as f:
        return set(re.findall(r"`(moe_[a-z0-9_]+)", f.read()))


def test_every_metric_referenced_is_documented_or_recorded():
    documented, recorded = documented_metrics(), set(RECORDS)
    for rule in all_rules():
        for vs in selectors(rule["expr"]):
            name = vs.name
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            assert name in documented or base in documented or name in recorded or name == "up", \
                f"{rule.get('alert') or rule['record']}: {name} is not in docs/metrics.md"
    # the annotations name metrics too
    for rule in alerts(MixinConfig()):
        for text in rule["annotations"].values():
            for name in re.findall(r"\b(moe_[a-z0-9_]+|moe:[a-z0-9_:]+)", text):
                assert name in documented or name in recorded, f"{rule['alert']} annotation: {name}"


def test_recording_rules_are_exactly_the_ones_dashboards_use():
    assert [r["record"] for r in records(MixinConfig())] == RECORDS
    for rule in records(MixinConfig()):
        promql_parser.parse(rule["expr"])


def test_the_selector_reaches_every_raw_series():
    cfg = MixinConfig(selector='job="vllm-moe", namespace="inference"')
    for rule in all_rules(cfg):
        for vs in selectors(rule["expr"]):
            if vs.name in RECORDS:
                continue  # recorded from selected series already
            matchers = {(m.name, m.value) for m in vs.matchers.matchers}
            assert {("job", "vllm-moe"), ("namespace", "inference")} <= matchers, (rule.get("alert"), vs.name)


def test_every_alert_has_severity_annotations_and_a_runbook_section():
    with open(os.path.join(REPO, "docs", "runbooks.md")) as f:
        anchors = {github_anchor(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", f.read(), flags=re.M)}
    for rule in alerts(MixinConfig()):
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert "$labels" in notes["summary"] + notes["description"], rule["alert"]
        base, _, anchor = notes["runbook_url"].partition("#")
        assert base == MixinConfig().runbook_url and anchor == rule["alert"].lower()
        assert anchor in anchors, f"docs/runbooks.md has no section for {rule['alert']}"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# -- config --------------------------------------------------------------------------------------------

def toml(tmp_path, text: str) -> str:
    path = tmp_path / "mixin.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_overrides_reach_the_rules(tmp_path):
    cfg = load_config(toml(tmp_path, """
        imbalance_ratio = 3
        imbalance_for = "20s"
        selector = 'job="vllm-moe"'
        capture_failure_outcomes = ["start_failed"]
        runbook_url = "https://wiki.example.com/moe"
    """))
    assert cfg.imbalance_ratio == 3.0 and isinstance(cfg.imbalance_ratio, float)
    rule = next(r for r in alerts(cfg) if r["alert"] == "MoeExpertImbalanceSustained")
    assert rule["for"] == "20s" and rule["expr"].endswith(") > 3") and 'job="vllm-moe"' in rule["expr"]
    assert rule["annotations"]["runbook_url"] == "https://wiki.example.com/moe#moeexpertimbalancesustained"
    failing = next(r for r in alerts(cfg) if r["alert"] == "MoeCapturesFailing")
    assert 'outcome=~"start_failed"' in failing["expr"]


def test_the_deployment_label_is_configurable():
    cfg = MixinConfig(deployment_label="lws_group")
    rules = {r.get("alert") or r["record"]: r for r in all_rules(cfg)}
    per_deployment = [name for name in rules if ":deployment_" in name or name == "MoeDeploymentEPRankImbalance"]
    assert len(per_deployment) == 6
    for name in [*per_deployment, "MoeEPRankImbalance"]:
        expr = rules[name]["expr"]
        assert "lws_group" in expr and not re.search(r"\bdeployment\b", expr), name
        for vs in selectors(expr):
            if vs.name in RECORDS or (name == "MoeEPRankImbalance" and vs.name != "up"):
                continue
            # raw series of a deployment figure: only the targets that carry the label
            assert ("lws_group", str(promql_parser.MatchOp.NotEqual), "") in \
                {(m.name, str(m.op), m.value) for m in vs.matchers.matchers}, (name, vs.name)
    assert "{{ $labels.lws_group }}" in rules["MoeDeploymentEPRankImbalance"]["annotations"]["summary"]


@pytest.mark.parametrize("scope, by", [
    (("namespace",), "job, namespace, deployment"),  # the default: AlertmanagerConfig routes on namespace
    ((), "job, deployment"),
    (("cluster", "namespace"), "job, cluster, namespace, deployment"),
])
def test_every_deployment_wide_aggregation_keeps_the_scope_labels(scope, by):
    cfg = MixinConfig(deployment_scope_labels=scope)
    group = next(g for g in rules_document(cfg)["groups"] if g["name"] == "moe-monitor.deployment")
    for rule in group["rules"]:
        groupings = re.findall(r"\b(?:by|on) \(([^)]*)\)", rule["expr"])
        assert groupings and all(g == by or g.startswith(by + ", ") for g in groupings), rule.get("record") or rule
    assert cfg == config_from_dict({"deployment_scope_labels": list(scope)})


def test_a_zero_for_leaves_for_out():
    rule = next(r for r in alerts(MixinConfig(sidecar_down_for="0s")) if r["alert"] == "MoeSidecarDown")
    assert "for" not in rule


@pytest.mark.parametrize("text, message", [
    ("imbalance_treshold = 3", "unknown key 'imbalance_treshold' (did you mean 'imbalance_ratio'?)"),
    ("nonsense = 1", "unknown key 'nonsense'; known keys: capture_failure_outcomes"),
    ('imbalance_ratio = "3"', "imbalance_ratio: expected a number, got a string '3'"),
    ("dead_experts = 1.5", "dead_experts: expected an integer, got a number 1.5"),
    ("dead_experts = true", "dead_experts: expected an integer, got a boolean True"),
    ("imbalance_for = 15", "imbalance_for: expected a string, got an integer 15"),
    ('imbalance_for = "15 minutes"', "imbalance_for: '15 minutes' is not a Prometheus duration"),
    ('rate_window = "0s"', "rate_window: a range cannot be '0s'"),
    ("imbalance_ratio = 0.5", "imbalance_ratio: 0.5 must be at least 1"),
    ("imbalance_ratio = nan", "imbalance_ratio: nan must be at least 1"),
    ("hot_expert_share = 1.5", "hot_expert_share: 1.5 must be in (0, 1]"),
    ('capture_failure_outcomes = ["ok"]', "capture_failure_outcomes: ['ok'] not allowed"),
    ("selector = 'job=moe'", "selector: 'job=moe' is not a list of PromQL label matchers"),
    ('deployment_label = "instance"', "deployment_label: 'instance' is not a free Prometheus label name"),
    ('deployment_label = "lws-group"', "deployment_label: 'lws-group' is not a free Prometheus label name"),
    ('deployment_scope_labels = ["instance"]', "deployment_scope_labels: ['instance'] are not distinct free"),
    ('deployment_scope_labels = ["deployment"]', "deployment_scope_labels: ['deployment'] are not distinct free"),
    ('deployment_scope_labels = ["ns", "ns"]', "deployment_scope_labels: ['ns', 'ns'] are not distinct free"),
    ('deployment_scope_labels = "namespace"', "deployment_scope_labels: expected a list of strings, got a string"),
    ("[imbalance]\nratio = 2", "unknown key 'imbalance'"),
    ("imbalance_ratio = ", "not valid TOML"),
])
def test_bad_overrides_say_what_is_wrong(tmp_path, text, message):
    path = toml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and str(e.value).startswith(path)


def test_the_cli_reports_a_bad_config_and_a_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["mixin", "build", "--config", toml(tmp_path, "imbalance_ratio = 'x'"),
                                       "--out", str(tmp_path)])
    assert result.exit_code == 2 and "imbalance_ratio: expected a number" in result.output
    result = CliRunner().invoke(main, ["mixin", "check", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "cannot read" in result.output


# -- generated files -----------------------------------------------------------------------------------

def test_the_prometheus_rule_carries_the_same_groups():
    files = build.generate(MixinConfig())
    rule_file = yaml.safe_load(files[build.RULES_FILE])
    crd = yaml.safe_load(files[build.PROMETHEUS_RULE_FILE])
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["metadata"] == {"name": "moe-monitor",
                               "labels": {"app.kubernetes.io/name": "moe-monitor", "release": "prometheus"}}
    assert crd["spec"] == rule_file == rules_document(MixinConfig())
    for text in (files[build.RULES_FILE], files[build.PROMETHEUS_RULE_FILE]):
        assert text.startswith("# Generated by `moe-monitor mixin build`")


def test_the_committed_tree_has_no_drift():
    """CI fails when someone edits a generated file or changes the code without `make mixin`."""
    result = CliRunner().invoke(main, ["mixin", "check", "--out", REPO])
    assert result.exit_code == 0, result.output


def test_check_lists_what_drifted_and_build_repairs_it(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["mixin", "build", "--out", str(tmp_path)]).exit_code == 0
    rules = tmp_path / build.RULES_FILE
    rules.write_text(rules.read_text().replace("> 2", "> 20"))
    (tmp_path / build.PROMETHEUS_RULE_FILE).unlink()
    result = runner.invoke(main, ["mixin", "check", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{build.RULES_FILE}: differs" in result.output and f"{build.PROMETHEUS_RULE_FILE}: missing" in result.output
    result = runner.invoke(main, ["mixin", "build", "--out", str(tmp_path)])
    assert f"wrote     {build.RULES_FILE}" in result.output
    assert runner.invoke(main, ["mixin", "check", "--out", str(tmp_path)]).exit_code == 0


def test_generation_is_deterministic():
    assert build.generate(MixinConfig()) == build.generate(MixinConfig())
