"""What EP-rank imbalance costs, measured against moe-monitor's estimate (issue #29; docs/metrics.md "What EP-rank
imbalance costs").

One vLLM engine with expert parallelism, the benchmark-only plugin in benchmarks/imbalance_cost_plugin forcing
every router's expert ids to a pattern that is either `uniform` over the EP ranks or `skewed` (EP rank 0 gets
`--skew` times each other rank's share), switched between rounds on the same engine (no second engine, no restart:
the two modes differ only in which ranks the same number of assignments go to). Rounds alternate ABBA (uniform,
skewed, skewed, uniform, ...) with the same prompts (fixed token ids, greedy, `ignore_eos`, a fixed number of new
tokens), so every round runs the same engine steps. Per round: its wall time, and moe-monitor's figures for it:
an in-process sidecar (`wiring.build`, as `moe-monitor serve` builds it) reading the engine's segments closes one
window per round and exports `moe_ep_step_time_lost_ratio`, `moe_ep_expert_time_lost_ratio` and vLLM's
balancedness. The step-time figure needs the experts' share of step time: before the timed rounds one skewed round
runs under vLLM's torch profiler, and the sidecar analyses that capture (its `--profile-dir`).

Reported: measured = (T_skewed - T_uniform) / T_skewed per adjacent pair of rounds (median, min, max), against
moe-monitor's estimate in the skewed rounds (median); with uniform rounds the estimate should be ~0.

    # the measurement (owed): two or more GPUs, expert parallelism over them
    python benchmarks/imbalance_cost.py --model <dir or HF id> --tp 2 --enable-expert-parallel --ep-size 2 \\
        --batch 256 --max-tokens 64 --rounds 8 --out $OUT/imbalance_cost.jsonl
    # the mechanics only, on vLLM's CPU build with the tiny model (one EP rank): NOT the measurement
    .venv/bin/python benchmarks/imbalance_cost.py --smoke

The CPU run (`--smoke`) is not the measurement: with one EP rank nobody waits for a busier rank (the sidecar then
exports no imbalance-cost series, and the skewed pattern only moves load between experts of one rank), and CPU step
times are host-bound. It shows that the forcing plugin takes effect (the sidecar sees the forced balance), that
modes switch on one engine, that the profile is analysed, and that the figures are read; the GPU run with EP >= 2
is the measurement, and it has not been run yet. (Two EP ranks on the CPU build could not be smoke-tested either:
vLLM 0.32 CPU with `--tp 2 --enable-expert-parallel` lost a worker to SIGSEGV on its first step here, with no
plugin loaded at all, VLLM_PLUGINS="".) On the GPU run, check first that the forcing takes effect under
torch.compile and CUDA graphs: every round's row shows `moe_eplb_balancedness_vllm`, which must be ~1 in uniform
rounds and ~(skew + R - 1) / (R x skew) in skewed ones (3/4 for skew 2 over 2 ranks).

Assumption the measurement tests: expert time proportional to the assignments a rank serves. Decode with a small
batch is memory-bound (a rank's expert time goes with the experts it loads), so run batches large enough that
experts are compute-bound as well as small ones, and report each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.path.join(ROOT, "benchmarks", "imbalance_cost_plugin")
sys.path.insert(0, os.path.join(ROOT, "tests"))
FIGURES = ("moe_ep_step_time_lost_ratio", "moe_ep_expert_time_lost_ratio", "moe_eplb_balancedness_vllm",
           "moe_mean_layer_imbalance_ratio")  # the last: expert-level, shows the forcing with one EP rank too


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory or id (default with --smoke: the tiny model, generated)")
    p.add_argument("--smoke", action="store_true", help="vLLM CPU, the tiny model, 2 rounds: the mechanics only")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--dp", type=int, default=1, help="data parallel size")
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--ep-size", type=int, default=1, help="EP ranks the experts split over (tp x dp with EP)")
    p.add_argument("--skew", type=int, default=2, help="EP rank 0's share over each other rank's when skewed")
    p.add_argument("--batch", type=int, default=64, help="requests per round (decode: tokens per step)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (even: ABBA pairs)")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on a GPU")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", help="JSON lines, one per round and one summary")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.batch, args.max_tokens, args.prompt_tokens = 2, 8, 8, 16
        args.enforce_eager = True
    return args


def tiny_model(work: str) -> str:
    from moe_monitor.demo.tiny_model import generate

    out = os.path.join(work, "qwen3-moe-tiny")
    generate(out, "qwen3_moe", hot_expert=3, hot_words=["hot", "blaze"], seed=0)
    return out


def engine(args, model: str, segments: str, profiles: str):
    """The vLLM engine, with moe-monitor's plugin (installed) and the forcing plugin (on PYTHONPATH)."""
    os.environ.update({"MOE_MONITOR_SEGMENT_DIR": segments, "MOE_MONITOR_PUBLISH_INTERVAL": "0.2",
                       "MOE_FORCE_EP_SIZE": str(args.ep_size), "MOE_FORCE_SKEW": str(args.skew),
                       "MOE_FORCE_ROUTING": "uniform", "TOKENIZERS_PARALLELISM": "false",
                       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                       "PYTHONPATH": os.pathsep.join(filter(None, [PLUGIN_DIR, os.environ.get("PYTHONPATH")]))})
    sys.path.insert(0, PLUGIN_DIR)
    from vllm import LLM

    gpu = not args.smoke
    return LLM(model=model, tensor_parallel_size=args.tp, data_parallel_size=args.dp,
               enable_expert_parallel=args.enable_expert_parallel, dtype=args.dtype or ("bfloat16" if gpu else
                                                                                        "float32"),
               enforce_eager=args.enforce_eager, max_model_len=args.prompt_tokens + args.max_tokens + 16,
               max_num_seqs=max(args.batch, 1), enable_prefix_caching=False, seed=0,
               gpu_memory_utilization=0.8 if gpu else 0.5,
               profiler_config={"profiler": "torch", "torch_profiler_dir": profiles,
                                "torch_profiler_with_stack": False})


