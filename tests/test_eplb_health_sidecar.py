"""The sidecar's EPLB health metrics (collectors/eplb.py) on real segments: the real SegmentWriter publishes what
the plugin's EplbRecorder records (driven here through its own entry points, as vLLM's rearrange and commits
drive it), and the sidecar, wired as `serve` wires it, exports it. A rearrangement moves the counters; a stall
(steps flow past 2 x the interval with no rearrangement) shows as overdue steps; no EPLB, no series; a record that
cannot be right is refused alone."""

from __future__ import annotations

import math
import types

import numpy as np
from conftest import parse_exposition, samples
from test_segment_eplb import RECORD, arrays, rewrite, writer

from moe_monitor.channel.layout import EplbHealth
from moe_monitor.plugin.eplb_health import EplbRecorder
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.wiring import build

SEGMENT = "dp0-pp0-tp0"
INTERVAL = 100


def scrape(exp, now: float) -> dict:
    return parse_exposition(exp.tick(now).body.decode())


def value(m: dict, name: str, **labels):
    return m.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


def eplb_names(m: dict) -> set[str]:
    return {name for name, _ in m if name.startswith("moe_eplb_") and "balancedness" not in name}


class VllmEplbState:
    """The attributes of vLLM's EplbState the recorder reads at publish (test_eplb_health_plugin.py drives the
    real one)."""

    def __init__(self, is_async: bool):
        self.expert_rearrangement_step = INTERVAL - INTERVAL // 4
        self.expert_rearrangement_step_interval = INTERVAL
        self.expert_load_window_size = 10
        self.is_async = is_async


def test_rearrangements_move_the_counters_and_a_stall_shows_as_overdue_steps(tmp_path):
    state, model_state = VllmEplbState(is_async=True), types.SimpleNamespace(rebalanced=False)
    steps = {"n": 0}
    rec = EplbRecorder(state, model_state, 2, lambda: steps["n"])
    w = writer(tmp_path)
    exp = build(SidecarConfig(segment_dir=str(tmp_path)), process_metrics=False)

    def advance(n: int) -> None:  # n engine steps of vLLM's: its counter, and the plugin's step count
        state.expert_rearrangement_step += n
        steps["n"] += n

    def publish_and_scrape(now: float) -> dict:
        w.publish(arrays(), eplb=rec.record())
        return scrape(exp, now)

    m = publish_and_scrape(1000.0)
    assert value(m, "moe_eplb_info", segment=SEGMENT, mode="async", timed="true") == 1
    assert value(m, "moe_eplb_rearrangements_total", segment=SEGMENT) == 0
    assert value(m, "moe_eplb_last_rearrangement_duration_seconds", segment=SEGMENT) is None  # none yet
    assert value(m, "moe_eplb_rearrangement_interval_steps", segment=SEGMENT) == INTERVAL

    advance(INTERVAL // 4)  # vLLM's counter reaches the interval: it resets it and starts an async rearrangement
    state.expert_rearrangement_step = 0
    rec.entered()
    model_state.rebalanced = True
    rec.returned()
    m = publish_and_scrape(1001.0)
    assert value(m, "moe_eplb_rearrangements_started_total", segment=SEGMENT) == 1
    assert value(m, "moe_eplb_rearrangement_in_progress_seconds", segment=SEGMENT) >= 0
    for layer in (0, 1):  # its layers commit, one a step
        advance(1)
        rec.committed(layer)
    model_state.rebalanced = False
    m = publish_and_scrape(1002.0)
    assert value(m, "moe_eplb_rearrangements_total", segment=SEGMENT) == 1
    assert value(m, "moe_eplb_layer_commits_total", segment=SEGMENT) == 2
    assert value(m, "moe_eplb_last_rearrangement_duration_seconds", segment=SEGMENT) > 0
    assert value(m, "moe_eplb_last_rearrangement_timestamp_seconds", segment=SEGMENT) > 1.7e9
    assert value(m, "moe_eplb_rearrangement_in_progress_seconds", segment=SEGMENT) == 0
    assert value(m, "moe_eplb_steps_since_rearrangement", segment=SEGMENT) == 2
    assert value(m, "moe_eplb_rearrangement_overdue_steps", segment=SEGMENT) == 0

    # the next one starts and its transfer never finishes: vLLM's counter climbs on past the interval
    advance(INTERVAL - 2)
    state.expert_rearrangement_step = 0
    rec.entered()
    model_state.rebalanced = True
    rec.returned()
    seen = []
    for i in range(6):
        advance(INTERVAL // 2)
        m = publish_and_scrape(1003.0 + i)
        seen.append(value(m, "moe_eplb_rearrangement_overdue_steps", segment=SEGMENT))
    assert seen == [0, 0, INTERVAL // 2, INTERVAL, 3 * INTERVAL // 2, 2 * INTERVAL]
    assert value(m, "moe_eplb_steps_since_rearrangement", segment=SEGMENT) == 3 * INTERVAL
    assert value(m, "moe_eplb_rearrangements_total", segment=SEGMENT) == 1  # no commit
    assert value(m, "moe_eplb_rearrangements_started_total", segment=SEGMENT) == 2
    assert value(m, "moe_eplb_rearrangement_in_progress_seconds", segment=SEGMENT) > 0


def test_without_eplb_no_eplb_series(tmp_path):
    w = writer(tmp_path, eplb_health=False)
    w.publish(arrays())
    m = scrape(build(SidecarConfig(segment_dir=str(tmp_path)), process_metrics=False), 1000.0)
    assert eplb_names(m) == set()
    assert value(m, "moe_monitor_collector_success", collector="eplb") == 1


def test_a_refused_record_is_reported_and_the_rest_of_the_segment_is_used(tmp_path):
    w = writer(tmp_path)
    w.publish(arrays(), eplb=RECORD)
    rewrite(w.path, record=EplbHealth(**{**RECORD.__dict__, "last_duration_s": math.inf}).pack())
    m = scrape(build(SidecarConfig(segment_dir=str(tmp_path), expert_series="all"), process_metrics=False), 1000.0)
    assert eplb_names(m) == set()
    assert samples(m, "moe_monitor_segment_sections_refused") == {
        (("reason", "value"), ("section", "eplb_health"), ("segment", SEGMENT)): 1.0}
    assert value(m, "moe_expert_routed_tokens_total", layer=0, expert=0) == 40
    assert value(m, "moe_monitor_segment_up", segment=SEGMENT) == 1


def test_the_sync_record_of_a_rank_exports_its_mode_and_duration(tmp_path):
    w = writer(tmp_path)
    w.publish(arrays(), eplb=RECORD)
    m = scrape(build(SidecarConfig(segment_dir=str(tmp_path)), process_metrics=False), 1000.0)
    assert value(m, "moe_eplb_info", segment=SEGMENT, mode="sync", timed="true") == 1
    assert value(m, "moe_eplb_last_rearrangement_duration_seconds", segment=SEGMENT) == 0.9
    assert value(m, "moe_eplb_rearrangement_seconds_total", segment=SEGMENT) == 2.7
    assert value(m, "moe_eplb_rearrangements_total", segment=SEGMENT) == 3
    assert np.isclose(value(m, "moe_eplb_last_rearrangement_timestamp_seconds", segment=SEGMENT), 1_700_000_001)
