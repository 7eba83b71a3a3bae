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

Where the kernel is launched from Python every step (vLLM's `--enforce-eager`; under CUDA graphs the launch is
captured once), `JITFunction.run` binds and specialises the arguments and looks the variant up again at every
launch: ~25 us of host time. `warm_up` keeps each compiled variant and proves that launching it directly through
its compiled launcher counts exactly what the JIT path counts; then eager steps launch it that way (`_direct`).
Under torch.compile's tracing the JIT path is kept (dynamo traces it into the graph), and where the check fails
(another Triton's launcher signature) the JIT path is used everywhere.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

BLOCKS = (16, 32, 64, 128, 256, 512, 1024)


# The kernel's name is what profiler traces show: the `moe_monitor_` prefix puts it in the breakdown's own
# `monitoring` row (moe_monitor/breakdown/categories.toml), so every capture shows what monitoring costs.
@triton.jit(do_not_specialize=["TK", "K", "E", "counts_stride", "ids_stride", "mirror_stride"])
def moe_monitor_count_routing(ids_ptr, rows_ptr, counts_ptr, mirror_ptr, valid_ptr, TK, K, E, counts_stride,
                              ids_stride, mirror_stride, BLOCK: tl.constexpr, BINS: tl.constexpr,
                              IDS_BY_ROW: tl.constexpr):
    r = tl.program_id(0)
    row = tl.load(rows_ptr + r)
    base = ids_ptr + (row if IDS_BY_ROW else r) * ids_stride
    valid = tl.load(valid_ptr).to(tl.int32)
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


_compiled: dict[tuple, object] = {}  # (BLOCK, BINS, IDS_BY_ROW, ids dtype) -> Triton's CompiledKernel
_direct = False  # launch _compiled variants through their launcher (proved by warm_up)
direct_why_not = "not checked yet"  # why the direct launch is not used ('' when it is)


def count_stacked(counts: torch.Tensor, mirror: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor,
                  valid_tokens: torch.Tensor, num_experts: int, tokens: int | None = None,
                  ids_by_row: bool = False, direct: bool | None = None) -> None:
    """ids: [R, T, K] with ids[r] counted into counts[rows[r]] (and mirror[rows[r]]); or, with ids_by_row, a
    [L, capacity, K] staging buffer whose row rows[r] holds that layer's ids and only its first `tokens`
    are read. mirror: pinned host int64 [L, E] (or any [L, >=E] int64 the GPU can address).
    direct: force (True) or forbid (False) the direct launch; None: as warm_up decided."""
    ids = ids.contiguous()
    T = ids.shape[1] if tokens is None else tokens
    K = ids.shape[2]
    TK = T * K
    bins = triton.next_power_of_2(num_experts + 1)
    block = block_for(TK)
    args = (ids, rows, counts, mirror, valid_tokens, TK, K, num_experts, counts.stride(0), ids.stride(0),
            mirror.stride(0))
    if _direct if direct is None else direct:
        kernel = _compiled.get((block, bins, ids_by_row, ids.dtype))
        if kernel is not None and not torch.compiler.is_compiling() and ids.data_ptr() % 16 == 0:
            grid, stream = (rows.numel(), 1, 1), _raw_stream(ids.device.index)
            enter, leave = _launch_hooks()  # as JITFunction.run does: torch may install one (its profiler's)
            meta = kernel.launch_metadata(grid, stream, *args, block, bins, ids_by_row) if enter else None
            kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *args, block, bins,
                       ids_by_row)
            return
    kernel = moe_monitor_count_routing[(rows.numel(),)](*args, BLOCK=block, BINS=bins, IDS_BY_ROW=ids_by_row)
    if kernel is not None and ids.numel() and not torch.compiler.is_compiling():
        # Kept from a launch on real ids only: an empty tensor's null pointer may be specialised differently.
        _compiled[(block, bins, ids_by_row, ids.dtype)] = kernel


def _raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def _launch_hooks():
    """Triton's launch enter/exit hooks (None when unset), which every launch passes to the launcher."""
    runtime = triton.knobs.runtime
    return runtime.launch_enter_hook, runtime.launch_exit_hook


def prove_direct(device: torch.device, num_experts: int, top_k: int, dtypes) -> str:
    """'' when launching every compiled variant directly counts exactly what the JIT path counts on the same ids
    (random ids, some out of range, a partial valid count), else why not."""
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):
        return "this torch has no raw current-stream accessor"
    _launch_hooks()  # this Triton has knobs.runtime's launch hooks (3.4+): AttributeError otherwise
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    for dtype in dtypes:
        for tokens in tokens_per_variant(top_k):
            ids = torch.randint(-1, num_experts + 2, (1, max(tokens, 1), top_k), generator=gen).to(dtype).to(device)
            valid = torch.tensor(max(tokens, 1) - (tokens > 1), dtype=torch.int64, device=device)
            got = []
            for direct in (False, True):
                counts = torch.zeros(1, num_experts + 1, dtype=torch.int64, device=device)
                mirror = torch.zeros(1, num_experts + 1, dtype=torch.int64, device=device)
                for by_row in (False, True):
                    count_stacked(counts, mirror, ids, rows, valid, num_experts, tokens=ids.shape[1],
                                  ids_by_row=by_row, direct=direct)
                got.append((counts.tolist(), mirror.tolist()))
            if got[0] != got[1]:
                return f"the direct launch counted {got[1]} where the JIT path counted {got[0]}"
            if not any(x for x in got[0][0][0]):
                return "the check's ids counted nothing"
    return ""


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
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    for dtype in dtypes:
        for tokens in sorted({1, *tokens_per_variant(top_k)}):  # 1 beside 0: the direct launch keeps real-id variants
            ids = torch.zeros(1, tokens, top_k, dtype=dtype, device=device)
            for by_row in (False, True):
                count_stacked(counts, mirror, ids, rows, valid, num_experts, tokens=tokens, ids_by_row=by_row)
    for n in (0, 1 << 20):  # both integer widths Triton may pick for n stay within int32: one variant
        set_valid_tokens(valid, n)
    global _direct, direct_why_not
    try:
        why_not = prove_direct(device, num_experts, top_k, dtypes)
    except Exception as e:  # noqa: BLE001 - another Triton's launcher: keep the JIT path
        why_not = f"{type(e).__name__}: {e}"
    _direct, direct_why_not = not why_not, why_not
    if why_not:
        log.info("moe-monitor: eager steps launch the counting kernel through Triton's JIT (~25 us a step): %s",
                 why_not)
    torch.cuda.synchronize(device)
