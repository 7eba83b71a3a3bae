"""Device-side routing counter: counts (token, expert) assignments per MoE layer into one persistent buffer.

Graph-safe by construction: every tensor the hot path touches is allocated once (grown only outside the
steady state), the number of real tokens is a device scalar written before each step, and nothing reads a
device value back on the host. Under CUDA-graph capture the Python below runs once and the kernels it
enqueues are replayed; under torch.compile on CPU it is traced into the graph.

Padded rows (CUDA-graph / DP padding, always at the end of the token dimension) and every dummy run
(warm-up, memory profiling, graph capture: `valid_tokens` is 0 then) land in a sink column that is never
exported.
"""

from __future__ import annotations

import torch


class Recorder:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, device: torch.device | str,
                 capacity: int = 8192):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.device = torch.device(device)
        # Column num_experts is the sink for padded rows and ids outside [0, E) (e.g. -1 from masked routing).
        self.counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64, device=self.device)
        self.valid_tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self._sink = torch.tensor(num_experts, dtype=torch.int64, device=self.device)
        self._capacity = 0
        self._grow(capacity)
        self.seen_rows: set[int] = set()  # rows whose hook ran at least once (at trace/capture time on GPU)

    def _grow(self, tokens: int) -> None:
        self._capacity = max(tokens, 2 * self._capacity)
        self._positions = torch.arange(self._capacity, dtype=torch.int64, device=self.device)
        self._ones = torch.ones(self._capacity * self.top_k, dtype=torch.int64, device=self.device)

    def set_valid_tokens(self, n: int) -> None:
        """Called by the step hook before the forward pass (0 after it). One tiny fill, no sync."""
        self.valid_tokens.fill_(n)

    def record(self, row: int, topk_ids: torch.Tensor) -> None:
        """Add one layer's routing decisions. topk_ids: [T, k] logical expert ids (int32 or int64)."""
        self.seen_rows.add(row)
        tokens, k = topk_ids.shape
        if tokens * k > self._ones.numel():
            self._grow(tokens * k // self.top_k + 1)
        ids = topk_ids.to(torch.int64)
        keep = (self._positions[:tokens] < self.valid_tokens).unsqueeze(1) & (ids >= 0) & (ids < self.num_experts)
        ids = torch.where(keep, ids, self._sink)
        self.counts[row].index_add_(0, ids.reshape(-1), self._ones[: tokens * k])

    def host_counts(self, out: torch.Tensor | None = None, stream=None) -> torch.Tensor:
        """Copy counts to host without touching the compute stream (the caller waits on its own thread)."""
        if self.device.type == "cpu":
            return self.counts[:, : self.num_experts].clone()
        assert out is not None
        with torch.cuda.stream(stream):
            out.copy_(self.counts[:, : self.num_experts], non_blocking=True)
        return out
