"""Where does a recorder's end-to-end delta come from? Profile replays of the graph without and with a
recorder (torch.profiler, CUDA activity) and print per-kernel device time, biggest differences first.

    python benchmarks/recorder_gpu_profile.py --shape mixtral-8x7b --tokens 1 --mode fused
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

from moe_stack import SHAPES, MoEStack, capture  # noqa: E402

from moe_monitor.plugin.recorder import Recorder  # noqa: E402


def kernel_times(graph, replays: int) -> dict[str, float]:
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    out = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name[:90]] += e.device_time / replays
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--mode", default="fused")
    ap.add_argument("--hold-refs", choices=["yes", "no"], default="yes",
                    help="no: deferred/fused taps whose captured ids are not kept alive (timing experiment only)")
    ap.add_argument("--tap", choices=["recorder", "refs-only", "alloc-only"], default="recorder",
                    help="refs-only: a tap that only keeps the ids alive (no kernels); alloc-only: a tap that "
                         "keeps a fresh 512-byte tensor alive per layer (no kernels on the ids)")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    stack = MoEStack(shape)
    x = torch.randn(args.tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
    base, _ = capture(lambda x: stack.step(x), x)
    rec = Recorder(shape.layers, shape.experts, shape.top_k, "cuda", capacity=args.tokens, mode=args.mode)
    rec.set_rows(list(range(shape.layers)))
    rec.set_valid_tokens(0)
    kept = []
    taps = {"recorder": rec.record, "refs-only": lambda row, ids: kept.append(ids),
            "alloc-only": lambda row, ids: kept.append(torch.empty(128, device="cuda", dtype=torch.int32))}
    graph, _ = capture(lambda x: stack.step(x, tap=taps[args.tap]), x)
    if args.hold_refs == "no":
        rec._captured.clear()
    rec.set_valid_tokens(args.tokens)
    a, b = kernel_times(base, 10), kernel_times(graph, 10)
    names = set(a) | set(b)
    diffs = sorted(names, key=lambda n: -abs(b.get(n, 0) - a.get(n, 0)))
    print(f"{shape.name} T={args.tokens} mode={args.mode} tap={args.tap}: "
          f"kernel time per step without {sum(a.values()):.1f} us, with {sum(b.values()):.1f} us")
    for n in diffs[:12]:
        print(f"  {b.get(n, 0) - a.get(n, 0):+9.1f} us  (without {a.get(n, 0):8.1f}, with {b.get(n, 0):8.1f})  {n}")


if __name__ == "__main__":
    main()
