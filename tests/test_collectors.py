"""Each collector on a hand-built `Reading`: the values a scrape would show, from one frozen view and nothing else
(no segment files, no window loop). test_sidecar covers the same families end to end over real segments."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import parse_exposition, samples

from moe_monitor.breakdown.latest import Capture
from moe_monitor.breakdown.record import BreakdownRecord
from moe_monitor.breakdown.result import Category
from moe_monitor.channel import LAYER_HOOKED, LAYER_UNOBSERVABLE, Ranks, Refusal, Shape, Snapshot
from moe_monitor.channel.layout import Header
from moe_monitor.sidecar.aggregate import Totals
from moe_monitor.sidecar.collectors import (
    balance,
    breakdown,
    detector,
    ep_ranks,
    health,
    imbalance_cost,
    load_histogram,
    model,
    routing,
    steps,
)
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.exposition import render
from moe_monitor.sidecar.reading import BreakdownView, DetectorView, Reading
from moe_monitor.sidecar.segments import SegmentStatus
from moe_monitor.sidecar.windows import LoadHistogram, Window
from moe_monitor.stats.imbalance import layer_stats

NOW = 1_000_000.0
INT64_MAX = np.iinfo(np.int64).max


def config(**settings) -> SidecarConfig:
    return SidecarConfig(segment_dir="/nonexistent", **settings)


def reading(cfg: SidecarConfig | None = None, statuses=(), totals: Totals | None = None, read_errors=None,
            restarts: int = 0, **fields) -> Reading:
    return Reading(NOW, cfg or config(), tuple(statuses), totals or Totals(), read_errors or {}, restarts, **fields)


def exposed(collector, r: Reading) -> dict:
    """What a scrape shows of one collector's families, read with the shared exposition parser."""
    return parse_exposition(render(collector.COLLECTOR.collect(r)).decode())


def by(m: dict, name: str, *keys: str) -> dict:
    """{label values in `keys` order: value} of one sample name."""
    return {tuple(dict(labels)[k] for k in keys): v for labels, v in samples(m, name).items()}


def snapshot(layer_ids, flags, *, age_s: float = 1.0, model_name: str = "tiny-moe", experts: int = 8,
             ranks: Ranks | None = None, publish_errors: int = 0, refused=()) -> Snapshot:
    """A rank's snapshot as the reader returns it; only the fields the collectors read carry meaning."""
    L = len(layer_ids)
    header = Header(seq=1, generation=1, created_unix_ns=0, updated_unix_ns=int((NOW - age_s) * 1e9), pid=1, top_k=2,
                    ranks=ranks or Ranks(), shape=Shape(L, experts, 1, 1), payload_size=0, payload_crc32=0,
                    publish_errors=publish_errors, model=model_name)
    return Snapshot(header, np.asarray(layer_ids, dtype=np.int32), np.asarray(flags, dtype=np.uint8),
                    np.zeros((L, experts), dtype=np.int64), np.zeros(1), np.zeros(1), np.zeros((3, 1, 1)),
                    np.zeros((3, 1)), np.zeros((3, 1)), refused=tuple(refused))


# -- model -------------------------------------------------------------------------------------------------------
def test_model_a_layer_is_unobservable_when_any_counted_rank_cannot_see_it():
    stage0 = snapshot((0, 1), (LAYER_HOOKED, LAYER_HOOKED))
    stage1 = snapshot((2, 3), (LAYER_HOOKED | LAYER_UNOBSERVABLE, LAYER_HOOKED), ranks=Ranks(pp_rank=1, pp_size=2))
    tp_twin = snapshot((0, 1), (LAYER_UNOBSERVABLE, LAYER_HOOKED), ranks=Ranks(tp_rank=1, tp_size=2))  # not counted
    statuses = [SegmentStatus("dp0-pp0-tp0", stage0, None, counted=True),
                SegmentStatus("dp0-pp1-tp0", stage1, None, counted=True),
                SegmentStatus("dp0-pp0-tp1", tp_twin, None, counted=False)]
    m = exposed(model, reading(statuses=statuses, totals=Totals(layer_ids=(0, 1, 2, 3))))
    assert by(m, "moe_layer_observable", "layer") == {("0",): 1, ("1",): 1, ("2",): 0, ("3",): 1}
    assert m[("moe_monitor_unobservable_layers", ())] == 1
    assert samples(m, "moe_model_info") == {
        (("experts", "8"), ("model", "tiny-moe"), ("moe_layers", "4"), ("top_k", "2")): 1}


