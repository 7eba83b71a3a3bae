"""One vocabulary: every family the sidecar exports, and every metric the shipped rules and dashboards query,
is declared in moe_monitor/schema/vocabulary.py (the generated docs/reference/metrics.md lists them)."""

from __future__ import annotations

import json
import re

import yaml
from test_golden import exposition

from moe_monitor.mixin.build import generate
from moe_monitor.mixin.config import MixinConfig
from moe_monitor.schema.vocabulary import BY_NAME, CAPTURE_OUTCOMES, METRICS

NAME = re.compile(r"\bmoe_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count")


def declared(name: str) -> bool:
    if name in BY_NAME or name.startswith("moe_monitor_process_"):
        return True
    return any(name.endswith(s) and BY_NAME.get(name.removesuffix(s), None) is not None
               and BY_NAME[name.removesuffix(s)].type == "histogram" for s in SUFFIXES)


def test_every_exported_family_is_declared_with_its_type(tmp_path):
    text = exposition(tmp_path, expert_series="all")
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types, text[:200]
    for name, kind in types.items():
        assert name in BY_NAME, f"{name} is exported but not declared in vocabulary.py"
        assert BY_NAME[name].type == kind, name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert declared(line.split("{")[0].split(" ")[0]), line


def test_what_the_rules_and_dashboards_query_is_declared():
    files = generate(MixinConfig())
    rules = yaml.safe_load(files["deploy/prometheus/rules/moe-monitor.rules.yml"])
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    queried = set()
    for path, text in files.items():
        if path.endswith((".yml", ".yaml")):  # the queries, not the generated-file header comment
            queried |= set(NAME.findall(json.dumps(yaml.safe_load(text))))
        elif path.endswith(".json"):
            queried |= set(NAME.findall(text))
    unknown = sorted(n for n in queried if not declared(n) and n not in recorded)
    assert not unknown, f"queried but never exported: {unknown}"
    assert len(queried) > 15


def test_the_generated_references_list_every_metric_and_outcome():
    files = generate(MixinConfig())
    metrics = files["docs/reference/metrics.md"]
    for m in METRICS:
        assert f"`{m.name}`" in metrics
    for outcome in CAPTURE_OUTCOMES:
        assert f"`{outcome}`" in metrics
    config = files["docs/reference/configuration.md"]
    assert "`MOE_MONITOR_CAPTURE_COOLDOWN`" in config and "`--max-captures-per-hour`" in config
