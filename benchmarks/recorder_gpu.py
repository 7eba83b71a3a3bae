"""Recorder overhead on a CUDA-graph-captured MoE stack: added µs per MoE layer per step and % of step.

For each model shape and tokens per step, graphs without the recorder and with each recorder strategy
(the plugin's own moe_monitor.plugin.recorder.Recorder) are captured under several graph-pool layouts
(see layouts()); replays are interleaved in rotating order, each timed with CUDA events over a batch of
replays, and each strategy is compared with the baseline of the same layout. A second,
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


def layouts(n: int, layers: int, seed: int = 0) -> list[tuple[int, int]]:
    """n graph-pool layouts: (row, bytes) of one extra block held from that row's layer on; (0, 0) = none.
    Holding any small block shifts where the graph's later small allocations land, and a kernel's speed can
    depend on its operands' addresses (the fixed-layout run measured +-16 us/layer from that alone)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [512, 4096, 32768, 262144, 1 << 20]
    out = [(0, 0)]
    for _ in range(n - 1):
        out.append((int(torch.randint(layers, (1,), generator=g)),
                    sizes[int(torch.randint(len(sizes), (1,), generator=g))]))
    return out


def padded_tap(layout, inner=None):
    row_at, nbytes = layout
    held = []

    def tap(row, ids):
        if nbytes and row == row_at:
            held.append(torch.empty(nbytes, dtype=torch.uint8, device="cuda"))
        if inner is not None:
            inner(row, ids)
    return tap, held


def bench_shape(shape, tokens_list, modes, rounds, reps, n_layouts, refs_control=False):
    stack = MoEStack(shape)
    rows = []
    for T in tokens_list:
        x = torch.randn(T, shape.hidden, device="cuda", dtype=torch.bfloat16)
        ref = stack.reference_counts(x, T)
        graphs, recorders, keep = {}, {}, []
        for j, layout in enumerate(layouts(n_layouts, shape.layers)):
            tap, held = padded_tap(layout)
            graphs[f"none@{j}"], _ = capture(lambda x, tap=tap: stack.step(x, tap=tap), x)
            keep.append(held)
            if refs_control:  # holds every layer's ids like `fused` and counts nothing: its layout, no work
                refs = []
                tap, held = padded_tap(layout, lambda row, ids, refs=refs: refs.append(ids))
                graphs[f"refs@{j}"], _ = capture(lambda x, tap=tap: stack.step(x, tap=tap), x)
                keep += [held, refs]
            for mode in modes:
                rec = Recorder(shape.layers, shape.experts, shape.top_k, "cuda", capacity=T, mode=mode)
                rec.set_rows(list(range(shape.layers)))
                rec.set_valid_tokens(0)  # warm-up and capture are dummy runs: nothing is counted
                tap, held = padded_tap(layout, rec.record)
                graphs[f"{mode}@{j}"], _ = capture(lambda x, tap=tap: stack.step(x, tap=tap), x)
                rec.set_valid_tokens(T)
                recorders[(mode, j)] = rec
                keep.append(held)
        graphs["none-again@0"], _ = capture(lambda x: stack.step(x), x)  # A/A control: the noise floor
        # The recorder's kernels alone: taps over precomputed ids of every layer, captured the same way.
        ids = [stack.route(torch.randn(T, shape.hidden, device="cuda", dtype=torch.bfloat16))[1]
               for _ in range(shape.layers)]
        for mode in modes:
            rec = Recorder(shape.layers, shape.experts, shape.top_k, "cuda", capacity=T, mode=mode)
            rec.set_rows(list(range(shape.layers)))
            graphs[f"alone:{mode}"], _ = capture(
                lambda _x, rec=rec, ids=ids: [rec.record(r, i) for r, i in enumerate(ids)], x)
            keep.append(rec)
        for rec in recorders.values():
            rec.counts.zero_()
        times = time_graphs(graphs, rounds, reps)
        replays = rounds * (reps + 1)
        L = shape.layers
        base = [times[f"none@{j}"] for j in range(n_layouts)]
        step = statistics.median(base)
        spread = (max(base) - min(base)) / L
        noise = (times["none-again@0"] - times["none@0"]) / L
        print(f"{shape.name:16s} T={T:5d} step {step:9.1f} us  layout spread {spread:7.3f} us/layer  "
              f"A/A noise {noise:7.3f} us/layer", flush=True)
        if refs_control:
            deltas = [(times[f"refs@{j}"] - times[f"none@{j}"]) / L for j in range(n_layouts)]
            print(f"{shape.name:16s} T={T:5d} {'refs-only':9s} added {statistics.median(deltas):7.3f} us/layer  "
                  f"per layout {' '.join(f'{d:6.2f}' for d in deltas)}  (holds the ids, counts nothing)", flush=True)
        for mode in modes:
            deltas = [(times[f"{mode}@{j}"] - times[f"none@{j}"]) / L for j in range(n_layouts)]
            added = statistics.median(deltas)
            ok = all(torch.equal(recorders[(mode, j)].counts[:, : shape.experts].cpu(), ref * replays)
                     for j in range(n_layouts))
            rows.append({
                "shape": shape.name, "tokens": T, "mode": mode, "layers": L, "layouts": n_layouts,
                "step_us": round(step, 2), "added_us_per_layer": round(added, 3),
                "added_pct": round(100 * added * L / step, 3),
                "added_per_layout_us_per_layer": [round(d, 3) for d in deltas],
                "layout_spread_us_per_layer": round(spread, 3),
                "alone_us_per_layer": round(times[f"alone:{mode}"] / L, 3),
                "aa_noise_us_per_layer": round(noise, 3), "counts_exact": ok,
            })
            print(f"{shape.name:16s} T={T:5d} {mode:9s} added {added:7.3f} us/layer ({100 * added * L / step:6.3f} %)"
                  f"  per layout {' '.join(f'{d:6.2f}' for d in deltas)}  recorder alone "
                  f"{times[f'alone:{mode}'] / L:6.3f} us/layer  counts exact: {ok}", flush=True)
        del graphs, recorders, keep
        torch.cuda.empty_cache()
    return rows


