"""What the plugin costs inside real vLLM, measured the way vLLM users measure it (issue #15, part 1).

vLLM's offline engine with `load_format="dummy"` on the model shapes users run, CUDA graphs on (vLLM's default
FULL_AND_PIECEWISE + torch.compile), Triton attention (the GPU bundle has no FlashAttention). Per shape, three
engines run side by side on one GPU, each in its own process, started at the same moment:

    on     the plugin installed (its dist-info on the path), default settings (fused recorder, 1 s publisher)
    off_a  vLLM alone (the plugin's dist-info left off the path: what "not installed" means)
    off_b  vLLM alone again: the A/A control

Only one engine works at a time; the others wait idle. Each round measures every batch size on every engine, in a
fresh random engine order per batch size, with the same prompts (random token ids) for all three. TPOT is vLLM's
definition for requests that start together: (time of the last token - time of the first token) / (tokens - 1),
here from the host-side times at which `LLMEngine.step()` returned each token; the median inter-token interval is
kept too. Reported per batch size: the on/off_a and off_b/off_a TPOT ratios of each round (median, min, max),
start-up time (process start to engine ready, all three starting together), first-request latency, and GPU memory
per engine process (nvidia-smi) after start-up.

    . .gpu/device-env.sh; python3 benchmarks/vllm_cost.py --shape qwen3-30b-a3b --out $OUT/cost.jsonl

Writes one JSON line per measurement as it goes (a call cut short keeps what it measured) and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# Shapes of real checkpoints (config.json fields as the checkpoints have them) with `layers` of their depth where
# three bf16 engines must fit on one 141 GB GPU: every per-layer dimension is the real one, so the plugin's work
# per layer relative to the model's is as in the full model; only the fixed per-step part (embedding, lm_head,
# sampling) weighs a little more, which makes the plugin's share look a little smaller than at full depth.
SHAPES = {
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B: 48 layers, 128 experts, top-8
        "layers": 24, "full_layers": 48, "kv_gib": 4,
        "config": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
                   "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                   "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
                   "mlp_only_layers": [], "rope_theta": 1000000.0, "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"},
    },
    "deepseek-v2-lite": {  # deepseek-ai/DeepSeek-V2-Lite: 27 layers (first dense), 64 routed + 2 shared, top-6
        "layers": 27, "full_layers": 27, "kv_gib": 8,
        # MLA needs FlashAttention/FlashMLA kernels the GPU bundle lacks: VLLM_MLA_DISABLE=1 runs the same
        # projections with vLLM's plain attention on the decompressed heads (the MoE part is unchanged)
        "env": {"VLLM_MLA_DISABLE": "1"},
        "config": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
                   "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                   "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2,
                   "n_routed_experts": 64, "num_experts_per_tok": 6, "routed_scaling_factor": 1.0,
                   "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
                   "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                   "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
                   "scoring_func": "softmax", "rope_theta": 10000, "max_position_embeddings": 163840,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
                   "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001},
    },
    "mixtral-8x7b": {  # mistralai/Mixtral-8x7B-v0.1: 32 layers, 8 experts, top-2
        "layers": 8, "full_layers": 32, "kv_gib": 4,
        "config": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                   "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                   "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "hidden_act": "silu", "sliding_window": None},
    },
}
# variant kind -> environment of its engine; an engine is named KIND or KIND_<suffix> (on_a, on_b, off_c: several
# engines of one kind, since engine instances differ by up to a few % in TPOT); off* engines run without the plugin
VARIANTS = {"on": {}, "off": {},
            "staged": {"MOE_MONITOR_RECORDER": "staged"}}  # the recorder that holds nothing in graph pools
REFERENCE = "off_a"


def variant_kind(name: str) -> str:
    kind = name.split("_")[0]
    if kind not in VARIANTS:
        raise ValueError(f"engine {name!r}: its kind {kind!r} is not one of {sorted(VARIANTS)}")
    return kind
PLUGIN_PATH = "/tmp/plug"  # where .gpu/device-env.sh registers the plugin's dist-info


def write_model(shape: str, root: str, layers: int | None = None) -> str:
    spec = SHAPES[shape]
    cfg = dict(spec["config"], num_hidden_layers=layers or spec["layers"], dtype="bfloat16", torch_dtype="bfloat16")
    cfg.setdefault("bos_token_id", 1)
    cfg.setdefault("eos_token_id", 2)
    path = os.path.join(root, shape)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


# --------------------------------------------------------------------------------------------- engine process


def engine_main(model: str, kv_gib: float, replies_fd: int, eager: bool, backend: str, profile_dir: str | None
                ) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = float(os.environ["COST_SPAWNED_AT"])
    on_gpu = backend != "auto"  # "auto" is for a smoke run of this script on vLLM CPU
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_model_len=1024, enable_prefix_caching=False, enforce_eager=eager,
              **({"profiler_config": {"profiler": "torch", "torch_profiler_dir": profile_dir, "ignore_frontend": True,
                                      "torch_profiler_with_stack": False}} if profile_dir else {}),
              **({"attention_config": {"backend": backend}, "kv_cache_memory_bytes": int(kv_gib * 2**30),
                  "gpu_memory_utilization": 0.1} if on_gpu else {"gpu_memory_utilization": 0.12}))
    replies = os.fdopen(replies_fd, "w", buffering=1)
    replies.write(json.dumps({"event": "ready", "seconds": time.time() - started, "pid": os.getpid()}) + "\n")
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    engine = llm.llm_engine
    serial = 0

    def run(batch: int, prompt_len: int, out_len: int, seed: int) -> dict:
        nonlocal serial
        rng = random.Random(seed)
        params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=1.0, top_p=1.0,
                                detokenize=False)
        t0 = time.perf_counter()
        for _ in range(batch):
            serial += 1
            ids = [rng.randrange(1000, vocab - 1000) for _ in range(prompt_len)]
            engine.add_request(f"r{serial}", TokensPrompt(prompt_token_ids=ids), params)
        seen: dict[int, float] = {}  # tokens every request has -> when the step that completed them returned
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            if outs:
                n = min(len(o.outputs[0].token_ids) for o in outs)
                seen.setdefault(n, now)
        first, last = seen.get(1), seen.get(out_len)
        times = [seen[k] for k in sorted(seen)]
        gaps = [b - a for a, b in zip(times, times[1:])]
        return {"ttft_s": (first - t0) if first else None, "e2e_s": time.perf_counter() - t0,
                "tpot_ms": 1000 * (last - first) / (out_len - 1) if first and last else None,
                "itl_median_ms": 1000 * statistics.median(gaps) if gaps else None, "token_steps": len(seen)}

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        if cmd["cmd"] == "profile":
            llm.start_profile()
        reply = run(cmd["batch"], cmd["prompt_len"], cmd["out_len"], cmd["seed"])
        if cmd["cmd"] == "profile":
            llm.stop_profile()
        replies.write(json.dumps(reply) + "\n")
    replies.close()
    os._exit(0)  # vLLM's engine-core child goes with the process group; skip slow interpreter teardown


# --------------------------------------------------------------------------------------------- orchestrator


class Engine:
    def __init__(self, variant: str, model: str, kv_gib: float, work: str, extra_env: dict, eager: bool,
                 backend: str, profile: bool):
        self.variant = variant
        self.log_path = os.path.join(work, f"engine_{variant}.log")
        env = dict(os.environ, **extra_env, COST_SPAWNED_AT=repr(time.time()))
        paths = [p for p in env.get("PYTHONPATH", "").split(":") if p]
        # every engine gets its own segment directory: only those with the plugin may ever hold a segment
        self.segments = os.path.join(work, f"segments_{variant}")
        env.update(MOE_MONITOR_SEGMENT_DIR=self.segments)
        self.profiles = os.path.join(work, f"profiles_{variant}")
        env.update(VARIANTS[variant_kind(variant)])
        if variant.startswith("off"):  # not installed; and disabled, were it installed some other way (pip)
            paths = [p for p in paths if os.path.abspath(p) != PLUGIN_PATH]
            env["MOE_MONITOR_ENABLED"] = "0"
        env["PYTHONPATH"] = ":".join(paths)
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--engine", model, "--kv-gib", str(kv_gib),
             "--replies-fd", str(write_fd), "--attention-backend", backend, *(["--eager"] if eager else []),
             *(["--profile-dir", self.profiles] if profile else [])],
            stdin=subprocess.PIPE, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env=env,
            pass_fds=(write_fd,), text=True, start_new_session=True)
        os.close(write_fd)
        self.replies = os.fdopen(read_fd)
        self.ready: dict | None = None

    def reply(self, timeout: float) -> dict:
        box: list = []
        t = threading.Thread(target=lambda: box.append(self.replies.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(f"engine {self.variant} gave no reply (exit {self.proc.poll()}); log:\n"
                               + self.tail())
        return json.loads(box[0])

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.reply(300)

    def tail(self, n: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            pass
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass


def gpu_memory_by_engine(engines: list[Engine]) -> dict[str, float]:
    """MiB per engine: nvidia-smi's per-process memory, summed over each engine's process tree."""
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    roots = {e.proc.pid: e.variant for e in engines}
    mem: dict[str, float] = {}
    for line in out.strip().splitlines():
        pid, used = (int(x) for x in line.split(","))
        p = pid
        while p > 1 and p not in roots:
            try:
                with open(f"/proc/{p}/stat") as f:
                    p = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                break
        if p in roots:
            mem[roots[p]] = mem.get(roots[p], 0.0) + used
    return mem


def routed_total(segments: str) -> int:
    from moe_monitor.channel.reader import list_segments, read_segment

    return int(sum(read_segment(p).counts.sum() for p in list_segments(segments)))


def per_round(rows: list[dict], batch: int) -> list[dict[str, float]]:
    by: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["batch"] == batch and r.get("tpot_ms"):
            by.setdefault(r["round"], {})[r["variant"]] = r["tpot_ms"]
    return list(by.values())


def ratios(rows: list[dict], batch: int, a: str, b: str) -> list[float]:
    return [v[a] / v[b] - 1 for v in per_round(rows, batch) if a in v and b in v]


def versus_offs(rows: list[dict], batch: int, a: str) -> list[float]:
    """a against the mean of every plugin-less engine of the same round."""
    out = []
    for v in per_round(rows, batch):
        offs = [t for k, t in v.items() if k.startswith("off")]
        if a in v and offs:
            out.append(v[a] / statistics.fmean(offs) - 1)
    return out


def pooled(rows: list[dict], batch: int) -> list[float]:
    """The mean of the plugin's engines against the mean of the plugin-less ones, per round."""
    out = []
    for v in per_round(rows, batch):
        ons = [t for k, t in v.items() if not k.startswith("off")]
        offs = [t for k, t in v.items() if k.startswith("off")]
        if ons and offs:
            out.append(statistics.fmean(ons) / statistics.fmean(offs) - 1)
    return out


