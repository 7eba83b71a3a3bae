"""Our breakdown next to Holistic Trace Analysis (PyPI holistictraceanalysis) on the same GPU traces.

1. Per-kernel device time: ours (raw event durations) vs HTA's get_gpu_kernel_breakdown, every kernel
   whose totals differ listed with the size of the difference and the number of its events HTA gave a
   negative or shortened duration.
2. --big: wall time and peak RSS (VmHWM) of the kernel breakdown on a large trace, each run in its own fresh
   process, in this order: ours (msgspec reader), ours with the previous reader (`read_trace(parser="ijson")`),
   HTA, then ours and HTA again, --repeat times in all (A/A: the same command run again, so the run-to-run
   noise is visible). Before the runs, both readers are checked to return the same Trace (device events,
   cpu_ops, steps, annotations: names, ts, dur, stream, cat, in order) on every trace under
   tests/fixtures/traces/, benchmarks/results/ and the big one. Build the big trace with benchmarks/big_trace.py.

    .venv/bin/python benchmarks/breakdown_vs_hta.py [TRACE.pt.trace.json.gz] [--big BIG.pt.trace.json.gz [--repeat N]]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {"ours": "ours (msgspec reader)", "ours-ijson": "ours (previous ijson reader)",
         "hta": "HTA get_gpu_kernel_breakdown"}


def ours(path: str, parser: str = "msgspec") -> dict:
    from moe_monitor.breakdown.analyze import analyze
    from moe_monitor.breakdown.trace import read_trace

    t = time.perf_counter()
    result = analyze([read_trace(path, parser=parser)], top=10**6)
    seconds = time.perf_counter() - t
    kernels: dict[str, float] = defaultdict(float)
    for r in result.top:  # a name can have a row per category
        kernels[r.name] += r.total_us
    return {"seconds": seconds, "kernels": kernels, "total_us": result.total_us}


def hta(path: str) -> dict:
    import logging

    logging.disable(logging.WARNING)
    from hta.trace_analysis import TraceAnalysis

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(path, os.path.join(d, "rank0.pt.trace.json.gz" if path.endswith(".gz") else "rank0.json"))
        t = time.perf_counter()
        analysis = TraceAnalysis(trace_dir=d)
        _, kernels = analysis.get_gpu_kernel_breakdown(visualize=False, num_kernels=10**6)
        seconds = time.perf_counter() - t
        trace_df = analysis.t.get_trace(0)
        sym = analysis.t.symbol_table.get_sym_table()
        negatives = trace_df[(trace_df["stream"] >= 0) & (trace_df["dur"] < 0)]
        neg_by_name = negatives.groupby("name").size().to_dict()
    return {"seconds": seconds, "kernels": dict(zip(kernels["name"], kernels["sum (us)"])),
            "negative": {sym[int(k)]: int(v) for k, v in neg_by_name.items()}}


def child(tool: str, path: str) -> dict:
    """Run one tool in a fresh process and report its result with that process's peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--child", tool, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_traces(paths: list[str]) -> list[str]:
    """The paths on which the two readers return different Traces (in this process: same string hashes)."""
    from moe_monitor.breakdown.trace import read_trace

    def events(t):
        return [[(e.name, e.ts, e.dur, e.stream, e.cat) for e in evs]
                for evs in (t.device, t.cpu_ops, t.steps, t.annotations)] + [t.rank, t.is_gpu]

    return [p for p in paths if events(read_trace(p)) != events(read_trace(p, parser="ijson"))]


def side_by_side(trace: str) -> None:
    a, b = child("ours", trace), child("hta", trace)
    names = set(a["kernels"]) | set(b["kernels"])
    print(f"{os.path.basename(trace)}: ours {a['total_us']:.3f} us over {len(a['kernels'])} kernel names, "
          f"HTA {sum(b['kernels'].values()):.3f} us over {len(b['kernels'])}")
    diffs = sorted(((a["kernels"].get(n, 0.0) - b["kernels"].get(n, 0.0), n) for n in names), key=lambda x: -abs(x[0]))
    for d, n in diffs:
        if abs(d) > 1e-6:
            print(f"  {d:+10.3f} us  ours {a['kernels'].get(n, 0):10.3f}  HTA {b['kernels'].get(n, 0):10.3f}  "
                  f"HTA negative durations: {b['negative'].get(n, 0):3d}  {n[:70]}")


def big(path: str, repeat: int) -> None:
    with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
        size = sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
    from importlib.metadata import version

    print(f"big trace {path}: {os.path.getsize(path) / 1e6:.1f} MB gzipped, {size / 1e6:.1f} MB of JSON; "
          f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}, "
          + ", ".join(f"{p} {version(p)}" for p in ("msgspec", "ijson", "numpy", "HolisticTraceAnalysis")), flush=True)
    traces = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "traces", "*.trace.json.gz"))) + \
        sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.trace.json.gz"))) + [path]
    differ = same_traces(traces)
    print(f"msgspec and ijson readers return the same Trace on {len(traces) - len(differ)} of {len(traces)} traces"
          + (f"; DIFFERENT on {differ}" if differ else " (tests/fixtures/traces, benchmarks/results, the big one)"),
          flush=True)
    runs = []
    print(f"{'run':>3}  {'':32s} {'seconds':>8} {'peak RSS MB':>12}")
    for i, tool in enumerate(("ours", "ours-ijson", "hta", *("ours", "hta") * (repeat - 1)), 1):
        r = child(tool, path)
        runs.append((tool, r))
        print(f"{i:3d}  {TOOLS[tool]:32s} {r['seconds']:8.2f} {r['peak_rss_mb']:12.0f}", flush=True)
    hta_s = [r["seconds"] for tool, r in runs if tool == "hta"]
    for tool in ("ours", "ours-ijson"):
        mine = [r["seconds"] for t, r in runs if t == tool]
        ratios = sorted(h / s for h in hta_s for s in mine)
        print(f"speed-up of {TOOLS[tool]} vs HTA: {ratios[0]:.1f}x to {ratios[-1]:.1f}x "
              f"(each of its {len(mine)} run(s) against each of HTA's {len(hta_s)})")
    totals = {json.dumps(sorted(r["kernels"].items())) for t, r in runs if t != "hta"}
    print(f"per-kernel totals identical in every run of ours (both readers): {'yes' if len(totals) == 1 else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", nargs="?")
    ap.add_argument("--big")
    ap.add_argument("--repeat", type=int, default=2, help="runs of ours (msgspec) and of HTA on --big (A/A: >= 2)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tool, path = args.child
        result = hta(path) if tool == "hta" else ours(path, "ijson" if tool == "ours-ijson" else "msgspec")
        # VmHWM of this process: ru_maxrss would carry the parent's peak across fork and exec
        with open("/proc/self/status") as f:
            result["peak_rss_mb"] = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
        print(json.dumps(result))
        return
    if not args.trace and not args.big:
        ap.error("give a trace, --big, or both")
    if args.trace:
        side_by_side(args.trace)
    if args.big:
        big(args.big, args.repeat)


if __name__ == "__main__":
    main()