def test_model_without_a_counted_rank_has_no_model_info():
    m = exposed(model, reading(statuses=[SegmentStatus("dp0-pp0-tp0", None, "magic")]))
    assert m[("moe_monitor_unobservable_layers", ())] == 0
    assert not samples(m, "moe_layer_observable") and not samples(m, "moe_model_info")


# -- balance -----------------------------------------------------------------------------------------------------
def window_of(counts, layer_ids=(3, 7), end: float = NOW) -> Window:
    return Window(end - 5, end, np.asarray(layer_ids, dtype=np.int64), np.asarray(counts, dtype=np.int64))


def test_balance_of_the_closed_window_per_layer_model_and_ep_rank():
    window = window_of([[6, 2, 0, 0], [2, 2, 2, 2]])  # layer 3: one hot expert, two dead; layer 7: even
    r = reading(config(window_s=5.0), window=window, stats=layer_stats(window.counts, top_k=2), closed=True,
                window_rank_load=np.array([[6.0, 2.0], [4.0, 4.0]]))
    m = exposed(balance, r)
    layer = {name: by(m, name, "layer") for name in (
        "moe_layer_window_routed_tokens", "moe_layer_imbalance_ratio", "moe_layer_balancedness",
        "moe_layer_top1_share", "moe_layer_topk_share", "moe_layer_dead_experts", "moe_layer_hot_experts",
        "moe_layer_load_cv", "moe_layer_load_entropy", "moe_layer_ep_rank_imbalance_ratio")}
    assert layer["moe_layer_window_routed_tokens"] == {("3",): 8, ("7",): 8}
    assert layer["moe_layer_imbalance_ratio"] == {("3",): 3.0, ("7",): 1.0}  # max / mean
    assert layer["moe_layer_balancedness"] == pytest.approx({("3",): 1 / 3, ("7",): 1.0})
    assert layer["moe_layer_top1_share"] == {("3",): 0.75, ("7",): 0.25}
    assert layer["moe_layer_topk_share"] == {("3",): 1.0, ("7",): 0.5}  # top_k = 2
    assert layer["moe_layer_dead_experts"] == {("3",): 2, ("7",): 0}
    assert layer["moe_layer_hot_experts"] == {("3",): 1, ("7",): 0}  # above 2 x mean
    assert layer["moe_layer_load_cv"][("7",)] == 0 and layer["moe_layer_load_entropy"][("7",)] == pytest.approx(1.0)
    assert layer["moe_layer_ep_rank_imbalance_ratio"] == {("3",): 1.5, ("7",): 1.0}
    assert m[("moe_window_length_seconds", ())] == 5.0
    assert m[("moe_window_end_timestamp_seconds", ())] == NOW
    assert m[("moe_window_routed_tokens", ())] == 16
    assert samples(m, "moe_worst_layer_imbalance_ratio") == {(("layer", "3"),): 3.0}
    assert m[("moe_mean_layer_imbalance_ratio", ())] == 2.0
    assert m[("moe_eplb_balancedness_vllm", ())] == pytest.approx((4 + 4) / (6 + 4))  # sum of means / sum of maxes
    assert m[("moe_eplb_balancedness_sglang", ())] == pytest.approx((4 / 6 + 1) / 2, rel=1e-5)


def test_balance_before_the_first_window_is_its_length_only():
    m = exposed(balance, reading(config(window_s=2.5)))
    assert m == {("moe_window_length_seconds", ()): 2.5}


