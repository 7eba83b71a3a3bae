"""`moe-monitor top` reads the sidecar's exposition by name: every metric name and label name it uses is one the
vocabulary declares (moe_monitor/schema/vocabulary.py), so renaming a metric there without changing top fails here,
not on an SRE's screen. top/core.py looks its metric names up with `vocabulary.declared` at import, so such a
rename also fails every import of top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from moe_monitor.schema.vocabulary import BY_NAME
from moe_monitor.schema.vocabulary import declared as lookup

TOP = Path(__file__).resolve().parent.parent / "moe_monitor" / "top"
SUFFIXES = ("_bucket", "_sum", "_count")  # a histogram's series


def declared(name: str) -> bool:
    if name in BY_NAME:
        return True
    return any(name.endswith(s) and BY_NAME.get(name[: -len(s)], None) is not None
               and BY_NAME[name[: -len(s)]].type == "histogram" for s in SUFFIXES)


def literals() -> dict[str, list[str]]:
    """Every string constant in top's modules that looks like a metric name, with where it is."""
    found: dict[str, list[str]] = {}
    for path in sorted(TOP.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and value.startswith("moe_") and value.replace("_", "").isalnum():
                found.setdefault(value, []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_metric_name_top_reads_is_declared_by_the_vocabulary():
    names = literals()
    assert len(names) >= 30, sorted(names)  # the scan sees top's names (34 when this test was written)
    labels = {label for m in BY_NAME.values() for label in m.labels}
    prefixes = {n for n in names if n.endswith("_")}  # a family of names (moe_detector_...): some must exist
    unknown = {n: where for n, where in names.items()
               if n not in prefixes and not declared(n) and n not in labels}
    assert not unknown, unknown
    assert all(any(m.startswith(p) for m in BY_NAME) for p in prefixes), prefixes


def test_the_check_sees_an_undeclared_name():
    assert not declared("moe_layer_imbalance_ratios") and declared("moe_layer_imbalance_ratio")
    assert declared("moe_step_duration_seconds_bucket") and not declared("moe_window_routed_tokens_bucket")


def test_top_looks_its_metric_names_up_in_the_vocabulary():
    assert lookup("moe_layer_imbalance_ratio") == "moe_layer_imbalance_ratio"
    with pytest.raises(KeyError, match="moe_layer_imbalance_ratios"):
        lookup("moe_layer_imbalance_ratios")
