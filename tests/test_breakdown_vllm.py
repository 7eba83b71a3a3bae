"""The breakdown on real vLLM GPU traces: vLLM 0.26 on an H200, the plugin on, dummy weights with the real
per-layer dimensions of Qwen3-30B-A3B (4 layers), DeepSeek-V2-Lite (4 layers: one dense, three MoE with two
shared experts) and Mixtral-8x7B (2 layers); CUDA graphs (vLLM's default FULL_AND_PIECEWISE) and eager;
decode-heavy (16 requests × 24 tokens) and prefill-heavy (6 × 1,500-token prompts); sampling with temperature,
top-k and top-p. Captured by `benchmarks/vllm_traces.py`, cut by `benchmarks/trim_trace.py` (device events and
step ranges only).

How the expected categories were found by hand: the kernel sequence of one decode step of each trace, read in
order on the compute stream against vLLM 0.26's source. A step runs input preparation (H2D copies,
`_compute_slot_mapping_kernel`), the embedding, per layer the input norm, QKV GEMM, rotary, `reshape_and_cache`,
`kernel_unified_attention` (+ `reduce_segments` for split-KV), O GEMM, the post-attention norm, then the MoE
block (gate GEMM → `topkGating` or softmax + `gatherTopK` → `moe_align_block_size` → `fused_moe_kernel`,
activation, `fused_moe_kernel` → `moe_sum`); then the final norm, the lm_head GEMM (the widest GEMM of the step,
N = vocabulary) and the sampler (`_topk_topp_kernel`, softmax, `exponential_`, argmax, Gumbel sampling). The
plugin adds `moe_monitor_set_valid_tokens` (twice per step), one `CatArrayBatchedCopy` and
`moe_monitor_count_routing`. DeepSeek runs its shared experts on a second stream, beside the routed ones.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter, defaultdict

import pytest

from moe_monitor.breakdown.analyze import analyze, classify, load_rules, units_of
from moe_monitor.breakdown.report import render_table
from moe_monitor.breakdown.trace import read_trace

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "traces")
QWEN3_GRAPHS, QWEN3_EAGER, QWEN3_PREFILL, DSV2, MIXTRAL = (
    os.path.join(TRACES, f"vllm026_{n}.pt.trace.json.gz") for n in
    ("qwen3_graphs_decode", "qwen3_eager_decode", "qwen3_graphs_prefill", "dsv2lite_graphs_decode",
     "mixtral_graphs_decode"))
ALL = (QWEN3_GRAPHS, QWEN3_EAGER, QWEN3_PREFILL, DSV2, MIXTRAL)

# kernel name (a prefix of it) -> the one category every call of it must be in, in every trace it appears in
EVERYWHERE = {
    "fused_moe_kernel": "experts",
    "void vllm::act_and_mul_kernel": "experts",
    "void vllm::moe::topkGating": "gate",
    "void at::native::sbtopk::gatherTopK": "gate",
    "void vllm::moe::moe_align_block_size": "align_permute",
    "void vllm::moe::count_and_sort_expert_tokens_kernel": "align_permute",
    "void vllm::moe::moe_sum_vec_kernel": "align_permute",
    "kernel_unified_attention": "attention",
    "reduce_segments": "attention",
    "reshape_and_cache_kernel_flash": "attention",
    "_compute_slot_mapping": "attention",
    "void vllm::rotary_embedding_kernel": "attention",
    "_topk_topp_kernel": "sampling",
    "_gumbel_sample_kernel": "sampling",
    "_temperature_kernel": "sampling",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward": "sampling",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps": "sampling",
    "void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSort": "sampling",
    "moe_monitor_count_routing": "monitoring",
    "moe_monitor_set_valid_tokens": "monitoring",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy": "monitoring",
    "void vllm::rms_norm_kernel": "norm_elementwise",
    "triton_red_fused_fused_add_rms_norm": "norm_elementwise",
    "triton_red_fused__to_copy_embedding_rms_norm": "norm_elementwise",
}
# the lm_head of each shape: the GEMM config right after the final norm, N = vocabulary (decode; 8-row tile
# for the last steps with fewer requests)
LM_HEAD = {QWEN3_GRAPHS: "nvjet_sm90_tst_384x", QWEN3_EAGER: "nvjet_sm90_tst_384x",
           QWEN3_PREFILL: "nvjet_sm90_tst_384x", DSV2: "nvjet_sm90_tst_512x", MIXTRAL: "nvjet_sm90_tst_256x"}
# the gate GEMM of a decode step (64-row tiles: 16 tokens), split-K for Mixtral (its reduction too)
GATE_GEMM = {QWEN3_GRAPHS: "nvjet_sm90_tst_64x8_64x16_2x2_h_bz_TNT",
             QWEN3_EAGER: "nvjet_sm90_tst_64x8_64x16_2x2_h_bz_TNT",
             MIXTRAL: "nvjet_sm90_tst_8x64_64x16_1x1_h_bz_splitK_TNN"}
LAYERS = {QWEN3_GRAPHS: 4, QWEN3_EAGER: 4, QWEN3_PREFILL: 4, DSV2: 3, MIXTRAL: 2}  # MoE layers


@pytest.fixture(scope="module")
def classified():
    out = {}
    for path in ALL:
        trace = read_trace(path)
        units = units_of(trace)
        classify(trace, units, load_rules())
        out[path] = (trace, units)
    return out


def categories_of(units, prefix: str) -> Counter:
    return Counter(u.category for u in units if u.event.name.startswith(prefix))


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_every_kernel_of_a_known_part_is_in_its_category(classified, path):
    _, units = classified[path]
    seen = 0
    for prefix, category in EVERYWHERE.items():
        got = categories_of(units, prefix)
        if got:
            seen += 1
            assert set(got) == {category}, (prefix, dict(got))
    assert seen >= 12


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_totals_are_the_raw_device_time(path):
    with gzip.open(path) as f:
        raw = sum(e["dur"] for e in json.load(f)["traceEvents"] if e["cat"] in ("kernel", "gpu_memcpy", "gpu_memset"))
    result = analyze([read_trace(path)])
    assert result.total_us == pytest.approx(raw, rel=1e-12)
    assert sum(c.us for c in result.categories.values()) == pytest.approx(raw, rel=1e-12)
    assert sum(sum(s.categories.values()) for s in result.steps) <= raw + 1e-6


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_the_lm_head_is_sampling_once_per_step_and_never_a_gate(classified, path):
    trace, units = classified[path]
    lm_head = [u for u in units if u.event.name.startswith(LM_HEAD[path])]
    assert lm_head and {u.category for u in lm_head} == {"sampling"}
    sampled_steps = sum(1 for s in trace.steps if "generation_0(0)" not in s.name or "context_0(" not in s.name)
    assert len(lm_head) <= sampled_steps
    assert sum(u.us for u in units if u.category == "sampling") >= sum(u.us for u in lm_head)


@pytest.mark.parametrize("path", [QWEN3_GRAPHS, QWEN3_EAGER, MIXTRAL], ids=os.path.basename)
def test_gate_is_the_router_gemm_and_the_top_k_and_nothing_else(classified, path):
    """A sampler softmax must not be taken for a router, nor the lm_head for its gate GEMM (issue #15: 20.9 % of
    a real step in `gate` where the router is ~7 %)."""
    _, units = classified[path]
    gate = Counter(u.event.name for u in units if u.category == "gate")
    allowed = ("void vllm::moe::topkGating", GATE_GEMM[path], "nvjet_sm90_tst_", "void cublasLt::splitKreduce_kernel")
    assert all(name.startswith(allowed) for name in gate), gate
    assert not any("lm_head" in n or n.startswith(LM_HEAD[path]) for n in gate)
    topk = sum(v for n, v in gate.items() if n.startswith("void vllm::moe::topkGating"))
    gemm = sum(v for n, v in gate.items() if n.startswith(GATE_GEMM[path]))
    assert gemm and topk >= gemm  # one gate GEMM per router in decode steps


def test_shared_experts_on_their_stream_are_experts(classified):
    """DeepSeek-V2-Lite's two shared experts run on a second stream beside the routed experts (vLLM overlaps
    them): their GEMMs, SiLU and split-K reductions are expert work, once per MoE layer and step."""
    trace, units = classified[DSV2]
    streams = Counter(u.event.stream for u in units if u.event.cat == "kernel")
    main = streams.most_common(1)[0][0]
    side = [u for u in units if u.event.stream != main and u.event.cat == "kernel"]
    assert side and Counter(u.category for u in side) == Counter({"experts": len(side)})
    kinds = ("nvjet_sm90_tst_64x", "triton_poi_fused_mul_silu_slice", "void cublasLt::splitKreduce")
    assert {next(k for k in kinds if u.event.name.startswith(k)) for u in side} == set(kinds)
    # the dense first layer's MLP (main stream) stays dense
    assert categories_of(units, "nvjet_sm90_tst_192x16_64x8_4x1_v_bz_TNT") == Counter({"dense_gemm": 23})


def test_a_router_with_two_top_k_passes_keeps_what_is_between_them_in_gate(classified):
    """DeepSeek's greedy router on these traces: inductor softmax, gatherTopK, a fused mask, gatherTopK again."""
    _, units = classified[DSV2]
    assert set(categories_of(units, "triton_poi_fused__softmax__to_copy_arange_bitwise_not_eq")) == {"gate"}
    assert set(categories_of(units, "triton_red_fused__softmax_exp_max_prepare_softmax_online")) == {"gate"}


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_monitoring_row_is_the_plugins_kernels(classified, path):
    trace, units = classified[path]
    mon = Counter(u.event.name.split("<")[0] for u in units if u.category == "monitoring")
    counts = mon["moe_monitor_count_routing"]
    assert counts and mon["void at::native::(anonymous namespace)::CatArrayBatchedCopy_vectorized"] == counts
    assert counts <= mon["moe_monitor_set_valid_tokens"] <= 2 * counts + 2
    assert set(mon) == {"moe_monitor_count_routing", "moe_monitor_set_valid_tokens",
                        "void at::native::(anonymous namespace)::CatArrayBatchedCopy_vectorized"}
    share = analyze([trace]).categories["monitoring"].share
    assert 0 < share < 0.01


