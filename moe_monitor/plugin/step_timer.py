"""Step timers: when a step began and ended, as the device saw it.

On CPU vLLM runs a step synchronously, so host time between the step hooks is the step's time. On CUDA vLLM
schedules asynchronously: `execute_model`/`sample_tokens` return once the step is *launched*, and host time
would measure launching, not computing. The CUDA timer records an event on vLLM's stream at the start and
end of each step and turns completed pairs into durations on the worker thread at the next step boundary
(a non-blocking `query()`; never a sync). Every CUDA call here happens on vLLM's worker thread, between
steps, where no graph capture can be running (docs/recorder.md, "Capture safety").

A consequence: the last step before the server goes idle is recorded when the next step runs.
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

    def begin(self, phase: str, tokens: int) -> None:
        self._open = (time.perf_counter(), phase, tokens)

    def end(self) -> None:
        if self._open is not None:
            start, phase, tokens = self._open
            self._open = None
            self.steps.record(phase, tokens, time.perf_counter() - start)

    def cancel(self) -> None:
        self._open = None


class CudaEventTimer:
    """Events on the current (vLLM's) stream; at most `max_pending` unresolved steps are kept."""

    def __init__(self, steps: StepStats, max_pending: int = 256):
        import torch

        self._event = lambda: torch.cuda.Event(enable_timing=True)
        self.steps, self.max_pending = steps, max_pending
        self._free: list = []
        self._pending: collections.deque = collections.deque()
        self._open = None
        self.dropped = 0

    def _take(self):
        ev = self._free.pop() if self._free else self._event()
        ev.record()
        return ev

    def begin(self, phase: str, tokens: int) -> None:
        self.poll()
        self._open = (self._take(), phase, tokens)

    def end(self) -> None:
        if self._open is None:
            return
        start, phase, tokens = self._open
        self._open = None
        self._pending.append((start, self._take(), phase, tokens))
        if len(self._pending) > self.max_pending:  # the device is far behind: keep memory bounded
            old = self._pending.popleft()
            self._free += old[:2]
            self.dropped += 1
            if self.dropped == 1:
                log.warning("moe-monitor: more than %d steps in flight on the device; dropping the oldest "
                            "step times", self.max_pending)
        self.poll()

    def cancel(self) -> None:
        if self._open is not None:
            self._free.append(self._open[0])
            self._open = None

    def poll(self) -> None:
        """Record every completed step, oldest first (steps complete in stream order)."""
        while self._pending and self._pending[0][1].query():
            start, end, phase, tokens = self._pending.popleft()
            self.steps.record(phase, tokens, start.elapsed_time(end) / 1000.0)
            self._free += (start, end)
