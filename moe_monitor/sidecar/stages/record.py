"""Stage `flight`: each closed window's counts, EP-rank load and step statistics into the flight recorder's ring
(flight.py), and the record a capture stores beside its traces. Its errors count in the `window` row."""

from __future__ import annotations

from ..flight import FlightRecorder
from ..reading import Reading


class RecordFlight:
    name, errors_as = "flight", "window"
    required = False

    def __init__(self, recorder: FlightRecorder):
        self.recorder = recorder
        self.model = ""  # the served model as of the newest pass, named in the record

    def run(self, r: Reading) -> Reading:
        self.model = r.model
        if r.closed and self.recorder.enabled:
            self.recorder.record(r.window, r.window_rank_load)
        return r

    def fallback(self, r: Reading) -> Reading:
        return r

    def file(self, trigger: float):
        """The flight record a capture stores: the windows are taken now (on the window thread, when the capture
        starts), gzipped later on the capture's thread (0.14 s at 61 x 256 x 120 windows)."""
        return self.recorder.snapshot(model=self.model, trigger=trigger).gzipped

    def body(self, last: int | None = None, since: float | None = None, gzipped: bool = False) -> bytes:
        return self.recorder.body(self.model, last, since, gzipped)
