"""A representative MoE decoder stack on the GPU, for the recorder benchmark and the GPU tests.

Per MoE layer: RMSNorm → gate linear → softmax + top-k (the router; the tap sees its ids, int32 as vLLM's
routers return them) → sort-based permutation → two grouped expert GEMMs (torch._grouped_mm, SwiGLU) →
deterministic weighted un-permute (inverse permutation + sum over k) → residual. Expert-parallel slices keep
only the experts of local rank 0 (ids < local_experts); the rest would leave through all-to-all and are dropped
here. Expert and gate weights
are shared across layers to fit the GPU: every layer still streams its experts' weights from HBM (they
exceed L2), so the per-layer cost is realistic. Attention is not modelled, so "% of step" is an upper bound.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MoEShape:
    name: str
    layers: int
    experts: int  # routed (logical) experts the router chooses from
    local_experts: int  # experts computed on this rank
    top_k: int
    hidden: int
    intermediate: int


SHAPES = {
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", 48, 128, 128, 8, 2048, 768),
    "deepseek-v3-ep8": MoEShape("deepseek-v3-ep8", 58, 256, 32, 8, 7168, 2048),
    "mixtral-8x7b": MoEShape("mixtral-8x7b", 32, 8, 8, 2, 4096, 14336),
}


class MoEStack:
    def __init__(self, shape: MoEShape, device="cuda", dtype=torch.bfloat16, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        s = self.shape = shape
        scale = shape.hidden ** -0.5
        self.gate = torch.randn(s.experts, s.hidden, device=device, dtype=dtype, generator=g) * scale
        # [E, N, K] stored, passed transposed: the column-major B operand _grouped_mm wants.
        self.w13 = torch.randn(s.local_experts, 2 * s.intermediate, s.hidden, device=device, dtype=dtype,
                               generator=g) * scale
        self.w2 = torch.randn(s.local_experts, s.hidden, s.intermediate, device=device, dtype=dtype,
                              generator=g) * s.intermediate ** -0.5
        self.norm = torch.ones(s.hidden, device=device, dtype=dtype)
        self.expert_ends = torch.arange(1, s.local_experts + 1, device=device, dtype=torch.int64)
        self._positions = torch.arange(1 << 16, device=device, dtype=torch.int64)

    def route(self, h: torch.Tensor):
        logits = F.linear(h, self.gate)
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), self.shape.top_k, dim=-1)
        return weights, ids.to(torch.int32)

    def layer(self, x: torch.Tensor, row: int, tap=None, annotate: bool = False) -> torch.Tensor:
        s = self.shape
        h = F.rms_norm(x, (s.hidden,), self.norm)
        weights, ids = self.route(h)
        if tap is not None:
            tap(row, ids)
        flat = ids.reshape(-1).to(torch.int64)
        local = flat < s.local_experts
        key = torch.where(local, flat, s.local_experts)
        sorted_key, order = torch.sort(key, stable=True)
        offs = torch.searchsorted(sorted_key, self.expert_ends).to(torch.int32)
        token = order // s.top_k
        xs = h[token]
        # vLLM's Triton path annotates its expert GEMMs `fused_moe_* MxNxK E=<n> top_k=<k>`: optional here.
        label = (f"fused_moe_grouped_mm {xs.shape[0]}x{2 * s.intermediate}x{s.hidden} "
                 f"E={s.local_experts} top_k={s.top_k}")
        with torch.profiler.record_function(label) if annotate else contextlib.nullcontext():
            y = torch._grouped_mm(xs, self.w13.transpose(-2, -1), offs=offs)
            a = F.silu(y[:, : s.intermediate]) * y[:, s.intermediate:]
            y2 = torch._grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)
        keep = (sorted_key < s.local_experts).unsqueeze(1)
        y2 = torch.where(keep, y2 * weights.reshape(-1)[order].unsqueeze(1).to(y2.dtype), 0)
        # Deterministic un-permute (no float atomics, so replays route exactly like the reference):
        # back to [T, k] order with the inverse permutation, then sum over k (vLLM's moe_sum).
        inverse = torch.empty_like(order).scatter_(0, order, self._positions[: order.numel()])
        return x + y2[inverse].view(x.shape[0], s.top_k, s.hidden).sum(dim=1)

    def step(self, x: torch.Tensor, tap=None) -> torch.Tensor:
        for row in range(self.shape.layers):
            x = self.layer(x, row, tap)
        return x

    def reference_counts(self, x: torch.Tensor, valid: int) -> torch.Tensor:
        """Eager per-layer counts of the first `valid` tokens, computed on the host: the ground truth."""
        counts = torch.zeros(self.shape.layers, self.shape.experts, dtype=torch.int64)
        seen = []
        self.step(x, tap=lambda row, ids: seen.append(ids[:valid].cpu()))
        for row, ids in enumerate(seen):
            counts[row] += torch.bincount(ids.reshape(-1).long(), minlength=self.shape.experts)
        return counts


def capture(fn, x: torch.Tensor, warmup: int = 2, pool=None):
    """Capture fn(x) in a CUDA graph (after warm-up on a side stream, as torch recommends); `pool` shares
    another graph's memory pool, as vLLM's graphs of every batch size share one."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(x)
    return graph, out
