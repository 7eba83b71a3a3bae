"""Step timers: when a step began and ended, as the device saw it.

On CPU vLLM runs a step synchronously, so host time between the step hooks is the step's time. On CUDA vLLM
schedules asynchronously: `execute_model`/`sample_tokens` return once the step is *launched*, and host time
would measure launching, not computing. The CUDA timer records an event on vLLM's stream at the start and
end of each step and turns completed pairs into durations on the worker thread at the next step's start
(a non-blocking query; never a sync). Every CUDA call here happens on vLLM's worker thread, between
steps, where no graph capture can be running (docs/recorder.md, "Capture safety").

Two event back ends, same timer: the CUDA driver's calls through ctypes (cuda_driver.py: ~1 us each, the
default) and torch's Event (the fallback where the driver's calls are not usable: a few us each).

On CUDA the worker times a pseudo-random sample of the steps (worker.py, `MOE_MONITOR_STEP_TIME_EVERY`): the timer
only sees those, and is told whether the step before was one of them (`chained`).

A consequence: a timed step's duration is recorded when the next timed step begins.
"""

from __future__ import annotations

import collections
import logging
import time

from .steps import StepStats

log = logging.getLogger(__name__)


class HostTimer:
    def __init__(self, steps: StepStats):
        self.steps = steps
        self._open: tuple[float, str, int] | None = None

    def begin(self, phase: str, tokens: int, chained: bool = False) -> None:
        self._open = (time.perf_counter(), phase, tokens)

    def end(self) -> None:
        if self._open is not None:
            start, phase, tokens = self._open
            self._open = None
            self.steps.record(phase, tokens, time.perf_counter() - start)

    def cancel(self) -> None:
        self._open = None


class DriverEvents:
    """Events through the CUDA driver (cuda_driver.Driver), recorded on the current stream."""

    def __init__(self, driver, current_stream):
        self.new, self.elapsed_s = driver.event, driver.elapsed_s
        self._record, self._stream = driver.record, current_stream

    def record(self, event) -> None:
        self._record(event, self._stream())


class TorchEvents:
    """torch.cuda.Event, recorded on the current stream."""

    def __init__(self):
        import torch

        self._event = torch.cuda.Event

    def new(self):
        return self._event(enable_timing=True)

    @staticmethod
    def record(event) -> None:
        event.record()

    @staticmethod
    def elapsed_s(start, end) -> float | None:
        return start.elapsed_time(end) / 1000.0 if end.query() else None


class CudaEventTimer:
    """Events on the current (vLLM's) stream, reused from a pool; at most `max_pending` unresolved steps are kept.

    A step's start is an event recorded on the stream when the step begins: it completes when the device has finished
    all work queued before it (the previous step, as vLLM's host prepares step N+1 while the device runs step N) or,
    with the device idle, when the step's own work is queued. When the step before was timed too (`chained`) and
    is still running, its end event is that start, and none is recorded. Per timed step then: an end record, a start
    record unless chained, and at the next timed step's start one elapsed-time call per finished step plus the one
    that finds the device busy (the driver answers "not ready" and the time in one call)."""

    def __init__(self, steps: StepStats, events: DriverEvents | TorchEvents, max_pending: int = 256):
        self.steps, self.events, self.max_pending = steps, events, max_pending
        self._free: list = []
        self._pending: collections.deque = collections.deque()  # (start, end, phase, tokens), oldest first
        self._open = None  # (start, phase, tokens, owns its start)
        self.dropped = 0

    def _take(self):
        event = self._free.pop() if self._free else self.events.new()
        self.events.record(event)
        return event

    def begin(self, phase: str, tokens: int, chained: bool = False) -> None:
        if self._open is not None:  # the previous step never ended: forget it
            self.cancel()
        if self._pending and not self.poll() and chained:
            self._open = (self._pending[-1][1], phase, tokens, False)
        else:
            self._open = (self._take(), phase, tokens, True)

    def end(self) -> None:
        if self._open is None:
            return
        start, phase, tokens, _ = self._open
        self._open = None
        self._pending.append((start, self._take(), phase, tokens))
        if len(self._pending) > self.max_pending:  # the device is far behind: keep memory bounded
            self._release(self._pending.popleft())
            self.dropped += 1
            if self.dropped == 1:
                log.warning("moe-monitor: more than %d steps in flight on the device; dropping the oldest "
                            "step times", self.max_pending)

    def cancel(self) -> None:
        if self._open is not None:
            if self._open[3]:
                self._free.append(self._open[0])
            self._open = None

    def _release(self, entry) -> None:
        """Back to the pool: a step's start (the step before it, resolved first, left it if it was its end) and its
        end unless the next step, pending or open, starts with it."""
        start, end = entry[0], entry[1]
        self._free.append(start)
        following = self._pending[0][0] if self._pending else self._open[0] if self._open else None
        if following is not end:
            self._free.append(end)

    def poll(self) -> bool:
        """Record every completed step, oldest first (steps complete in stream order). True when every step has
        completed (the device has finished all the work the timer knows of)."""
        pending, elapsed_s = self._pending, self.events.elapsed_s
        while pending:
            start, end, phase, tokens = pending[0]
            seconds = elapsed_s(start, end)
            if seconds is None:
                return False
            self._release(pending.popleft())
            self.steps.record(phase, tokens, seconds)
        return True