class Sidecar:
    """moe-monitor's sidecar in this process: one window per round, closed once the ranks have published it."""

    def __init__(self, segments: str, profiles: str):
        from moe_monitor.sidecar.config import SidecarConfig
        from moe_monitor.sidecar.wiring import build

        self.exporter = build(SidecarConfig(segment_dir=segments, profile_dir=profiles, window_s=1,
                                            min_window_assignments=1), process_metrics=False)

    def boundary(self) -> dict:
        """Closes the window at now, after the ranks' next publish (MOE_MONITOR_PUBLISH_INTERVAL 0.2 s)."""
        from conftest import parse_exposition

        time.sleep(0.6)
        values = parse_exposition(self.exporter.tick(time.time()).body.decode())
        return {name: values.get((name, ())) for name in FIGURES}

    def analyse_capture(self, timeout_s: float = 120) -> bool:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            time.sleep(2.5)  # the files settle 2 s after the last write
            self.exporter.captures.poll(background=False)
            if getattr(self.exporter.captures, "result", None) is not None:
                return True
        return False


def run_round(llm, prompts, params, mode: str) -> float:
    llm.collective_rpc("moe_force_routing", args=(mode,))
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = arguments(argv)
    work = tempfile.mkdtemp(prefix="imbalance-cost-")
    segments, profiles = os.path.join(work, "segments"), os.path.join(work, "profiles")
    os.makedirs(segments)
    os.makedirs(profiles)
    model = args.model or tiny_model(work)
    llm = engine(args, model, segments, profiles)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 1000 + 10 for j in range(args.prompt_tokens)])
               for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    sidecar = Sidecar(segments, profiles)
    out = open(args.out, "a") if args.out else None

    def emit(row: dict) -> None:
        print(json.dumps(row))
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    for mode in ("uniform", "skewed"):  # warm-up (and CUDA graphs), untimed
        run_round(llm, prompts, params, mode)
    sidecar.boundary()
    # the capture the step-time estimate takes its expert share from: a skewed round under the profiler
    llm.collective_rpc("moe_force_routing", args=("skewed",))
    llm.start_profile("imbalance-skewed")
    llm.generate(prompts, params, use_tqdm=False)
    llm.stop_profile()
    analysed = sidecar.analyse_capture()
    emit({"capture_analysed": analysed})
    sidecar.boundary()
    order = [("uniform", "skewed"), ("skewed", "uniform")]
    rows = []
    for i in range(args.rounds // 2):
        for mode in order[i % 2]:
            seconds = run_round(llm, prompts, params, mode)
            row = {"round": len(rows), "mode": mode, "seconds": seconds, **sidecar.boundary()}
            rows.append(row)
            emit(row)
    pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2], strict=True)]
    measured = [((s["seconds"] - u["seconds"]) / s["seconds"]) for a, b in pairs
                for u, s in [(a, b) if a["mode"] == "uniform" else (b, a)]]

    def median(mode: str, name: str):
        values = [r[name] for r in rows if r["mode"] == mode and r[name] is not None]
        return statistics.median(values) if values else None

    summary = {"summary": True, "ep_size": args.ep_size, "skew": args.skew, "batch": args.batch,
               "max_tokens": args.max_tokens, "smoke": args.smoke, "measured_median": statistics.median(measured),
               "measured_min": min(measured), "measured_max": max(measured),
               "estimate_skewed": median("skewed", "moe_ep_step_time_lost_ratio"),
               "estimate_uniform": median("uniform", "moe_ep_step_time_lost_ratio"),
               "expert_time_lost_skewed": median("skewed", "moe_ep_expert_time_lost_ratio"),
               "balancedness_skewed": median("skewed", "moe_eplb_balancedness_vllm"),
               "balancedness_uniform": median("uniform", "moe_eplb_balancedness_vllm")}
    emit(summary)
    if args.smoke:
        print("smoke run (vLLM CPU, one EP rank): the mechanics only, not the measurement")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
