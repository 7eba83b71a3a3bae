"""What the detector sees of a closed window: per (phase, tokens bucket) mean step time, worst imbalance.

The mean step time is the timed steps' (the plugin times a sample of the steps on CUDA): their summed duration over
their number, and that number is what --min-window-steps asks of a key, the sample the mean rests on."""

from __future__ import annotations

import math

import numpy as np

from moe_monitor.channel import PHASES
from moe_monitor.stats.imbalance import LayerStats

from .detector import WindowSignals

INT64_MAX = np.iinfo(np.int64).max


def signals_of(window, stats: LayerStats | None) -> WindowSignals:
    means = {}
    if window.timed_steps is not None:
        for p, phase in enumerate(PHASES):
            for t, bound in enumerate(window.token_bounds):
                n = int(window.timed_steps[p, t])
                if n > 0:
                    label = "+Inf" if int(bound) == INT64_MAX else str(int(bound))
                    means[(phase, label)] = (float(window.step_seconds[p, t]) / n, n)
    worst = layer = None
    if stats is not None and not np.isnan(stats.imbalance_ratio).all():
        row = int(np.nanargmax(stats.imbalance_ratio))
        worst, layer = float(stats.imbalance_ratio[row]), int(window.layer_ids[row])
        worst = None if math.isnan(worst) else worst
    return WindowSignals(window.end, means, worst, layer)