def test_preamble_per_tokens_bucket_on_a_prefill_heavy_trace():
    result = analyze([read_trace(QWEN3_PREFILL)])
    buckets = result.moe_blocks_by_tokens
    assert set(buckets) == {"<=8", "<=2048", ">2048"}
    assert sum(b.count for b in buckets.values()) == result.moe_blocks.count
    big, small = buckets[">2048"], buckets["<=8"]
    assert big.count == LAYERS[QWEN3_PREFILL] and big.first_expert_us > 10 * small.first_expert_us
    assert small.preamble_us < big.preamble_us < big.first_expert_us
    table = render_table(result)
    assert ">2048 tokens:" in table and "<=8 tokens:" in table


@pytest.mark.parametrize("path", [QWEN3_GRAPHS, QWEN3_EAGER], ids=os.path.basename)
def test_graph_and_eager_traces_of_the_same_model_agree(classified, path):
    """Same shape, workload and sampler, graphs vs eager: the MoE rows agree within a few points."""
    shares = {p: analyze([read_trace(p)]).categories for p in (QWEN3_GRAPHS, QWEN3_EAGER)}
    for cat in ("experts", "gate", "align_permute", "sampling", "monitoring"):
        a, b = shares[QWEN3_GRAPHS][cat].share, shares[QWEN3_EAGER][cat].share
        assert abs(a - b) < 0.03, (cat, a, b)