def test_balance_of_a_window_too_small_to_judge_has_no_worst_layer():
    window = window_of([[1, 0, 0, 0], [0, 0, 0, 0]])
    m = exposed(balance, reading(window=window, stats=layer_stats(window.counts, top_k=2, min_assignments=100)))
    assert all(math.isnan(v) for v in by(m, "moe_layer_imbalance_ratio", "layer").values())
    assert m[("moe_window_routed_tokens", ())] == 1
    assert not samples(m, "moe_worst_layer_imbalance_ratio") and not samples(m, "moe_eplb_balancedness_vllm")


# -- steps -------------------------------------------------------------------------------------------------------
def test_steps_histogram_by_phase_and_tokens_bucket():
    hist = np.zeros((3, 2, 3), dtype=np.int64)  # [phase, tokens bucket, duration bucket]: the timed steps
    hist[0, 0] = [1, 2, 0]  # prefill, <= 16 tokens: 1 step <= 10 ms, 2 steps <= 100 ms
    hist[1, 1] = [0, 0, 1]  # decode, any size: 1 step over 100 ms
    seconds = np.array([[0.15, 0.0], [0.0, 2.5], [0.0, 0.0]])
    tokens = np.array([[40, 0], [0, 7], [0, 0]])
    count = np.array([[48, 0], [0, 16], [5, 0]])  # every step: mixed ones ran, none was timed
    totals = Totals(step_hist=hist, step_seconds=seconds, step_tokens=tokens, step_count=count,
                    token_bounds=np.array([16, INT64_MAX]), duration_bounds=np.array([0.01, 0.1, math.inf]))
    m = exposed(steps, reading(totals=totals))
    assert by(m, "moe_steps_total", "phase", "tokens_le") == {("prefill", "16"): 48, ("decode", "+Inf"): 16,
                                                              ("mixed", "16"): 5}
    assert by(m, "moe_step_duration_seconds_bucket", "phase", "tokens_le", "le") == {
        ("prefill", "16", "0.01"): 1, ("prefill", "16", "0.1"): 3, ("prefill", "16", "+Inf"): 3,
        ("decode", "+Inf", "0.01"): 0, ("decode", "+Inf", "0.1"): 0, ("decode", "+Inf", "+Inf"): 1}
    assert by(m, "moe_step_duration_seconds_count", "phase", "tokens_le") == {("prefill", "16"): 3,
                                                                              ("decode", "+Inf"): 1}
    assert by(m, "moe_step_duration_seconds_sum", "phase", "tokens_le") == {("prefill", "16"): 0.15,
                                                                            ("decode", "+Inf"): 2.5}
    assert by(m, "moe_step_tokens_total", "phase") == {("prefill",): 40, ("decode",): 7, ("mixed",): 0}


def test_steps_before_any_step_are_empty_families():
    body = render(steps.COLLECTOR.collect(reading()))
    assert b"# TYPE moe_step_duration_seconds histogram" in body and parse_exposition(body.decode()) == {}


# -- ep_ranks ----------------------------------------------------------------------------------------------------
def test_ep_ranks_cumulative_load_per_layer_and_rank():
    r = reading(totals=Totals(layer_ids=(3, 7)), cumulative_rank_load=np.array([[45.0, 15.0], [16.0, 16.0]]))
    assert by(exposed(ep_ranks, r), "moe_ep_rank_routed_tokens_total", "layer", "ep_rank") == {
        ("3", "0"): 45, ("3", "1"): 15, ("7", "0"): 16, ("7", "1"): 16}
    assert exposed(ep_ranks, reading()) == {}  # no placement known: no series
    assert ep_ranks.COLLECTOR.enabled(config()) and not ep_ranks.COLLECTOR.enabled(config(rank_series=False))


# -- load_histogram ----------------------------------------------------------------------------------------------
def test_load_histogram_is_cumulative_over_the_load_ratio_buckets():
    buckets = np.zeros((1, 13), dtype=np.int64)
    buckets[0, [1, 5, 9]] = [2, 1, 1]  # two experts <= 0.25 x mean, one <= 1.1 x, one <= 3 x
    r = reading(load_histogram=LoadHistogram((3,), buckets, np.array([4.0])))
    m = exposed(load_histogram, r)
    les = ("0.0", "0.25", "0.5", "0.75", "0.9", "1.1", "1.25", "1.5", "2.0", "3.0", "4.0", "8.0", "+Inf")
    assert by(m, "moe_expert_load_ratio_bucket", "le") == dict(zip([(le,) for le in les],
                                                                   [0, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]))
    assert m[("moe_expert_load_ratio_count", (("layer", "3"),))] == 4
    assert m[("moe_expert_load_ratio_sum", (("layer", "3"),))] == 4.0
    assert exposed(load_histogram, reading()) == {}
    assert not load_histogram.COLLECTOR.enabled(config(load_histogram=False))


