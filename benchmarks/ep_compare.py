"""EP-rank load: moe-monitor (the sidecar's moe_ep_rank_routed_tokens_total) against vLLM's own EPLB physical
load of the same steps (benchmarks/eplb_reference), from the runs of benchmarks/vllm_ep.py.

    .venv/bin/python benchmarks/ep_compare.py benchmarks/results/vllm_ep_h200/run6_dp2ep_eplb ...

Each directory holds the sidecar's metrics.txt and ep0.npz / ep1.npz (or eplb_reference/ep<r>.npz, as a run's
tarball has them). Prints per layer rank 0 / rank 1 load and the max/mean imbalance of: vLLM's physical load
(the truth), the same steps' logical counts split evenly over each step's replicas (moe-monitor's method with
exact timing) and moe-monitor's exported counter; and the largest differences in % of a layer's total.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from conftest import parse_exposition  # noqa: E402


def exported(path: str) -> np.ndarray:
    ep = {}
    for (name, labels), v in parse_exposition(open(path).read()).items():
        if name == "moe_ep_rank_routed_tokens_total":
            d = dict(labels)
            ep[(int(d["layer"]), int(d["ep_rank"]))] = v
    layers, ranks = 1 + max(k[0] for k in ep), 1 + max(k[1] for k in ep)
    return np.array([[ep[(layer, r)] for r in range(ranks)] for layer in range(layers)])


def figures(run: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """(moe-monitor's exported EP-rank load, vLLM's physical load per EP rank, the even split with exact timing,
    the ranks' reference files), each [layers, ranks]."""
    ref_dir = os.path.join(run, "eplb_reference") if os.path.isdir(os.path.join(run, "eplb_reference")) else run
    ours = exported(os.path.join(run, "metrics.txt"))
    R = ours.shape[1]
    refs = [np.load(os.path.join(ref_dir, f"ep{r}.npz")) for r in range(R)]
    load = sum(r["load"] for r in refs)
    L, S = load.shape
    return ours, load.reshape(L, R, S // R).sum(axis=2), sum(r["even_split_rank_load"] for r in refs), refs


def main(dirs: list[str]) -> None:
    for d in dirs:
        ours, truth, even, refs = figures(d)
        total = truth.sum(axis=1).min()
        print(f"{d}: vLLM steps per rank {[int(r['steps']) for r in refs]}, placements seen "
              f"{[int(r['placements']) for r in refs]}; assignments per layer: moe-monitor "
              f"{ours.sum(axis=1).astype(int).tolist()}, vLLM {truth.sum(axis=1).tolist()}")
        for name, a in (("vLLM physical (truth)", truth), ("even split, exact timing", even), ("moe-monitor", ours)):
            loads = " ".join("/".join(f"{x:.0f}" for x in row) for row in a)
            print(f"  {name:26s} {loads}   imbalance {np.round(a.max(axis=1) / a.mean(axis=1), 3).tolist()}")
        for name, a, b in (("moe-monitor vs truth", ours, truth), ("even split vs truth", even, truth),
                           ("moe-monitor vs even split", ours, even)):
            print(f"  max |{name}|: {100 * np.abs(a - b).max() / total:.2f} % of a layer's assignments")


if __name__ == "__main__":
    main(sys.argv[1:])
