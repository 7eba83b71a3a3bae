"""Kernel breakdown on real traces: GPU traces from an H100 (benchmarks/make_gpu_traces.py: 8-layer MoE
decoder, 8 tokens/step, eager with a fused_moe annotation and CUDA-graph replays) and a vLLM CPU trace of a
generated Qwen3-MoE (2 MoE layers, 6 engine steps). Expectations are computed from the raw events here,
independently of the analyser."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

from moe_monitor.breakdown.analyze import analyze, load_rules
from moe_monitor.breakdown.result import BreakdownResult
from moe_monitor.breakdown.trace import TraceError, read_trace

TRACES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "traces")
EAGER, GRAPH = os.path.join(TRACES, "gpu_eager.pt.trace.json.gz"), os.path.join(TRACES, "gpu_graph.pt.trace.json.gz")
CPU = os.path.join(TRACES, "cpu_vllm_dp0_pp0_tp0_dcp0_ep0_rank0.pt.trace.json.gz")
LAYERS, STEPS = 8, 3


def raw_events(path):
    return json.load(gzip.open(path))["traceEvents"]


def device_events(path):
    """Kernels, memcpy and memset of one stream, in order: what the device actually ran."""
    evs = [e for e in raw_events(path) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(evs, key=lambda e: e["ts"])


@pytest.fixture(scope="module")
def results():
    return {p: analyze([read_trace(p)], top=1000) for p in (EAGER, GRAPH, CPU)}


def by_name(result):
    """Top rows by kernel name; a name in two categories (one GEMM config for projections and the lm_head) sums
    its rows and keeps the category with the most time (all of them in `categories`)."""
    out = {}
    for row in result.top:  # sorted by time: the first row of a name has its largest share
        merged = out.setdefault(row.name, dict(vars(row), categories=set()))
        if merged["categories"]:
            merged["total_us"] += row.total_us
            merged["count"] += row.count
        merged["categories"].add(row.category)
    return out


@pytest.mark.parametrize("path", [EAGER, GRAPH])
def test_total_is_exactly_the_raw_device_time(results, path):
    raw = sum(e["dur"] for e in device_events(path))
    assert results[path].total_us == pytest.approx(raw, rel=1e-12)
    assert sum(c.us for c in results[path].categories.values()) == pytest.approx(raw, rel=1e-12)


def test_cpu_total_is_the_worker_threads_op_time(results):
    """Self times of nested ops add up to the time covered by top-level ops (per thread)."""
    ops = sorted((e for e in raw_events(CPU) if e.get("cat") == "cpu_op"), key=lambda e: (e["ts"], -e["dur"]))
    covered, end = defaultdict(float), defaultdict(lambda: float("-inf"))
    for e in ops:
        tid = e["tid"]
        if e["ts"] >= end[tid]:  # not inside the previous top-level op of this thread
            covered[tid] += e["dur"]
            end[tid] = e["ts"] + e["dur"]
    assert results[CPU].total_us == pytest.approx(sum(covered.values()), rel=1e-9)


@pytest.mark.parametrize("path", [EAGER, GRAPH])
def test_gpu_categories_are_what_the_kernels_are(results, path):
    names = by_name(results[path])
    evs = device_events(path)
    grouped = [n for n in names if "GroupProblemShape" in n]
    assert grouped and all(names[n]["category"] == "experts" for n in grouped)
    assert sum(names[n]["count"] for n in grouped) == 2 * LAYERS * STEPS  # two grouped GEMMs per MoE layer
    assert all(names[n]["category"] == "attention" for n in names if "sdpa" in n)
    assert all(names[n]["category"] == "gate" for n in names if "gatherTopK" in n or "softmax_warp" in n)
    # The gate GEMM has no name of its own: it is the last cuBLAS kernel before the router's softmax.
    gate_gemms = {next(p["name"] for p in reversed(evs[:i]) if p["name"].startswith("nvjet"))
                  for i, e in enumerate(evs) if "softmax_warp" in e["name"]}
    assert len(gate_gemms) == 1 and "nvjet" in next(iter(gate_gemms))
    gate_name = next(iter(gate_gemms))
    assert names[gate_name]["category"] == "gate" and names[gate_name]["count"] == LAYERS * STEPS
    # The other cuBLAS GEMMs (attention projections) are dense, not gate.
    assert all(names[n]["category"] == "dense_gemm" for n in names if n.startswith("nvjet") and n != gate_name)
    # Sort-based permutation between the router and the experts.
    assert names[next(n for n in names if "radixSortKV" in n)]["category"] == "align_permute"
    assert names[next(n for n in names if "searchsorted" in n)]["category"] == "align_permute"


def test_annotated_eager_and_inferred_graph_traces_agree(results):
    """The graph trace has no annotations and no CPU parents: structure alone must give the same rows."""
    a, b = results[EAGER].categories, results[GRAPH].categories
    for cat in a:
        assert abs(a[cat].share - b[cat].share) < 0.04, (cat, a[cat].share, b[cat].share)
    assert results[EAGER].moe_blocks.count == results[GRAPH].moe_blocks.count == LAYERS * STEPS


def test_steps_phases_and_idle(results):
    for path in (EAGER, GRAPH):
        steps = results[path].steps
        assert [(s.phase, s.tokens) for s in steps] == [("decode", 8)] * STEPS
        for s in steps:
            # timestamps are ~4.6e12 us: float64 resolves them to ~1 ns
            assert s.busy_us + s.idle_us == pytest.approx(s.span_us, abs=0.01)
            assert s.idle_us >= 0
    # Eager launches from Python: the device waits between kernels far more than under graph replay.
    assert results[EAGER].idle_us > 10 * results[GRAPH].idle_us


def test_preamble_and_token_buckets(results):
    blocks = results[GRAPH].moe_blocks
    assert blocks.preamble_us > blocks.gate_us > 0
    assert blocks.first_expert_us > 0 and blocks.experts_us >= blocks.first_expert_us
    # The eager trace's `fused_moe_grouped_mm 64x1024x1024 E=64 top_k=8` annotation: 64 rows per call.
    assert list(results[EAGER].expert_tokens) == ["<=128"]
    assert results[EAGER].expert_tokens["<=128"] == pytest.approx(results[EAGER].categories["experts"].us)


def test_vllm_cpu_trace(results):
    r = results[CPU]
    names = by_name(r)
    assert names["_C::cpu_fused_moe"]["category"] == "experts"
    assert names["aten::topk"]["category"] == "gate"
    assert names["_C::cpu_attention_with_kv_cache"]["category"] == "attention"
    steps = r.steps
    assert len(steps) == 6 and {s.phase for s in steps} == {"prefill", "mixed", "decode"}
    assert names["_C::cpu_fused_moe"]["count"] == 2 * len(steps)  # 2 MoE layers per step
    assert r.moe_blocks.count == 2 * len(steps)
    assert r.ranks[0].rank == "dp0-pp0-tp0-ep0"


@pytest.mark.parametrize("content, message", [
    (b"\x1f\x8b\x08\x00" + b"\x00" * 20, "gzip"),
    (json.dumps({"hello": "world"}).encode(), "no traceEvents"),
    (json.dumps({"traceEvents": [{"ph": "X", "cat": "python_function", "name": "f", "ts": 1, "dur": 2}]}).encode(),
     "no kernels"),
    (b'{"traceEvents": [{"ph": "X", "cat": "kernel", "na', "JSON"),
])
def test_bad_traces_give_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(TraceError, match=message):
        read_trace(str(path))
    cli = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode != 0 and message.lower() in cli.stderr.lower(), cli.stderr


def test_truncated_gzip_of_a_real_trace(tmp_path):
    data = open(EAGER, "rb").read()
    (tmp_path / "cut.pt.trace.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="truncated or corrupt gzip"):
        read_trace(str(tmp_path / "cut.pt.trace.json.gz"))


def test_the_json_reads_back_and_so_do_breakdowns_stored_before_its_newer_parts(results):
    r = results[CPU]
    doc = json.loads(json.dumps(r.to_json()))
    assert BreakdownResult.from_json(doc) == r
    newer = ("moe_blocks_by_tokens", "unplaced", "ep_wait", "collective_wait")
    older = {k: v for k, v in doc.items() if k not in newer}
    old = BreakdownResult.from_json(older)
    assert old.unplaced == () and not old.moe_blocks_by_tokens and old.ep_wait is None and old.steps == r.steps
    doc["steps"][1]["tokens"] = "8"
    with pytest.raises(ValueError, match=r"steps\[1\]\.tokens is not an integer"):
        BreakdownResult.from_json(doc)


def test_cli_table_and_json(tmp_path):
    table = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", GRAPH, CPU], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    assert "experts" in table and "per rank:" in table and "MoE pre-amble" in table
    out = subprocess.run([sys.executable, "-m", "moe_monitor.cli", "analyze", "--json", GRAPH], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    doc = json.loads(out)
    assert doc["categories"]["experts"]["share"] > 0.3 and len(doc["steps"]) == STEPS


def test_rules_are_data(tmp_path):
    rules = open(os.path.join(os.path.dirname(load_rules.__code__.co_filename), "categories.toml")).read()
    custom = tmp_path / "rules.toml"
    custom.write_text(rules.replace('name = "attention"\npattern = \'', 'name = "attention"\npattern = \'nvjet|'))
    r = analyze([read_trace(GRAPH)], load_rules(str(custom)))
    base = analyze([read_trace(GRAPH)])
    assert r.categories["dense_gemm"].us == 0 < base.categories["dense_gemm"].us


@pytest.mark.slow  # imports pandas and HTA: ~1 s on two cores
def test_hta_side_by_side_every_difference_is_its_rounding(tmp_path):
    """HTA 0.5.0 moves each ns-resolution event to whole microseconds, start rounded up and end rounded down
    (its log: "Rounding down ns resolution events due to issue with events overlapping"), so its duration is
    floor(end) - ceil(start): up to 2 us short per event, and -1 for sub-microsecond events that do not cross
    an integer (the negative durations TRACE_NOTES mentions). Recomputing that from the raw events reproduces
    HTA's per-kernel totals exactly, while ours equal the raw sums."""
    import math

    hta = pytest.importorskip("hta.trace_analysis")
    shutil.copy(EAGER, tmp_path / "rank0.pt.trace.json.gz")
    analysis = hta.TraceAnalysis(trace_dir=str(tmp_path))
    _, kernels = analysis.get_gpu_kernel_breakdown(visualize=False, num_kernels=10**6)
    theirs = dict(zip(kernels["name"], kernels["sum (us)"]))
    ours = by_name(analyze([read_trace(EAGER)], top=1000))
    raw, hta_rounded = defaultdict(float), defaultdict(float)
    for e in device_events(EAGER):
        raw[e["name"]] += e["dur"]
        hta_rounded[e["name"]] += math.floor(e["ts"] + e["dur"]) - math.ceil(e["ts"])
    assert set(theirs) <= set(ours) and theirs
    for name in theirs:
        assert ours[name]["total_us"] == pytest.approx(raw[name], abs=1e-6), name
        assert theirs[name] == pytest.approx(hta_rounded[name], abs=1e-6), name
    lost = sum(raw[n] for n in theirs) - sum(theirs.values())
    assert lost > 0  # what HTA drops on this trace (reported in docs/breakdown.md)