# -- routing -----------------------------------------------------------------------------------------------------
def test_routing_top_experts_per_layer_ties_by_expert_id():
    window = window_of([[1, 5, 5, 0], [0, 0, 0, 0]])  # layer 7 routed nothing: no top experts
    m = exposed(routing, reading(config(expert_series="top", top_experts=2), window=window))
    assert by(m, "moe_layer_top_expert_id", "layer", "rank") == {("3", "1"): 1, ("3", "2"): 2}
    assert by(m, "moe_layer_top_expert_share", "layer", "rank") == {("3", "1"): 5 / 11, ("3", "2"): 5 / 11}
    assert not samples(m, "moe_expert_routed_tokens_total")
    assert not routing.COLLECTOR.enabled(config())  # --expert-series none (the default)


def test_routing_all_adds_every_experts_cumulative_count():
    totals = Totals(layer_ids=(3,), counts=np.array([[10, 0, 4]]))
    m = exposed(routing, reading(config(expert_series="all", top_experts=1), totals=totals,
                                 window=window_of([[0, 0, 3]], layer_ids=(3,))))
    assert by(m, "moe_expert_routed_tokens_total", "layer", "expert") == {("3", "0"): 10, ("3", "1"): 0,
                                                                          ("3", "2"): 4}
    assert by(m, "moe_layer_top_expert_id", "layer", "rank") == {("3", "1"): 2}  # the window's, not the totals'


# -- imbalance cost ----------------------------------------------------------------------------------------------
def cost_reading(rank_load, breakdown_view=None, **settings) -> Reading:
    window = window_of([[1, 1, 1, 1], [1, 1, 1, 1]])  # the expert counts play no part; the EP-rank loads do
    return reading(config(min_window_assignments=10, **settings), window=window, closed=True,
                   window_rank_load=np.asarray(rank_load, dtype=np.float64), breakdown=breakdown_view)


def test_imbalance_cost_per_layer_and_of_expert_time_from_routing_alone():
    # layer 3: rank 0 at twice each other rank's load; layer 7: balanced
    m = exposed(imbalance_cost, cost_reading([[200.0, 100.0, 100.0, 100.0], [50.0, 50.0, 50.0, 50.0]]))
    assert by(m, "moe_layer_ep_expert_time_lost_ratio", "layer") == {("3",): 1 - 125 / 200, ("7",): 0.0}
    assert m[("moe_ep_expert_time_lost_ratio", ())] == pytest.approx((200 - 125) / (200 + 50))
    assert not samples(m, "moe_ep_step_time_lost_ratio")  # no capture: no guess


def test_imbalance_cost_of_step_time_with_the_newest_capture():
    record = BreakdownRecord(categories={"experts": Category(3000.0, 0.3), "attention": Category(6000.0, 0.6),
                                         "all_to_all": Category(500.0, 0.05)},
                             ranks=4, idle_us=500.0, moe_blocks=2, preamble_us=None, first_expert_us=None)
    view = BreakdownView(0, Capture("trigger-1_", ("a", "b", "c", "d"), NOW - 600), record)
    r = cost_reading([[200.0, 100.0, 100.0, 100.0], [50.0, 50.0, 50.0, 50.0]], view, profile_dir="/profiles")
    m = exposed(imbalance_cost, r)
    share = 3000 / (3000 + 6000 + 500 + 500)  # experts over busy + idle: 0.3
    assert m[("moe_ep_step_time_lost_ratio", ())] == pytest.approx(share * ((200 + 50) / (125 + 50) - 1))
    # an idle layer is left out of every figure; one EP rank gives none
    m = exposed(imbalance_cost, cost_reading([[200.0, 100.0], [1.0, 0.0]], view))
    lost = by(m, "moe_layer_ep_expert_time_lost_ratio", "layer")
    assert lost[("3",)] == 0.25 and math.isnan(lost[("7",)])
    assert m[("moe_ep_step_time_lost_ratio", ())] == pytest.approx(share * (200 / 150 - 1))
    assert exposed(imbalance_cost, cost_reading([[400.0], [100.0]], view)) == {}
    assert exposed(imbalance_cost, reading(window=window_of([[1, 1], [1, 1]]))) == {}  # no placement that fits


