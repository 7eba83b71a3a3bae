"""Format-2 sections (the live placement, the EP-rank load the plugin attributed) checked against their segment's
header (issue #24 item 6). Segments come from the real SegmentWriter with sections that do not fit their header;
the sidecar, wired as `serve` wires it, reads them. What a user must see: the section refused with its reason in
moe_monitor_segment_sections_refused and one warning, the rest of the segment still counted, the windows and the
flight recorder going on, and moe_ep_rank_routed_tokens_total never going down."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import parse_exposition, samples
from test_sidecar import publish

from moe_monitor.channel import Ranks
from moe_monitor.sidecar.config import SidecarConfig
from moe_monitor.sidecar.exporter import Exporter
from moe_monitor.sidecar.wiring import build

COUNTS = np.array([[40, 10, 6, 4], [8, 8, 8, 8]])  # 2 layers x 4 experts
PLACEMENT = [[0, 1, 0, 2, 3, 1], [0, 1, 2, 3, 3, 2]]  # 6 slots over 2 EP ranks (3 each), experts 0, 1, 3 replicated
SEGMENT = "dp0-pp0-tp0"


def exporter(directory) -> Exporter:
    return build(SidecarConfig(segment_dir=str(directory), expert_series="all"), process_metrics=False)


def value(m: dict, name: str, **labels):
    return m.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


def ep_load(m: dict) -> dict[tuple[str, str], float]:
    return {(dict(k)["layer"], dict(k)["ep_rank"]): v for k, v in samples(m, "moe_ep_rank_routed_tokens_total").items()}


def refused(m: dict) -> dict[tuple[str, str, str], float]:
    return {(dict(k)["segment"], dict(k)["section"], dict(k)["reason"]): v
            for k, v in samples(m, "moe_monitor_segment_sections_refused").items()}


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def run(exp: Exporter, n: int, first: float = 1000.0) -> list[dict]:
    """n window ticks (the first one only takes the baseline)."""
    return [parse_exposition(exp.tick(first + i).body.decode()) for i in range(n)]


@pytest.mark.parametrize("columns", [5, 1 << 16])
def test_an_ep_rank_load_whose_columns_are_not_ep_size_is_refused_and_the_rest_is_counted(tmp_path, caplog, columns):
    """5 columns with ep_size 2 were exported as 5 EP ranks; 65,536 (the attacker's 1M, smaller) made 131,072
    series: the series budget dropped every T1 family and the window took seconds."""
    publish(tmp_path, Ranks(ep_size=2), COUNTS, placement=PLACEMENT, rank_load=np.full((2, columns), 7.0))
    exp = exporter(tmp_path)
    with caplog.at_level(logging.WARNING):
        m = run(exp, 4)[-1]
    assert sorted({rank for _, rank in ep_load(m)}) == ["0", "1"]  # ep_size ranks, split by the sidecar
    assert value(m, "moe_ep_rank_routed_tokens_total", layer=0, ep_rank=0) == 40 + 5
    assert value(m, "moe_expert_routed_tokens_total", layer=0, expert=0) == 40
    assert refused(m) == {(SEGMENT, "ep_rank_load", "shape"): 1.0}
    assert value(m, "moe_monitor_series", tier="t1") < 100 and value(m, "moe_monitor_series_truncated") == 0
    assert len(exp.flight) == 3 and value(m, "moe_monitor_window_errors_total", stage="window") == 0
    assert len([w for w in warnings(caplog) if "refused" in w]) == 1, warnings(caplog)


HOSTILE_PLACEMENTS = {  # name: (ep_size, physical_to_logical, reason)
    "2M_slots": (2, np.tile(np.arange(1 << 21) % 4, (2, 1)), "shape"),  # 4 experts: at most 1,028 slots
    "9_slots_over_2_ranks": (2, [[0, 1, 2, 3, 0, 1, 2, 3, 0]] * 2, "shape"),
    "fewer_slots_than_experts": (2, [[0, 1], [2, 3]], "shape"),
    "expert_9_of_4": (2, [[0, 1, 2, 3, 9, 0], [0, 1, 2, 3, 0, 1]], "expert_ids"),
    "expert_minus_1": (2, [[0, 1, 2, 3, -1, 0], [0, 1, 2, 3, 0, 1]], "expert_ids"),
    "expert_3_without_a_slot": (2, [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]], "expert_ids"),
    "ep_size_0": (0, PLACEMENT, "ep_size"),
    "ep_size_minus_2": (-2, PLACEMENT, "ep_size"),
    "ep_size_100000": (100_000, PLACEMENT, "ep_size"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PLACEMENTS))
def test_a_placement_that_does_not_fit_its_header_is_refused_and_the_windows_go_on(tmp_path, caplog, case):
    """ep_size <= 0 with a placement raised outside the placement handling every window (no window statistics,
    the flight recorder stopped); 2M slots for 4 experts cost hundreds of MB a window. Now the placement is refused
    (the sidecar exports no EP-rank split it cannot know), everything else goes on."""
    ep_size, placement, reason = HOSTILE_PLACEMENTS[case]
    publish(tmp_path, Ranks(ep_size=ep_size), COUNTS, placement=placement)
    exp = exporter(tmp_path)
    with caplog.at_level(logging.WARNING):
        m = run(exp, 4)[-1]
    assert refused(m) == {(SEGMENT, "physical_to_logical", reason): 1.0}
    assert value(m, "moe_expert_routed_tokens_total", layer=0, expert=0) == 40
    assert value(m, "moe_layer_window_routed_tokens", layer=0) == 0  # windows close (nothing new was routed)
    assert value(m, "moe_monitor_window_errors_total", stage="window") == 0
    assert len(exp.flight) == 3
    assert ep_load(m) == {}
    assert len([w for w in warnings(caplog) if "refused" in w]) == 1, warnings(caplog)


def test_a_refused_placement_leaves_the_ep_rank_load_the_plugin_published(tmp_path):
    publish(tmp_path, Ranks(ep_size=2), COUNTS, placement=[[0, 1, 2, 3, 0, 1, 2, 3, 0]] * 2,
            rank_load=[[31, 29], [20, 12]])
    m = run(exporter(tmp_path), 1)[-1]
    assert refused(m) == {(SEGMENT, "physical_to_logical", "shape"): 1.0}
    assert ep_load(m) == {("0", "0"): 31, ("0", "1"): 29, ("1", "0"): 20, ("1", "1"): 12}


def test_a_published_ep_rank_load_that_goes_down_is_refused_and_the_counter_never_decreases(tmp_path, caplog):
    """The plugin's cumulative EP-rank load went down (rank 0: 60 -> 50) without a restart of the writer:
    moe_ep_rank_routed_tokens_total went down with it. Now that reading is refused until the load is back above
    the last accepted one; meanwhile the sidecar splits the new counts itself."""
    ranks = Ranks(ep_size=2)
    w = publish(tmp_path, ranks, COUNTS, placement=PLACEMENT, rank_load=[[30, 30], [16, 16]])
    exp = exporter(tmp_path)
    loads = [[[60, 40], [20, 20]], [[50, 80], [24, 24]], [[55, 90], [28, 28]], [[70, 100], [32, 32]],
             [[80, 110], [36, 36]]]
    with caplog.at_level(logging.WARNING):
        seen = [run(exp, 1)[0]]
        for i, load in enumerate(loads):
            publish(tmp_path, ranks, COUNTS + 10 * (i + 1), writer=w, placement=PLACEMENT, rank_load=load)
            seen.append(parse_exposition(exp.tick(1001.0 + i).body.decode()))
    history = [ep_load(m) for m in seen]
    for before, after in zip(history, history[1:]):
        assert after.keys() == before.keys() and all(after[k] >= before[k] for k in before), (before, after)
    down = {(SEGMENT, "ep_rank_load", "decreased"): 1.0}
    assert [refused(m) for m in seen] == [{}, {}, down, down, {}, {}]
    assert len([w for w in warnings(caplog) if "decreased" in w]) == 1, warnings(caplog)
    # while refused (and at the tick it is back), the sidecar splits the new assignments under the placement:
    # layer 0 +10 per expert, rank 0 holds both replicas of expert 0 and one of expert 1's two (10 + 5)
    for i in (2, 3, 4):
        assert (history[i][("0", "0")], history[i][("0", "1")]) == (
            history[i - 1][("0", "0")] + 15, history[i - 1][("0", "1")] + 25)
    # then the plugin's figures go on from there: +10 on each rank, as published (80 - 70, 110 - 100)
    assert (history[5][("0", "0")], history[5][("0", "1")]) == (history[4][("0", "0")] + 10,
                                                                history[4][("0", "1")] + 10)

    restarted = publish(tmp_path, ranks, COUNTS, placement=PLACEMENT, rank_load=[[30, 30], [16, 16]])  # new writer
    assert restarted.generation != w.generation
    m = parse_exposition(exp.tick(1010.0).body.decode())
    assert refused(m) == {}  # a restart starts from zero: not a decrease (the counts before it are carried)
    assert all(ep_load(m)[k] >= history[-1][k] for k in history[-1])
