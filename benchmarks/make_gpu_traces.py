"""Real torch.profiler GPU traces of a small MoE decoder (attention + MoE per layer) for the breakdown's
fixtures and its speed benchmark. Run on a CUDA machine (the device tool):

    python3 benchmarks/make_gpu_traces.py --out $OUT

Writes gpu_eager.pt.trace.json.gz (3 eager steps, record_shapes, a `fused_moe_*` annotation around the expert
GEMMs as vLLM's Triton path names it), gpu_graph.pt.trace.json.gz (3 CUDA-graph replays: kernels without CPU
op parents) and gpu_big.pt.trace.json.gz (150 eager steps, the ~140 MB JSON the benchmark needs). Each step is
annotated `execute_context_0(0)_generation_<n>(<n>)` like vLLM's.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__))]
from moe_stack import MoEShape, MoEStack, capture  # noqa: E402

SHAPE = MoEShape("trace-moe", layers=8, experts=64, local_experts=64, top_k=8, hidden=1024, intermediate=512)
HEADS, HEAD_DIM, CONTEXT = 8, 128, 512


class Decoder:
    def __init__(self):
        self.moe = MoEStack(SHAPE)
        g = torch.Generator(device="cuda").manual_seed(1)
        h = SHAPE.hidden
        self.qkv = torch.randn(3 * HEADS * HEAD_DIM, h, device="cuda", dtype=torch.bfloat16, generator=g) * h ** -0.5
        self.o = torch.randn(h, HEADS * HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g) * h ** -0.5
        self.kv = torch.randn(2, 1, HEADS, CONTEXT, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        self.norm = torch.ones(h, device="cuda", dtype=torch.bfloat16)

    def attention(self, x):
        T = x.shape[0]
        h = F.rms_norm(x, (SHAPE.hidden,), self.norm)
        q, _, _ = F.linear(h, self.qkv).view(T, 3, HEADS, HEAD_DIM).unbind(1)
        q = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D] against a cached context of CONTEXT tokens
        a = F.scaled_dot_product_attention(q, self.kv[0], self.kv[1])
        return x + F.linear(a.squeeze(0).transpose(0, 1).reshape(T, -1), self.o)

    def step(self, x, annotate_experts: bool):
        for row in range(SHAPE.layers):
            x = self.attention(x)
            x = self.moe.layer(x, row, annotate=annotate_experts)
        return x


def trace(fn, path: str, steps: int, tokens: int, record_shapes: bool) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=record_shapes) as prof:
        for _ in range(steps):
            with record_function(f"execute_context_0(0)_generation_{tokens}({tokens})"):
                fn()
        torch.cuda.synchronize()
    raw = path.removesuffix(".gz")
    prof.export_chrome_trace(raw)
    with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    print(f"{os.path.basename(path)}: {os.path.getsize(raw) / 1e6:.1f} MB JSON, "
          f"{os.path.getsize(path) / 1e6:.1f} MB gz", flush=True)
    os.unlink(raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--big-steps", type=int, default=150)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Decoder()
    T = 8
    x = torch.randn(T, SHAPE.hidden, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        model.step(x, annotate_experts=True)
    torch.cuda.synchronize()
    trace(lambda: model.step(x, annotate_experts=True), f"{args.out}/gpu_eager.pt.trace.json.gz", 3, T, True)
    graph, _ = capture(lambda x: model.step(x, annotate_experts=False), x)
    trace(graph.replay, f"{args.out}/gpu_graph.pt.trace.json.gz", 3, T, False)
    trace(lambda: model.step(x, annotate_experts=False), f"{args.out}/gpu_big.pt.trace.json.gz", args.big_steps, T,
          False)


if __name__ == "__main__":
    main()
