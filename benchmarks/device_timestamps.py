"""Can the step timer leave the host? A feasibility probe for issue #27's next step (not used by the plugin yet).

The plugin's remaining host cost per step is its event timer: two or three driver calls, 3.4-9.4 us each inside
vLLM's step (benchmarks/results/plugin_host_cost_h100.md, section 8). The alternative: kernels inside vLLM's CUDA
graph stamp the device's own clock (PTX `%globaltimer`, ns) and the step's token count into a ring in pinned host
memory, which the publisher reads with no CUDA call, as it already reads the counts' host mirror. Nothing runs on
the host per step.

What this checks, on a GPU, with a graph of [stamp, N small kernels, stamp] standing in for a step:
1. that Triton compiles a `%globaltimer` read and the stamp kernel writes pinned host memory from a graph replay;
2. the clock's resolution (the smallest non-zero difference seen) and its agreement with CUDA events around the
   same replays (the span stamped inside against the events' elapsed time outside);
3. what the stamp costs the device (the graph with and without the two stamps, events);
4. that the ring read on the host (numpy) is consistent after a synchronize, and never torn within a slot.

    . .gpu/device-env.sh; python3 benchmarks/device_timestamps.py
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
import triton
import triton.language as tl

RING = 64
SLOT = 4  # seq, start ns, end ns, tokens


@triton.jit
def moe_monitor_stamp_start(start_ptr):
    tl.store(start_ptr, tl.extra.cuda.globaltimer())  # PTX %globaltimer, ns


@triton.jit
def moe_monitor_stamp_end(start_ptr, seq_ptr, tokens_ptr, ring_ptr, R: tl.constexpr, S: tl.constexpr):
    now = tl.extra.cuda.globaltimer()
    n = tl.load(seq_ptr)
    slot = ring_ptr + (n % R) * S
    tl.store(slot + 1, tl.load(start_ptr))
    tl.store(slot + 2, now)
    tl.store(slot + 3, tl.load(tokens_ptr).to(tl.int64))
    tl.store(slot, n + 1)  # last: a reader takes a slot whose seq moved as not yet written
    tl.store(seq_ptr, n + 1)


def main() -> None:
    dev = torch.device("cuda", 0)
    start = torch.zeros((), dtype=torch.int64, device=dev)
    seq = torch.zeros((), dtype=torch.int64, device=dev)
    tokens = torch.full((), 7, dtype=torch.int32, device=dev)
    ring = torch.zeros(RING * SLOT, dtype=torch.int64).pin_memory()
    x = torch.zeros(4096, device=dev)

    def step(stamped: bool, kernels: int) -> None:
        if stamped:
            moe_monitor_stamp_start[(1,)](start)
        for _ in range(kernels):
            x.add_(1)
        if stamped:
            moe_monitor_stamp_end[(1,)](start, seq, tokens, ring, R=RING, S=SLOT)

    for kernels in (10, 500):
        graphs = {}
        for stamped in (True, False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step(stamped, kernels)  # warm-up: compiles the stamps outside the capture
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step(stamped, kernels)
            graphs[stamped] = g
        seq.zero_()
        ring.zero_()
        torch.cuda.synchronize()
        spans, events, plain = [], [], []
        for i in range(200):
            for stamped in (True, False):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graphs[stamped].replay()
                b.record()
                b.synchronize()
                (events if stamped else plain).append(a.elapsed_time(b) * 1e6)
            view = ring.numpy().reshape(RING, SLOT)
            n = int(view[:, 0].max())
            row = view[(n - 1) % RING]
            assert row[0] == n == i + 1, (row, n, i)  # one stamped replay per round
            assert row[3] == 7, row
            spans.append(int(row[2] - row[1]))
        diffs = sorted({b - a for a, b in zip(spans, spans[1:]) if b != a})
        resolution = min((abs(d) for d in diffs if d), default=0)
        under = [e - s for s, e in zip(spans, events)]
        print(f"--- a step of {kernels} kernels, 200 replays")
        print(f"stamped span (inside the graph)   median {statistics.median(spans) / 1e3:9.2f} us")
        print(f"events around the stamped graph   median {statistics.median(events) / 1e3:9.2f} us "
              f"(events - span: median {statistics.median(under) / 1e3:.2f} us, range "
              f"{min(under) / 1e3:.2f} to {max(under) / 1e3:.2f})")
        print(f"events around the unstamped graph median {statistics.median(plain) / 1e3:9.2f} us "
              f"(the two stamps cost the device {(statistics.median(events) - statistics.median(plain)) / 1e3:.2f} us)")
        print(f"smallest change between spans seen: {resolution} ns (an upper bound on the clock's resolution)")
    print("ring slots consistent after every replay; token count carried:", int(np.asarray(ring)[3]))


if __name__ == "__main__":
    main()
