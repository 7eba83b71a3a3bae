"""What EP-rank imbalance costs (stats/imbalance_cost.py) on hand-built loads, and against a simulated EP step in
which every rank waits at each layer's combine for the busiest: the step time the simulation loses is what the
formula says, from the same breakdown a capture of that step would give."""

from __future__ import annotations

import math
import os
import shutil
import time

import numpy as np
import pytest
from conftest import parse_exposition
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moe_monitor.breakdown.analyze import analyze
from moe_monitor.breakdown.trace import read_trace
from moe_monitor.channel import LAYER_HOOKED, Ranks, SegmentWriter, Shape
from moe_monitor.plugin.steps import StepStats
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.wiring import build
from moe_monitor.stats.imbalance import vllm_balancedness
from moe_monitor.stats.imbalance_cost import (
    expert_time_lost,
    experts_share_of_steps,
    layer_expert_time_lost,
    step_time_lost,
)


def test_a_balanced_layer_loses_nothing():
    load = np.array([[5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    assert layer_expert_time_lost(load).tolist() == [0.0, 0.0]
    assert expert_time_lost(load) == 0.0
    assert step_time_lost(load, 0.4) == 0.0


def test_one_rank_at_twice_the_others_loses_one_minus_mean_over_max():
    load = np.array([[200.0, 100.0, 100.0, 100.0]])
    mean, peak = 125.0, 200.0
    assert layer_expert_time_lost(load).tolist() == [1 - mean / peak]  # 0.375
    assert expert_time_lost(load) == 1 - mean / peak
    # of step time: the capture's expert share (every rank's own work) stretched to the busiest rank's, minus it
    assert step_time_lost(load, 0.3) == pytest.approx(0.3 * (peak / mean - 1))  # 0.18


def test_one_ep_rank_gives_nothing():
    load = np.array([[300.0], [10.0]])
    assert layer_expert_time_lost(load) is None
    assert expert_time_lost(load) is None
    assert step_time_lost(load, 0.5) is None


def test_layers_weigh_as_their_expert_time_and_idle_layers_are_left_out():
    load = np.array([[30.0, 10.0], [10.0, 10.0], [1.0, 0.0]])  # layer 2: 1 assignment, below 5
    lost = layer_expert_time_lost(load, min_assignments=5)
    assert lost[:2].tolist() == [1 - 20 / 30, 0.0] and math.isnan(lost[2])
    assert expert_time_lost(load, min_assignments=5) == pytest.approx((30 - 20) / (30 + 10))  # not the mean 1/6
    assert expert_time_lost(load, min_assignments=5) == pytest.approx(1 - vllm_balancedness(load[:2]))
    assert math.isnan(expert_time_lost(load[2:], min_assignments=5))
    assert math.isnan(step_time_lost(load[2:], 0.5, min_assignments=5))


def test_step_time_needs_a_share_that_fits_the_window():
    load = np.array([[300.0, 100.0]])  # busiest rank's expert time = 1.5 x the even spread's
    assert step_time_lost(load, None) is None  # no capture
    assert step_time_lost(load, float("nan")) is None
    assert step_time_lost(load, 0.6) == pytest.approx(0.3)  # 0.6 x 1.5 = 0.9 of the step on the busiest rank
    assert step_time_lost(load, 0.7) is None  # 0.7 x 1.5 > 1: the capture's share is not of a step like this one


def test_experts_share_of_steps_counts_idle_time_as_step_time():
    assert experts_share_of_steps(300.0, 900.0, 100.0) == 0.3
    assert experts_share_of_steps(0.0, 0.0, 0.0) is None


def simulated_capture(load: np.ndarray, us_per_assignment: float, other_us: float):
    """One EP step: each rank does `other_us` of non-expert work and, per layer, its own assignments' expert work,
    then waits in the layer's combine for the busiest rank. (step time, balanced step time, experts us summed over
    ranks, busy us summed over ranks) as a profiler capture of that step would see them (waiting is a busy
    collective kernel, as NCCL's are)."""
    ranks = load.shape[1]
    step = other_us + us_per_assignment * load.max(axis=1).sum()
    balanced = other_us + us_per_assignment * load.mean(axis=1).sum()
    experts = us_per_assignment * load.sum()
    busy = ranks * step  # every rank is busy (computing or waiting) for the whole step
    return step, balanced, experts, busy


@given(load=arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 16)), elements=st.integers(1, 1000)),
       us_per_assignment=st.floats(0.01, 10), other_us=st.floats(0, 1e5))
def test_the_step_time_a_simulated_ep_step_loses_is_the_formula(load, us_per_assignment, other_us):
    step, balanced, experts, busy = simulated_capture(load, us_per_assignment, other_us)
    share = experts_share_of_steps(experts, busy, 0.0)
    assert step_time_lost(load, share) == pytest.approx((step - balanced) / step, abs=1e-12)
    expert_step = us_per_assignment * load.max(axis=1).sum()  # the experts' critical path
    # step - balanced cancels `other_us` (up to 1e5 us) out of two sums: the expected value carries rounding of a
    # few ulps of `step`, relative to an expert time that may be 0.02 us (found by hypothesis: 0.25 vs 0.25 + 1.2e-12)
    rounding = 8 * np.finfo(np.float64).eps * step / expert_step
    assert expert_time_lost(load) == pytest.approx((step - balanced) / expert_step, abs=1e-12 + rounding)


