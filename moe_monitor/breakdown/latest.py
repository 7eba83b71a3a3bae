"""The breakdown of the newest profiler capture in vLLM's torch_profiler_dir, for the sidecar's gauges.

vLLM's workers write `<prefix>dp0_pp0_tp0_dcp0_ep0_rank0.<ns>.pt.trace.json.gz` (one per rank); the API
server's `*.async_llm.*` trace has no model kernels and is ignored. A capture is the set of rank files with
the same prefix written within a minute of the newest; it is analysed once its files have stopped changing
(`settle_s`), in a background thread so the window loop never waits for it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .analyze import analyze_files
from .record import BreakdownRecord
from .trace import TraceError

if TYPE_CHECKING:
    from moe_monitor.capture.catalog import Catalog

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


class LatestBreakdown:
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
            result = BreakdownRecord.from_json(analyze_files(files))
            self.capture, self.result = capture, result
            log.info("analysed capture %r (%d rank files%s)", capture.prefix, len(files),
                     f"; {len(capture.files) - len(files)} more left out" if len(files) < len(capture.files) else "")
        except (TraceError, ValueError, OSError) as e:
            self.errors += 1
            self.capture = capture  # do not retry the same broken files every window
            log.warning("cannot analyse capture %r: %s", capture.prefix, e)
        finally:
            self._busy.release()


class CatalogLatest:
    """The newest catalogued capture with a breakdown, in LatestBreakdown's shape (for capture_t0)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog, self.errors = catalog, 0
        self.capture: Capture | None = None
        self.result: BreakdownRecord | None = None

    def poll(self, background: bool = True) -> None:
        """Once per window: the catalog's index brought up to date (one stat unless someone else changed the
        directory; never waiting for another thread's listing), its newest capture with a breakdown.json looked
        up in memory, and that capture's metadata and breakdown read once. Nothing here grows with the catalog's
        size."""
        self.catalog.refresh(blocking=False)
        found = self.catalog.newest_with_breakdown()
        if found is None or (self.capture is not None and self.capture.prefix == found[0]):
            return
        capture_id, path = found
        meta = self.catalog.get(capture_id)
        if meta is None:  # gone or damaged since it was indexed
            return
        self.result = None
        try:
            with open(path, "rb") as f:
                result = json.load(f)
            self.result = BreakdownRecord.from_json(result)
        except (OSError, ValueError) as e:  # a damaged capture: counted, not retried, nothing exported
            self.errors += 1
            log.warning("capture %s: cannot use its breakdown.json: %s", meta["id"], e)
        try:
            self.capture = Capture(meta["id"], tuple(f["name"] for f in meta["files"]), float(meta["created"]))
        except (KeyError, TypeError, ValueError) as e:
            self.errors, self.result = self.errors + 1, None
            self.capture = Capture(meta["id"], (), 0.0)
            log.warning("capture %s: damaged metadata: %r", meta["id"], e)


def valid_breakdown(result) -> bool:
    """The shape the capture metrics read (what breakdown.analyze writes)."""
    try:
        BreakdownRecord.from_json(result)
        return True
    except ValueError:
        return False
