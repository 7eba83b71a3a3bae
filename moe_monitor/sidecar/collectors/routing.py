"""T2: the top-K experts per layer (`--expert-series top`), and with `all`, the fullest tier, routed tokens per
layer x expert as well: `all` is a superset of `top`, so every panel and rule that reads the top-K gauges has
data under either (the K gauges cost 2 L·K series next to the L·E counters)."""

from __future__ import annotations

import numpy as np

from ..exposition import Family, family
from ..reading import Reading
from .base import DENSE, Collector, layer_labels


def collect(r: Reading) -> list[Family]:
    return (_all(r) if r.config.expert_series == "all" else []) + _top(r)


def _all(r: Reading) -> list[Family]:
    f = family("moe_expert_routed_tokens_total")
    totals = r.totals
    if totals.counts is not None:
        experts = tuple(map(str, range(totals.counts.shape[1])))
        f.add_dense(DENSE.get(f.name, ("layer", "expert"), (layer_labels(totals.layer_ids), experts)), totals.counts)
    return [f]


def _top(r: Reading) -> list[Family]:
    ids, share = family("moe_layer_top_expert_id"), family("moe_layer_top_expert_share")
    window = r.window
    if window is not None:
        k = min(r.config.top_experts, window.counts.shape[1])
        order = np.argsort(-window.counts, axis=1, kind="stable")[:, :k]
        totals = window.counts.sum(axis=1)
        for row, layer in enumerate(window.layer_ids):
            if totals[row] == 0:
                continue
            for rank, expert in enumerate(order[row], start=1):
                ids.add(int(expert), [("layer", int(layer)), ("rank", rank)])
                share.add(float(window.counts[row, expert] / totals[row]), [("layer", int(layer)), ("rank", rank)])
    return [ids, share]


COLLECTOR = Collector("routing", "t2", collect, enabled=lambda config: config.expert_series != "none")
