"""One vocabulary: every family the sidecar exports, and every metric the shipped rules and dashboards query,
is declared in moe_monitor/schema/vocabulary.py (the generated docs/reference/metrics.md lists them)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from test_golden import exposition

from moe_monitor.mixin.build import generate
from moe_monitor.mixin.config import MixinConfig
from moe_monitor.schema.vocabulary import BY_NAME, CAPTURE_OUTCOMES, METRICS
from moe_monitor.sidecar.exposition import DenseLabels, family

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


def test_every_exported_series_carries_only_the_labels_its_metric_declares(tmp_path):
    text = exposition(tmp_path, expert_series="all")
    series = re.findall(r"^(moe_[a-z0-9_]+)\{([^}]*)\}", text, re.M)
    assert len({name for name, _ in series}) > 30, text[:300]  # the scan sees the labelled families
    for name, labels in series:
        base = next((name.removesuffix(s) for s in SUFFIXES if name.removesuffix(s) in BY_NAME), name)
        if base not in BY_NAME:
            continue  # the process collector's series
        keys = set(re.findall(r'(\w+)="', labels))
        assert keys <= set(BY_NAME[base].labels) | {"le"}, (name, keys)


def test_a_series_with_a_label_its_metric_does_not_declare_is_refused():
    f = family("moe_layer_imbalance_ratio")  # declares ("layer",)
    f.add(1.5, [("layer", 3)])
    with pytest.raises(ValueError, match="moe_layer_imbalance_ratio: label expert is not declared"):
        f.add(1.5, [("layer", 3), ("expert", 7)])
    assert f.lines == ['moe_layer_imbalance_ratio{layer="3"} 1.5\n']  # nothing of the refused sample written
    hist = family("moe_step_duration_seconds")
    hist.add(2, [("phase", "decode"), ("tokens_le", "8"), ("le", "0.1")], suffix="_bucket")  # a bucket's le
    dense = DenseLabels()
    assert dense.get("moe_expert_load_ratio_bucket", ("layer", "le"), (("0",), ("1.0",))) == \
        ['moe_expert_load_ratio_bucket{layer="0",le="1.0"} ']
    with pytest.raises(ValueError, match="label rank is not declared"):
        dense.get("moe_layer_load_cv", ("layer", "rank"), (("0",), ("1",)))
    with pytest.raises(ValueError, match="not a series of a metric"):
        dense.get("moe_layer_load_cvs", ("layer",), (("0",),))