def markdown(rows, meta) -> str:
    out = [f"# Recorder overhead on {meta['device']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; {meta['rounds']} interleaved rounds "
           f"x {meta['reps']} graph replays, medians. Each graph is captured under {meta['layouts']} graph-pool "
           "layouts (none, or one extra block of 512 B - 1 MB held from a random layer on), the same layouts "
           "with and without the recorder; `added` = median over layouts of (step with recorder - step without, "
           "same layout), per MoE layer. `layout spread` = max - min of the step without recorder over the "
           "layouts: what memory placement alone moves. `alone` = the recorder's kernels captured alone.", "",
           "| shape | tokens | mode | step (us) | added | % of step | per layout (us/layer) | layout spread | "
           "recorder alone | A/A noise | counts exact |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = " / ".join(f"{d:.2f}" for d in r["added_per_layout_us_per_layer"])
        out.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['step_us']} | "
                   f"{r['added_us_per_layer']} us/layer | {r['added_pct']} % | {per} | "
                   f"{r['layout_spread_us_per_layer']} us/layer | {r['alone_us_per_layer']} us/layer | "
                   f"{r['aa_noise_us_per_layer']} us/layer | {r['counts_exact']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 256, 1024])
    ap.add_argument("--modes", nargs="+", default=["fused", "staged"], choices=MODES)
    ap.add_argument("--layouts", type=int, default=4)
    ap.add_argument("--refs-control", action="store_true",
                    help="also time a tap that only holds the ids (the fused recorder's memory effect, no work)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "rounds": args.rounds, "reps": args.reps,
            "layouts": args.layouts}
    print(meta, flush=True)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for name in args.shapes:
        rows += bench_shape(SHAPES[name], args.tokens, args.modes, args.rounds, args.reps, args.layouts,
                            args.refs_control)
        with open(os.path.join(args.out, "recorder_gpu.json"), "w") as f:  # after each shape: partial results
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "recorder_gpu.md"), "w") as f:
            f.write(markdown(rows, meta))


if __name__ == "__main__":
    main()
