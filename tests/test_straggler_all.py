"""Stragglers on every collective (issue #25 part 4): per kind of collective (TP all-reduce, all-gather /
reduce-scatter, integer syncs, EP dispatch / combine), each rank's wait, the rank it waited for, and why that rank
was late (its device idle: host-bound, or busy computing), on the real two-H200 vLLM traces and on synthetic ones.

The expected numbers on the real traces are recomputed here from the raw JSON events, without the analyser."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import subprocess
import sys

import pytest

from moe_monitor.breakdown.analyze import Unit, analyze
from moe_monitor.breakdown.record import BreakdownRecord
from moe_monitor.breakdown.report import render_table
from moe_monitor.breakdown.result import collective_wait_from_json
from moe_monitor.breakdown.straggler import (
    EP,
    GATHER,
    OTHER,
    SYNC,
    TP,
    collective_wait,
    collectives_of,
    kind_of,
    render_kinds,
)
from moe_monitor.breakdown.trace import Event, read_trace

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "traces")
R0, R1 = "dp0-pp0-tp0-ep0", "dp0-pp0-tp1-ep1"  # TP=2 + EP: tp0 is vLLM's driver rank
DP0, DP1 = "dp0-pp0-tp0-ep0", "dp1-pp0-tp0-ep1"


def paths(config: str) -> list[str]:
    found = sorted(glob.glob(os.path.join(TRACES, f"vllm026_x2_{config}_dp*.pt.trace.json.gz")))
    assert len(found) == 2, found
    return found


def raw_device(path: str, in_steps: bool = False) -> list[dict]:
    """The trace's kernels, copies and memsets; with in_steps, only those from its first vLLM step range on (what
    the breakdown looks at)."""
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    first = min(e["ts"] for e in events if e["name"].startswith("execute_context")) if in_steps else -1
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
            and e["ts"] >= first]


def raw_pairs(a: list[dict], b: list[dict], pattern: str, tolerance: float = 30.0) -> list[tuple[dict, dict]]:
    """Kernels matching `pattern` of two ranks paired by name and end time: closest first, each once."""
    a, b = ([e for e in x if re.search(pattern, e["name"])] for x in (a, b))
    candidates = sorted((abs(x["ts"] + x["dur"] - y["ts"] - y["dur"]), i, j) for i, x in enumerate(a)
                        for j, y in enumerate(b) if x["name"] == y["name"]
                        and abs(x["ts"] + x["dur"] - y["ts"] - y["dur"]) <= tolerance)
    used_a, used_b, out = set(), set(), []
    for _, i, j in candidates:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((a[i], b[j]))
    return out


def idle_in(events: list[dict], lo: float, hi: float) -> float:
    """Time in [lo, hi] that no device event covers."""
    spans = sorted((max(e["ts"], lo), min(e["ts"] + e["dur"], hi)) for e in events
                   if e["ts"] < hi and e["ts"] + e["dur"] > lo)
    busy, cur = 0.0, None
    for s, e in spans:
        if cur is None or s > cur[1]:
            busy += cur[1] - cur[0] if cur else 0.0
            cur = [s, e]
        else:
            cur[1] = max(cur[1], e)
    busy += cur[1] - cur[0] if cur else 0.0
    return (hi - lo) - busy


def waits_and_late_idle(pairs, events_of_late: list[dict], late_is_second: bool) -> tuple[float, float, float]:
    """(the early rank's total wait, the late rank's idle in the windows from the early rank's start to its own,
    those windows' length) over the pairs where the given rank joined last."""
    wait = idle = window = 0.0
    for x, y in pairs:
        early, late = (x, y) if late_is_second else (y, x)
        if late["dur"] < early["dur"]:
            wait += early["dur"] - late["dur"]
            idle += idle_in(events_of_late, early["ts"], late["ts"])
            window += late["ts"] - early["ts"]
    return wait, idle, window


@pytest.fixture(scope="module")
def tp2ep():
    return analyze([read_trace(p) for p in paths("tp2ep")])


def test_tp_ep_rank_1_waits_for_rank_0_in_the_tp_all_reduces_and_rank_0_was_host_bound(tp2ep):
    """Rank tp1 reaches every all-reduce first and waits for tp0, vLLM's driver rank, whose GPU sits idle while
    its host schedules and samples. On the full trace that was 194 of 221 ms; the trimmed fixture (6 steps) holds
    ~29 ms of it in the all-reduces outside MoE blocks, where the EP table alone showed 6 ms."""
    raw0, raw1 = (raw_device(p) for p in paths("tp2ep"))
    pairs = raw_pairs(raw0, raw1, "cross_device_reduce")
    assert len(pairs) == 54  # 6 steps x (4 after attention + the embedding's + 4 MoE combines)
    wait1, idle0, window0 = waits_and_late_idle(pairs, raw0, late_is_second=False)
    assert idle0 / window0 > 0.95  # in the windows rank 1 waited, rank 0's device was idle: host-bound
    kinds = tp2ep.collective_wait.kinds
    assert list(kinds) == [TP, GATHER, EP]
    tp, ep = kinds[TP], kinds[EP]
    assert tp.collectives == 30 and ep.collectives == 24 and not any(tp.unmatched.values())
    assert tp.wait_us[R1] + ep.wait_us[R1] == pytest.approx(wait1, rel=1e-9)
    assert tp.wait_us[R1] > 25_000 and tp.wait_us[R0] < 10  # 29.4 ms
    assert ep.wait_us[R1] == pytest.approx(tp2ep.ep_wait.wait_us[R1], rel=1e-12)  # the EP table's figure
    assert tp.waited_for == {R0: None, R1: R0} and tp.last_arrivals[R0] == 30
    why = tp.why[R0]
    assert why.reason == "host-bound" and set(tp.why) == {R0}
    assert why.idle_us + why.busy_us + why.unexplained_us == pytest.approx(tp.caused_us[R0])
    assert why.idle_us > 0.99 * (tp.caused_us[R0] - why.unexplained_us) and abs(why.busy_us) < 50
    first = min(pairs, key=lambda xy: xy[0]["ts"])  # no collective before it on either rank: not comparable
    assert why.unexplained_us == pytest.approx(first[1]["dur"] - first[0]["dur"], abs=15)  # 891 us; the rest:
    # the two ranks' ends differ by up to 0.4 us per collective
    # the sampler's logits all-gather (stream 21), one per step: the same story
    gather = raw_pairs(raw0, raw1, "AllGather")
    assert kinds[GATHER].wait_us[R1] == pytest.approx(waits_and_late_idle(gather, raw0, False)[0], rel=1e-9)
    assert kinds[GATHER].why[R0].reason == "host-bound"


def test_dp_ep_eplb_load_sync_waits_for_the_other_dp_engine_and_dp_sync_is_not_on_the_device():
    """DP=2 + EP: vLLM's DP padding sync runs over gloo on the host (no integer all-reduce kernel in either trace),
    so the wait table has the EP column only. With EPLB, its per-step expert-load all-reduce (`AllReduce_Sum_u32`,
    between steps) is a `sync`: DP engine 0 waits there for engine 1, idle on the device (host-bound)."""
    for path in paths("dp2ep"):
        assert not [e for e in raw_device(path) if "AllReduce" in e["name"]]
    plain = analyze([read_trace(p) for p in paths("dp2ep")]).collective_wait.kinds
    assert list(plain) == [EP]
    raw0, raw1 = (raw_device(p, in_steps=True) for p in paths("dp2ep_eplb"))  # the engines began at other steps
    pairs = raw_pairs(raw0, raw1, r"AllReduce_Sum_u(32|64)")
    wait0, idle1, window1 = waits_and_late_idle(pairs, raw1, late_is_second=True)
    assert len(pairs) == 6 and idle1 / window1 > 0.95
    sync = analyze([read_trace(p) for p in paths("dp2ep_eplb")]).collective_wait.kinds[SYNC]
    assert sync.wait_us[DP0] == pytest.approx(wait0, rel=1e-9) and sync.wait_us[DP0] > 5_000
    assert sync.waited_for[DP0] == DP1 and sync.why[DP1].reason == "host-bound"
    assert sum(sync.unmatched.values()) == 2  # each engine's profile holds a sync the other's does not


@pytest.mark.slow
def test_what_the_cli_shows(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", *paths("tp2ep")], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    head = lines.index("Collective wait per kind (2 ranks): ms each rank's collectives waited for the last rank "
                       "to join")
    assert lines[head + 1].split() == ["rank", TP, GATHER, EP]
    assert lines[head + 2].split() == [R0, "0.000", "0.000", "0.000"]
    r1 = lines[head + 3].split()
    assert r1[0] == R1 and 25 < float(r1[1]) < 35
    assert lines[head + 4].split() == ["matched", "(unmatched)", "30", "(0)", "6", "(0)", "24", "(0)"]
    assert f"    {TP}: {R1} waited {r1[1]} ms, most for {R0}" in lines
    late = next(x for x in lines if x.startswith(f"      {R0} joined last 30 of 30, made others wait {r1[1]} ms: "))
    assert "host-bound (device idle +2" in late  # +28.5 ms
    assert "EP communication wait (24 collectives matched across 2 ranks)" in out  # the EP table stays
    doc = json.loads(subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", "--json", *paths("tp2ep")],
                                    capture_output=True, text=True, timeout=120, check=True).stdout)
    assert doc["collective_wait"]["kinds"][TP]["waited_for"][R1] == R0
    one = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", paths("tp2ep")[0]],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Collective wait" not in one and "EP communication wait" not in one  # one rank: nobody to wait for


