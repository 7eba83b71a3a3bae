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
    step_count: np.ndarray | None = None  # [phase, tokens bucket] engine steps in the window
    step_seconds: np.ndarray | None = None  # [phase, tokens bucket] their summed duration
    token_bounds: np.ndarray | None = None


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
        steps = (totals.step_hist.sum(axis=2), totals.step_seconds) if totals.step_hist is not None else None
        base, self._base = self._base, (boundary, layers, counts, steps)
        if base is None or base[1] != layers or base[2].shape != counts.shape:
            return None
        start, _, previous, previous_steps = base
        delta = counts - previous
        if (delta < 0).any():  # cannot happen with monotonic totals; never report negative load
            return None
        step_count = step_seconds = None
        if steps is not None and previous_steps is not None and steps[0].shape == previous_steps[0].shape:
            step_count, step_seconds = steps[0] - previous_steps[0], steps[1] - previous_steps[1]
        return Window(start, boundary, np.asarray(layers, dtype=np.int64), delta, step_count, step_seconds,
                      totals.token_bounds)