# -- detector ----------------------------------------------------------------------------------------------------
def test_detector_state_is_one_hot_with_each_signals_baseline_and_current():
    view = DetectorView("armed", {("step_time", "decode", "64"): 0.02},
                        {("step_time", "decode", "64"): 0.05, ("imbalance", "all", "+Inf"): 1.4})
    m = exposed(detector, reading(detector=view))
    assert by(m, "moe_detector_state", "state") == {("warmup",): 0, ("armed",): 1, ("cooldown",): 0,
                                                    ("budget_exhausted",): 0}
    assert by(m, "moe_detector_baseline", "signal", "phase", "tokens_le") == {("step_time", "decode", "64"): 0.02}
    assert by(m, "moe_detector_current", "signal", "phase", "tokens_le") == {
        ("step_time", "decode", "64"): 0.05, ("imbalance", "all", "+Inf"): 1.4}


# -- health ------------------------------------------------------------------------------------------------------
def test_health_of_fresh_stale_unreadable_and_ignored_segments():
    refusal = Refusal("ep_rank_load", "shape", "5 columns, ep_size 2")
    statuses = [
        SegmentStatus("dp0-pp0-tp0", snapshot((0,), (LAYER_HOOKED,), age_s=2, ranks=Ranks(ep_size=2),
                                              publish_errors=3, refused=[refusal]), None, counted=True),
        SegmentStatus("dp1-pp0-tp0", snapshot((0,), (LAYER_HOOKED,), age_s=100, ranks=Ranks(dp_rank=1, dp_size=2)),
                      None, counted=True),
        SegmentStatus("dp2-pp0-tp0", None, "magic"),
        SegmentStatus("old", snapshot((0,), (LAYER_HOOKED,), model_name="previous-model"), None,
                      ignored="other_model"),
    ]
    m = exposed(health, reading(config(stale_after_s=30), statuses=statuses, read_errors={"magic": 2}, restarts=1))
    assert by(m, "moe_monitor_segment_up", "segment") == {("dp0-pp0-tp0",): 1, ("dp1-pp0-tp0",): 0,
                                                          ("dp2-pp0-tp0",): 0, ("old",): 1}
    assert by(m, "moe_monitor_snapshot_age_seconds", "segment") == pytest.approx(
        {("dp0-pp0-tp0",): 2, ("dp1-pp0-tp0",): 100, ("old",): 1})
    assert by(m, "moe_monitor_segments", "state") == {("fresh",): 2, ("stale",): 1, ("unreadable",): 1}
    info = by(m, "moe_monitor_rank_info", "segment", "model", "dp_rank", "ep_rank", "counted")
    assert info == {("dp0-pp0-tp0", "tiny-moe", "0", "0", "true"): 1, ("dp1-pp0-tp0", "tiny-moe", "1", "0", "true"): 1,
                    ("old", "previous-model", "0", "0", "false"): 1}
    assert by(m, "moe_monitor_plugin_publish_errors_total", "segment")[("dp0-pp0-tp0",)] == 3
    assert by(m, "moe_monitor_segments_ignored", "segment", "reason") == {("old", "other_model"): 1}
    assert by(m, "moe_monitor_segment_sections_refused", "segment", "section", "reason") == {
        ("dp0-pp0-tp0", "ep_rank_load", "shape"): 1}
    errors = by(m, "moe_monitor_segment_read_errors_total", "kind")
    assert errors[("magic",)] == 2 and sum(errors.values()) == 2 and ("io",) in errors  # every kind, 0 included
    assert m[("moe_monitor_rank_restarts_total", ())] == 1
    assert len(samples(m, "moe_monitor_build_info")) == 1