def test_the_record_the_sidecar_reads(tp2ep):
    doc = json.loads(json.dumps(tp2ep.to_json()))
    record = BreakdownRecord.from_json(doc)
    assert record.collective_wait_us[TP][R1] == tp2ep.collective_wait.kinds[TP].wait_us[R1]
    assert set(record.collective_caused_us[TP]) == {R0}
    assert record.collective_caused_us[TP][R0]["idle"] > 0.9 * sum(record.collective_caused_us[TP][R0].values())
    assert record.ep_wait_us[R1] == tp2ep.ep_wait.wait_us[R1]
    damaged = json.loads(json.dumps(doc))
    del damaged["collective_wait"]["kinds"][TP]["why"][R0]["busy_us"]
    with pytest.raises(ValueError, match="collective_wait kind 'tp_allreduce'"):
        BreakdownRecord.from_json(damaged)
    older = {k: v for k, v in doc.items() if k != "collective_wait"}  # stored before the table existed
    assert BreakdownRecord.from_json(older).collective_wait_us is None


@pytest.mark.parametrize("name,category,kind", [
    ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 2>(vllm::RankData*, ...)", "collective", TP),
    ("void vllm::cross_device_reduce_2stage<float, 8>(...)", "collective", TP),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective", TP),
    ("ncclKernel_AllReduce_RING_LL_Sum_float(ncclDevComm*, unsigned long, ncclWork*)", "collective", TP),
    ("void c10d::symmetric_memory::one_shot_all_reduce_kernel<bf16>(...)", "collective", TP),
    ("ncclDevKernel_AllReduce_Sum_u32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective", SYNC),
    ("ncclDevKernel_AllReduce_Sum_i64_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective", SYNC),
    ("ncclKernel_AllReduce_RING_LL_Sum_int32_t(ncclDevComm*, unsigned long, ncclWork*)", "collective", SYNC),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective", GATHER),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective", GATHER),
    ("ncclDevKernel_Broadcast_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective", GATHER),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "all_to_all", EP),  # in a MoE block
    ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 2>(...)", "all_to_all", EP),  # the TP+EP combine
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "all_to_all", EP),
    ("ncclDevKernel_Barrier(...)", "collective", OTHER),
])
def test_kinds(name, category, kind):
    assert kind_of(category, name) == kind