@given(load=arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 16)), elements=st.integers(0, 1000)),
       share=st.floats(0, 1))
def test_the_figures_are_fractions(load, share):
    lost = layer_expert_time_lost(load)
    assert ((lost >= 0) & (lost < 1) | np.isnan(lost)).all()
    total = expert_time_lost(load)
    assert math.isnan(total) or 0 <= total < 1
    step = step_time_lost(load, share)
    assert step is None or math.isnan(step) or 0 <= step <= 1 - share


# -- a real sidecar over real segments and a real two-rank EP capture ---------------------------------------------
TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "traces")
EP_TRACES = [f"cpu_ep_stack_gloo_dp{r}_pp0_tp0_ep{r}_rank{r}.pt.trace.json.gz" for r in (0, 1)]


def publish(directory, writers: dict, rank: int, counts: np.ndarray) -> None:
    """DP rank `rank` of an EP=2 model (dp_size = ep_size = 2, 2 layers x 4 experts, contiguous placement)."""
    if rank not in writers:
        steps = StepStats()
        shape = Shape(2, counts.shape[1], len(steps.token_bounds), len(steps.duration_bounds))
        writers[rank] = (SegmentWriter(str(directory), "tiny-moe", Ranks(dp_rank=rank, dp_size=2, ep_rank=rank,
                                                                         ep_size=2), shape, top_k=2), steps)
    writer, steps = writers[rank]
    arrays = steps.snapshot()
    arrays.update(counts=counts.astype(np.int64), layer_ids=np.array([0, 1], dtype=np.int32),
                  layer_flags=np.full(2, LAYER_HOOKED, dtype=np.uint8))
    writer.publish(arrays)


def test_a_sidecar_exports_what_ep_rank_imbalance_costs(tmp_path):
    segments, profiles = tmp_path / "segments", tmp_path / "profiles"
    segments.mkdir()
    profiles.mkdir()
    for name in EP_TRACES:  # both ranks' traces of benchmarks/ep_stack.py, written a while ago (settled)
        shutil.copy(os.path.join(TRACES, name), profiles / name)
        os.utime(profiles / name, (time.time() - 100, time.time() - 100))
    now = [time.time()]
    t0 = now[0]
    exporter = build(SidecarConfig(segment_dir=str(segments), profile_dir=str(profiles), window_s=5,
                                   min_window_assignments=50), clock=lambda: now[0], process_metrics=False)
    exporter.captures.poll(background=False)  # analysed here, not in the window loop's thread
    writers: dict = {}
    base = np.full((2, 4), 10)
    for rank in (0, 1):
        publish(segments, writers, rank, base)
    exporter.tick(t0)
    # in the window, each DP rank routes layer 0 as [300, 100, 50, 50] (EP rank 0 serves experts 0-1: 400 of
    # each DP rank's 500) and layer 1 evenly
    for rank in (0, 1):
        publish(segments, writers, rank, base + np.array([[300, 100, 50, 50], [100, 100, 100, 100]]))
    now[0] = t0 + 6
    values = parse_exposition(exporter.tick(t0 + 5).body.decode())
    lost = {layer: values[("moe_layer_ep_expert_time_lost_ratio", (("layer", layer),))] for layer in ("0", "1")}
    assert lost == {"0": pytest.approx(1 - 500 / 800), "1": 0.0}  # rank loads [800, 200] and [400, 400]
    assert values[("moe_ep_expert_time_lost_ratio", ())] == pytest.approx((800 - 500) / (800 + 400))
    capture = analyze([read_trace(os.path.join(TRACES, name)) for name in EP_TRACES])
    share = capture.categories["experts"].us / (capture.total_us + capture.idle_us)
    assert 0 < share < 0.75  # the capture fits this window: its busiest rank's expert time within the step
    assert values[("moe_ep_step_time_lost_ratio", ())] == pytest.approx(share * ((800 + 400) / (500 + 400) - 1))
    assert values[("moe_monitor_collector_success", (("collector", "imbalance_cost"),))] == 1


# -- the benchmark's forcing pattern (benchmarks/imbalance_cost_plugin) -------------------------------------------
@given(ranks=st.integers(2, 8), per_rank=st.integers(2, 16), skew=st.integers(1, 4), length=st.integers(1, 2000))
def test_every_prefix_of_the_forced_pattern_splits_over_the_ranks_as_the_weights_do(ranks, per_rank, skew, length):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                                    "imbalance_cost_plugin"))
    from moe_monitor_force_routing import pattern

    weights = [skew] + [1] * (ranks - 1)
    ids = np.array(pattern(ranks * per_rank, ranks, weights, length))
    load = np.bincount(ids // per_rank, minlength=ranks)
    expected = length * np.array(weights) / sum(weights)
    assert np.abs(load - expected).max() <= skew  # within one turn of the weights
    first = ids[: min(skew, length)].tolist()  # rank 0's first turn: consecutive ids of one rank are distinct experts
    assert len(set(first)) == min(len(first), per_rank)
