"""Publisher thread: writes the rank's segment from host memory at a fixed cadence.

It does host work only and never calls CUDA: the routing counts come from the recorder's host mirror (on
CUDA, pinned memory the counting kernel writes), the step histograms from StepStats. vLLM captures CUDA
graphs in global capture mode, where a CUDA call from any other thread invalidates the capture; this
thread makes none (docs/recorder.md, "Capture safety"; tests/test_recorder_gpu.py proves it under capture).
It never blocks a step and never raises: a failure is logged once, counted in the next snapshot that does
get through, and retried at the next tick. It holds the GIL while it works, which vLLM's engine thread pays for,
so what does not change between publishes (layer ids, flags, the header) is built once
(benchmarks/results/publisher_cost.md).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from moe_monitor.channel import LAYER_HOOKED, LAYER_UNOBSERVABLE, SegmentWriter

from .attach import Attachment
from .eplb_health import EplbRecorder
from .placement import LivePlacement
from .recorder import Recorder
from .steps import StepStats

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, writer: SegmentWriter, recorder: Recorder, steps: StepStats, attachment: Attachment,
                 interval_s: float, placement: LivePlacement | None = None, eplb: EplbRecorder | None = None):
        self.writer, self.recorder, self.steps, self.attachment = writer, recorder, steps, attachment
        self.placement = placement
        self.eplb = eplb  # vLLM's EPLB rearrangements (host attributes), with the placement
        self._eplb_last = None  # the last record read: published again when reading one fails
        self._eplb_failed = False
        self.interval_s = interval_s
        self.errors = 0
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-monitor-publisher", daemon=True)
        self._layer_ids = np.array([x.layer_id for x in attachment.layers], dtype=np.int32)
        self._flags_key: tuple | None = None  # what layer_flags' cached answer was computed from
        self._flags = np.zeros(0, dtype=np.uint8)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.publish_once()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.publish_once()

    def layer_flags(self, stepped: bool) -> np.ndarray:
        """Read-only; recomputed only when the layers, the recorder's seen rows (which only grow) or `stepped`
        changed since the last call."""
        layers, seen = self.attachment.layers, self.recorder.seen_rows
        key = (stepped, id(layers), len(layers), id(seen), len(seen))
        if key != self._flags_key:
            flags = np.zeros(len(layers), dtype=np.uint8)
            for row, layer in enumerate(layers):
                if not layer.observable:
                    flags[row] = LAYER_UNOBSERVABLE
                elif stepped and row not in seen:
                    flags[row] = LAYER_HOOKED | LAYER_UNOBSERVABLE  # tapped, but the router never ran: bypassed
                else:
                    flags[row] = LAYER_HOOKED
            flags.flags.writeable = False
            self._flags, self._flags_key = flags, key
        return self._flags

    def eplb_record(self):
        """The EPLB record of this publish; the last one (logged once) when vLLM's state cannot be read, so the
        counts are still published."""
        if self.eplb is None:
            return None
        try:
            self._eplb_last = self.eplb.record()
        except Exception:  # noqa: BLE001 - EPLB health must not stop the counts' publish
            if not self._eplb_failed:
                log.exception("moe-monitor cannot read vLLM's EPLB state; its last reading is published again")
                self._eplb_failed = True
        return self._eplb_last

    def publish_once(self) -> bool:
        try:
            arrays = self.steps.snapshot()
            arrays.update(layer_ids=self._layer_ids, counts=self.recorder.host_counts(),
                          layer_flags=self.layer_flags(bool(arrays["step_count"].any())))
            if self.placement is not None:
                arrays["ep_rank_load"] = self.placement.rank_load()  # what the sidecar exports (EPLB)
                arrays["physical_to_logical"] = self.placement.current  # may be one commit newer: shown, not summed
            self.writer.publish(arrays, publish_errors=self.errors, eplb=self.eplb_record())
        except Exception as e:  # noqa: BLE001 - a guest in vLLM's process must not die or raise
            self.errors += 1
            if not self._failing:
                log.error("moe-monitor cannot publish %s (will retry every %.1fs): %s",
                          self.writer.path, self.interval_s, e)
                self._failing = True
            self.writer.reset()
            return False
        if self._failing:
            log.warning("moe-monitor publishing to %s again after %d failed attempts", self.writer.path,
                        self.errors)
            self._failing = False
        return True