def test_sidecar_exports_the_newest_captures_breakdown(tmp_path):
    """vLLM's profiler dir → the sidecar analyses the newest complete capture and exports its rows."""
    from conftest import parse_exposition

    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.wiring import build

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    old = profiles / "capture-old_dp0_pp0_tp0_dcp0_ep0_rank0.1.pt.trace.json.gz"
    shutil.copy(EAGER, old)
    os.utime(old, (1000, 1000))
    shutil.copy(GRAPH, profiles / "capture-new_dp0_pp0_tp0_dcp0_ep0_rank0.2.pt.trace.json.gz")
    (profiles / "host_1.async_llm.3.pt.trace.json.gz").write_bytes(b"not even gzip")  # API server: ignored
    exporter = build(SidecarConfig(segment_dir=str(tmp_path / "segments"), profile_dir=str(profiles)),
                     clock=lambda: 4e9, process_metrics=False)
    exporter.captures.poll(background=False)
    values = parse_exposition(exporter.tick().body.decode())
    expected = analyze([read_trace(GRAPH)])
    assert values[("moe_capture_info", (("capture", "capture-new"), ("ranks", "1")))] == 1
    assert values[("moe_capture_share", (("category", "experts"),))] == pytest.approx(
        expected.categories["experts"].share)
    assert values[("moe_capture_device_seconds", (("category", "gate"),))] == pytest.approx(
        expected.categories["gate"].us / 1e6)
    assert values[("moe_capture_moe_preamble_seconds", ())] > 0
    assert values[("moe_capture_analysis_errors_total", ())] == 0


