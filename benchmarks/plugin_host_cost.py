"""The plugin's host work per vLLM step, hook by hook, on real GPU vLLM (issue #27, part 3a: the baseline).

One offline engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the worker's hooks run here), the plugin
on, `load_format="dummy"`, a real checkpoint's per-layer dimensions (benchmarks/vllm_cost.py's shapes), vLLM's
default CUDA graphs. Before the engine is built, each hook of the plugin is wrapped with a `perf_counter_ns` pair:
`WorkerMonitor.step_begin / forward_done / step_end` (vLLM's worker thread, every step), `Recorder.set_valid_tokens`
(inside two of them) and `Publisher.publish_once` (the publisher thread, GIL held). A wrapped no-op measures what
the wrapper itself adds (its A/A), subtracted from nothing: it is reported beside the figures.

Per batch size (decode of OUT tokens after PROMPT-token prompts, after a warm-up generate of the same shape):
calls, mean and median microseconds per call of each hook, the hooks' sum per engine step, and the step's host
wall time (generate time / steps), so the share of the step the hooks take.

    . .gpu/device-env.sh; python3 benchmarks/plugin_host_cost.py --out $OUT/host_cost.jsonl

`--publisher LxE` (no GPU, no vLLM): the publisher's `publish_once` alone at L layers x E experts (part 2's shape:
61x256), a real SegmentWriter into a temporary directory, the CPU recorder's counts; the time it holds the GIL is its
wall time (it is Python and numpy on one thread, with no I/O wait: the segment is a shared-memory file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm_cost import SHAPES, write_model  # noqa: E402
from vllm_traces import prompts_of  # noqa: E402

SAMPLES: dict[str, list[int]] = defaultdict(list)  # hook -> ns per call


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            SAMPLES[name].append(time.perf_counter_ns() - t)
    wrapper.__wrapped__ = fn
    return wrapper


def instrument() -> None:
    from moe_monitor.plugin import publisher, recorder, worker

    for cls, names in ((worker.WorkerMonitor, ("step_begin", "forward_done", "step_end")),
                       (recorder.Recorder, ("set_valid_tokens",)), (publisher.Publisher, ("publish_once",))):
        for name in names:
            setattr(cls, name, timed(f"{cls.__name__}.{name}", getattr(cls, name)))


def wrapper_cost(n: int = 100_000) -> float:
    """ns the wrapper adds per call (a wrapped no-op, minus the no-op)."""
    def noop():
        return None
    wrapped = timed("noop", noop)
    t = time.perf_counter_ns()
    for _ in range(n):
        noop()
    bare = time.perf_counter_ns() - t
    t = time.perf_counter_ns()
    for _ in range(n):
        wrapped()
    SAMPLES.pop("noop", None)
    return (time.perf_counter_ns() - t - bare) / n


def publisher_cost(layers: int, experts: int, repeats: int = 200) -> dict:
    import numpy as np

    from moe_monitor.channel import Ranks, SegmentWriter, Shape
    from moe_monitor.plugin.attach import Attachment, MoELayer
    from moe_monitor.plugin.publisher import Publisher
    from moe_monitor.plugin.recorder import Recorder
    from moe_monitor.plugin.steps import StepStats

    recorder = Recorder(layers, experts, 8, "cpu")
    recorder.counts[:, :experts] = torch_randint(np, layers, experts)
    recorder.seen_rows.update(range(layers))
    steps = StepStats()
    steps.record("decode", 8, 0.01)
    attachment = Attachment([MoELayer(i, f"layers.{i}.mlp", experts, 8, None, True) for i in range(layers)])
    shape = Shape(layers, experts, len(steps.token_bounds), len(steps.duration_bounds))
    writer = SegmentWriter(tempfile.mkdtemp(prefix="seg_"), "bench", Ranks(), shape, 8)
    pub = Publisher(writer, recorder, steps, attachment, 1.0)
    times = []
    for _ in range(repeats):
        t = time.perf_counter_ns()
        assert pub.publish_once()
        times.append(time.perf_counter_ns() - t)
    return {"layers": layers, "experts": experts, "repeats": repeats, "median_us": statistics.median(times) / 1e3,
            "p90_us": sorted(times)[int(0.9 * repeats)] / 1e3, "min_us": min(times) / 1e3}


def torch_randint(np, layers: int, experts: int):
    import torch

    return torch.from_numpy(np.random.default_rng(0).integers(0, 1 << 40, size=(layers, experts)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--out", help="JSON lines, one per batch size")
    ap.add_argument("--publisher", metavar="LxE", help="only the publisher's publish_once at L layers x E experts")
    args = ap.parse_args()
    if args.publisher:
        layers, experts = map(int, args.publisher.lower().split("x"))
        row = publisher_cost(layers, experts)
        print(json.dumps(row))
        return
    if not args.out:
        ap.error("--out is required (or --publisher LxE)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("MOE_MONITOR_SEGMENT_DIR", tempfile.mkdtemp(prefix="seg_"))
    instrument()
    from vllm import LLM, SamplingParams

    model = write_model(args.shape, tempfile.mkdtemp(prefix="model_"), args.layers)
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              attention_config={"backend": "TRITON_ATTN"}, max_model_len=2048, max_num_seqs=64,
              enable_prefix_caching=False, gpu_memory_utilization=0.85)
    vocab = SHAPES[args.shape]["config"]["vocab_size"]
    params = SamplingParams(max_tokens=args.out_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    overhead_ns = wrapper_cost()
    rng = random.Random(0)
    with open(args.out, "w") as out:
        for batch in map(int, args.batches.split(",")):
            prompts = prompts_of(vocab, batch, args.prompt, rng)
            llm.generate(prompts, params, use_tqdm=False)  # warm-up of this batch size
            SAMPLES.clear()
            t = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t
            steps = len(SAMPLES.get("WorkerMonitor.step_end", [])) or 1
            hooks = {name: {"calls": len(v), "mean_us": statistics.fmean(v) / 1e3,
                            "median_us": statistics.median(v) / 1e3} for name, v in sorted(SAMPLES.items())}
            worker_ns = sum(sum(SAMPLES.get(f"WorkerMonitor.{h}", [])) for h in ("step_begin", "forward_done",
                                                                                  "step_end"))
            row = {"shape": args.shape, "layers": args.layers, "batch": batch, "steps": steps,
                   "step_wall_ms": 1e3 * wall / steps, "hooks_us_per_step": worker_ns / 1e3 / steps,
                   "wrapper_ns_per_call": overhead_ns, "hooks": hooks}
            row["share_of_step"] = row["hooks_us_per_step"] / 1e3 / row["step_wall_ms"]
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"batch {batch:3d}: {steps} steps, {row['step_wall_ms']:.3f} ms a step on the host, plugin hooks "
                  f"{row['hooks_us_per_step']:.1f} us a step ({100 * row['share_of_step']:.2f} %)", flush=True)
            for name, h in hooks.items():
                print(f"    {name:32s} {h['calls']:6d} calls  mean {h['mean_us']:8.1f} us  median "
                      f"{h['median_us']:8.1f} us", flush=True)
    print(f"the timing wrapper adds {overhead_ns:.0f} ns a call (not subtracted)")
    os._exit(0)


if __name__ == "__main__":
    main()
