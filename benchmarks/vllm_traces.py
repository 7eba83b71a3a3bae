"""Real vLLM GPU profiler traces for the breakdown's fixtures (issue #15, part 2).

Each scenario is one vLLM offline engine (its own process, plugin on, `load_format="dummy"`, real per-layer
dimensions of the shapes in benchmarks/vllm_cost.py with few layers) profiled with vLLM's torch profiler around
one `generate` call, with sampling that runs the sampler's real kernels (temperature, top-k, top-p). Engines
start together; the profiled calls take turns (a file lock), so no trace overlaps another engine's work.

    . .gpu/device-env.sh; python3 benchmarks/vllm_traces.py --out $OUT/traces

`benchmarks/trim_trace.py` cuts the fixtures in tests/fixtures/traces/ from these traces.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_cost import PLUGIN_PATH, SHAPES, write_model  # noqa: E402

# name: (shape, layers, eager, prompts, prompt tokens, output tokens)
SCENARIOS = {
    "qwen3_graphs_decode": ("qwen3-30b-a3b", 4, False, 16, 32, 24),
    "qwen3_eager_decode": ("qwen3-30b-a3b", 4, True, 16, 32, 24),
    "qwen3_graphs_prefill": ("qwen3-30b-a3b", 4, False, 6, 1500, 3),
    "dsv2lite_graphs_decode": ("deepseek-v2-lite", 4, False, 16, 32, 24),
    "mixtral_graphs_decode": ("mixtral-8x7b", 2, False, 16, 32, 24),
}


def prompts_of(vocab: int, n: int, length: int, rng: random.Random) -> list:
    """n prompts of `length` random token ids (no tokenizer: the engines run with skip_tokenizer_init)."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=[rng.randrange(1000, vocab - 1000) for _ in range(length)])
            for _ in range(n)]


def sampling(out_len: int):
    """Sampling that runs the sampler's real kernels (temperature, top-k, top-p), every request to out_len."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.8, top_p=0.95, top_k=40,
                          detokenize=False)


def scenario_main(name: str, out: str, lock: str) -> None:
    from vllm import LLM

    shape, layers, eager, prompts, prompt_len, out_len = SCENARIOS[name]
    work = tempfile.mkdtemp(prefix=f"trace_{name}_")
    model = write_model(shape, work, layers)
    profiles = os.path.join(work, "profiles")
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              attention_config={"backend": "TRITON_ATTN"}, max_model_len=4096, enable_prefix_caching=False,
              kv_cache_memory_bytes=4 << 30, gpu_memory_utilization=0.1, enforce_eager=eager,
              profiler_config={"profiler": "torch", "torch_profiler_dir": profiles, "ignore_frontend": True,
                               "torch_profiler_with_stack": False, "torch_profiler_use_gzip": True})
    vocab = SHAPES[shape]["config"]["vocab_size"]
    rng = random.Random(0)
    params = sampling(out_len)
    llm.generate(prompts_of(vocab, prompts, prompt_len, rng), params, use_tqdm=False)  # warm-up: Triton, caches
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        llm.start_profile()
        t = time.perf_counter()
        llm.generate(prompts_of(vocab, prompts, prompt_len, rng), params, use_tqdm=False)
        took = time.perf_counter() - t
        llm.stop_profile()
        fcntl.flock(f, fcntl.LOCK_UN)
    traces = sorted(glob.glob(os.path.join(profiles, "**", "*.pt.trace.json*"), recursive=True))
    os.makedirs(out, exist_ok=True)
    kept = []
    for path in traces:
        dest = os.path.join(out, f"{name}__{os.path.basename(path)}")
        shutil.copy(path, dest)
        kept.append({"file": os.path.basename(dest), "bytes": os.path.getsize(dest)})
    print(json.dumps({"scenario": name, "shape": shape, "layers": layers, "eager": eager, "prompts": prompts,
                      "prompt_len": prompt_len, "out_len": out_len, "generate_s": took, "traces": kept}), flush=True)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    ap.add_argument("--lock", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scenario:
        scenario_main(args.scenario, args.out, args.lock)
        return
    if not any(os.path.abspath(p) == PLUGIN_PATH for p in os.environ.get("PYTHONPATH", "").split(":")):
        sys.exit("the plugin is not on PYTHONPATH: source .gpu/device-env.sh first")
    os.makedirs(args.out, exist_ok=True)
    lock = os.path.join(args.out, ".profile.lock")
    procs = {}
    for name in args.only or SCENARIOS:
        env = dict(os.environ, **SHAPES[SCENARIOS[name][0]].get("env", {}),
                   MOE_MONITOR_SEGMENT_DIR=tempfile.mkdtemp(prefix="seg_"))
        log = open(os.path.join(args.out, f"{name}.log"), "w")
        procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--scenario", name, "--out",
                                        args.out, "--lock", lock], stdout=subprocess.PIPE, stderr=log, env=env,
                                       text=True, start_new_session=True)
    failed = 0
    for name, proc in procs.items():
        try:
            stdout, _ = proc.communicate(timeout=540)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout = ""
        line = [x for x in stdout.splitlines() if x.startswith("{")]
        print(line[-1] if line else json.dumps({"scenario": name, "error": f"exit {proc.returncode}"}), flush=True)
        failed += not line
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