# -- Expert parallelism: all-to-all ------------------------------------------------------------------------------
# CPU traces of both ranks of benchmarks/ep_stack.py (gloo, 2 ranks, 2 MoE layers x 8 experts, top-2, 32 tokens
# per rank, 2 recorded steps; docs/ep.md has the command). Each MoE layer runs 4 all_to_all_single calls: split
# sizes, hidden states, expert ids (dispatch) and the combine.
EP_TRACES = [os.path.join(TRACES, f"cpu_ep_stack_gloo_dp{r}_pp0_tp0_ep{r}_rank{r}.pt.trace.json.gz") for r in (0, 1)]
EP_LAYERS, EP_STEPS = 2, 2


def cpu_covered_time(path):
    """Time covered by top-level ops per thread, the c10d communication ranges (gloo's thread) included."""
    evs = [e for e in raw_events(path) if e.get("ph") == "X" and (
        e.get("cat") == "cpu_op" or (e.get("cat") == "user_annotation" and e["name"].startswith("gloo:")))]
    covered, end = defaultdict(float), defaultdict(lambda: float("-inf"))
    for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end[e["tid"]]:
            covered[e["tid"]] += e["dur"]
            end[e["tid"]] = e["ts"] + e["dur"]
    return sum(covered.values())


@pytest.mark.parametrize("path", EP_TRACES)
def test_ep_cpu_trace_all_to_all_and_experts(path):
    r = analyze([read_trace(path)], top=10_000)
    names = by_name(r)
    cats = r.categories
    assert cats["all_to_all"].us > 0 and cats["experts"].us > 0
    calls = 4 * EP_LAYERS * EP_STEPS
    # gloo: the op enqueues on the calling thread, the exchange runs in gloo's range on its own thread
    assert names["c10d::alltoall_base_"]["count"] == names["gloo:all_to_all"]["count"] == calls
    assert names["c10d::alltoall_base_"]["category"] == names["gloo:all_to_all"]["category"] == "all_to_all"
    assert cats["all_to_all"].us == pytest.approx(
        names["c10d::alltoall_base_"]["total_us"] + names["gloo:all_to_all"]["total_us"])
    # _grouped_mm runs aten::mm on CPU: its children are expert work too, not dense GEMMs
    assert names["aten::_grouped_mm"]["count"] == 2 * EP_LAYERS * EP_STEPS
    assert names["aten::_grouped_mm"]["category"] == names["aten::mm"]["category"] == "experts"
    assert cats["dense_gemm"].us < 0.1 * cats["experts"].us  # what is left: the gate's addmm internals
    # Between the router and the experts (dispatch) the permutation is align/permute; the collectives are not.
    assert names["aten::topk"]["category"] == "gate" and names["aten::addmm"]["category"] == "gate"
    assert names["aten::sort"]["category"] == "align_permute"
    assert r.moe_blocks.count == EP_LAYERS * EP_STEPS
    assert [(s.phase, s.tokens) for s in r.steps] == [("prefill", 32)] * EP_STEPS
    assert r.total_us == pytest.approx(cpu_covered_time(path), rel=1e-9)