def test_health_of_an_empty_directory_leaves_out_the_ignored_and_refused_families():
    m = exposed(health, reading())
    assert by(m, "moe_monitor_segments", "state") == {("fresh",): 0, ("stale",): 0, ("unreadable",): 0}
    assert not samples(m, "moe_monitor_segments_ignored") and not samples(m, "moe_monitor_segment_sections_refused")
    assert b"moe_monitor_segments_ignored" not in render(health.COLLECTOR.collect(reading()))


# -- breakdown ---------------------------------------------------------------------------------------------------
def test_breakdown_of_the_newest_capture_in_seconds_and_shares():
    record = BreakdownRecord(
        categories={"experts": Category(6000.0, 0.6), "gate": Category(1000.0, 0.1),
                    "attention": Category(3000.0, 0.3)},
        ranks=2, idle_us=500.0, moe_blocks=4, preamble_us=12.0, first_expert_us=30.0,
        ep_wait_us={"0": 200.0, "1": 50.0}, ep_caused_share={"1": 0.8},
        collective_wait_us={"all_to_all": {"0": 150.0}},
        collective_caused_us={"all_to_all": {"1": {"busy": 120.0, "idle": 0.0, "unexplained": 30.0}}})
    view = BreakdownView(errors=1, capture=Capture("trigger-7_", ("a", "b"), NOW - 60), result=record)
    m = exposed(breakdown, reading(config(profile_dir="/profiles"), breakdown=view))
    assert m[("moe_capture_analysis_errors_total", ())] == 1
    assert samples(m, "moe_capture_info") == {(("capture", "trigger-7"), ("ranks", "2")): 1}
    assert m[("moe_capture_end_timestamp_seconds", ())] == NOW - 60
    assert by(m, "moe_capture_device_seconds", "category") == pytest.approx(
        {("experts",): 0.006, ("gate",): 0.001, ("attention",): 0.003})
    assert by(m, "moe_capture_share", "category") == {("experts",): 0.6, ("gate",): 0.1, ("attention",): 0.3}
    assert m[("moe_capture_idle_seconds", ())] == pytest.approx(0.0005)
    assert m[("moe_capture_moe_preamble_seconds", ())] == pytest.approx(12e-6)
    assert m[("moe_capture_first_expert_gemm_seconds", ())] == pytest.approx(30e-6)
    assert by(m, "moe_capture_ep_wait_seconds", "rank") == pytest.approx({("0",): 200e-6, ("1",): 50e-6})
    assert by(m, "moe_capture_ep_wait_caused_share", "rank") == {("0",): 0.0, ("1",): 0.8}
    assert by(m, "moe_capture_collective_wait_seconds", "kind", "rank") == pytest.approx(
        {("all_to_all", "0"): 150e-6})
    assert by(m, "moe_capture_collective_wait_caused_seconds", "kind", "rank", "reason") == pytest.approx(
        {("all_to_all", "1", "busy"): 120e-6, ("all_to_all", "1", "idle"): 0.0,
         ("all_to_all", "1", "unexplained"): 30e-6})


def test_breakdown_without_a_capture_or_without_moe_blocks():
    assert exposed(breakdown, reading(config(profile_dir="/profiles"), breakdown=BreakdownView(0, None, None))) == {
        ("moe_capture_analysis_errors_total", ()): 0}
    record = BreakdownRecord(categories={"dense_gemm": Category(10.0, 1.0)}, ranks=1, idle_us=0.0, moe_blocks=0,
                             preamble_us=None, first_expert_us=None)
    m = exposed(breakdown, reading(breakdown=BreakdownView(0, Capture("", ("a",), NOW), record)))
    assert samples(m, "moe_capture_info") == {(("capture", "unnamed"), ("ranks", "1")): 1}
    assert not samples(m, "moe_capture_moe_preamble_seconds") and not samples(m, "moe_capture_ep_wait_seconds")
    assert not breakdown.COLLECTOR.enabled(config())  # no --profile-dir
