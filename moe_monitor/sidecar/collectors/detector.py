"""The regression detector: its state, and each signal's baseline and current value."""

from __future__ import annotations

from moe_monitor.schema.vocabulary import DETECTOR_STATES

from ..exposition import Family, family
from ..reading import Reading
from .base import Collector


def collect(r: Reading) -> list[Family]:
    d = r.detector
    assert d is not None, "the exporter gives every reading its detector view"
    state = family("moe_detector_state")
    for name in DETECTOR_STATES:
        state.add(1 if name == d.state else 0, [("state", name)])
    baseline, current = family("moe_detector_baseline"), family("moe_detector_current")
    for (signal, phase, tokens), value in sorted(d.baselines.items()):
        baseline.add(value, [("signal", signal), ("phase", phase), ("tokens_le", tokens)])
    for (signal, phase, tokens), value in sorted(d.currents.items()):
        current.add(value, [("signal", signal), ("phase", phase), ("tokens_le", tokens)])
    return [state, baseline, current]


COLLECTOR = Collector("detector", "t0", collect)
