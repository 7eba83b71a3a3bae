"""Engine-step accounting, by phase and tokens-per-step bucket: every step's count and tokens (exact), and a
histogram of the duration of the steps the timer measured (every step on CPU, a pseudo-random sample on CUDA:
worker.py, `MOE_MONITOR_STEP_TIME_EVERY`).

`step()` (every step) and `record()` (every timed step) run on vLLM's worker thread, so each only appends a tuple
to a deque (~40 ns; deque appends and pops are thread-safe). The publisher's `snapshot()` drains both once an
interval and bins them with numpy (searchsorted + bincount: ~50 us for 400 steps on the 2-core development VM).
Binning each step on the worker thread with numpy scalar indexing would cost ~1 us a step
(benchmarks/plugin_host_cost.py).

The deques are bounded (`max_queued` steps: over a minute of 1 ms steps); if the publisher stalls longer, the
oldest queued steps are dropped, counted in `dropped` and logged once.
"""

from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from moe_monitor.channel.layout import PHASES

log = logging.getLogger(__name__)

INT64_MAX = np.iinfo(np.int64).max
TOKEN_BOUNDS = (1, 8, 32, 128, 512, 2048, 8192, INT64_MAX)
DURATION_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   float("inf"))
PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}


def phase_of(num_prefill_tokens: int, num_decode_tokens: int) -> str:
    """prefill: only prompt tokens; decode: only one-token-per-request continuation; mixed: both."""
    if num_prefill_tokens and num_decode_tokens:
        return "mixed"
    return "prefill" if num_prefill_tokens else "decode"


class _Queue:
    """A bounded deque the worker thread appends to and the publisher drains; `appended` counts every append, so
    what fell out of a full deque is known."""

    def __init__(self, maxlen: int):
        self.items: collections.deque = collections.deque(maxlen=maxlen)
        self.appended = 0  # written by the worker thread only
        self.taken = 0  # written by the draining thread only
        self.dropped = 0

    def drain(self) -> list:
        appended = self.appended  # read before draining: every append counted here is in the deque or fell out
        items, queue = [], self.items
        for _ in range(len(queue)):
            items.append(queue.popleft())
        self.taken += len(items)
        lost = appended - self.taken - len(queue) - self.dropped
        if lost > 0:  # appended to a full deque (its oldest fell out); one appended meanwhile is not lost
            self.dropped += lost
        return items


class StepStats:
    def __init__(self, token_bounds=TOKEN_BOUNDS, duration_bounds=DURATION_BOUNDS, max_queued: int = 1 << 16):
        self.token_bounds = np.asarray(token_bounds, dtype=np.int64)
        self.duration_bounds = np.asarray(duration_bounds, dtype=np.float64)
        P, TB, DB = len(PHASES), len(token_bounds), len(duration_bounds)
        self.hist = np.zeros((P, TB, DB), dtype=np.int64)  # timed steps
        self.seconds = np.zeros((P, TB), dtype=np.float64)  # timed steps
        self.count = np.zeros((P, TB), dtype=np.int64)  # every step
        self.tokens = np.zeros((P, TB), dtype=np.int64)  # every step
        self._counted, self._timed = _Queue(max_queued), _Queue(max_queued)
        self._warned = False
        self._lock = threading.Lock()  # between snapshot() callers (the publisher thread and its stop())

    @property
    def recorded(self) -> int:
        """Engine steps counted so far (every step with tokens, timed or not)."""
        return self._counted.appended

    @property
    def dropped(self) -> int:
        return self._counted.dropped + self._timed.dropped

    def step(self, phase: int, tokens: int) -> None:
        """Every engine step with tokens, when it begins. phase: an index into PHASES."""
        queue = self._counted
        queue.items.append((phase, tokens))
        queue.appended += 1

    def record(self, phase: str, tokens: int, seconds: float) -> None:
        """A timed step's duration, once known (its step() was called when it began)."""
        queue = self._timed
        queue.items.append((PHASE_INDEX[phase], tokens, seconds))
        queue.appended += 1

    def record_step(self, phase: str, tokens: int, seconds: float) -> None:
        """One step, counted and timed (the CPU timer times every step; feeders in tests and benchmarks)."""
        self.step(PHASE_INDEX[phase], tokens)
        self.record(phase, tokens, seconds)

    def snapshot(self) -> dict[str, np.ndarray]:
        with self._lock:
            self._bin()
            return {"token_bounds": self.token_bounds, "duration_bounds": self.duration_bounds,
                    "step_hist": self.hist.copy(), "step_seconds": self.seconds.copy(),
                    "step_count": self.count.copy(), "step_tokens": self.tokens.copy()}

    def _cells(self, phase, tokens) -> np.ndarray:
        TB = len(self.token_bounds)
        return phase * TB + np.minimum(np.searchsorted(self.token_bounds, tokens), TB - 1)

    def _bin(self) -> None:
        P, TB, DB = self.hist.shape
        counted = self._counted.drain()
        if counted:
            phase, tokens = (np.array(column) for column in zip(*counted))
            cell = self._cells(phase, tokens)
            self.count += np.bincount(cell, minlength=P * TB).reshape(P, TB)
            self.tokens += np.bincount(cell, weights=tokens, minlength=P * TB).reshape(P, TB).astype(np.int64)
        timed = self._timed.drain()
        if timed:
            phase, tokens, seconds = (np.array(column) for column in zip(*timed))
            cell = self._cells(phase, tokens)
            d = np.minimum(np.searchsorted(self.duration_bounds, seconds), DB - 1)
            self.hist += np.bincount(cell * DB + d, minlength=P * TB * DB).reshape(P, TB, DB)
            self.seconds += np.bincount(cell, weights=seconds, minlength=P * TB).reshape(P, TB)
        if self._counted.dropped:  # counted steps fell out of the full deque: never publish fewer than were timed
            np.maximum(self.count, self.hist.sum(axis=2), out=self.count)
        if self.dropped and not self._warned:
            self._warned = True
            log.warning("moe-monitor: the publisher fell behind by more than %d steps; the oldest steps were "
                        "dropped", self._counted.items.maxlen)
