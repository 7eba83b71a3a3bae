"""Golden end-to-end test in the style of node_exporter: committed fixture segments → the sidecar's exporter
→ the exposition, compared with tests/fixtures/golden.prom, and `promtool check metrics` on it.

Regenerate after an intended change (and review the diff):

    .venv/bin/python tests/fixtures/make_segments.py            # only if the fixtures must change
    MOE_MONITOR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import os
import shutil
import subprocess

from conftest import parse_exposition

from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.wiring import build

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GOLDEN = os.path.join(FIXTURES, "golden.prom")
T0, T1 = 1_700_000_010, 1_700_000_015
VOLATILE = ("moe_monitor_build_duration_seconds ", "moe_monitor_collector_duration_seconds{")  # wall times


def exposition(tmp_path, **config) -> str:
    segments = tmp_path / "segments"
    now = [T0]
    exporter = build(SidecarConfig(segment_dir=str(segments), window_s=5, min_window_assignments=50, **config),
                     clock=lambda: now[0] + 1, process_metrics=False)
    shutil.copytree(os.path.join(FIXTURES, "segments", "t0"), segments)
    exporter.tick(T0)
    shutil.rmtree(segments)
    shutil.copytree(os.path.join(FIXTURES, "segments", "t1"), segments)
    now[0] = T1
    body = exporter.tick(T1).body.decode()
    return "".join(line for line in body.splitlines(keepends=True) if not line.startswith(VOLATILE))


def test_exposition_matches_golden_file(tmp_path):
    text = exposition(tmp_path, expert_series="all")
    if os.environ.get("MOE_MONITOR_UPDATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            f.write(text)
    with open(GOLDEN) as f:
        golden = f.read()
    assert text == golden, "exposition differs from tests/fixtures/golden.prom (see its module docstring)"


def test_no_duplicate_series(tmp_path):
    for series in ("all", "top", "none"):
        lines = [x for x in exposition(tmp_path / series, expert_series=series).splitlines() if not x.startswith("#")]
        keys = [x.rsplit(" ", 1)[0] for x in lines]
        assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)[:5]


def test_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/setup-env installs Debian's prometheus package"
    with open(GOLDEN, "rb") as f:
        result = subprocess.run([promtool, "check", "metrics"], stdin=f, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "", result.stdout.decode()  # no lint remarks either


def test_golden_window_figures_are_what_the_fixtures_hold(tmp_path):
    """Spot checks that make the golden file trustworthy: layer 5 (row 2) has expert 5 hot in the window."""
    values = parse_exposition(exposition(tmp_path, expert_series="top", top_experts=2))
    assert values[("moe_layer_top_expert_id", (("layer", "5"), ("rank", "1")))] == 5
    assert values[("moe_worst_layer_imbalance_ratio", (("layer", "5"),))] > 4
    assert values[("moe_layer_observable", (("layer", "7"),))] == 0
    assert values[("moe_monitor_segments", (("state", "unreadable"),))] == 1
    assert values[("moe_monitor_rank_info", (("counted", "false"), ("dp_rank", "0"), ("ep_rank", "1"),
                                             ("model", "golden/tiny-moe"), ("pp_rank", "0"),
                                             ("segment", "dp0-pp0-tp1"), ("tp_rank", "1")))] == 1
    # window tokens = both DP ranks' deltas (TP duplicates not added), read back from the fixture files
    from moe_monitor.channel import read_segment

    def total(snap, dp):
        return int(read_segment(os.path.join(FIXTURES, "segments", snap, f"dp{dp}-pp0-tp0.moeseg")).counts.sum())
    expected = sum(total("t1", dp) - total("t0", dp) for dp in (0, 1))
    assert values[("moe_window_routed_tokens", ())] == expected > 4000


def test_all_is_the_fullest_tier(tmp_path):
    """`--expert-series all` exports what `top` does (the top-K gauges, same values) and the per-expert counters:
    the dashboards' top-K table and top-1 timeline have data under either."""
    def series(kind):
        return {k: v for k, v in parse_exposition(exposition(tmp_path / kind, expert_series=kind)).items()
                if k[0].startswith(("moe_layer_top_expert_", "moe_expert_routed_tokens_total"))}
    top, full = series("top"), series("all")
    assert top and all(name.startswith("moe_layer_top_expert_") for name, _ in top)
    assert {k: full[k] for k in top} == top
    assert any(name.startswith("moe_expert_routed_tokens_total") for name, _ in full)
