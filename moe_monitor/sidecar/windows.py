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


def next_boundary(now: float, length_s: float) -> float:
    return (math.floor(now / length_s) + 1) * length_s


class Windower:
    def __init__(self, length_s: float):
        if not length_s > 0:
            raise ValueError("window length must be > 0")
        self.length_s = length_s
        self._base: tuple[float, tuple[int, ...], np.ndarray] | None = None

    def close(self, boundary: float, totals: Totals) -> Window | None:
        """Close the window ending at `boundary` given the cumulative totals read there. None while there
        is no baseline yet (first boundary, or the model changed)."""
        layers, counts = totals.layer_ids, totals.counts
        if counts is None or not layers:
            self._base = None
            return None
        base, self._base = self._base, (boundary, layers, counts)
        if base is None or base[1] != layers or base[2].shape != counts.shape:
            return None
        start, _, previous = base
        delta = counts - previous
        if (delta < 0).any():  # cannot happen with monotonic totals; never report negative load
            return None
        return Window(start, boundary, np.asarray(layers, dtype=np.int64), delta)
