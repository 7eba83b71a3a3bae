"""Benchmark-only vLLM general plugin (benchmarks/imbalance_cost.py): every MoE router still computes its routing
(the gate costs what it costs), then the expert ids it chose are replaced by a fixed pattern, `uniform` (every EP
rank, and every expert of a rank, gets the same share of each step's assignments) or `skewed` (EP rank 0 gets
`skew` times the share of each other rank), switchable at run time on the same engine. The routing weights are
kept. moe-monitor's router tap runs after the ids are replaced, so it counts the forced routing.

Found by vLLM through `moe_monitor_force_routing-0.dist-info/entry_points.txt` when this directory is on
PYTHONPATH (never installed). Settings, read in each worker:

    MOE_FORCE_ROUTING    the mode at start: uniform (default) or skewed
    MOE_FORCE_EP_SIZE    EP ranks the experts are split over (contiguously, vLLM's default placement); at least 2
                         is used for the pattern, so `skewed` is skewed over expert groups even with one rank
    MOE_FORCE_SKEW       rank 0's share over each other rank's (integer, default 2)

`LLM.collective_rpc("moe_force_routing", args=(mode,))` switches every worker: the pattern is copied into the
buffer the routers read, so CUDA graphs captured with it follow. Per step, the first `tokens x top_k` entries of
the pattern are used: any prefix of it splits over the ranks as the weights say, to within one assignment.
"""

from __future__ import annotations

import functools
import os

MODES = ("uniform", "skewed")
_MODE = [os.environ.get("MOE_FORCE_ROUTING", "uniform")]
_BUFFERS: dict = {}  # (experts, top_k, dtype, device) -> {"live": tensor, mode: tensor}
MAX_TOKENS = 1 << 16  # per step; the buffers hold MAX_TOKENS x top_k ids


def pattern(num_experts: int, ranks: int, weights: list[int], length: int) -> list[int]:
    """`length` expert ids: in turns, each rank r in order takes weights[r] ids, each the next of its own experts
    (contiguous placement: rank r holds experts [r E/R, (r+1) E/R)), so every prefix splits over the ranks as the
    weights do and consecutive ids of one rank are distinct experts."""
    per = num_experts // ranks
    nxt = [0] * ranks
    out: list[int] = []
    while len(out) < length:
        for r in range(ranks):
            for _ in range(weights[r]):
                out.append(r * per + nxt[r] % per)
                nxt[r] += 1
    return out[:length]


def _ranks(num_experts: int) -> int:
    ranks = max(int(os.environ.get("MOE_FORCE_EP_SIZE", "1")), 2)
    if num_experts % ranks:
        raise ValueError(f"{num_experts} experts do not split over {ranks} EP ranks")
    return ranks


def _buffers(num_experts: int, top_k: int, like):
    import torch

    key = (num_experts, top_k, like.dtype, like.device)
    if key not in _BUFFERS:
        ranks, skew = _ranks(num_experts), int(os.environ.get("MOE_FORCE_SKEW", "2"))
        n = MAX_TOKENS * top_k
        made = {mode: torch.tensor(pattern(num_experts, ranks, [skew if mode == "skewed" and r == 0 else 1
                                                                 for r in range(ranks)], n),
                                   dtype=like.dtype, device=like.device) for mode in MODES}
        made["live"] = made[_MODE[0]].clone()
        _BUFFERS[key] = made
    return _BUFFERS[key]


def set_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {MODES}")
    import torch

    _MODE[0] = mode
    with torch.inference_mode():  # the buffers were made in vLLM's forward pass: inference tensors
        for made in _BUFFERS.values():
            made["live"].copy_(made[mode])
    return mode


def _forced(router, compute, hidden_states, router_logits, indices_type, **kwargs):
    weights, ids = compute(hidden_states, router_logits, indices_type, **kwargs)
    tokens, top_k = ids.shape
    if tokens > MAX_TOKENS:
        raise ValueError(f"{tokens} tokens in one step: the forced pattern holds {MAX_TOKENS}")
    live = _buffers(router.global_num_experts, top_k, ids)["live"]
    return weights, live[: tokens * top_k].view(tokens, top_k)


def register() -> None:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.v1.worker.worker_base import WorkerBase

    if getattr(BaseRouter._select_experts, "_force_routing", False):
        return
    original = BaseRouter._select_experts

    def _select_experts(self, *args, **kwargs):
        if "_compute_routing" not in self.__dict__:  # once per router: shadow its class's method
            self._compute_routing = functools.partial(_forced, self, type(self)._compute_routing.__get__(self))
        return original(self, *args, **kwargs)

    _select_experts._force_routing = True
    BaseRouter._select_experts = _select_experts
    WorkerBase.moe_force_routing = lambda self, mode: set_mode(mode)