def spread(xs: list[float]) -> str:
    return f"{100 * statistics.median(xs):+.2f} % [{100 * min(xs):+.2f}, {100 * max(xs):+.2f}]" if xs else "n/a"


def summarize(shape: str, rows: list[dict], meta: dict) -> str:
    """Markdown: the shape's set-up lines and, per batch size, each engine's TPOT against the reference engine
    and the plugin's engines against the mean of the plugin-less ones (the A/A column is off_b vs off_a)."""
    variants, ref = meta.get("variants", ["on", "off_a", "off_b"]), REFERENCE
    others = [v for v in variants if v != ref]
    plugged = [v for v in variants if not v.startswith("off")]
    first = meta.get("first_request_order", variants)
    lines = [f"### {shape}: {meta['layers']} of {meta['full_layers']} layers, {meta['rounds']} rounds, "
             f"{meta['out_len']} output tokens after a {meta['prompt_len']}-token prompt",
             "",
             "- start-up (engines starting together): " + ", ".join(f"{v} {meta['ready_s'][v]:.1f} s"
                                                                     for v in variants),
             "- first request (batch 1, 16 tokens)"
             + (", in the order served: " if "first_request_order" in meta else ": ")
             + ", ".join(f"{v} {meta['first_request_s'][v] * 1000:.1f} ms" for v in first),
             "- GPU memory per engine (nvidia-smi): " + ", ".join(
                 f"{v} {meta['gpu_mib'].get(v, float('nan')):.0f} MiB" for v in variants),
             f"- routed assignments the plugin counted: {meta['routed']:,}", "",
             "TPOT per round, median [min, max]:", "",
             f"| batch | TPOT {ref} | " + " | ".join(f"{v} vs {ref}" for v in others) + " | "
             + " | ".join(f"{v} vs mean(off)" for v in plugged)
             + (f" | mean of {len(plugged)} plugin engines vs mean(off)" if len(plugged) > 1 else "") + " |",
             "|---|---|" + "---|" * (len(others) + len(plugged) + (len(plugged) > 1))]
    for batch in meta["batches"]:
        base = [r["tpot_ms"] for r in rows if r["batch"] == batch and r["variant"] == ref and r.get("tpot_ms")]
        cells = [spread(ratios(rows, batch, v, ref)) for v in others] + \
            [spread(versus_offs(rows, batch, v)) for v in plugged] + \
            ([spread(pooled(rows, batch))] if len(plugged) > 1 else [])
        lines.append(f"| {batch} | {statistics.median(base):.3f} ms | " + " | ".join(cells) + " |" if base
                     else f"| {batch} | n/a |")
    return "\n".join(lines)


