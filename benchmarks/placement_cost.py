"""Host cost of following vLLM's EPLB placement in the plugin (moe_monitor/plugin/placement.py), at DeepSeek-V3
scale: 61 MoE layers x 256 experts, 288 physical slots (32 redundant), 32 EP ranks.

    .venv/bin/python benchmarks/placement_cost.py

A per-layer commit runs on vLLM's main thread between steps while async EPLB moves layers (one per step); a
whole-model commit once per synchronous rearrangement; rank_load() on the publisher thread at every publish.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_monitor.plugin.placement import LivePlacement  # noqa: E402


def main(L: int = 61, E: int = 256, S: int = 288, R: int = 32, n: int = 300) -> None:
    rng = np.random.default_rng(0)
    p2l = np.stack([np.concatenate([np.arange(E), rng.integers(0, E, S - E)]) for _ in range(L)])
    counts = np.zeros((L, E), dtype=np.int64)
    live = LivePlacement(None, p2l, R, lambda: counts.copy())
    counts += rng.integers(0, 10**6, (L, E))
    for name, fn in (("per-layer commit (async EPLB, vLLM's main thread)",
                      lambda i: live.commit(p2l[i % L], layer=i % L)),
                     ("whole-model commit (sync EPLB, vLLM's main thread)", lambda i: live.commit(p2l)),
                     ("rank_load() (publisher thread, every publish)", lambda i: live.rank_load())):
        times = []
        for i in range(n):
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
        print(f"{name:52s} median {1e3 * np.median(times):.3f} ms, p99 {1e3 * np.percentile(times, 99):.3f} ms")


if __name__ == "__main__":
    main()
