"""Recorder overhead on a CUDA-graph-captured MoE stack: added µs per MoE layer per step and % of step.

For each model shape and tokens per step, one graph without the recorder and one per recorder strategy
(the plugin's own moe_monitor.plugin.recorder.Recorder) are captured; A/B/C/D replays are interleaved in
rotating order, each timed with CUDA events over a batch of replays, and medians are compared. A second,
precise figure times the recorder's kernels alone (a graph that only taps precomputed ids of every layer).
Every variant's counts are checked against the host-computed reference after all replays.

    python benchmarks/recorder_gpu.py [--shapes ...] [--tokens 1 8 64 256 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_stack import SHAPES, MoEStack, capture  # noqa: E402

from moe_monitor.plugin.recorder import MODES, Recorder  # noqa: E402


def time_graphs(graphs: dict[str, torch.cuda.CUDAGraph], rounds: int, reps: int) -> dict[str, float]:
    """Median µs per replay for each graph, interleaved in rotating order."""
    names = list(graphs)
    samples = {n: [] for n in names}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            g = graphs[n]
            g.replay()  # settle
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            end.synchronize()
            samples[n].append(start.elapsed_time(end) * 1000 / reps)
    return {n: statistics.median(v) for n, v in samples.items()}


def bench_shape(shape, tokens_list, modes, rounds, reps):
    stack = MoEStack(shape)
    rows = []
    for T in tokens_list:
        x = torch.randn(T, shape.hidden, device="cuda", dtype=torch.bfloat16)
        ref = stack.reference_counts(x, T)
        graphs, recorders = {}, {}
        graphs["none"], _ = capture(lambda x: stack.step(x), x)
        graphs["none-again"], _ = capture(lambda x: stack.step(x), x)  # A/A control: the noise floor
        for mode in modes:
            rec = Recorder(shape.layers, shape.experts, shape.top_k, "cuda", capacity=T, mode=mode)
            rec.set_rows(list(range(shape.layers)))
            rec.set_valid_tokens(0)  # warm-up and capture are dummy runs: nothing is counted
            graphs[mode], _ = capture(lambda x, rec=rec: stack.step(x, tap=rec.record), x)
            rec.set_valid_tokens(T)
            recorders[mode] = rec
        # The recorder's kernels alone: taps over precomputed ids of every layer, captured the same way.
        ids = [stack.route(torch.randn(T, shape.hidden, device="cuda", dtype=torch.bfloat16))[1]
               for _ in range(shape.layers)]
        alone = {}
        for mode in modes:
            rec = Recorder(shape.layers, shape.experts, shape.top_k, "cuda", capacity=T, mode=mode)
            rec.set_rows(list(range(shape.layers)))
            alone[f"alone:{mode}"], _ = capture(lambda _x, rec=rec: [rec.record(r, i) for r, i in enumerate(ids)], x)
        for rec in recorders.values():
            rec.counts.zero_()
        times = time_graphs({**graphs, **alone}, rounds, reps)
        replays = rounds * (reps + 1)
        noise = times["none-again"] - times["none"]
        print(f"{shape.name:16s} T={T:5d} A/A noise {noise / shape.layers:7.3f} us/layer "
              f"({100 * noise / times['none']:6.3f} %)", flush=True)
        for mode in modes:
            got = recorders[mode].counts[:, : shape.experts].cpu()
            ok = torch.equal(got, ref * replays)
            added = times[mode] - times["none"]
            rows.append({
                "shape": shape.name, "tokens": T, "mode": mode, "layers": shape.layers,
                "step_us": round(times["none"], 2), "with_us": round(times[mode], 2),
                "added_us_per_layer": round(added / shape.layers, 3),
                "added_pct": round(100 * added / times["none"], 3),
                "alone_us_per_layer": round(times[f"alone:{mode}"] / shape.layers, 3),
                "aa_noise_us_per_layer": round(noise / shape.layers, 3),
                "counts_exact": ok,
            })
            print(f"{shape.name:16s} T={T:5d} {mode:9s} step {times['none']:9.1f} us  "
                  f"added {added / shape.layers:7.3f} us/layer ({100 * added / times['none']:6.3f} %)  "
                  f"recorder alone {times[f'alone:{mode}'] / shape.layers:6.3f} us/layer  counts exact: {ok}",
                  flush=True)
        del graphs, alone, recorders
        torch.cuda.empty_cache()
    return rows


def markdown(rows, meta) -> str:
    out = [f"# Recorder overhead on {meta['device']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; {meta['rounds']} interleaved rounds "
           f"x {meta['reps']} graph replays, medians. `added` = step with recorder - step without, per MoE layer; "
           "`alone` = the recorder's kernels captured alone, per layer.", "",
           "| shape | tokens | mode | step (us) | added | % of step | recorder alone | A/A noise | counts exact |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['step_us']} | "
                   f"{r['added_us_per_layer']} us/layer | {r['added_pct']} % | {r['alone_us_per_layer']} us/layer | "
                   f"{r['aa_noise_us_per_layer']} us/layer | {r['counts_exact']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 256, 1024])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "rounds": args.rounds, "reps": args.reps}
    print(meta, flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for name in args.shapes:
        rows += bench_shape(SHAPES[name], args.tokens, args.modes, args.rounds, args.reps)
        with open(os.path.join(args.out, "recorder_gpu.json"), "w") as f:  # after each shape: partial results
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "recorder_gpu.md"), "w") as f:
            f.write(markdown(rows, meta))


if __name__ == "__main__":
    main()
