"""Property tests of the pure statistics, placement and window maths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moe_monitor.sidecar.aggregate import Totals
from moe_monitor.sidecar.windows import Windower, next_boundary
from moe_monitor.stats.imbalance import layer_stats, rank_imbalance, sglang_balancedness, vllm_balancedness
from moe_monitor.stats.placement import Placement, PlacementError, contiguous, load_placement, parse_placement

FIELDS = ("imbalance_ratio", "balancedness", "cv", "entropy", "top1_share", "topk_share", "dead_experts",
          "hot_experts")


def counts_strategy(min_total=1):
    shapes = st.tuples(st.integers(1, 6), st.integers(2, 64))
    return shapes.flatmap(lambda s: arrays(np.int64, s, elements=st.integers(0, 10_000))).filter(
        lambda c: (c.sum(axis=1) >= min_total).all())


@given(layers=st.integers(1, 5), experts=st.integers(2, 300), per_expert=st.integers(1, 10_000))
def test_uniform_load_is_perfectly_balanced(layers, experts, per_expert):
    s = layer_stats(np.full((layers, experts), per_expert), top_k=2)
    np.testing.assert_allclose(s.imbalance_ratio, 1.0)
    np.testing.assert_allclose(s.balancedness, 1.0)
    np.testing.assert_allclose(s.entropy, 1.0)
    np.testing.assert_allclose(s.cv, 0.0, atol=1e-12)
    np.testing.assert_allclose(s.top1_share, 1 / experts)
    assert (s.dead_experts == 0).all() and (s.hot_experts == 0).all()


@given(counts=counts_strategy(), seed=st.integers(0, 2**32 - 1))
def test_permuting_experts_changes_nothing(counts, seed):
    perm = np.random.default_rng(seed).permutation(counts.shape[1])
    a, b = layer_stats(counts, top_k=3), layer_stats(counts[:, perm], top_k=3)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12, err_msg=name)


@given(counts=counts_strategy(), factor=st.integers(2, 1000))
def test_scaling_all_counts_changes_no_ratio(counts, factor):
    a, b = layer_stats(counts, top_k=2), layer_stats(counts * factor, top_k=2)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12, err_msg=name)


@given(counts=counts_strategy())
def test_bounds(counts):
    s = layer_stats(counts, top_k=2)
    E = counts.shape[1]
    assert (s.imbalance_ratio >= 1 - 1e-12).all() and (s.imbalance_ratio <= E + 1e-9).all()
    assert ((s.balancedness > 0) & (s.balancedness <= 1 + 1e-12)).all()
    assert ((s.entropy >= -1e-12) & (s.entropy <= 1 + 1e-12)).all()
    assert (s.topk_share >= s.top1_share - 1e-12).all()


def test_one_hot_expert():
    c = np.array([[90, 2, 2, 2, 2, 2]])
    s = layer_stats(c, top_k=1, hot_multiple=2.0)
    assert s.imbalance_ratio[0] == pytest.approx(90 / 100 * 6)
    assert s.top1_share[0] == pytest.approx(0.9)
    assert s.hot_experts[0] == 1 and s.dead_experts[0] == 0


def test_empty_and_tiny_windows_are_nan_not_misleading():
    s = layer_stats(np.array([[0, 0, 0, 0], [3, 0, 0, 0], [50, 50, 50, 50]]), top_k=2, min_assignments=10)
    for name in FIELDS:
        v = getattr(s, name)
        assert np.isnan(v[0]) and np.isnan(v[1]) and not np.isnan(v[2]), name
    assert s.tokens.tolist() == [0, 3, 200]


def vllm_log_balancedness(expert_load, ep_size):
    """vLLM's EplbState code, re-implemented line by line (torch ops spelled in Python)."""
    layers = []
    for layer in expert_load:
        per_rank = [sum(layer[r * len(layer) // ep_size:(r + 1) * len(layer) // ep_size]) for r in range(ep_size)]
        layers.append(per_rank)
    avg_tokens = sum(sum(r) / len(r) for r in layers)  # num_tokens_per_rank.mean(dim=1).sum()
    max_tokens = sum(max(r) for r in layers)  # num_tokens_per_rank.max(dim=1).values.sum()
    return avg_tokens / max_tokens


@given(st.integers(1, 6), st.sampled_from([1, 2, 4, 8]), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_vllm_balancedness_matches_vllm_code(layers, ep, per_rank, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 1000, size=(layers, ep * per_rank))
    counts[:, 0] += 1  # never all-zero
    rank_load = contiguous(ep * per_rank, ep).rank_load(counts)
    assert vllm_balancedness(rank_load) == pytest.approx(vllm_log_balancedness(counts.tolist(), ep), rel=1e-12)


def test_sglang_balancedness_formula():
    rank_load = np.array([[10.0, 30.0], [20.0, 20.0]])
    expected = ((20 + 1e-5) / (30 + 1e-5) + (20 + 1e-5) / (20 + 1e-5)) / 2
    assert sglang_balancedness(rank_load) == pytest.approx(expected)
    assert np.isnan(sglang_balancedness(np.zeros((2, 2)))) and np.isnan(vllm_balancedness(np.zeros((2, 2))))
    np.testing.assert_allclose(rank_imbalance(rank_load), [1.5, 1.0])


@given(st.integers(1, 4), st.integers(2, 32), st.sampled_from([1, 2, 4]), st.integers(0, 64),
       st.integers(0, 2**32 - 1))
def test_placement_with_redundant_experts_conserves_tokens(layers, experts, ranks, redundant, seed):
    rng = np.random.default_rng(seed)
    slots = experts + redundant
    slots += (-slots) % ranks  # pad to a multiple of the rank count with more replicas
    p2l = np.stack([np.concatenate([rng.permutation(experts), rng.integers(0, experts, slots - experts)])
                    for _ in range(layers)])
    placement = Placement(ranks, p2l)
    counts = rng.integers(0, 10_000, size=(layers, experts))
    load = placement.rank_load(counts)
    assert load.shape == (layers, ranks)
    np.testing.assert_allclose(load.sum(axis=1), counts.sum(axis=1))


def test_contiguous_placement_and_file_with_replicas(tmp_path):
    counts = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(contiguous(8, 2).rank_load(counts), [[10, 26]])
    path = tmp_path / "p.json"
    # experts 7 and 0 have a replica on each rank: their tokens split evenly
    path.write_text(json.dumps({"num_ranks": 2, "physical_to_logical": [0, 1, 2, 3, 7, 4, 5, 6, 7, 0]}))
    np.testing.assert_allclose(load_placement(str(path)).rank_load(counts), [[0.5 + 2 + 3 + 4 + 4,
                                                                             5 + 6 + 7 + 4 + 0.5]])
    path.write_text(json.dumps({"num_ranks": 2, "physical_to_logical": [0, 1, 2, 3, 4, 5, 6, 6]}))
    with pytest.raises(PlacementError, match="expert 7 has no physical slot"):
        load_placement(str(path)).rank_load(counts)
    path.write_text(json.dumps({"num_ranks": 2, "physical_to_logical": [0, 1, 2, 3, 4, 5, 6, 7]}))
    with pytest.raises(PlacementError, match="names logical expert 7, the model has 7"):
        load_placement(str(path)).rank_load(counts[:, :7])


@pytest.mark.parametrize("doc, message", [
    ([], "expected"),
    ({"num_ranks": 0, "physical_to_logical": [0, 1]}, "positive integer"),
    ({"num_ranks": 2, "physical_to_logical": "abc"}, "list of integers"),
    ({"num_ranks": 2, "physical_to_logical": [0, 1, 2]}, "split evenly"),
    ({"num_ranks": 1, "physical_to_logical": [0, -1]}, ">= 0"),
    ({"num_ranks": 1, "physical_to_logical": [[0, 1], [1, 0], [0, 1]]}, "3 layers"),
])
def test_bad_placement_documents_say_what_is_wrong(doc, message):
    with pytest.raises(PlacementError, match=message):
        parse_placement(doc, num_layers=2)


def test_placement_file_errors(tmp_path):
    with pytest.raises(PlacementError, match="cannot read"):
        load_placement(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlacementError, match="not JSON"):
        load_placement(str(tmp_path / "bad.json"))


def totals(counts: dict[int, list[int]]) -> Totals:
    layers = tuple(sorted(counts))
    return Totals(layers, np.array([counts[k] for k in layers], dtype=np.int64))


def test_windows_are_aligned_and_start_with_a_baseline():
    assert next_boundary(12.3, 5) == 15 and next_boundary(15.0, 5) == 20
    w = Windower(5)
    assert w.close(15, totals({0: [1, 1], 1: [0, 0]})) is None  # baseline only
    win = w.close(20, totals({0: [4, 2], 1: [1, 0]}))
    assert (win.start, win.end) == (15, 20)
    assert win.layer_ids.tolist() == [0, 1] and win.counts.tolist() == [[3, 1], [1, 0]]
    assert w.close(25, totals({0: [4, 2], 1: [1, 0]})).counts.sum() == 0  # idle window


def test_model_change_restarts_the_baseline():
    w = Windower(1)
    w.close(1, totals({0: [1, 1]}))
    assert w.close(2, totals({0: [1, 1, 1]})) is None
    assert w.close(3, totals({0: [2, 1, 1]})).counts.tolist() == [[1, 0, 0]]
    assert w.close(4, Totals()) is None


def test_rank_load_ledger_attributes_each_assignment_under_the_placement_of_its_time():
    from moe_monitor.stats.placement import Placement, RankLoadLedger, contiguous

    fixed, ledger = contiguous(4, 2), RankLoadLedger()
    c1, c2 = np.array([[5, 1, 2, 0]]), np.array([[9, 1, 2, 6]])
    assert ledger.update(c1, fixed).tolist() == fixed.rank_load(c1).tolist() == [[6, 2]]
    assert ledger.update(c2, fixed).tolist() == fixed.rank_load(c2).tolist() == [[10, 8]]
    swapped = Placement(2, np.array([[3, 2, 1, 0]]))  # a rearrangement: experts 0 and 3 change ranks
    c3 = c2 + np.array([[1, 0, 0, 5]])
    assert ledger.update(c3, swapped).tolist() == [[15, 9]]  # 10 + 5 (expert 3 now on rank 0), 8 + 1
    assert ledger.resets == 1
    assert ledger.update(c1, swapped).tolist() == swapped.rank_load(c1).tolist()  # counters went down: afresh
    assert ledger.resets == 2