def test_every_step_window_holds_its_sampler(classified):
    """vLLM 0.26's step range ends before the sampler (and with a second stream, before the last layer): the
    breakdown counts a step's kernels from its start to the next step's start, so decode steps hold their
    lm_head and sampler."""
    result = analyze([read_trace(DSV2)])
    decode = [s for s in result.steps if s.phase == "decode"]
    assert decode and all(s.categories["sampling"] > 0 and s.categories["experts"] > 0 for s in decode[:-1])
    by_step = defaultdict(float)
    for s in result.steps:
        by_step[s.phase] += sum(s.categories.values())
    assert sum(by_step.values()) == pytest.approx(result.total_us, rel=0.02)  # all but pre-first-step work


def test_a_sampler_softmax_after_the_lm_head_is_not_a_router(tmp_path):
    """The shape of the step issue #15 saw: the sampler's `softmax_warp_forward` (a router anchor) right after
    the lm_head GEMM. Synthetic events in vLLM's order, one step range that ends before the sampler."""
    names = ["vllm::rms_norm_kernel", "nvjet_sm90_tst_64x8_gate", "void vllm::moe::topkGating<8>",
             "void vllm::moe::moe_align_block_size_kernel<int>", "fused_moe_kernel", "vllm::act_and_mul_kernel",
             "fused_moe_kernel", "void vllm::moe::moe_sum_vec_kernel", "triton_red_fused_add_rms_norm_3",
             "nvjet_sm90_tst_384x16_lm_head", "void at::native::softmax_warp_forward<float>",
             "void at::native::reduce_kernel<ArgMaxOps>", "moe_monitor_set_valid_tokens"]
    events = [{"ph": "X", "cat": "kernel", "name": n, "pid": 0, "tid": 7, "ts": 1000.0 + 10 * i, "dur": 5.0}
              for i, n in enumerate(names)]
    events.append({"ph": "X", "cat": "gpu_user_annotation", "name": "execute_context_0(0)_generation_8(8)",
                   "pid": 0, "tid": 7, "ts": 1000.0, "dur": 95.0})  # ends after the final norm (vLLM 0.26)
    path = tmp_path / "step.pt.trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    trace = read_trace(str(path))
    units = units_of(trace)
    classify(trace, units, load_rules())
    got = {u.event.name: u.category for u in units}
    assert got["nvjet_sm90_tst_64x8_gate"] == got["void vllm::moe::topkGating<8>"] == "gate"
    assert got["nvjet_sm90_tst_384x16_lm_head"] == "sampling"
    assert got["void at::native::softmax_warp_forward<float>"] == "sampling"
    assert got["void at::native::reduce_kernel<ArgMaxOps>"] == "sampling"
    assert got["moe_monitor_set_valid_tokens"] == "monitoring"
    assert got["void vllm::moe::moe_sum_vec_kernel"] == "align_permute"
    result = analyze([read_trace(str(path))])
    assert result.moe_blocks.count == 1 and result.steps[0].categories["sampling"] == 15.0
