"""The breakdown of the newest profiler capture in vLLM's torch_profiler_dir, for the sidecar's gauges.

vLLM's workers write `<prefix>dp0_pp0_tp0_dcp0_ep0_rank0.<ns>.pt.trace.json.gz` (one per rank); the API
server's `*.async_llm.*` trace has no model kernels and is ignored. A capture is the set of rank files with
the same prefix written within a minute of the newest; it is analysed once its files have stopped changing
(`settle_s`), in a background thread so the window loop never waits for it.

`BreakdownSource` is what the sidecar's breakdown stage polls. Two sources have that shape: `LatestBreakdown`
here, which analyses the newest traces in vLLM's profile directory itself (captures off: someone else profiles),
and `capture.latest.CatalogLatest`, which reads the breakdown the capturer stored with its newest capture
(captures on: the capturer already analysed the traces, stored them in its catalog and removed them from the
profile directory). Exactly one
of them is wired (sidecar/wiring.py).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from .analyze import analyze_files
from .record import BreakdownRecord
from .trace import TraceError

log = logging.getLogger(__name__)
# vLLM >= 0.32 and vLLM 0.26 on GPU: `<prefix>dp0_pp0_tp0_..._rank0.<ns>.pt.trace.json.gz`; vLLM 0.27-0.31 on CPU:
# `<trace id>-rank-0.<ns>.pt.trace.json.gz` (no prefix: those vLLMs ignore /start_profile's body).
RANK_FILE = re.compile(r"^(?P<prefix>.*?)(?:dp\d+_pp\d+_tp\d+.*|\d+-rank-\d+\.\d+)\.pt\.trace\.json(\.gz)?$")


def rank_trace(name: str) -> re.Match | None:
    """A worker rank's trace file name (the API server's `*.async_llm.*` trace is not one)."""
    return RANK_FILE.match(name) if ".async_llm." not in name else None


@dataclass(frozen=True)
class Capture:
    prefix: str
    files: tuple[str, ...]
    end: float  # mtime of the newest file


def newest_capture(directory: str, now: float, settle_s: float = 2.0, span_s: float = 60.0) -> Capture | None:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    files = []
    for name in names:
        m = rank_trace(name)
        if m:
            path = os.path.join(directory, name)
            try:
                files.append((os.path.getmtime(path), m.group("prefix"), path))
            except FileNotFoundError:
                continue
    if not files:
        return None
    end, prefix, _ = max(files)
    if now - end < settle_s:
        return None  # still being written
    group = sorted(p for t, pre, p in files if pre == prefix and end - t <= span_s)
    return Capture(prefix, tuple(group), end)


class BreakdownSource(Protocol):
    """The newest analysed capture as the breakdown stage reads it: `poll` once per window, never waiting for an
    analysis; `capture` and `result` (both frozen) and `errors` (analyses that failed so far) read after it."""
    errors: int
    capture: Capture | None
    result: BreakdownRecord | None

    def poll(self, background: bool = True) -> None: ...


class LatestBreakdown:
    """The newest rank traces in vLLM's profile directory, analysed here off the window thread."""

    def __init__(self, directory: str, settle_s: float = 2.0, clock=time.time, max_files: int = 64):
        self.directory, self.settle_s, self._clock, self.max_files = directory, settle_s, clock, max_files
        self.capture: Capture | None = None
        self.result: BreakdownRecord | None = None
        self.errors = 0
        self._busy = threading.Lock()

    def poll(self, background: bool = True) -> None:
        """Start analysing a new capture if there is one (at most one analysis at a time)."""
        capture = newest_capture(self.directory, self._clock(), self.settle_s)
        if capture is None or (self.capture is not None and capture.files == self.capture.files
                               and capture.end == self.capture.end):
            return
        if not self._busy.acquire(blocking=False):
            return
        if background:
            threading.Thread(target=self._analyze, args=(capture,), name="moe-monitor-breakdown", daemon=True).start()
        else:
            self._analyze(capture)

    def _analyze(self, capture: Capture) -> None:
        files = capture.files[: self.max_files]  # read one at a time: memory is one trace's
        try:
            result = BreakdownRecord.of(analyze_files(files))
            self.capture, self.result = capture, result
            log.info("analysed capture %r (%d rank files%s)", capture.prefix, len(files),
                     f"; {len(capture.files) - len(files)} more left out" if len(files) < len(capture.files) else "")
        except (TraceError, ValueError, OSError) as e:
            self.errors += 1
            self.capture = capture  # do not retry the same broken files every window
            log.warning("cannot analyse capture %r: %s", capture.prefix, e)
        finally:
            self._busy.release()


def valid_breakdown(result) -> bool:
    """Whether a stored breakdown.json reads back (BreakdownResult.from_json, what the capture metrics use)."""
    try:
        BreakdownRecord.from_json(result)
        return True
    except ValueError:
        return False
