"""Device-side routing counter: counts (token, expert) assignments per MoE layer into one persistent buffer.

Graph-safe by construction: the number of real tokens is a device scalar written before each step, nothing
reads a device value back on the host, and every kernel reads and writes tensors whose addresses are stable
across CUDA-graph replays. Padded rows (CUDA-graph / DP padding, always at the end of the token dimension),
ids outside [0, E) and every dummy run (warm-up, memory profiling, graph capture: `valid_tokens` is 0
then) land in a sink column that is never exported.

Strategies, same counts (tests/test_plugin_cpu.py, tests/test_recorder_gpu.py, benchmarks/recorder_gpu.py):

- `per_layer`: each layer's tap masks its ids and does one `index_add_` (about four small kernels per layer).
  The CPU strategy, traced by torch.compile there. The counters are host memory.
- `fused` (CUDA default): each layer's tap only keeps a reference to its `topk_ids`; the last MoE layer's
  tap stacks the step's ids and counts them all with one Triton kernel (triton_flush.py): a constant number
  of kernels per step, none per layer. The references live until that flush and no longer: under CUDA-graph
  capture that keeps a layer's ids from being reused by a later allocation of the same graph, and frees them
  for the next capture in the pool (vLLM captures every batch size into one pool; its graphs replay one at a
  time, each writing its ids before its flush reads them: tests/test_recorder_gpu.py). Keeping them for the
  graph's lifetime instead would hold memory per captured size and shift the pool's layout for every later,
  smaller capture (benchmarks/results/vllm_cost_h200.md).
- `staged` (CUDA): each tap copies its ids into a persistent staging buffer allocated before any capture
  (one copy kernel per layer), and the same kernel counts the buffer after the last layer. Nothing is held
  in the CUDA graph's memory pool, so the graph's own allocations are laid out exactly as without the
  recorder (docs/recorder.md: why that matters for measurement).

On CUDA the step's token count is written by the driver's stream write (cuda_driver.py: no kernel, ~2 us of
host time alone; a Triton kernel where that call is unusable), and the counting kernel is a Triton kernel named
`moe_monitor_*`, so profiler traces show it by name in the breakdown's `monitoring` row. The
exceptions are copies: the fused mode's `torch.stack` (one `CatArrayBatchedCopy`, right before the counting
kernel: attributed by its position) and the staged mode's per-layer copies. The counting kernel also writes
every counter it changes into `mirror`, pinned host memory: the publisher thread reads counts from there with
no CUDA call, so nothing but vLLM's own worker thread ever calls CUDA (docs/recorder.md, "Capture safety").
The kernel variants are compiled when the recorder is built.
"""

from __future__ import annotations

import numpy as np
import torch

MODES = ("per_layer", "fused", "staged")
CUDA_MODES = ("fused", "staged")


def default_mode(device: torch.device) -> str:
    return "fused" if device.type == "cuda" else "per_layer"


