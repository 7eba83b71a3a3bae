"""Expert parallelism on real vLLM GPU traces (issue #16 parts 2-4): both ranks of one capture, vLLM 0.26 on two
H200s (benchmarks/vllm_ep.py; tiny Qwen3-MoE, 4 layers x 16 experts, top-2, CUDA graphs), cut by
benchmarks/trim_trace.py:

- TP=2 + EP: per layer an all-reduce after attention (`cross_device_reduce_1stage`, TP) and one after the experts'
  `moe_sum` (the EP combine: each rank ran its 8 experts on all tokens); the embedding's and the sampler's
  collectives outside any layer.
- DP=2 + EP (vLLM's naive all-gather / reduce-scatter EP path): `AllGather` right after the router (dispatch),
  `ReduceScatter` after `moe_sum` (combine); `Broadcast` / `Reduce` in their place for steps whose two DP ranks
  ran different token counts.
- DP=2 + EP + EPLB: the same, and EPLB's load all-reduces (`AllReduce_Sum_u32`) between steps.

The kernel orders were read by hand from one step of each trace (docs/ep.md shows them).
"""

from __future__ import annotations

import glob
import os
from collections import Counter

import pytest

from moe_monitor.breakdown.analyze import analyze, classify, load_rules, units_of
from moe_monitor.breakdown.record import BreakdownRecord
from moe_monitor.breakdown.report import render_table
from moe_monitor.breakdown.straggler import Collective, ep_wait
from moe_monitor.breakdown.trace import read_trace

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "traces")


def ranks_of(config: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(TRACES, f"vllm026_x2_{config}_dp*.pt.trace.json.gz")))
    assert len(paths) == 2, paths
    return paths


def categories_by_kernel(paths: list[str]) -> dict[str, Counter]:
    rules, out = load_rules(), {}
    for path in paths:
        trace = read_trace(path)
        units = units_of(trace)
        classify(trace, units, rules)
        for u in units:
            out.setdefault(u.event.name.split("(")[0].split("<")[0], Counter())[u.category] += 1
    return out


def test_tp_ep_the_combine_all_reduce_is_ep_communication_the_attention_all_reduce_is_not():
    by = categories_by_kernel(ranks_of("tp2ep"))
    reduce = by["void vllm::cross_device_reduce_1stage"]
    # 2 ranks x 6 steps x 4 layers: one combine per MoE layer; the others (after attention, the embedding) TP
    assert reduce["all_to_all"] == 48, reduce
    assert reduce["collective"] == 60, reduce
    assert set(by["ncclDevKernel_AllGather_RING_LL"]) == {"collective"}  # the sampler's logits gather


def test_dp_ep_dispatch_and_combine_are_ep_communication():
    for config in ("dp2ep", "dp2ep_eplb"):
        by = categories_by_kernel(ranks_of(config))
        for kernel in ("ncclDevKernel_AllGather_RING_LL", "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL",
                       "ncclDevKernel_Broadcast_RING_LL", "ncclDevKernel_Reduce_Sum_bf16_RING_LL"):
            assert set(by[kernel]) == {"all_to_all"}, (config, kernel, by[kernel])
    eplb = categories_by_kernel(ranks_of("dp2ep_eplb"))
    assert set(eplb["ncclDevKernel_AllReduce_Sum_u32_RING_LL"]) == {"collective"}  # EPLB's load sync: no MoE block


def test_tp_ep_rank_1_waits_for_rank_0_in_every_layer():
    result = analyze([read_trace(p) for p in ranks_of("tp2ep")])
    w = result.ep_wait
    r0, r1 = "dp0-pp0-tp0-ep0", "dp0-pp0-tp1-ep1"
    assert w.ranks == (r0, r1) and w.collectives == 24 and w.unmatched == 0  # 6 steps x 4 layers
    assert w.caused_share[r0] > 0.99 and w.last_arrivals[r0] >= 20
    assert w.wait_us[r1] == pytest.approx(6161, rel=0.01) and w.wait_us[r0] < 1.0
    assert [row.layer for row in w.layers] == [0, 1, 2, 3]
    assert all(max(row.caused_us, key=row.caused_us.get) == r0 for row in w.layers)
    # the waiting rank's wait is the ep row's excess over the other rank's
    per_rank = {r.rank: r.categories["all_to_all"] for r in result.ranks}
    assert per_rank[r1] - per_rank[r0] == pytest.approx(w.wait_us[r1] - w.wait_us[r0], rel=0.02)
    text = render_table(result)
    assert "EP communication wait (24 collectives matched across 2 ranks)" in text
    record = BreakdownRecord.of(result)
    assert record.ep_caused_share[r0] > 0.99 and record.ep_wait_us[r1] == pytest.approx(6161, rel=0.01)


