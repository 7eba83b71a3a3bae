"""One Triton kernel that counts a whole step's routing: ids [R, T, k] of R MoE layers → counts [L, E+1].

Each program takes one layer's block of ids, masks padded rows (position >= valid_tokens) and ids outside
[0, E) into the sink column, builds the block's histogram in registers (tl.histogram) and adds it to the
layer's counters with one atomic per bin, so contention does not grow with tokens per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(ids_ptr, rows_ptr, counts_ptr, valid_ptr, TK, K, E, counts_stride, ids_stride,
                  BLOCK: tl.constexpr, BINS: tl.constexpr, IDS_BY_ROW: tl.constexpr):
    r = tl.program_id(0)
    b = tl.program_id(1)
    row = tl.load(rows_ptr + r)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    in_block = offs < TK
    base = ids_ptr + (row if IDS_BY_ROW else r) * ids_stride
    ids = tl.load(base + offs, mask=in_block, other=-1).to(tl.int32)
    valid = tl.load(valid_ptr).to(tl.int32)
    keep = in_block & (offs // K < valid) & (ids >= 0) & (ids < E)
    binned = tl.where(keep, ids, E)
    hist = tl.histogram(binned, BINS)
    bins = tl.arange(0, BINS)
    # Only real assignments are added: bin E (the sink) would also hold the block's out-of-range lanes.
    tl.atomic_add(counts_ptr + row * counts_stride + bins, hist.to(tl.int64), mask=(bins < E) & (hist > 0))


def count_stacked(counts: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, valid_tokens: torch.Tensor,
                  num_experts: int, tokens: int | None = None, ids_by_row: bool = False) -> None:
    """ids: [R, T, K] with ids[r] counted into counts[rows[r]]; or, with ids_by_row, a [L, capacity, K]
    staging buffer whose row rows[r] holds that layer's ids and only its first `tokens` are read."""
    ids = ids.contiguous()
    R = rows.numel()
    T = ids.shape[1] if tokens is None else tokens
    K = ids.shape[2]
    TK = T * K
    block = min(1024, max(16, triton.next_power_of_2(TK)))
    bins = triton.next_power_of_2(num_experts + 1)
    grid = (R, triton.cdiv(TK, block))
    _count_kernel[grid](ids, rows, counts, valid_tokens, TK, K, num_experts, counts.stride(0), ids.stride(0),
                        BLOCK=block, BINS=bins, IDS_BY_ROW=ids_by_row)
