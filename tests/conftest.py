from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_monitor.demo.launch import free_port  # noqa: F401  (the test modules import it from here)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET a Prometheus endpoint and return {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse_exposition(r.read().decode())


def parse_exposition(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def samples(metrics: dict, name: str) -> dict[tuple, float]:
    return {labels: v for (n, labels), v in metrics.items() if n == name}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The README demo's default model: Qwen3-MoE, 2 layers x 8 experts, top-2, expert 3 hot for hot words."""
    pytest.importorskip("transformers")
    from moe_monitor.demo.tiny_model import generate

    out = tmp_path_factory.mktemp("model") / "qwen3-moe-tiny"
    meta = generate(out, "qwen3_moe", hot_expert=3, hot_words=["hot", "blaze"], seed=0)
    return str(out), meta
