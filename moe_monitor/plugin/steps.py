"""Engine-step accounting: cumulative histograms of step duration by phase and tokens-per-step bucket.

Pure numpy, host side; one `record()` per engine step costs a few microseconds and takes a lock that the
publisher holds only while copying (tens of microseconds once per publish interval).
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

from moe_monitor.channel.layout import PHASES

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


class StepStats:
    def __init__(self, token_bounds=TOKEN_BOUNDS, duration_bounds=DURATION_BOUNDS):
        self.token_bounds = np.asarray(token_bounds, dtype=np.int64)
        self.duration_bounds = np.asarray(duration_bounds, dtype=np.float64)
        self._tb = list(token_bounds)
        self._db = list(duration_bounds)
        P, TB, DB = len(PHASES), len(token_bounds), len(duration_bounds)
        self.hist = np.zeros((P, TB, DB), dtype=np.int64)
        self.seconds = np.zeros((P, TB), dtype=np.float64)
        self.tokens = np.zeros((P, TB), dtype=np.int64)
        self._lock = threading.Lock()

    def record(self, phase: str, tokens: int, seconds: float) -> None:
        p = PHASE_INDEX[phase]
        t = min(bisect.bisect_left(self._tb, tokens), len(self._tb) - 1)
        d = min(bisect.bisect_left(self._db, seconds), len(self._db) - 1)
        with self._lock:
            self.hist[p, t, d] += 1
            self.seconds[p, t] += seconds
            self.tokens[p, t] += tokens

    def snapshot(self) -> dict[str, np.ndarray]:
        with self._lock:
            return {"token_bounds": self.token_bounds, "duration_bounds": self.duration_bounds,
                    "step_hist": self.hist.copy(), "step_seconds": self.seconds.copy(),
                    "step_tokens": self.tokens.copy()}
