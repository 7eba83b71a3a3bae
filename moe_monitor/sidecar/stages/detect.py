"""Stage `detect`: a closed window goes to the capture control (capture/control.py: the detector, and a capture
when it decides so); the detector's state, baselines and current values copied into the reading."""

from __future__ import annotations

from dataclasses import replace

from moe_monitor.capture.control import CaptureControl
from moe_monitor.detect.detector import Detector

from ..reading import DetectorView, Reading, frozen


class Detect:
    name = errors_as = "detect"
    required = False

    def __init__(self, detector: Detector, control: CaptureControl):
        self.detector, self.control = detector, control

    def run(self, r: Reading) -> Reading:
        if r.closed:
            ranks = sum(1 for s in r.statuses if s.snapshot is not None and not s.ignored)
            self.control.observe(r.window, r.stats, ranks)
        return self.fallback(r)

    def fallback(self, r: Reading) -> Reading:
        d = self.detector
        return replace(r, detector=DetectorView(d.state(r.now), frozen(d.baselines), frozen(d.currents)))
