"""Check benchmarks/truth_ranges.py on vLLM CPU, without a GPU: a tiny model of one architecture of
benchmarks/vllm_trace_matrix.py (its config.json with small dimensions, 2 layers, dummy weights), eager and
in-process, the truth ranges installed, one profiled `generate`. CPU traces have ops instead of kernels: each op
takes the role of the ranges open at its start, as a kernel takes those open at its launch on GPU.

    python benchmarks/truth_ranges_cpu.py qwen2_moe      # prints JSON: what was wrapped, ranges, ops per role

The vLLM here is the CPU build of 0.32 (the device machines run 0.26): module trees and function names can differ.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tempfile
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trace_truth import PREFIX, decide, open_ranges_at, role_of_range  # noqa: E402
from vllm_cost import SHAPES, write_model  # noqa: E402
from vllm_trace_matrix import ARCHS  # noqa: E402
from vllm_traces import prompts_of, sampling  # noqa: E402

TINY = {"hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128, "intermediate_size_mlp": 256, "vocab_size": 4096,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "kv_lora_rank": 64,
        "qk_rope_head_dim": 32, "qk_nope_head_dim": 32, "v_head_dim": 32}


def tiny_model(arch: str, root: str) -> str:
    shape = ARCHS[arch][0]
    real = SHAPES[shape]["config"]
    SHAPES[f"{shape}-tiny"] = {"config": {**real, **{k: v for k, v in TINY.items() if k in real or k in (
        "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads")}}}
    return write_model(f"{shape}-tiny", root, 2)


def op_roles(doc: dict) -> dict[str, Counter]:
    """role -> CPU op names (with input dims) that started inside it."""
    ranges = defaultdict(list)
    ops = {}
    for i, e in enumerate(doc["traceEvents"]):
        if e.get("ph") != "X":
            continue
        if e.get("cat") == "user_annotation" and e["name"].startswith(PREFIX):
            ranges[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"], e["name"]))
        elif e.get("cat") == "cpu_op":
            ops[i] = (e["pid"], e["tid"], e["ts"], f"{e['name']}{e.get('args', {}).get('Input Dims', '')}")
    stacks = open_ranges_at({i: op[:3] for i, op in ops.items()}, ranges)
    out: dict[str, Counter] = defaultdict(Counter)
    for i, (*_, name) in ops.items():
        out[decide(tuple(role_of_range(n) for n in stacks.get(i, ())))][name] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("arch", choices=sorted(ARCHS))
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env = SHAPES[ARCHS[args.arch][0]].get("env", {})
    os.environ.update(env)
    from truth_ranges import install
    from vllm import LLM

    profiles = tempfile.mkdtemp(prefix="truth_cpu_")
    llm = LLM(model=tiny_model(args.arch, tempfile.mkdtemp()), load_format="dummy", skip_tokenizer_init=True,
              dtype="bfloat16", seed=0, max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.5,
              enable_prefix_caching=False,
              profiler_config={"profiler": "torch", "torch_profiler_dir": profiles, "ignore_frontend": True,
                               "torch_profiler_with_stack": False, "torch_profiler_record_shapes": True,
                               "torch_profiler_use_gzip": False, "torch_profiler_dump_cuda_time_total": False})
    installed = install(llm)
    rng = random.Random(0)
    llm.generate(prompts_of(4096, 2, 8, rng), sampling(3), use_tqdm=False)
    llm.start_profile()
    llm.generate(prompts_of(4096, 2, 8, rng), sampling(3), use_tqdm=False)
    llm.stop_profile()
    (path,) = glob.glob(os.path.join(profiles, "**", "*.pt.trace.json"), recursive=True)
    with open(path) as f:
        doc = json.load(f)
    ranges = Counter(role_of_range(e["name"]) for e in doc["traceEvents"]
                     if e.get("cat") == "user_annotation" and e.get("name", "").startswith(PREFIX))
    print(json.dumps({"arch": args.arch, "installed": installed, "ranges": dict(sorted(ranges.items())),
                      "ops": {r: dict(c.most_common()) for r, c in sorted(op_roles(doc).items())}}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