def test_ep_cpu_traces_of_both_ranks_together():
    r = analyze([read_trace(p) for p in EP_TRACES])
    assert [x.rank for x in r.ranks] == ["dp0-pp0-tp0-ep0", "dp1-pp0-tp0-ep1"]
    assert all(x.categories["all_to_all"] > 0 and x.categories["experts"] > 0 for x in r.ranks)


def _write_trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def _x(cat, name, ts, dur, tid):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


NCCL_SENDRECV = "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)"  # NCCL 2.28, H100 trace
COMPUTE, NCCL = 7, 23


def ep_gpu_layer(comm_kernel: str, comm_stream: int, t0: float = 0.0) -> list[dict]:
    """One EP MoE layer on the device as torch + NCCL run it: norm, gate GEMM, router, sort, dispatch
    (split sizes, hidden states, ids), two grouped expert GEMMs, combine, un-permute; 10 us per kernel."""
    seq = [("vectorized_layer_norm_kernel<float>", COMPUTE), ("nvjet_tst_64x8_64x16_1x1_v_bz_TNT", COMPUTE),
           ("void softmax_warp_forward<float, float, float, 3>", COMPUTE),
           ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", COMPUTE),
           ("void at::native::radixSortKVInPlace<-2, -1, 32, 4, long, long>", COMPUTE),
           (comm_kernel, comm_stream), (comm_kernel, comm_stream), (comm_kernel, comm_stream),
           ("void at::native::index_elementwise_kernel<128, 4>", COMPUTE),
           ("_ZN7cutlass13device_kernelI...GroupProblemShape...", COMPUTE),
           ("void at::native::vectorized_elementwise_kernel<4, silu>", COMPUTE),
           ("_ZN7cutlass13device_kernelI...GroupProblemShape...", COMPUTE),
           (comm_kernel, comm_stream),
           ("void at::native::index_elementwise_kernel<128, 4>", COMPUTE),
           ("vectorized_layer_norm_kernel<float>", COMPUTE)]
    return [_x("kernel", name, t0 + 20.0 * i, 10.0, stream) for i, (name, stream) in enumerate(seq)]