AR = "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)"


def rank(*kernels: tuple[str, float, float], clock: float = 0.0):
    """A GPU rank's collectives table from (name, start, end) kernels: names with AllReduce are collectives."""
    units = [Unit(Event(n, s + clock, e - s, 7, "kernel"), e - s, "collective" if "AllReduce" in n else "experts")
             for n, s, e in kernels]
    return collectives_of(units, [units], [0])


def test_a_rank_late_because_it_computed_longer_is_busy_and_its_kernels_are_named():
    a = rank(("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 20, 30), (AR, 30, 130))
    b = rank(("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 20, 120), (AR, 120, 130))
    tp = collective_wait({"A": a, "B": b})["kinds"][TP]
    assert tp["collectives"] == 2 and tp["wait_us"] == {"A": 90.0, "B": 0.0} and tp["waited_for"]["A"] == "B"
    assert tp["why"]["B"] == {"idle_us": 0.0, "busy_us": 90.0, "unexplained_us": 0.0, "reason": "busy",
                              "kernels": [["fused_moe_kernel", 100.0]]}
    text = "\n".join(render_kinds(collective_wait_from_json(collective_wait({"A": a, "B": b}))))
    assert "B joined last 1 of 2, made others wait 0.090 ms: busy (device idle +0.000 ms, busy +0.090 ms" in text
    assert "busiest kernels before it: fused_moe_kernel 0.100 ms" in text


def test_a_rank_late_with_its_device_idle_is_host_bound():
    a = rank(("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 20, 30), (AR, 30, 130))
    b = rank(("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 110, 120), (AR, 120, 130))
    why = collective_wait({"A": a, "B": b})["kinds"][TP]["why"]["B"]
    assert (why["reason"], why["idle_us"], why["busy_us"]) == ("host-bound", 90.0, 0.0)


def test_three_ranks_and_other_clocks():
    """C is 40 us late to the second all-reduce (idle), B 10 us (busy); C's clock is 1 s ahead, which the pairing
    cannot see past: with it, nothing of C pairs."""
    a = [("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 20, 30), (AR, 30, 80)]
    b = [("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 20, 40), (AR, 40, 80)]
    c = [("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 60, 70), (AR, 70, 80)]
    tp = collective_wait({"A": rank(*a), "B": rank(*b), "C": rank(*c)})["kinds"][TP]
    assert tp["wait_us"] == {"A": 40.0, "B": 30.0, "C": 0.0} and tp["waited_for"] == {"A": "C", "B": "C", "C": None}
    # C's segment: idle 40, busy 10; A's: idle 0, busy 10; B's: idle 0, busy 20. A's 40 = +40 idle; B's 30 = +40
    # idle, -10 busy (B computed 10 longer than C)
    assert (tp["why"]["C"]["idle_us"], tp["why"]["C"]["busy_us"], tp["why"]["C"]["unexplained_us"]) == (80, -10, 0)
    apart = collective_wait({"A": rank(*a), "B": rank(*b), "C": rank(*c, clock=1e6)})["kinds"][TP]
    assert apart["collectives"] == 0 and apart["unmatched"] == {"A": 2, "B": 2, "C": 2} and not apart["why"]
    table = collective_wait_from_json({"ranks": ["A", "B", "C"], "kinds": {TP: apart}})
    assert "0 (6)" in "\n".join(render_kinds(table))


def test_unmatched_and_mismatched_collectives_are_counted_not_guessed():
    a = rank(("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 20, 30), (AR, 30, 130))
    b_late_profile = rank(("fused_moe_kernel", 20, 120), (AR, 120, 130))  # B's profile starts after the first
    tp = collective_wait({"A": a, "B": b_late_profile})["kinds"][TP]
    assert tp["collectives"] == 1 and tp["unmatched"] == {"A": 1, "B": 0}
    assert tp["why"]["B"]["unexplained_us"] == 90.0  # B's segment has no start both ranks share
    other = AR.replace("bf16", "f16")  # the same moment, another kernel: not the same collective
    b_renamed = rank(("gemm", 0, 10), (AR, 10, 20), ("fused_moe_kernel", 20, 120), (other, 120, 130))
    tp = collective_wait({"A": a, "B": b_renamed})["kinds"][TP]
    assert tp["collectives"] == 1 and tp["unmatched"] == {"A": 1, "B": 1} and tp["wait_us"] == {"A": 0.0, "B": 0.0}


def test_nothing_to_compare():
    a = rank(("gemm", 0, 10), (AR, 10, 20))
    assert collective_wait({"A": a}) is None  # one rank
    assert collective_wait({"A": rank(("gemm", 0, 10)), "B": rank(("gemm", 0, 10))}) is None  # no collective
    assert collective_wait({}) is None and render_kinds(None) == []
    assert len(rank()) == 0 and len(collectives_of([], [], [])) == 0
    no_steps = collectives_of([Unit(Event(AR, 0, 1, 7, "kernel"), 1, "collective")], [], [])
    assert len(no_steps) == 0  # outside every step window: not kept (as the rest of the breakdown)
    result = analyze([read_trace(paths("tp2ep")[0])])
    assert result.collective_wait is None and "Collective wait" not in render_table(result)