class Recorder:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, device: torch.device | str,
                 capacity: int = 8192, mode: str | None = None,
                 id_dtypes: tuple[torch.dtype, ...] = (torch.int32, torch.int64)):
        """id_dtypes: the dtypes of the ids taps will record (routers give int32/int64, routed-experts sinks
        int16); on CUDA the counting kernel is compiled for each of them here, before any capture."""
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" is the current device: name it, so
            self.device = torch.device("cuda", torch.cuda.current_device())  # it compares equal to its tensors'
        self.mode = mode or default_mode(self.device)
        if self.mode not in MODES:
            raise ValueError(f"recorder mode {self.mode!r} is not one of {MODES}")
        if (self.mode in CUDA_MODES) != (self.device.type == "cuda"):
            raise ValueError(f"the {self.mode} recorder does not run on {self.device.type}: on CUDA use one of "
                             f"{CUDA_MODES}, elsewhere per_layer")
        # Column num_experts is the sink for padded rows and ids outside [0, E).
        self.counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.int64, device=self.device)
        # The step's real token count, as the counting reads it: valid_tokens + gate x step_tokens. Either the
        # hooks write valid_tokens every step (gate 0), or vLLM's own per-step buffer is read (read_step_tokens_from:
        # valid_tokens stays 0, gate is 1 in real steps and 0 in dummy runs), which costs the host nothing a step.
        self.valid_tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self.gate = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step_tokens = torch.zeros((), dtype=torch.int32, device=self.device)
        self._sink = torch.tensor(num_experts, dtype=torch.int64, device=self.device)
        self._one = torch.ones(1, dtype=torch.int64, device=self.device)
        self._capacity = 0
        self._retired: list[torch.Tensor] = []  # graphs captured earlier may still read these
        self._grow(capacity)
        self._row_tensors: dict[tuple[int, ...], torch.Tensor] = {}
        self.seen_rows: set[int] = set()  # rows whose hook ran at least once (at trace/capture time on GPU)
        self.failed = False  # set by a Tap whose record() raised: nothing is recorded any more
        self.last_row = num_layers - 1  # the fused flush runs after this row's tap
        self._tapped_rows = list(range(num_layers))
        self._pending: dict[int, torch.Tensor] = {}
        self._staged_tokens = 0  # staged mode: tokens of the step whose ids are in the buffer, not yet counted
        self.mirror = None  # CUDA: pinned host copy of counts[:, :E], written by the counting kernel
        self.driver = None  # CUDA: (cuda_driver.Driver, current-stream getter), or None where unusable
        self._stream_write = None  # CUDA: (write_u64, current-stream getter) of the driver, where usable
        if self.device.type == "cuda":
            from . import cuda_driver, triton_flush

            self.mirror = torch.zeros(num_layers, num_experts, dtype=torch.int64, pin_memory=True)
            self._count_stacked = triton_flush.count_stacked
            self._set_valid_tokens = triton_flush.set_valid_tokens
            triton_flush.warm_up(self.device, num_experts, top_k, id_dtypes)
            self.driver = cuda_driver.load(self.device)
            if self.driver is not None:
                driver, stream = self.driver
                self._stream_write = driver.write_u64, stream

    def _grow(self, tokens: int) -> None:
        if self._capacity:  # graphs captured earlier still read the old buffers: keep them allocated
            self._retired.append(self._positions)
            if self.mode == "staged":
                self._retired.append(self._stage)
        self._capacity = max(tokens, 2 * self._capacity)
        self._positions = torch.arange(self._capacity, dtype=torch.int64, device=self.device)
        if self.mode == "staged":
            self._stage = torch.full((self.num_layers, self._capacity, self.top_k), -1, dtype=torch.int32,
                                     device=self.device)

    def set_valid_tokens(self, n: int) -> None:
        """Called by the step hook before the forward pass, and with 0 before any forward that is not a step
        (vLLM's dummy runs). No sync. On CUDA a stream write of the driver (~2 us of host time alone), else a
        one-thread Triton kernel (~11 us alone: its Python launcher); on CPU a fill (benchmarks/cuda_call_cost.py).
        A step boundary: ids still pending (a step that never reached the last row) are counted first,
        with the valid count of their own step."""
        if self._pending:
            self.flush()
        if self._staged_tokens:
            self._flush_staged()
        self._write_scalar(self.valid_tokens, n)

    def _write_scalar(self, scalar: torch.Tensor, n: int) -> None:
        """n into a 0-d int64 device scalar in stream order, no sync: the driver's stream write where usable, a
        one-thread Triton kernel on CUDA otherwise, a fill on CPU."""
        if self._stream_write is not None:
            write, stream = self._stream_write
            write(stream(), scalar.data_ptr(), n)
        elif self.mirror is not None:
            self._set_valid_tokens(scalar, n)
        else:
            scalar.fill_(n)

    def read_step_tokens_from(self, tokens: torch.Tensor) -> None:
        """Count the first `tokens` rows of every step: a 0-d int32 tensor on the recorder's device that vLLM
        fills before each step's forward (the last element of its query_start_loc buffer, which it pads with the
        step's token count). From then on the step hooks write nothing; `set_gate(False)` around vLLM's dummy
        runs keeps them from counting (they leave that element at the last real step's count). Call before any
        CUDA-graph capture: the counting kernel reads this address at every replay."""
        if tokens.dim() != 0 or tokens.dtype != torch.int32 or tokens.device != self.device:
            raise ValueError(f"step tokens must be a 0-d int32 tensor on {self.device}, not {tokens.dtype} "
                             f"{tuple(tokens.shape)} on {tokens.device}")
        self.set_valid_tokens(0)
        self.step_tokens = tokens
        self.set_gate(True)

    def set_gate(self, open_: bool) -> None:
        """1: count vLLM's step tokens (read_step_tokens_from); 0: count only `valid_tokens` (0 in a dummy run)."""
        self._write_scalar(self.gate, int(open_))

    def stop_reading_step_tokens(self) -> None:
        """Back to the written count (the hooks call set_valid_tokens every step again). Graphs captured while
        reading vLLM's buffer keep working: they read the same three scalars."""
        self.set_gate(False)

    def record(self, row: int, topk_ids: torch.Tensor) -> None:
        """One layer's routing decisions. topk_ids: [T, k] logical expert ids (int32 or int64)."""
        self.seen_rows.add(row)
        if topk_ids.shape[0] > self._capacity:
            self._grow(topk_ids.shape[0])
        if self.mode == "per_layer":
            self._count(row, topk_ids)
            return
        if self.mode == "staged":
            T = topk_ids.shape[0]
            self._stage[row, :T].copy_(topk_ids)
            self._staged_tokens = T
            if row == self.last_row:
                self._flush_staged()
            return
        if row in self._pending:  # the previous step never reached the last row: count what it had
            self.flush()
        self._pending[row] = topk_ids
        if row == self.last_row:
            self.flush()

    def flush(self) -> None:
        """Count every pending layer of this step (fused mode)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        by_shape: dict[tuple, list[int]] = {}
        for row, ids in pending.items():
            by_shape.setdefault((tuple(ids.shape), ids.dtype), []).append(row)
        for rows in by_shape.values():  # one group in practice: every layer of a step sees the same tokens
            self._count_stacked(self.counts, self.mirror, torch.stack([pending[r] for r in rows]),
                                self._row_index(rows), self._valid_args(), self.num_experts)

    def _flush_staged(self) -> None:
        """Count the staging buffer's rows of the tapped layers: one kernel, reading [:T] of each row."""
        T, self._staged_tokens = self._staged_tokens, 0
        if T:
            self._count_stacked(self.counts, self.mirror, self._stage, self._row_index(self._tapped_rows),
                                self._valid_args(), self.num_experts, tokens=T, ids_by_row=True)

    def _valid_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.valid_tokens, self.gate, self.step_tokens

    def set_rows(self, rows: list[int]) -> None:
        """The rows whose taps are installed (attach calls this before any forward pass): the fused
        flush runs after the last of them, and its row index is built now, not inside a graph capture."""
        self.last_row = max(rows)
        self._tapped_rows = sorted(rows)
        self._row_index(self._tapped_rows)

    def _row_index(self, rows: list[int]) -> torch.Tensor:
        key = tuple(rows)
        if key not in self._row_tensors:
            self._row_tensors[key] = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return self._row_tensors[key]

    def _count(self, row: int, ids: torch.Tensor) -> None:
        """ids: [T, k] of one layer. Masks and adds with torch ops (~5 kernels)."""
        T, k = ids.shape
        ids = ids.to(torch.int64)
        valid = self.valid_tokens + self.gate * self.step_tokens
        keep = (self._positions[:T] < valid).view(T, 1) & (ids >= 0) & (ids < self.num_experts)
        self.counts[row].index_add_(0, torch.where(keep, ids, self._sink).reshape(-1), self._one.expand(T * k))

    def host_counts(self) -> np.ndarray:
        """[L, E] counts read from host memory only: safe on any thread, at any time, even while vLLM
        captures CUDA graphs. A read may mix two steps across layers (never within one counter)."""
        if self.mirror is not None:
            return self.mirror.numpy().copy()
        return self.counts[:, : self.num_experts].numpy().copy()