def report(path: str) -> str:
    """The tables again, from a --out file (one shape's rows, then its summary line)."""
    rows, out = [], []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "round" in rec:
                rows.append(rec)
            elif "summary" in rec:
                shape = rec["summary"]["shape"]
                out.append(summarize(shape, [r for r in rows if r["shape"] == shape], rec["summary"]))
                rows = [r for r in rows if r["shape"] != shape]
    return "\n\n".join(out)


def bench_shape(shape: str, args, out) -> str:
    spec = SHAPES[shape]
    layers = args.layers or spec["layers"]
    work = tempfile.mkdtemp(prefix=f"cost_{shape}_", dir=args.work)
    model = write_model(shape, work, layers)
    order = list(args.variants)
    random.Random(args.seed).shuffle(order)
    engines = {v: Engine(v, model, spec["kv_gib"], work, spec.get("env", {}), args.eager, args.attention_backend,
                         bool(args.profile_batch)) for v in order}
    try:
        for e in engines.values():
            e.ready = e.reply(args.start_timeout)
        meta = {"shape": shape, "layers": layers, "full_layers": spec["full_layers"], "rounds": args.rounds,
                "batches": args.batches, "prompt_len": args.prompt_len, "out_len": args.out_len,
                "eager": args.eager, "variants": args.variants,
                "ready_s": {v: e.ready["seconds"] for v, e in engines.items()},
                "gpu_mib": gpu_memory_by_engine(list(engines.values())), "first_request_s": {}}
        rng = random.Random(args.seed)
        meta["first_request_order"] = rng.sample(order, len(order))
        for v in meta["first_request_order"]:
            meta["first_request_s"][v] = engines[v].call(cmd="run", batch=1, prompt_len=args.prompt_len, out_len=16,
                                                          seed=1)["e2e_s"]
        for batch in args.batches:  # warm-up: every batch size once on every engine, untimed
            for v in order:
                engines[v].call(cmd="run", batch=batch, prompt_len=args.prompt_len, out_len=8, seed=2)
        rows = []
        for rnd in range(args.rounds):
            for batch in args.batches:
                for v in rng.sample(order, len(order)):
                    r = engines[v].call(cmd="run", batch=batch, prompt_len=args.prompt_len, out_len=args.out_len,
                                        seed=1000 * rnd + batch)
                    row = {"shape": shape, "round": rnd, "batch": batch, "variant": v, **r}
                    rows.append(row)
                    out.write(json.dumps(row) + "\n")
                    out.flush()
        if args.profile_batch:
            for v in order:
                r = engines[v].call(cmd="profile", batch=args.profile_batch, prompt_len=args.prompt_len, out_len=32,
                                    seed=7)
                out.write(json.dumps({"shape": shape, "profiled": v, "batch": args.profile_batch, **r}) + "\n")
                for path in glob.glob(os.path.join(engines[v].profiles, "**", "*.pt.trace.json*"), recursive=True):
                    os.makedirs(args.trace_out, exist_ok=True)
                    name = f"{shape}_{v}_b{args.profile_batch}.pt.trace.json.gz"
                    shutil.copy(path, os.path.join(args.trace_out, name))
        meta["routed"] = min(routed_total(e.segments) for v, e in engines.items() if not v.startswith("off"))
        meta["segments_off"] = sum(len(os.listdir(e.segments)) if os.path.isdir(e.segments) else 0
                                   for v, e in engines.items() if v.startswith("off"))
        out.write(json.dumps({"summary": meta}) + "\n")
        out.flush()
        if not meta["routed"] or meta["segments_off"]:
            raise RuntimeError(f"the plugin counted {meta['routed']} assignments (fewest of its engines) and wrote "
                               f"{meta['segments_off']} segments in the 'off' engines: the comparison is void")
        return summarize(shape, rows, meta)
    except Exception:
        for e in engines.values():
            sys.stderr.write(f"--- {e.variant} log tail ---\n{e.tail()}\n")
        raise
    finally:
        for e in engines.values():
            e.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, help="override the shape's layer count")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--variants", type=lambda s: s.split(","), default=["on", "off_a", "off_b"],
                    help=f"engines to compare, each KIND or KIND_<suffix> with KIND in {sorted(VARIANTS)} (e.g. "
                    f"on_a,on_b,off_a,off_b,off_c); {REFERENCE} is the reference and must be one of them")
    ap.add_argument("--profile-batch", type=int, help="after the rounds, profile one run at this batch size on "
                    "every engine (vLLM's torch profiler; traces under --work)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs, no torch.compile)")
    ap.add_argument("--attention-backend", default="TRITON_ATTN", help="'auto' for a smoke run on vLLM CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-timeout", type=float, default=420)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default="vllm_cost.jsonl")
    ap.add_argument("--report", help="print the tables of an earlier --out file and exit")
    ap.add_argument("--trace-out", default="traces", help="where --profile-batch's traces are copied")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--profile-dir", help=argparse.SUPPRESS)
    ap.add_argument("--kv-gib", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--replies-fd", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.engine and not args.report:
        try:
            [variant_kind(v) for v in args.variants]
        except ValueError as e:
            ap.error(str(e))
        if REFERENCE not in args.variants:
            ap.error(f"--variants must include the reference engine {REFERENCE}")
    if args.report:
        print(report(args.report))
        return
    if args.engine:
        engine_main(args.engine, args.kv_gib, args.replies_fd, args.eager, args.attention_backend, args.profile_dir)
        return
    with open(args.out, "a") as out:
        for shape in args.shape or ["qwen3-30b-a3b"]:
            t = time.monotonic()
            table = summarize_safe(shape, args, out)
            print(f"{table}\n(wall {time.monotonic() - t:.0f} s)\n", flush=True)


def summarize_safe(shape: str, args, out) -> str:
    try:
        return bench_shape(shape, args, out)
    except Exception as e:  # noqa: BLE001 - the next shape still runs; the error is in the output
        out.write(json.dumps({"shape": shape, "error": f"{type(e).__name__}: {e}"[:4000]}) + "\n")
        return f"## {shape}: FAILED: {type(e).__name__}: {str(e)[-3000:]}"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
