"""T1: the per-layer histogram of expert load / mean load over closed windows (the expert-load heatmap)."""

from __future__ import annotations

import numpy as np
from prometheus_client.utils import floatToGoString

from ..exposition import Family, family
from ..reading import Reading
from ..windows import LOAD_RATIO_BUCKETS
from .base import DENSE, Collector, layer_labels

LES = tuple(floatToGoString(b) for b in LOAD_RATIO_BUCKETS)


def collect(r: Reading) -> list[Family]:
    f = family("moe_expert_load_ratio")
    h = r.load_histogram
    if h is None or h.buckets is None or h.sums is None:
        return [f]
    cumulative = np.cumsum(h.buckets, axis=1)
    layers = layer_labels(h.layer_ids)
    # Grouped by suffix rather than by layer: the text format allows it, and each group is one dense block.
    f.add_dense(DENSE.get(f.name + "_bucket", ("layer", "le"), (layers, LES)), cumulative)
    f.add_dense(DENSE.get(f.name + "_sum", ("layer",), (layers,)), h.sums)
    f.add_dense(DENSE.get(f.name + "_count", ("layer",), (layers,)), cumulative[:, -1])
    return [f]


COLLECTOR = Collector("load_histogram", "t1", collect, enabled=lambda config: config.load_histogram)
