"""T1: cumulative assignments served by each EP rank, per layer, under the expert placement."""

from __future__ import annotations

from ..exposition import Family, family
from ..reading import Reading
from .base import DENSE, Collector, layer_labels


def collect(r: Reading) -> list[Family]:
    load = r.cumulative_rank_load
    if load is None:
        return []
    f = family("moe_ep_rank_routed_tokens_total")
    ranks = tuple(map(str, range(load.shape[1])))
    f.add_dense(DENSE.get(f.name, ("layer", "ep_rank"), (layer_labels(r.totals.layer_ids), ranks)), load)
    return [f]


COLLECTOR = Collector("ep_ranks", "t1", collect, enabled=lambda config: config.rank_series)
