"""Classification by structure first, names second (issue #25, part 1), and what `analyze` says it could not
place (part 2).

The real-trace tests take the vLLM 0.26 GPU fixtures and rename the kernels a new architecture would name
differently (the router's softmax / top-k, the shared expert's GEMMs): the breakdown a user sees must not move. The
made-up layouts pin the position rules one at a time.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re

import pytest
from click.testing import CliRunner

from moe_monitor.breakdown.analyze import analyze_files, load_rules
from moe_monitor.cli import main

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "traces")
GPU_FIXTURES = sorted(p for p in glob.glob(os.path.join(TRACES, "vllm026_*.pt.trace.json.gz"))
                      if "_x2_" not in p)  # one-rank traces of real vLLM on a GPU
ROUTING = re.compile(r"topk|softmax|gating|sbtopk|bitonicSort|moeTopK|moeSoftmax", re.IGNORECASE)


def _load(path):
    with gzip.open(path) as f:
        return json.load(f)


def _write(path, doc):
    """One string, compressed fast: json.dump's many small writes through gzip took most of a test's time."""
    with gzip.open(path, "wt", compresslevel=1) as f:
        f.write(json.dumps(doc))


def _rename(doc, pattern: re.Pattern, new: str) -> int:
    """Every kernel whose name matches `pattern` renamed (the same name to the same new name); how many names."""
    names: dict[str, str] = {}
    seen: dict[str, str | None] = {}  # kernel name -> its new name (None: not renamed); the pattern once per name
    for e in doc["traceEvents"]:
        if e.get("cat") != "kernel":
            continue
        name = e.get("name", "")
        if name not in seen:
            seen[name] = f"{new}_{len(names)}" if pattern.search(name) else None
            if seen[name] is not None:
                names[name] = seen[name]
        if seen[name] is not None:
            e["name"] = seen[name]
    return len(names)


def _cats(path, rules=None):
    return {c: row.share for c, row in analyze_files([path], rules).categories.items()}


@pytest.mark.parametrize("path", GPU_FIXTURES, ids=os.path.basename)
def test_router_kernels_of_an_unseen_architecture_are_still_gate(tmp_path, path):
    """Every routing kernel renamed to a name no rule knows (as Qwen2-MoE's `moeTopK` was): nothing lands in
    `other`, and gate and every row stay where they were, to 0.01 point. Structure places them: between the router
    GEMM and the first align or expert kernel. One limit, where names still count: a shared expert run inline
    with its own sigmoid gate (Qwen2-MoE above 256 tokens a step) ends where the routing starts, and only a
    routing name says where; renamed, its sigmoid and multiply count as gate (within the issue's 1 point)."""
    doc = _load(path)
    assert _rename(doc, ROUTING, "unseen_router_kernel") >= 1
    renamed = str(tmp_path / "renamed.pt.trace.json.gz")
    _write(renamed, doc)
    before, after = _cats(path), _cats(renamed)
    assert before["gate"] > 0.005
    assert after["other"] == pytest.approx(before["other"], abs=1e-9)
    if "qwen2_moe" in path:
        assert after["gate"] - before["gate"] <= 0.0101
        assert after["gate"] + after["experts"] == pytest.approx(before["gate"] + before["experts"], abs=1e-9)
        return
    for cat in before:
        assert after[cat] == pytest.approx(before[cat], abs=1e-4), cat


def _kernel(name, ts, dur, stream=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": stream,
            "args": {"stream": stream}}


def _layer(t0: float, *, norm="rms_norm_kernel", router="nvjet_router", routing=("mystery_a", "mystery_b"),
           shared=(), align=("moe_align_block_size_kernel",), tail=("mystery_sum",), between=("mystery_act",)):
    """One MoE layer on one stream: attention, o_proj, norm, router GEMM, [inline shared expert], routing, align,
    expert GEMM, [between], expert GEMM, tail. Each kernel 10 us, back to back."""
    names = ["kernel_unified_attention", "nvjet_o_proj", norm, router, *shared, *routing, *align,
             "fused_moe_kernel", *between, "fused_moe_kernel", *tail]
    return [_kernel(n, t0 + 10 * i, 10) for i, n in enumerate(names)]


def _categories(tmp_path, events) -> dict[str, str]:
    path = str(tmp_path / "t.pt.trace.json.gz")
    _write(path, {"traceEvents": events})
    result = analyze_files([path], top=100)
    return {row.name: row.category for row in result.top}, result


def test_positions_inside_a_block_decide_unknown_kernels(tmp_path):
    cats, result = _categories(tmp_path, _layer(0) + _layer(1000))
    assert cats["nvjet_router"] == "gate"  # the first GEMM after the layer's norm
    assert cats["mystery_a"] == cats["mystery_b"] == "gate"  # between router GEMM and the first align kernel
    assert cats["moe_align_block_size_kernel"] == "align_permute"
    assert cats["mystery_act"] == "experts"  # between two expert kernels
    assert cats["mystery_sum"] == "align_permute"  # after the last expert kernel, before the next boundary
    assert cats["nvjet_o_proj"] == "dense_gemm"
    assert result.categories["other"].us == 0
    assert result.moe_blocks.count == 2 and result.moe_blocks.gate_us == 10


def test_an_inline_shared_expert_is_experts_and_the_router_gemm_is_the_first(tmp_path):
    """vLLM without the shared-experts stream (prefill over 256 tokens): router GEMM, then the shared expert's
    GEMMs and its sigmoid gate, then routing (Qwen2-MoE)."""
    shared = ("nvjet_shared_up", "act_and_mul_kernel", "nvjet_shared_down", "nvjet_shared_gate", "sigmoid_kernel",
              "mul_kernel")
    cats, result = _categories(tmp_path, _layer(0, shared=shared, routing=("vllm::moe::moeSoftmax<256>",
                                                                           "vllm::moe::moeTopK<256>")))
    assert cats["nvjet_router"] == "gate"
    assert all(cats[n] == "experts" for n in shared), {n: cats[n] for n in shared}
    assert cats["vllm::moe::moeSoftmax<256>"] == cats["vllm::moe::moeTopK<256>"] == "gate"
    assert result.moe_blocks.gate_us == 10


def test_without_a_named_norm_the_router_gemm_is_the_last_before_routing(tmp_path):
    """A norm no rule names: the front reaches back to attention; the o_proj GEMM is not taken for the router."""
    cats, _ = _categories(tmp_path, _layer(0, norm="mystery_kernel_x", routing=("topk_softmax_kernel",)))
    assert cats["nvjet_router"] == "gate" and cats["nvjet_o_proj"] == "dense_gemm"
    assert cats["mystery_kernel_x"] == "other"  # outside the block: not placed, and said so


def test_ep_dispatch_in_the_front_is_all_to_all_and_copies_stay_memory(tmp_path):
    events = _layer(0, routing=("mystery_a", "ncclDevKernel_AllGather_RING", "mystery_b"))
    events.append(_kernel("Memcpy DtoD (Device -> Device)", 55, 1, cat="gpu_memcpy"))
    cats, _ = _categories(tmp_path, sorted(events, key=lambda e: e["ts"]))
    assert cats["ncclDevKernel_AllGather_RING"] == "all_to_all"
    assert cats["Memcpy DtoD (Device -> Device)"] == "memory"
    assert cats["mystery_b"] == "gate"


def test_analyze_says_what_it_could_not_place_and_how_to_add_a_rule(tmp_path):
    """A kernel outside every MoE block that no rule names: the table lists it with its share and tells how to
    add a rule; the printed rules plus one [[category]] place it."""
    events = _layer(0, norm="mystery_kernel_x", routing=("topk_softmax_kernel",))
    trace = str(tmp_path / "t.pt.trace.json.gz")
    _write(trace, {"traceEvents": events})
    runner = CliRunner()
    out = runner.invoke(main, ["analyze", trace])
    assert out.exit_code == 0, out.output
    assert "not placed (in `other`): 10.0 % of device time; the top 1 kernel(s) / op(s):" in out.output, out.output
    assert re.search(r"10\.0 % +1 calls  mystery_kernel_x", out.output)
    assert "moe-monitor analyze --print-rules > rules.toml" in out.output
    rules = runner.invoke(main, ["analyze", "--print-rules"])
    assert rules.exit_code == 0 and rules.output.startswith("# Kernel / op classification")
    own = tmp_path / "rules.toml"
    own.write_text(rules.output.replace('[[category]]\nname = "all_to_all"',
                                        '[[category]]\nname = "norm_elementwise"\npattern = \'mystery_kernel_x\'\n\n'
                                        '[[category]]\nname = "all_to_all"', 1))
    placed = runner.invoke(main, ["analyze", "--rules", str(own), trace])
    assert placed.exit_code == 0 and "not placed" not in placed.output, placed.output
    assert analyze_files([trace], load_rules(str(own))).categories["other"].us == 0
    assert runner.invoke(main, ["analyze"]).exit_code == 2  # no trace, no --print-rules: a usage error
