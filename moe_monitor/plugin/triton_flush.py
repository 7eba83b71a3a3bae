"""One Triton kernel that counts a whole step's routing: ids [R, T, k] of R MoE layers → counts [L, E+1].

One program per layer: it walks the layer's T×k ids in blocks, masks padded rows (position >= valid_tokens)
and ids outside [0, E) into the sink column, sums the blocks' histograms (tl.histogram) in registers, and
adds the result to the layer's counters with plain loads and stores (no other program touches that row,
and steps are ordered on the stream). It also stores each changed counter into a **host mirror**: pinned
host memory the GPU writes through unified addressing, so the publisher thread reads fresh counts with no
CUDA call at all (docs/recorder.md: why no other thread may call CUDA while vLLM captures graphs).

Integer arguments are not specialised (`do_not_specialize`), so the only compiled variants are the block
sizes and the id dtype; `warm_up` compiles all of them when the plugin attaches, before vLLM's warm-up,
and no step ever waits for the compiler.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCKS = (16, 32, 64, 128, 256, 512, 1024)


# The kernel's name is what profiler traces show: the `moe_monitor_` prefix puts it in the breakdown's own
# `monitoring` row (moe_monitor/breakdown/categories.toml), so every capture shows what monitoring costs.
@triton.jit(do_not_specialize=["TK", "K", "E", "counts_stride", "ids_stride", "mirror_stride"])
def moe_monitor_count_routing(ids_ptr, rows_ptr, counts_ptr, mirror_ptr, valid_ptr, gate_ptr, step_ptr, TK, K, E,
                              counts_stride, ids_stride, mirror_stride, BLOCK: tl.constexpr, BINS: tl.constexpr,
                              IDS_BY_ROW: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r)
    base = ids_ptr + (row if IDS_BY_ROW else r) * ids_stride
    # the step's real tokens: the written count, plus vLLM's own count where the recorder reads it (gate 1)
    valid = (tl.load(valid_ptr) + tl.load(gate_ptr) * tl.load(step_ptr).to(tl.int64)).to(tl.int32)
    hist = tl.zeros((BINS,), dtype=tl.int32)
    for start in range(0, TK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_block = offs < TK
        ids = tl.load(base + offs, mask=in_block, other=-1).to(tl.int32)
        keep = in_block & (offs // K < valid) & (ids >= 0) & (ids < E)
        hist += tl.histogram(tl.where(keep, ids, E), BINS)
    bins = tl.arange(0, BINS)
    # Only real assignments: bin E (the sink) also holds the blocks' out-of-range lanes.
    changed = (bins < E) & (hist > 0)
    at = counts_ptr + row * counts_stride + bins
    new = tl.load(at, mask=changed, other=0) + hist.to(tl.int64)
    tl.store(at, new, mask=changed)
    tl.store(mirror_ptr + row * mirror_stride + bins, new, mask=changed)


@triton.jit(do_not_specialize=["n"])
def moe_monitor_set_valid_tokens(valid_ptr, n):
    """The step's real token count into the device scalar the counting kernel reads (a named kernel where
    `fill_` would be an anonymous `FillFunctor<long>`: traces show it in the `monitoring` row)."""
    tl.store(valid_ptr, n.to(tl.int64))


def set_valid_tokens(valid_tokens: torch.Tensor, n: int) -> None:
    moe_monitor_set_valid_tokens[(1,)](valid_tokens, n)


def block_for(tk: int) -> int:
    return min(BLOCKS[-1], max(BLOCKS[0], triton.next_power_of_2(max(tk, 1))))


def count_stacked(counts: torch.Tensor, mirror: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor,
                  valid: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_experts: int, tokens: int | None = None,
                  ids_by_row: bool = False) -> None:
    """ids: [R, T, K] with ids[r] counted into counts[rows[r]] (and mirror[rows[r]]); or, with ids_by_row, a
    [L, capacity, K] staging buffer whose row rows[r] holds that layer's ids and only its first `tokens`
    are read. mirror: pinned host int64 [L, E] (or any [L, >=E] int64 the GPU can address). valid: the
    recorder's (valid_tokens int64, gate int64, step_tokens int32) scalars: rows below valid + gate x step
    are real."""
    valid_tokens, gate, step_tokens = valid
    ids = ids.contiguous()
    T = ids.shape[1] if tokens is None else tokens
    K = ids.shape[2]
    TK = T * K
    bins = triton.next_power_of_2(num_experts + 1)
    moe_monitor_count_routing[(rows.numel(),)](ids, rows, counts, mirror, valid_tokens, gate, step_tokens, TK, K,
                                               num_experts, counts.stride(0), ids.stride(0), mirror.stride(0),
                                               BLOCK=block_for(TK), BINS=bins, IDS_BY_ROW=ids_by_row)


def tokens_per_variant(top_k: int) -> list[int]:
    """One token count per block size a step can use: 0 tokens, then doubling until the largest block."""
    out, seen, tokens = [], set(), 0
    while True:
        block = block_for(tokens * top_k)
        if block not in seen:
            seen.add(block)
            out.append(tokens)
        if block == BLOCKS[-1]:
            return out
        tokens = max(1, 2 * tokens)


def warm_up(device: torch.device, num_experts: int, top_k: int, dtypes=(torch.int32, torch.int64)) -> None:
    """Compile every variant the plugin can launch (each block size × id dtype × ids layout) on scratch
    buffers: real counts are untouched. Runs on the worker thread at attach time, before any capture."""
    counts = torch.zeros(1, num_experts + 1, dtype=torch.int64, device=device)
    mirror = torch.zeros(1, num_experts + 1, dtype=torch.int64, device=device)
    valid = torch.zeros((), dtype=torch.int64, device=device)
    scalars = (valid, torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int32,
                                                                                    device=device))
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    for dtype in dtypes:
        for tokens in tokens_per_variant(top_k):
            ids = torch.zeros(1, tokens, top_k, dtype=dtype, device=device)
            for by_row in (False, True):
                count_stacked(counts, mirror, ids, rows, scalars, num_experts, tokens=tokens, ids_by_row=by_row)
    for n in (0, 1 << 20):  # both integer widths Triton may pick for n stay within int32: one variant
        set_valid_tokens(valid, n)
    torch.cuda.synchronize(device)
