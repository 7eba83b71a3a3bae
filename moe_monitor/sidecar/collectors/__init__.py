"""The sidecar's collectors, one module per family group, in exposition order. Each is a `Collector`
(name, tier, collect(reading), enabled(config)); docs/metrics.md lists which families each one owns."""

from __future__ import annotations

from . import (
    balance,
    breakdown,
    captures,
    detector,
    ep_ranks,
    eplb,
    health,
    imbalance_cost,
    load_histogram,
    model,
    routing,
    steps,
)
from .base import Collector, Runner

ALL: tuple[Collector, ...] = tuple(m.COLLECTOR for m in (
    model, balance, steps, eplb, ep_ranks, load_histogram, routing, breakdown, imbalance_cost, detector, captures,
    health))

__all__ = ["ALL", "Collector", "Runner"]