@pytest.mark.parametrize("comm_kernel", [
    NCCL_SENDRECV,
    "ncclDevKernel_SendRecv(ncclDevComm*, unsigned long, ncclWork*)",  # older NCCL forms
    "ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)",
    "void deep_ep::intranode::dispatch<8, 768, 8192>(int4*, float*, int*)",
])
@pytest.mark.parametrize("comm_stream", [NCCL, COMPUTE], ids=["own-stream", "compute-stream"])
def test_ep_gpu_all_to_all_kernels(tmp_path, comm_kernel, comm_stream):
    """NCCL runs all_to_all_single as grouped send/recv on its own stream; DeepEP-like kernels run on the compute
    stream, between the router and the experts: either way they are all-to-all, never align/permute, and the
    MoE block around them is still found. c10d's `nccl:all_to_all` range (host side, and its device projection)
    closes when the GPU work completes, so it spans compute kernels too: it must not re-label them."""
    events = ep_gpu_layer(comm_kernel, comm_stream)
    events += [_x("user_annotation", "nccl:all_to_all", 100.0, 200.0, 1),
               _x("gpu_user_annotation", "nccl:all_to_all", 100.0, 200.0, NCCL),
               _x("user_annotation", "execute_context_0(0)_generation_8(8)", 0.0, 300.0, 1),
               _x("gpu_user_annotation", "execute_context_0(0)_generation_8(8)", 0.0, 300.0, COMPUTE)]
    path = tmp_path / "ep_dp0_pp0_tp0_ep0_rank0.pt.trace.json.gz"
    _write_trace(path, events)
    r = analyze([read_trace(str(path))], top=100)
    names = by_name(r)
    assert names[comm_kernel]["category"] == "all_to_all" and names[comm_kernel]["count"] == 4
    assert names["_ZN7cutlass13device_kernelI...GroupProblemShape..."]["category"] == "experts"
    assert names["void at::native::vectorized_elementwise_kernel<4, silu>"]["category"] == "experts"
    assert names["nvjet_tst_64x8_64x16_1x1_v_bz_TNT"]["category"] == "gate"
    assert names["void at::native::radixSortKVInPlace<-2, -1, 32, 4, long, long>"]["category"] == "align_permute"
    assert names["void at::native::index_elementwise_kernel<128, 4>"]["category"] == "align_permute"
    assert r.categories["all_to_all"].us == pytest.approx(40.0)
    assert r.moe_blocks.count == 1 and r.moe_blocks.first_expert_us == 10.0


@pytest.mark.parametrize("name, category", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
    ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 2>(...)", "collective"),
    ("void deep_ep::intranode::combine<__nv_bfloat16, 8, 768>(...)", "all_to_all"),
    ("c10d::alltoall_base_", "all_to_all"),
    ("gloo:all_to_all", "all_to_all"),
    ("nccl:all_to_all", "all_to_all"),
    ("c10d::barrier", "collective"),
])
def test_communication_names(tmp_path, name, category):
    _write_trace(tmp_path / "t.json.gz", [_x("kernel", name, 0.0, 5.0, NCCL)])
    assert by_name(analyze([read_trace(str(tmp_path / "t.json.gz"))]))[name]["category"] == category


