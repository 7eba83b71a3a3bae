"""Our breakdown next to Holistic Trace Analysis (PyPI holistictraceanalysis) on the same GPU traces.

1. Per-kernel device time: ours (raw event durations) vs HTA's get_gpu_kernel_breakdown, every kernel
   whose totals differ listed with the size of the difference and the number of its events HTA gave a
   negative or shortened duration.
2. Wall time and peak RSS of the kernel breakdown on a large trace, each tool in its own process.

    .venv/bin/python benchmarks/breakdown_vs_hta.py TRACE.pt.trace.json.gz [--big BIG.pt.trace.json.gz]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def ours(path: str) -> dict:
    from moe_monitor.breakdown.analyze import analyze
    from moe_monitor.breakdown.trace import read_trace

    t = time.perf_counter()
    result = analyze([read_trace(path)], top=10**6)
    return {"seconds": time.perf_counter() - t, "kernels": {r["name"]: r["total_us"] for r in result["top"]},
            "total_us": result["total_us"]}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace", nargs="?")
    ap.add_argument("--big")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tool, path = args.child
        result = (ours if tool == "ours" else hta)(path)
        # VmHWM of this process: ru_maxrss would carry the parent's peak across fork and exec
        with open("/proc/self/status") as f:
            result["peak_rss_mb"] = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
        print(json.dumps(result))
        return
    a, b = child("ours", args.trace), child("hta", args.trace)
    names = set(a["kernels"]) | set(b["kernels"])
    print(f"{os.path.basename(args.trace)}: ours {a['total_us']:.3f} us over {len(a['kernels'])} kernel names, "
          f"HTA {sum(b['kernels'].values()):.3f} us over {len(b['kernels'])}")
    diffs = sorted(((a["kernels"].get(n, 0.0) - b["kernels"].get(n, 0.0), n) for n in names), key=lambda x: -abs(x[0]))
    for d, n in diffs:
        if abs(d) > 1e-6:
            print(f"  {d:+10.3f} us  ours {a['kernels'].get(n, 0):10.3f}  HTA {b['kernels'].get(n, 0):10.3f}  "
                  f"HTA negative durations: {b['negative'].get(n, 0):3d}  {n[:70]}")
    if args.big:
        for tool in ("ours", "hta"):
            r = child(tool, args.big)
            print(f"big trace ({os.path.getsize(args.big) / 1e6:.1f} MB gz): {tool:4s} kernel breakdown "
                  f"{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
