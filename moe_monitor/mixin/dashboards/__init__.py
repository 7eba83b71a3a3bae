"""The four Grafana dashboards of the moe-monitor mixin, built with grafana-foundation-sdk's typed builders.

`build(cfg)` returns {file name: dashboard JSON dict}; `moe-monitor mixin build` writes them to
grafana/dashboards/ (json.dumps(d, indent=2, sort_keys=True) + "\\n"; `python -m moe_monitor.mixin.dashboards`
does the same). Metric names and labels are those of docs/metrics.md; the `moe:*` series are the mixin's
recording rules. Every query is scoped by the `job` and `instance` template variables (panels.sel), or, on the
deployment dashboard, by `job` and `deployment`.

- MoE overview: expert balance, EP-rank load, throughput and step time, exporter health, firing alerts.
- MoE expert load: the per-window expert-load histogram per layer, per-expert load (T2), top experts.
- MoE kernel breakdown: where the profiled step's device time goes, over captures, the capture catalog, the
  regression detector.
- MoE deployment: one model whose ranks span several sidecars (one per node): EP-rank and expert load summed
  over them (the deployment recording rules).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import ALERTS, UIDS  # noqa: F401  (the tests and the docs read them here)
from .deployment import deployment
from .expert_load import expert_load
from .kernel_breakdown import kernel_breakdown
from .overview import overview

# -- entry points ------------------------------------------------------------------------------------

def build(cfg=None) -> dict[str, dict]:
    """{file name: dashboard JSON dict} for grafana/dashboards/."""
    return {
        "moe-overview.json": overview(cfg),
        "moe-expert-load.json": expert_load(cfg),
        "moe-kernel-breakdown.json": kernel_breakdown(cfg),
        "moe-deployment.json": deployment(cfg),
    }


def render(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def write(directory: str | Path, cfg=None) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in build(cfg).items():
        path = out / name
        path.write_text(render(dashboard))
        written.append(path)
    return written


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[3] / "grafana" / "dashboards")
    for p in write(target):
        print(p)
