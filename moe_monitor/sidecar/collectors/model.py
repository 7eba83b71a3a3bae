"""The served model: which layers moe-monitor can observe, and the model's shape."""

from __future__ import annotations

import numpy as np

from moe_monitor.channel import LAYER_UNOBSERVABLE

from ..exposition import Family, family
from ..reading import Reading
from .base import DENSE, Collector, layer_labels


def collect(r: Reading) -> list[Family]:
    counted = [s.snapshot for s in r.statuses if s.counted and s.snapshot is not None]  # counted ones are read
    observable = family("moe_layer_observable")
    unobservable: list[int] = []
    if counted:  # a layer is unobservable if any counted rank cannot see it
        ids = np.concatenate([s.layer_ids for s in counted])
        blind = np.concatenate([(s.layer_flags & LAYER_UNOBSERVABLE) != 0 for s in counted])
        layers, inverse = np.unique(ids, return_inverse=True)
        hidden = np.zeros(len(layers), dtype=bool)
        np.logical_or.at(hidden, inverse, blind)
        observable.add_dense(DENSE.get(observable.name, ("layer",), (layer_labels(layers),)),
                             (~hidden).astype(np.int64))
        unobservable = layers[hidden].tolist()
    n = family("moe_monitor_unobservable_layers")
    n.add(len(unobservable))
    out = [observable, n]
    if counted:
        h = counted[0].header
        info = family("moe_model_info")
        info.add(1, [("model", h.model), ("moe_layers", len(r.totals.layer_ids)), ("experts", h.shape.num_experts),
                     ("top_k", h.top_k)])
        out.append(info)
    return out


COLLECTOR = Collector("model", "t0", collect)
