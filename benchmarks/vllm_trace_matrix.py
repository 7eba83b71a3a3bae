"""A matrix of real vLLM GPU traces, one per MoE architecture, with a labelled truth (issue #25, part 3).

Per architecture (config.json of the real checkpoint, few layers, `load_format="dummy"`), two engines, each in its
own process with the plugin on, the workload and sampling of `benchmarks/vllm_traces.py`:

    truth_<arch>   eager, in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), `record_shapes`, and
                   `benchmarks/truth_ranges.py`'s ranges around every module and MoE step: the eager fixture
                   and the per-kernel truth (`benchmarks/trace_truth.py`)
    graphs_<arch>  torch.compile + CUDA graphs (vLLM's default FULL_AND_PIECEWISE): the graph fixture

each profiled on decode (16 requests x 32 prompt tokens, 24 output tokens) and, for PREFILL, on a prefill-heavy
batch (6 x 1,500-token prompts, 3 output tokens). Engines start in waves that fit the GPU's memory; a wave's
engines are profiled one at a time once all of them are ready (nothing else runs on the GPU meanwhile).
Memory per engine: the weights at that depth, the KV cache and OVERHEAD_GIB (CUDA context, the profile run's
activations, graph pools).

    . .gpu/device-env.sh; python3 benchmarks/vllm_trace_matrix.py --out $OUT --budget 540

writes $OUT/matrix.tar.gz: fixtures/ (trimmed as benchmarks/trim_trace.py trims, truth ranges dropped),
contexts/ (each eager kernel's truth ranges), logs/, results.jsonl. `benchmarks/trace_matrix_report.py` turns
it into tests/fixtures/traces/ files and benchmarks/results/trace_matrix_<gpu>.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_truth import PREFIX, contexts  # noqa: E402
from trim_trace import FIELDS, KEEP  # noqa: E402
from vllm_cost import PLUGIN_PATH, SHAPES, write_model  # noqa: E402
from vllm_traces import prompts_of, sampling  # noqa: E402

# config.json fields of the real checkpoints (their per-layer dimensions; depth set per architecture below)
SHAPES.update({
    "qwen1.5-moe-a2.7b": {  # Qwen/Qwen1.5-MoE-A2.7B: 60 experts (not a power of two), top-4, gated shared expert
        "config": {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 151936,
                   "hidden_size": 2048, "intermediate_size": 5632, "moe_intermediate_size": 1408,
                   "shared_expert_intermediate_size": 5632, "num_experts": 60, "num_experts_per_tok": 4,
                   "norm_topk_prob": False, "num_attention_heads": 16, "num_key_value_heads": 16,
                   "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1000000.0,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "hidden_act": "silu", "use_sliding_window": False, "bos_token_id": 151643,
                   "eos_token_id": 151643},
    },
    "olmoe-1b-7b": {  # allenai/OLMoE-1B-7B-0924: 64 experts, top-8, q/k norm
        "config": {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304,
                   "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8,
                   "norm_topk_prob": False, "num_attention_heads": 16, "num_key_value_heads": 16,
                   "rope_theta": 10000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                   "clip_qkv": None, "tie_word_embeddings": False, "hidden_act": "silu", "pad_token_id": 1,
                   "eos_token_id": 50279},
    },
    "llama4-scout": {  # meta-llama/Llama-4-Scout-17B-16E text model: 16 experts, sigmoid top-1 + shared expert
        "config": {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 202048,
                   "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                   "num_local_experts": 16, "num_experts_per_tok": 1, "interleave_moe_layer_step": 1,
                   "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                   "attention_chunk_size": 8192, "use_qk_norm": True, "no_rope_layers": [1, 1],
                   "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 16.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                                            "original_max_position_embeddings": 8192},
                   "max_position_embeddings": 10485760, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "hidden_act": "silu", "attention_bias": False, "bos_token_id": 200000,
                   "eos_token_id": 200008, "pad_token_id": 200018},
    },
    "gpt-oss-20b": {  # openai/gpt-oss-20b: 32 experts, top-4, router with bias, softmax after top-k; bf16 experts
        # (the checkpoint's MXFP4 experts need kernels the GPU bundle does not have: no quantization_config)
        "config": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088,
                   "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32,
                   "num_experts_per_tok": 4, "experts_per_token": 4, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "head_dim": 64, "sliding_window": 128,
                   "layer_types": ["sliding_attention", "full_attention"], "rope_theta": 150000.0,
                   "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 4096},
                   "initial_context_length": 4096, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                   "swiglu_limit": 7.0, "attention_bias": True, "tie_word_embeddings": False,
                   "hidden_act": "silu", "eos_token_id": 200002, "pad_token_id": 199999},
    },
    "phi3.5-moe": {  # microsoft/Phi-3.5-MoE-instruct: 16 experts, top-2, sparsemixer routing; plain RoPE here
        # (the checkpoint's longrope factors change the rotary only) with max_position_embeddings 4096
        "config": {"architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "vocab_size": 32064,
                   "hidden_size": 4096, "intermediate_size": 6400, "num_local_experts": 16,
                   "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rope_theta": 10000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                   "attention_bias": True, "lm_head_bias": True, "sliding_window": None,
                   "router_jitter_noise": 0.01, "input_jitter_noise": 0.01, "tie_word_embeddings": False,
                   "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 32000},
    },
    "granite-3.0-3b-a800m": {  # ibm-granite/granite-3.0-3b-a800m-instruct: 40 experts (not a power of two), top-8
        "config": {"architectures": ["GraniteMoeForCausalLM"], "model_type": "granitemoe", "vocab_size": 49155,
                   "hidden_size": 1536, "intermediate_size": 512, "num_local_experts": 40,
                   "num_experts_per_tok": 8, "num_attention_heads": 24, "num_key_value_heads": 8,
                   "rope_theta": 10000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                   "attention_multiplier": 0.015625, "embedding_multiplier": 12.0, "logits_scaling": 6.0,
                   "residual_multiplier": 0.22, "tie_word_embeddings": True, "hidden_act": "silu",
                   "attention_bias": False, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0},
    },
})

# fixture name -> (shape, layers, weights GiB at that depth (bf16), KV cache GiB)
ARCHS = {
    "qwen2_moe": ("qwen1.5-moe-a2.7b", 4, 5.4, 0.5),
    "qwen3_moe": ("qwen3-30b-a3b", 4, 5.8, 0.5),
    "mixtral_8x7b": ("mixtral-8x7b", 2, 5.9, 0.5),
    "deepseek_v2_lite": ("deepseek-v2-lite", 4, 4.2, 0.5),
    "olmoe": ("olmoe-1b-7b", 4, 3.5, 0.5),
    "llama4_scout": ("llama4-scout", 2, 12.1, 0.5),
    "gpt_oss_20b": ("gpt-oss-20b", 2, 5.2, 0.5),
    "phimoe": ("phi3.5-moe", 2, 5.3, 0.5),
    "granitemoe": ("granite-3.0-3b-a800m", 4, 0.9, 0.5),
}
PREFILL = ("qwen2_moe", "gpt_oss_20b", "phimoe")
RUNS = {"decode": (16, 32, 24), "prefill": (6, 1500, 3)}  # prompts, prompt tokens, output tokens
OVERHEAD_GIB = {"truth": 1.5, "graphs": 2.0}  # CUDA context, activations of the profile run, graph pools
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32]  # decode runs 16 requests: fewer graphs to capture than vLLM's default


def jobs() -> list[str]:
    """Eager truth engines first (they start fast), then the graph engines."""
    return [f"truth_{a}" for a in ARCHS] + [f"graphs_{a}" for a in ARCHS]


def job_gib(job: str) -> float:
    kind, arch = job.split("_", 1)
    _, _, weights, kv = ARCHS[arch]
    return weights + kv + OVERHEAD_GIB[kind]


# --------------------------------------------------------------------------------------------- engine process


def job_main(job: str, work: str) -> None:
    kind, arch = job.split("_", 1)
    shape, layers, _, kv_gib = ARCHS[arch]
    ctl = os.path.join(work, "ctl")
    profiles = tempfile.mkdtemp(prefix=f"prof_{job}_")
    t0 = time.time()
    from vllm import LLM

    model = write_model(shape, tempfile.mkdtemp(prefix=f"model_{arch}_"), layers)
    truth = kind == "truth"
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              attention_config={"backend": "TRITON_ATTN"}, max_model_len=4096, max_num_batched_tokens=4096,
              max_num_seqs=32, enable_prefix_caching=False, kv_cache_memory_bytes=int(kv_gib * 2**30),
              gpu_memory_utilization=0.03, enforce_eager=truth,
              **({} if truth else {"compilation_config": {"cudagraph_capture_sizes": CAPTURE_SIZES}}),
              profiler_config={"profiler": "torch", "torch_profiler_dir": profiles, "ignore_frontend": True,
                               "torch_profiler_with_stack": False, "torch_profiler_record_shapes": truth,
                               "torch_profiler_use_gzip": False, "torch_profiler_dump_cuda_time_total": False})
    info: dict = {"job": job, "startup_s": time.time() - t0}
    if truth:
        from truth_ranges import install

        info["truth_ranges"] = install(llm)
    vocab = SHAPES[shape]["config"]["vocab_size"]
    runs = ["decode"] + (["prefill"] if arch in PREFILL else [])
    rng = {run: random.Random(0) for run in runs}
    for run in runs:  # warm-up: Triton autotuning, caches; the same prompts as vllm_traces.py's first call
        n, length, out_len = RUNS[run]
        llm.generate(prompts_of(vocab, n, length, rng[run]), sampling(out_len), use_tqdm=False)
    info["ready_s"] = time.time() - t0
    _write_json(os.path.join(ctl, f"{job}.ready"), info)
    while not os.path.exists(os.path.join(ctl, f"{job}.go")):
        time.sleep(0.2)
    info["traces"] = {}
    for run in runs:
        n, length, out_len = RUNS[run]
        llm.start_profile()
        t = time.perf_counter()
        llm.generate(prompts_of(vocab, n, length, rng[run]), sampling(out_len), use_tqdm=False)
        info[f"{run}_generate_s"] = time.perf_counter() - t
        llm.stop_profile()
        found = sorted(glob.glob(os.path.join(profiles, "**", "*.pt.trace.json"), recursive=True),
                       key=os.path.getsize, reverse=True)
        for i, path in enumerate(found):  # one worker: one trace (anything else is kept aside, not analysed)
            dest = os.path.join(work, "raw", f"{job}__{run}.pt.trace.json" + (f".{i}" if i else ""))
            shutil.move(path, dest)
        if found:
            info["traces"][run] = os.path.join(work, "raw", f"{job}__{run}.pt.trace.json")
    info["done_s"] = time.time() - t0
    _write_json(os.path.join(ctl, f"{job}.done"), info)
    sys.stdout.flush()
    os._exit(0)  # the engine (and, for graph engines, its engine-core process group) goes with the process


def _write_json(path: str, obj: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------------- post-processing


def fixture_events(doc: dict) -> list[dict]:
    """What benchmarks/trim_trace.py keeps (device events and step ranges, its fields), without truth ranges."""
    events = [{k: e[k] for k in FIELDS if k in e} for e in doc["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in KEEP and not e.get("name", "").startswith(PREFIX)]
    events.sort(key=lambda e: e["ts"])
    return events


def postprocess(raw: str, work: str) -> dict:
    job, run = os.path.basename(raw).split(".")[0].split("__")
    kind, arch = job.split("_", 1)
    with open(raw) as f:
        doc = json.load(f)
    fixture = os.path.join(work, "fixtures", f"vllm026_{arch}_{'eager' if kind == 'truth' else 'graphs'}_{run}"
                                             ".pt.trace.json.gz")
    events = fixture_events(doc)
    with gzip.open(fixture, "wt", compresslevel=9) as f:
        json.dump({"traceEvents": events}, f, separators=(",", ":"))
    out = {"raw": os.path.basename(raw), "raw_bytes": os.path.getsize(raw), "fixture": os.path.basename(fixture),
           "fixture_bytes": os.path.getsize(fixture), "events": len(events)}
    if kind == "truth":
        path = os.path.join(work, "contexts", f"vllm026_{arch}_eager_{run}.contexts.json.gz")
        with gzip.open(path, "wt") as f:
            json.dump(contexts(doc), f, separators=(",", ":"))
        out["contexts"] = os.path.basename(path)
    os.remove(raw)
    return out


# --------------------------------------------------------------------------------------------- orchestrator


def gpu() -> dict:
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True,
                              timeout=20).stdout.splitlines()[0]
        name, total, used = (x.strip() for x in line.split(","))
        return {"name": name, "total_gib": float(total) / 1024, "used_gib": float(used) / 1024}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"name": "unknown", "total_gib": 79.0, "used_gib": 0.0}


class Job:
    def __init__(self, name: str):
        self.name, self.gib = name, job_gib(name)
        self.proc: subprocess.Popen | None = None
        self.state = "pending"  # pending, starting, ready, go, finished
        self.started = 0.0


def orchestrate(work: str, budget_s: float, only: list[str] | None) -> list[dict]:
    t0 = time.time()
    for sub in ("ctl", "raw", "fixtures", "contexts", "logs"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    dev = gpu()
    limit_gib = dev["total_gib"] * 0.9 - 1.0
    results = [{"event": "gpu", **dev, "limit_gib": limit_gib}]
    print(json.dumps(results[0]), flush=True)
    todo = [Job(n) for n in jobs() if not only or n.split("_", 1)[1] in only]
    active: list[Job] = []
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=3)
    futures = []
    ctl = os.path.join(work, "ctl")
    while todo or active:
        now = time.time() - t0
        for j in list(active):
            if j.proc.poll() is None and now < budget_s:
                if j.state == "starting" and os.path.exists(os.path.join(ctl, f"{j.name}.ready")):
                    j.state = "ready"
                continue
            _kill(j.proc)
            active.remove(j)
            done = os.path.join(ctl, f"{j.name}.done")
            info = json.load(open(done)) if os.path.exists(done) else {"job": j.name, "error": _error(j, now,
                                                                                                   budget_s, work)}
            info["t_end_s"] = now
            results.append(info)
            print(json.dumps(info), flush=True)
            futures += [pool.submit(postprocess, raw, work) for raw in info.get("traces", {}).values()]
        if now >= budget_s:
            todo = []
            continue
        starting = [j for j in active if j.state == "starting" and now - j.started < 300]
        if not starting and not any(j.state == "go" for j in active):
            ready = [j for j in active if j.state == "ready"]
            if ready:
                ready[0].state = "go"
                _write_json(os.path.join(ctl, f"{ready[0].name}.go"), {"t_s": now})
                results.append({"event": "go", "job": ready[0].name, "t_s": now, "gpu_used_gib": gpu()["used_gib"],
                                "engines": [j.name for j in active]})
        if todo and all(j.state == "starting" for j in active):  # admit a new wave only between waves
            used = sum(j.gib for j in active)
            deadline = time.time() + 30
            while not active and gpu()["used_gib"] > 2.0 and time.time() < deadline:  # the last wave's leftovers
                time.sleep(1)
            for j in list(todo):  # first fit, in order
                if used + j.gib <= limit_gib:
                    todo.remove(j)
                    used += j.gib
                    _start(j, work, now)
                    active.append(j)
            if not active and todo:  # not even one fits: try it anyway (and say so)
                results.append({"event": "over_memory", "job": todo[0].name, "gib": todo[0].gib})
                _start(todo.pop(0), work, now)
        time.sleep(0.5)
    for f in futures:
        try:
            results.append({"event": "postprocess", **f.result(timeout=max(10.0, budget_s + 60 - (time.time() - t0)))})
        except Exception as e:  # noqa: BLE001
            results.append({"event": "postprocess", "error": repr(e)})
    pool.shutdown(cancel_futures=True)
    return results


def _start(j: Job, work: str, now: float) -> None:
    kind, arch = j.name.split("_", 1)
    env = dict(os.environ, **SHAPES[ARCHS[arch][0]].get("env", {}), TORCHINDUCTOR_COMPILE_THREADS="2",
               MOE_MONITOR_SEGMENT_DIR=tempfile.mkdtemp(prefix="seg_"))
    if kind == "truth":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    log = open(os.path.join(work, "logs", f"{j.name}.log"), "w")
    j.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--job", j.name, "--work", work],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    j.state, j.started = "starting", now
    print(json.dumps({"event": "start", "job": j.name, "gib": j.gib, "t_s": now}), flush=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _error(j: Job, now: float, budget_s: float, work: str) -> str:
    state = "timed out" if now >= budget_s else f"exit {j.proc.returncode}"
    with open(os.path.join(work, "logs", f"{j.name}.log"), errors="replace") as f:
        tail = [x for x in f.read().splitlines() if x.strip()][-3:]
    return f"{state} while {j.state}: " + " | ".join(tail)[-600:]


def pack(work: str, out: str, results: list[dict]) -> None:
    with open(os.path.join(work, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    path = os.path.join(out, "matrix.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for sub in ("results.jsonl", "fixtures", "contexts", "logs"):
            tar.add(os.path.join(work, sub), arcname=sub)
    print(json.dumps({"event": "packed", "bytes": os.path.getsize(path)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="where matrix.tar.gz goes ($OUT)")
    ap.add_argument("--budget", type=float, default=540, help="seconds until every engine is stopped")
    ap.add_argument("--only", action="append", choices=sorted(ARCHS))
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/trace_matrix", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        job_main(args.job, args.work)
        return
    if not any(os.path.abspath(p) == PLUGIN_PATH for p in os.environ.get("PYTHONPATH", "").split(":")):
        sys.exit("the plugin is not on PYTHONPATH: source .gpu/device-env.sh first")
    pack(args.work, args.out, orchestrate(args.work, args.budget, args.only))


if __name__ == "__main__":
    main()
