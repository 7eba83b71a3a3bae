"""Windows: per-window deltas of the cumulative (monotonic) totals, closed at wall-clock boundaries.

Boundaries are multiples of the window length since the Unix epoch, so every sidecar of a fleet closes its
windows at the same instants. The first boundary after the sidecar starts only records a baseline: a
restarted sidecar never reports the whole history as one window. vLLM restarts need nothing here: the
aggregator's totals are already monotonic across them. A change of model (other layers or experts) starts
a new baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .aggregate import Totals


@dataclass(frozen=True)
class Window:
    start: float  # unix seconds
    end: float
    layer_ids: np.ndarray  # [L] model layer index of each row
    counts: np.ndarray  # [L, E] assignments routed in the window
    timed_steps: np.ndarray | None = None  # [phase, tokens bucket] engine steps timed in the window (a sample)
    step_seconds: np.ndarray | None = None  # [phase, tokens bucket] the timed steps' summed duration
    token_bounds: np.ndarray | None = None
    step_count: np.ndarray | None = None  # [phase, tokens bucket] every engine step in the window


def next_boundary(now: float, length_s: float) -> float:
    return (math.floor(now / length_s) + 1) * length_s


class Windower:
    def __init__(self, length_s: float):
        if not length_s > 0:
            raise ValueError("window length must be > 0")
        self.length_s = length_s
        self._base: tuple | None = None

    def close(self, boundary: float, totals: Totals) -> Window | None:
        """Close the window ending at `boundary` given the cumulative totals read there. None while there
        is no baseline yet (first boundary, or the model changed)."""
        layers, counts = totals.layer_ids, totals.counts
        if counts is None or not layers:
            self._base = None
            return None
        steps = None
        if totals.step_hist is not None:
            steps = (totals.step_hist.sum(axis=2), totals.step_seconds, totals.step_count)
        base, self._base = self._base, (boundary, layers, counts, steps)
        if base is None or base[1] != layers or base[2].shape != counts.shape:
            return None
        start, _, previous, previous_steps = base
        delta = counts - previous
        if (delta < 0).any():  # cannot happen with monotonic totals; never report negative load
            return None
        timed = step_seconds = step_count = None
        if steps is not None and previous_steps is not None and steps[0].shape == previous_steps[0].shape:
            timed, step_seconds, step_count = (now - then for now, then in zip(steps, previous_steps))
        return Window(start, boundary, np.asarray(layers, dtype=np.int64), delta, timed, step_seconds,
                      totals.token_bounds, step_count)


LOAD_RATIO_BUCKETS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, float("inf"))


@dataclass
class LoadHistogram:
    """Cumulative per-layer histogram of expert load / mean load, one observation per expert per window."""

    layer_ids: tuple[int, ...] = ()
    buckets: np.ndarray | None = None  # [L, B] non-cumulative
    sums: np.ndarray | None = None  # [L]

    def observe(self, window: Window, imbalance_ratio: np.ndarray) -> None:
        """`imbalance_ratio` NaN marks a layer whose window was too small to observe (see stats.imbalance)."""
        layers = tuple(int(x) for x in window.layer_ids)
        if layers != self.layer_ids or self.buckets is None or self.sums is None:
            self.layer_ids = layers
            self.buckets = np.zeros((len(layers), len(LOAD_RATIO_BUCKETS)), dtype=np.int64)
            self.sums = np.zeros(len(layers))
        ok = ~np.isnan(imbalance_ratio)
        if not ok.any():
            return
        c = window.counts[ok].astype(np.float64)
        ratio = c / (c.sum(axis=1, keepdims=True) / c.shape[1])
        idx = np.searchsorted(np.asarray(LOAD_RATIO_BUCKETS), ratio, side="left")
        rows = np.repeat(np.flatnonzero(ok), c.shape[1])
        np.add.at(self.buckets, (rows, idx.reshape(-1)), 1)
        self.sums[ok] += ratio.sum(axis=1)

    def copy(self) -> LoadHistogram:
        return LoadHistogram(self.layer_ids, None if self.buckets is None else self.buckets.copy(),
                             None if self.sums is None else self.sums.copy())
