from __future__ import annotations

import contextlib
import importlib
import importlib.util
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_monitor.demo.launch import free_port  # noqa: F401  (the test modules import it from here)


def have(module: str) -> bool:
    """Whether a top-level `module` is installed, found without importing it: vLLM takes seconds to import, and
    a module-level importorskip would pay that at collection even when `-m` deselects every test there."""
    return importlib.util.find_spec(module) is not None


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


def prom_api(prom, path: str, **params) -> dict:
    """GET /api/v1/<path> of a real Prometheus (promstack); the `data` of a successful answer."""
    import json
    import urllib.parse
    import urllib.request

    url = f"{prom.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def queries_without_data(prom, dash: dict, variables: dict, start: float, end: float, step: float,
                         **ranges) -> tuple[int, list[str]]:
    """Run every query of a generated dashboard (variables' queries as series matches, panel queries as range
    queries with `ranges`: rate_interval, range_, interval) against Prometheus. (queries run, those without data)."""
    import math

    from moe_monitor.mixin import queries

    checked, empty = 0, []
    for q in queries.panel_queries(dash):
        if q.kind == queries.VARIABLE:
            data = prom_api(prom, "series", **{"match[]": queries.substitute(q.expr, variables), "start": start,
                                               "end": end})
            ok = bool(data)
        else:
            expr = queries.substitute(q.expr, variables, **ranges)
            data = prom_api(prom, "query_range", query=expr, start=start, end=end, step=step)["result"]
            ok = any(not math.isnan(float(v)) for series in data for _, v in series["values"])
        checked += 1
        if not ok:
            empty.append(f"{q.panel} [{q.kind} {q.ref_id}]: {q.expr}")
    return checked, empty


@contextlib.contextmanager
def channel_from_git(directory: Path, commit: str, name: str):
    """moe_monitor/channel as committed at `commit`, importable as `name` inside the block (an older writer or
    reader beside today's); skips the test where git cannot show it (no history in the checkout)."""
    pkg = Path(directory) / name
    pkg.mkdir()
    for module in ("__init__", "layout", "reader", "writer"):
        source = subprocess.run(["git", "show", f"{commit}:moe_monitor/channel/{module}.py"],
                                cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if source.returncode:
            pytest.skip(f"git cannot show the channel package at {commit}: {source.stderr.strip()}")
        (pkg / f"{module}.py").write_text(source.stdout)
    sys.path.insert(0, str(pkg.parent))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(pkg.parent))
        for mod in [m for m in sys.modules if m.split(".")[0] == name]:
            del sys.modules[mod]