def test_ep_cpu_gloo_range_is_communication_not_an_annotation(tmp_path):
    """On CPU the exchange is gloo's range on its own thread; an op of the main thread that runs meanwhile keeps
    its own category, and ops that an expert op runs are expert work."""
    main, gloo = 100, 200
    events = [_x("cpu_op", "aten::addmm", 0.0, 10.0, main), _x("cpu_op", "aten::topk", 10.0, 10.0, main),
              _x("cpu_op", "aten::sort", 20.0, 10.0, main), _x("cpu_op", "c10d::alltoall_base_", 30.0, 5.0, main),
              _x("user_annotation", "gloo:all_to_all", 32.0, 30.0, gloo),
              _x("cpu_op", "aten::index", 40.0, 10.0, main),  # overlaps gloo's range in time, another thread
              _x("cpu_op", "aten::_grouped_mm", 60.0, 20.0, main), _x("cpu_op", "aten::mm", 62.0, 15.0, main),
              _x("cpu_op", "c10d::alltoall_base_", 80.0, 5.0, main),
              _x("user_annotation", "gloo:all_to_all", 81.0, 10.0, gloo),
              _x("cpu_op", "aten::index_put_", 92.0, 5.0, main), _x("cpu_op", "aten::rms_norm", 100.0, 5.0, main)]
    _write_trace(tmp_path / "t.json.gz", events)
    r = analyze([read_trace(str(tmp_path / "t.json.gz"))])
    names = by_name(r)
    assert {n: names[n]["category"] for n in names} == {
        "aten::addmm": "gate", "aten::topk": "gate", "aten::sort": "align_permute", "aten::index": "align_permute",
        "c10d::alltoall_base_": "all_to_all", "gloo:all_to_all": "all_to_all", "aten::_grouped_mm": "experts",
        "aten::mm": "experts", "aten::index_put_": "align_permute", "aten::rms_norm": "norm_elementwise"}
    assert r.categories["all_to_all"].us == pytest.approx(5 + 30 + 5 + 10)
    assert r.categories["experts"].us == pytest.approx(20.0)  # 5 us self + the 15 us mm it ran
    assert r.moe_blocks.count == 1 and r.moe_blocks.first_expert_us == pytest.approx(20.0)


RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
READER_TRACES = [os.path.join(TRACES, f) for f in sorted(os.listdir(TRACES)) if f.endswith(".trace.json.gz")] + sorted(
    os.path.join(RESULTS, f) for f in os.listdir(RESULTS) if f.endswith(".trace.json.gz"))


@pytest.mark.parametrize("path", READER_TRACES, ids=os.path.basename)
def test_the_msgspec_reader_returns_what_the_ijson_reader_does(path):
    """read_trace decodes events with msgspec; the previous reader (ijson for every byte) is kept as
    parser="ijson": the same device events, CPU ops, steps and annotations, field for field, in the same order
    (benchmarks/breakdown_vs_hta.py --big checks the 135 MB trace of benchmarks/big_trace.py too)."""
    def fields(t):
        return [[(e.name, e.ts, e.dur, e.stream, e.cat) for e in evs]
                for evs in (t.device, t.cpu_ops, t.steps, t.annotations)] + [t.path, t.rank]

    new, old = read_trace(path), read_trace(path, parser="ijson")
    assert fields(new) == fields(old)
    assert new.device or new.cpu_ops


@pytest.mark.parametrize("name, prefix", [
    ("e2e_dp0_pp0_tp0_dcp0_ep0_rank0.1796644925576344506.pt.trace.json.gz", "e2e_"),  # vLLM >= 0.32, 0.26 GPU
    ("dp1_pp0_tp0_dcp0_ep1_rank1.17966.pt.trace.json", ""),
    ("1796644907564650089-rank-0.1796644925576344506.pt.trace.json.gz", ""),  # vLLM 0.27-0.31 CPU
    ("vm_8792.async_llm.1796644925768064530.pt.trace.json.gz", None),  # the API server's trace: no model kernels
    ("profiler_out_0.txt", None),
])
def test_rank_trace_files_of_every_supported_vllm(name, prefix):
    from moe_monitor.breakdown.latest import rank_trace

    m = rank_trace(name)
    assert (m.group("prefix") if m else None) == prefix