def test_dp_ranks_that_started_profiling_at_different_steps_are_still_paired():
    """The two DP engines' profiles begin at different steps: collectives pair by end time, not by step index."""
    w = analyze([read_trace(p) for p in ranks_of("dp2ep_eplb")]).ep_wait
    assert w.collectives == 40 and w.unmatched == 8
    assert w.caused_share["dp1-pp0-tp0-ep1"] > 0.99


def test_the_duration_rule_needs_no_clock():
    """Synthetic: rank B's clock is 1 s ahead and its profile starts one collective later; B joins layer 1's
    combine 30 us late, A joins the others 5 us late."""
    a = [Collective(100.0, 10.0, "combine", 0), Collective(200.0, 40.0, "combine", 1),
         Collective(300.0, 10.0, "combine", 0)]
    b = [Collective(1_000_200.0, 10.0, "combine", 1), Collective(1_000_300.0, 15.0, "combine", 0)]
    w = ep_wait({"A": a, "B": [Collective(c.end - 1_000_000.0, c.us, c.name, c.layer) for c in b]})
    assert w["collectives"] == 2 and w["unmatched"] == 1
    assert w["wait_us"] == {"A": 30.0, "B": 5.0}
    assert w["caused_us"] == {"A": 5.0, "B": 30.0} and w["last_arrivals"] == {"A": 1, "B": 1}
    assert ep_wait({"A": a}) is None
    assert ep_wait({"A": a, "B": [Collective(5000.0, 1.0, "combine", 0)]}) is None  # nothing pairs


@pytest.mark.slow
def test_the_sidecar_exports_who_waited_for_whom(tmp_path):
    """A real sidecar over a profile directory holding both ranks' traces of one capture."""
    import shutil
    import time

    from conftest import free_port, samples, scrape

    from moe_monitor.demo import launch

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for path in ranks_of("tp2ep"):  # as vLLM names them: <prefix>dp0_pp0_tp0_dcp0_ep0_rank0.<ns>.pt.trace.json.gz
        name = os.path.basename(path).replace("vllm026_x2_tp2ep_", "ep_").replace(".pt.", ".1.pt.")
        shutil.copy(path, profiles / name)
    sidecar = launch.start_sidecar(str(tmp_path / "segments"), free_port(), str(tmp_path / "sidecar.log"),
                                   ["--window", "1", "--profile-dir", str(profiles)])
    try:
        sidecar.wait_ready("/healthz", 30)
        deadline, m = time.monotonic() + 30, {}
        while time.monotonic() < deadline and not samples(m, "moe_capture_ep_wait_seconds"):
            time.sleep(0.5)
            m = scrape(sidecar.url + "/metrics")
    finally:
        sidecar.stop()
    wait = {dict(k)["rank"]: v for k, v in samples(m, "moe_capture_ep_wait_seconds").items()}
    caused = {dict(k)["rank"]: v for k, v in samples(m, "moe_capture_ep_wait_caused_share").items()}
    assert wait["dp0-pp0-tp1-ep1"] == pytest.approx(6.161e-3, rel=0.01) and wait["dp0-pp0-tp0-ep0"] < 1e-6
    assert caused["dp0-pp0-tp0-ep0"] > 0.99
    assert samples(m, "moe_capture_info") == {(("capture", "ep"), ("ranks", "2")): 1.0}
    # every kind of collective (tests/test_straggler_all.py): tp1 waited ~29 ms in TP all-reduces for tp0, host-bound
    series = samples(m, "moe_capture_collective_wait_seconds")
    kinds = {(dict(k)["kind"], dict(k)["rank"]): v for k, v in series.items()}
    assert kinds[("tp_allreduce", "dp0-pp0-tp1-ep1")] > 0.025 and kinds[("tp_allreduce", "dp0-pp0-tp0-ep0")] < 1e-5
    assert kinds[("ep_dispatch_combine", "dp0-pp0-tp1-ep1")] == wait["dp0-pp0-tp1-ep1"]
    why = {dict(k)["reason"]: v for k, v in samples(m, "moe_capture_collective_wait_caused_seconds").items()
           if dict(k)["kind"] == "tp_allreduce" and dict(k)["rank"] == "dp0-pp0-tp0-ep0"}
    assert set(why) == {"idle", "busy", "unexplained"} and why["idle"] > 0.9 * sum(why.values())


def test_a_collective_pairs_with_one_partner_only():
    """Two same-name collectives of rank A end 10 us apart, rank B's profile holds only the second: B's pairs
    with the closer of A's two, not with the first one tried, and A's other stays unmatched."""
    a = [Collective(100.0, 30.0, "ag", 0), Collective(110.0, 5.0, "ag", 0)]
    b = [Collective(109.0, 12.0, "ag", 0)]
    w = ep_wait({"A": a, "B": b})
    assert w["collectives"] == 1 and w["unmatched"] == 1
    assert w["wait_us"] == {"A": 0.0, "B": 7.0}
