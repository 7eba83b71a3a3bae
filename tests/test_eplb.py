"""The EPLB advisor core (moe_monitor/eplb): placement against DeepSeek's published example, a load with a known
answer, the balancedness formulas on hand-computed cases, the files SGLang / the sidecar load, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_monitor.eplb import (
    FILE_NAMES,
    advise,
    balance_report,
    balanced_packing,
    identity_rank_load,
    layer_balancedness,
    placement_rank_load,
    plan_placement,
    rebalance_experts,
    redundancy_sweep,
    replicate_experts,
    sglang_balancedness,
    sglang_init_expert_location,
    sglang_logical_count,
    straggler_factor,
    vllm_args,
    vllm_balancedness,
    vllm_balancedness_layer_axis,
    write_placement_files,
)
from moe_monitor.stats.placement import load_placement

# The example of DeepSeek's EPLB README (https://github.com/deepseek-ai/EPLB, README.md, "Interface and Example":
# a two-layer MoE model with 12 experts per layer, 4 redundant experts, 16 replicas on 2 nodes of 4 GPUs, 4 expert
# groups), weight matrix and printed `phy2log` verbatim.
README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_published_example_exactly():
    p = rebalance_experts(np.array(README_WEIGHT), 16, 4, 2, 8)  # num_replicas, num_groups, num_nodes, num_gpus
    phy2log = p.placement.physical_to_logical
    assert phy2log.tolist() == README_PHY2LOG and p.placement.num_ranks == 8
    assert p.policy == "hierarchical" and p.placement.slots_per_rank == 2 and p.num_redundant == 4
    for layer in range(2):
        assert np.array_equal(p.logcnt[layer], np.bincount(phy2log[layer], minlength=12))
        for expert in range(12):
            slots = p.log2phy[layer, expert]
            real = slots[slots >= 0]
            assert len(real) == p.logcnt[layer, expert] and (np.diff(real) > 0).all()
            assert (phy2log[layer, real] == expert).all()
    assert p.log2phy.shape == (2, 12, 2)  # at most 2 replicas per expert in this example


def hot_expert_load():
    """One layer, 16 experts on 8 ranks; expert 3 carries half of the 1500 assignments, the 15 others 50 each."""
    load = np.full((1, 16), 50.0)
    load[0, 3] = 750.0
    return load


def test_known_answer_hot_expert():
    load = hot_expert_load()
    mean = 1500 / 8
    # Without EPLB (vLLM's linear placement: rank r holds experts 2r, 2r+1) rank 1 serves experts 2 and 3:
    # 50 + 750 = 800, i.e. (s + (1 - s)/(E - 1)) * W = (1/2 + 1/30) * 8 = 64/15.
    before = identity_rank_load(load, 8)
    assert before[0].tolist() == [100, 800, 100, 100, 100, 100, 100, 100]
    assert straggler_factor(before)[0] == pytest.approx(800 / mean) == pytest.approx(64 / 15)
    assert identity_rank_load(load, 8, "round_robin")[0, 3] == 800  # experts 3 and 11

    # 8 redundant experts (24 slots, 3 per GPU), by hand: replicas go one at a time to the highest load per
    # replica, 750/1, 750/2, ... 750/8 = 93.75 are all above 50, so expert 3 takes all 8: 9 replicas of 250/3.
    # Packing heaviest first onto the lightest GPU with room: 8 replicas one per GPU, the 9th onto GPU 0
    # (ties go to the lowest index); the fifteen 50s fill GPUs 1..7 to 3 slots (83.3 + 50 + 50) and the last
    # one lands on GPU 0, the only one with room: 2 * 250/3 + 50 = 650/3.
    p = plan_placement(load, num_gpus=8, num_redundant=8)
    assert p.logcnt[0, 3] == 9 and p.logcnt[0].sum() == 24
    after = placement_rank_load(load, p)
    assert after[0] == pytest.approx([650 / 3] + [550 / 3] * 7)
    assert straggler_factor(after)[0] == pytest.approx(52 / 45)
    assert vllm_balancedness(after) == pytest.approx(45 / 52)

    report = balance_report(load, p)
    assert report.before.mean_straggler == pytest.approx(64 / 15)
    assert report.after.mean_straggler == pytest.approx(52 / 45)
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["after"]["balancedness_vllm"] == pytest.approx(45 / 52)
    assert "4.267" in report.format_table() and "1.156" in report.format_table()

    # The sweep: 0 redundant cannot help (the GPU with expert 3 carries >= 750 + 50); 16 gives 200/187.5 (hand:
    # e3 gets 14 replicas of 50, then experts 0 and 1 one each; 28 x 50 + 4 x 25 over 8 GPUs of 4 slots);
    # 24 gives 1.033, the best, and the greedy is not monotonic: 32 is worse again.
    advice = advise(load, num_gpus=8)
    by_r = {pt.num_redundant: pt.summary.mean_straggler for pt in advice.points}
    assert sorted(by_r) == [0, 8, 16, 24, 32]
    assert by_r[0] == pytest.approx(64 / 15) and by_r[8] == pytest.approx(52 / 45)
    assert by_r[16] == pytest.approx(200 / mean) and by_r[24] < by_r[16] < by_r[32] * 1.0001
    assert advice.recommended.num_redundant == 24 and advice.enable_eplb
    assert advice.predicted_gain == pytest.approx((64 / 15) / by_r[24])
    # 94 assignments per layer x expert: the best fit is said, not recommended.
    doc = json.loads(json.dumps(advice.to_dict()))
    assert doc["best_eplb_num_redundant_experts"] == 24 and doc["recommended_num_redundant_experts"] is None
    assert "too little routing recorded: 94 assignments" in doc["confidence"]["withheld"]
    assert "<- recommended" not in advice.format_table()
    # Ten times as much, in one range: nothing to check it on.
    one = advise(10 * load, num_gpus=8)
    assert not one.stands and "the history is one range" in one.confidence.withheld
    # ... as four equal sub-ranges: held out in turn, every one agrees.
    quarters = advise(10 * load, num_gpus=8, parts=[10 * load / 4] * 4)
    assert quarters.stands and quarters.confidence.per_fold == (24, 24, 24, 24)
    assert quarters.to_dict()["recommended_num_redundant_experts"] == 24
    assert "<- recommended" in quarters.format_table()


def test_recommendation_rule_and_balanced_load():
    rng = np.random.default_rng(7)
    load = rng.gamma(0.5, size=(6, 64)) * 1000
    advice = advise(load, num_gpus=8, num_nodes=2, num_groups=8, tolerance=0.01)
    best = min(pt.summary.mean_straggler for pt in advice.points)
    within = [pt.num_redundant for pt in advice.points if pt.summary.mean_straggler <= best * 1.01]
    assert advice.recommended.num_redundant == min(within)
    # Perfectly even load: nothing to gain, the advice is to leave EPLB off.
    flat = advise(np.full((3, 16), 1000.0), num_gpus=4, parts=[np.full((3, 16), 250.0)] * 4)
    assert flat.stands and not flat.enable_eplb and flat.to_dict()["recommended_num_redundant_experts"] is None
    assert "EPLB does not pay" in flat.format_table()
    # Too little of it: withheld, and said why.
    thin = advise(np.full((3, 16), 10.0), num_gpus=4, parts=[np.full((3, 16), 2.5)] * 4)
    assert not thin.stands and "too little routing recorded: 10 assignments" in thin.confidence.withheld
    assert thin.to_dict()["enable_eplb"] is None


def _history(rng, probs: np.ndarray, per_fold: int) -> list[np.ndarray]:
    """Four consecutive sub-ranges of routing drawn from `probs` [L, E], `per_fold` assignments per layer each."""
    return [np.stack([rng.multinomial(per_fold, p) for p in probs]).astype(float) for _ in range(4)]


def test_advice_no_longer_flips_between_samples_of_the_same_traffic():
    """A minute apart on the same live sidecar the old advice said 4, then 16, then 12 redundant experts (4 GPUs,
    8 experts). Five histories of the same traffic: read as one range each (the old rule) they disagree; with
    their sub-ranges held out in turn, each one is withheld or gives the same answer."""
    probs = np.tile([0.22, 0.16, 0.14, 0.12, 0.11, 0.10, 0.08, 0.07], (2, 1))
    old, new = set(), set()
    for seed in range(5):
        parts = _history(np.random.default_rng(seed), probs, 150)
        load = sum(parts)
        old.add(advise(load, num_gpus=4).recommended.num_redundant)
        advice = advise(load, num_gpus=4, parts=parts)
        if advice.stands:
            new.add(advice.to_dict()["recommended_num_redundant_experts"])
        else:
            assert "not stable" in advice.confidence.withheld or "too little" in advice.confidence.withheld
    assert len(old) > 1, old  # the problem, reproduced
    assert len(new) <= 1, new
    # With ten times the traffic the answer stands, and is one of them.
    many = [advise(sum(p), num_gpus=4, parts=p) for p in
            (_history(np.random.default_rng(10 + s), probs, 15000) for s in range(3))]
    assert all(a.stands for a in many), [a.confidence.withheld for a in many]
    assert len({a.to_dict()["recommended_num_redundant_experts"] for a in many}) == 1


def test_balanced_traffic_does_not_gain_from_replicas_of_its_noise():
    """Uniform routing, a short history: replicas smooth sampling noise as they smooth skew, so read naively a
    balanced load 'gains' from EPLB; with what noise alone scores taken off, it does not."""
    parts = _history(np.random.default_rng(3), np.full((4, 8), 1 / 8), 2000)
    naive = advise(sum(parts), num_gpus=4, tolerance=0.01)
    assert naive.enable_eplb  # the trap
    advice = advise(sum(parts), num_gpus=4, parts=parts)
    assert not advice.enable_eplb and advice.to_dict()["recommended_num_redundant_experts"] is None


def test_placement_properties_on_random_loads():
    rng = np.random.default_rng(1)
    for num_experts, groups, nodes, gpus, redundant in [(64, 8, 2, 8, 16), (64, 8, 4, 16, 0), (60, 6, 3, 6, 6),
                                                        (48, 4, 3, 6, 6), (256, 8, 4, 32, 32)]:
        load = rng.gamma(0.4, size=(4, num_experts)) * 1000
        load[:, rng.integers(num_experts)] *= 30  # one hot expert per layer
        p = plan_placement(load, num_gpus=gpus, num_redundant=redundant, num_nodes=nodes, num_groups=groups)
        assert p.policy == ("hierarchical" if groups % nodes == 0 else "global")
        phy2log, num_physical = p.placement.physical_to_logical, p.placement.num_physical
        assert phy2log.shape == (4, num_experts + redundant) and num_physical % gpus == 0
        slot_node = np.arange(num_physical) // (num_physical // nodes)
        for layer in range(4):
            # every logical expert placed, as many times as logcnt says
            assert np.array_equal(np.bincount(phy2log[layer], minlength=num_experts), p.logcnt[layer])
            assert (p.logcnt[layer] >= 1).all()
            # replicas went to the heaviest experts: the last replica an expert got was deserved
            # (its load per replica then, w / (c - 1), was at least any other expert's final w / c)
            w, c = load[layer], p.logcnt[layer]
            if p.policy == "global" or nodes == 1:
                extra = c > 1
                if extra.any():
                    assert (w[extra] / (c[extra] - 1)).min() >= (w / c).max() - 1e-9
            if p.policy == "hierarchical":
                # each expert group stays within one node
                size = num_experts // groups
                for g in range(groups):
                    holds_group = np.isin(phy2log[layer], g * size + np.arange(size))
                    assert len(set(slot_node[holds_group])) == 1
        # on these (seeded, skewed) loads EPLB is better than no EPLB; it is a heuristic, not a guarantee
        before = identity_rank_load(load, gpus)
        after = placement_rank_load(load, p)
        assert np.allclose(after.sum(axis=1), load.sum(axis=1))
        assert vllm_balancedness(after) >= vllm_balancedness(before)


def test_building_blocks():
    pack, rank = balanced_packing(np.array([[5.0, 1, 4, 2]]), 2)
    assert pack.tolist() == [[0, 0, 1, 1]] and rank.tolist() == [[0, 1, 0, 1]]  # 5, 4, then 2 on 4, 1 on 5
    pack, rank = balanced_packing(np.array([[1.0, 9, 3]]), 3)  # one item per pack: item i -> pack i
    assert pack.tolist() == [[0, 1, 2]] and rank.tolist() == [[0, 0, 0]]
    phy2log, replica, count = replicate_experts(np.array([[10.0, 30, 20]]), 6)
    assert phy2log.tolist() == [[0, 1, 2, 1, 2, 1]]  # 30 -> 15 -> 20 -> 10 (vs 15) -> ...
    assert replica.tolist() == [[0, 0, 0, 1, 1, 2]] and count.tolist() == [[1, 3, 2]]


def test_balancedness_formulas():
    # rank 1 always carries twice rank 0's load
    steady = np.array([[100.0, 200], [100, 200]])
    assert vllm_balancedness(steady) == pytest.approx(0.75)  # (150 + 150) / (200 + 200)
    assert sglang_balancedness(steady) == pytest.approx((150 + 1e-5) / (200 + 1e-5))
    assert vllm_balancedness_layer_axis(steady) == pytest.approx(1.0)  # vLLM 0.26's reduction over layers
    assert straggler_factor(steady).tolist() == pytest.approx([4 / 3, 4 / 3])

    # layers of different balance: vLLM weighs by load (ratio of sums), SGLang averages the layer ratios
    mixed = np.array([[100.0, 300], [100, 100]])
    assert vllm_balancedness(mixed) == pytest.approx((200 + 100) / (300 + 100))
    assert sglang_balancedness(mixed) == pytest.approx(((200 + 1e-5) / (300 + 1e-5) + 1) / 2)
    assert layer_balancedness(mixed).tolist() == pytest.approx([2 / 3, 1.0])

    # a layer without load: no straggler figure (NaN), SGLang counts it as balanced (eps / eps = 1)
    idle = np.array([[0.0, 0], [100, 300]])
    s = straggler_factor(idle)
    assert np.isnan(s[0]) and s[1] == pytest.approx(1.5)
    assert vllm_balancedness(idle) == pytest.approx(200 / 300)
    assert sglang_balancedness(idle) == pytest.approx((1 + (200 + 1e-5) / (300 + 1e-5)) / 2)
    report = balance_report(np.array([[0.0] * 4, [1, 2, 3, 4]]), plan_placement(
        np.array([[0.0] * 4, [1, 2, 3, 4]]), num_gpus=2))
    doc = json.loads(json.dumps(report.to_dict()))  # NaN is written as null, never as invalid JSON
    assert doc["before"]["straggler_per_layer"][0] is None


def test_formats_round_trip(tmp_path):
    load = np.array(README_WEIGHT, dtype=float)
    p = rebalance_experts(load, 16, 4, 2, 8)
    paths = write_placement_files(tmp_path, p, load)
    assert {k: v.name for k, v in paths.items()} == FILE_NAMES

    # SGLang --init-expert-location: exactly one key (init_by_mapping(**doc) rejects any other)
    sg = json.loads(paths["sglang_init_expert_location"].read_text())
    assert list(sg) == ["physical_to_logical_map"] and sg["physical_to_logical_map"] == README_PHY2LOG
    counts = json.loads(paths["sglang_logical_count"].read_text())
    assert list(counts) == ["logical_count"] and counts["logical_count"] == README_WEIGHT

    # vLLM: its EplbModelState maps, for reading only
    state = json.loads(paths["vllm_eplb_state"].read_text())
    assert state["loadable"] is False and state["num_redundant_experts"] == 4 and state["ep_size"] == 8
    assert np.array(state["physical_to_logical_map"]).shape == (2, 16)
    assert np.array(state["logical_to_physical_map"]).shape == (2, 12, 2)
    assert np.array(state["logical_replica_count"]).sum(axis=1).tolist() == [16, 16]
    assert state["vllm_args"] == vllm_args(4)
    assert json.loads(vllm_args(4)[-1]) == {"num_redundant_experts": 4}

    # the sidecar's own --placement reader takes it and gets the same per-rank load
    side = load_placement(str(paths["sidecar_placement"]), num_layers=2)
    assert np.allclose(side.rank_load(load), placement_rank_load(load, p))

    # a model whose layer 0 is dense: rows over all layers, the dense row trivial (slot i -> expert i % E)
    sg3 = sglang_init_expert_location(p, num_hidden_layers=3, moe_layer_ids=[1, 2])["physical_to_logical_map"]
    assert sg3[0] == [i % 12 for i in range(16)] and sg3[1:] == README_PHY2LOG
    lc3 = sglang_logical_count(load, num_hidden_layers=3, moe_layer_ids=[1, 2])["logical_count"]
    assert lc3[0] == [0] * 12 and lc3[1:] == README_WEIGHT
    assert isinstance(sglang_logical_count(load + 0.5)["logical_count"][0][0], float)


def test_redundancy_sweep():
    assert redundancy_sweep(256, 32) == [0, 32, 64, 96, 128]
    assert redundancy_sweep(60, 8, steps=2) == [4, 12, 20]  # 60 + 4 = 64 splits over 8
    assert redundancy_sweep(4, 8, steps=1) == [4, 12]  # more GPUs than experts: each rank needs a slot


@pytest.mark.parametrize("call, message", [
    (lambda: plan_placement(np.ones(12), num_gpus=4), "2-D"),
    (lambda: plan_placement(np.array([[1.0, -1, 1, 1]]), num_gpus=2), "negative at layer 0, expert 1"),
    (lambda: plan_placement(np.array([[1.0, np.nan]]), num_gpus=2), "NaN"),
    (lambda: plan_placement(np.zeros((2, 4)), num_gpus=2), "all zero"),
    (lambda: plan_placement([["a", "b"]], num_gpus=2), "numeric"),
    (lambda: plan_placement(np.ones((1, 12)), num_gpus=8), "do not split evenly over 8 GPUs"),
    (lambda: plan_placement(np.ones((1, 12)), num_gpus=16, num_redundant=0), "16 GPUs but only 12"),
    (lambda: plan_placement(np.ones((1, 12)), num_gpus=4, num_groups=5), "5 equal expert groups"),
    (lambda: plan_placement(np.ones((1, 12)), num_gpus=4, num_nodes=3), "over 3 nodes"),
    (lambda: plan_placement(np.ones((1, 12)), num_gpus=4, num_redundant=-4), "num_redundant must be >= 0"),
    (lambda: plan_placement(np.ones((1, 12)), num_gpus=True), "num_gpus must be an integer"),
    (lambda: plan_placement(np.ones((1, 12)), num_gpus=4.0), "num_gpus must be an integer"),
    (lambda: rebalance_experts(np.ones((1, 12)), 8, 1, 1, 4), "cannot hold 12 logical"),
    (lambda: balanced_packing(np.ones((1, 5)), 2), "5 items do not split evenly"),
    (lambda: placement_rank_load(np.ones((1, 16)), plan_placement(np.ones((2, 16)), num_gpus=4)),
     "placement is for 2 layers"),
    (lambda: identity_rank_load(np.ones((1, 4)), 2, "striped"), "strategy must be one of"),
    (lambda: advise(np.ones((1, 12)), num_gpus=4, redundant=[]), "at least one"),
    (lambda: advise(np.ones((1, 12)), num_gpus=4, redundant=[2]), "do not split evenly over 4 GPUs"),
    (lambda: advise(np.ones((1, 12)), num_gpus=4, tolerance=1.5), "tolerance"),
    (lambda: sglang_init_expert_location(plan_placement(np.ones((2, 4)), num_gpus=2), num_hidden_layers=3),
     "give moe_layer_ids"),
    (lambda: sglang_init_expert_location(plan_placement(np.ones((2, 4)), num_gpus=2), moe_layer_ids=[1]),
     "1 moe_layer_ids for 2"),
    (lambda: sglang_logical_count(np.ones((2, 4)), moe_layer_ids=[2, 1]), "strictly increasing"),
    (lambda: sglang_logical_count(np.ones((2, 4)), num_hidden_layers=2, moe_layer_ids=[1, 2]), "past the model"),
    (lambda: vllm_args(-1), "num_redundant must be >= 0"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.slow  # imports vLLM: ~5 s on two cores
def test_placement_equals_vllms_own_eplb_policy_on_random_loads():
    """vLLM ships the same algorithm (vllm/distributed/eplb/policy/default.py): on loads without ties ours must
    give vLLM's placement slot for slot, hierarchical and global, across shapes."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

    from moe_monitor.eplb.placement import rebalance_experts

    rng = np.random.default_rng(1)
    cases = [(12, 16, 4, 2, 8), (64, 72, 8, 2, 8), (128, 144, 8, 4, 16), (256, 288, 8, 4, 32), (16, 24, 1, 1, 8),
             (60, 64, 3, 2, 8)]  # (logical, physical, groups, nodes, gpus); the last one takes the global policy
    for logical, physical, groups, nodes, gpus in cases:
        for _ in range(5):
            weight = rng.permutation(logical * 3)[:logical].reshape(1, logical) + rng.random((1, logical))
            weight = np.vstack([weight, rng.random((2, logical)) * 1000])  # distinct values: no ties
            ours = rebalance_experts(weight, physical, groups, nodes, gpus).placement.physical_to_logical
            theirs = DefaultEplbPolicy.rebalance_experts(torch.tensor(weight), physical, groups, nodes, gpus)
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            assert np.array_equal(ours, np.asarray(theirs)), (logical, physical, groups, nodes, gpus)
