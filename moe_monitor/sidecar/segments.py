"""Read every segment of the directory, decide which ones describe the served model, fold those into
monotonic totals.

A segment that cannot be read is reported (`moe_monitor_segment_up` 0, a read error by kind), never fatal.
A readable segment can still be wrong for the model's metrics: one that describes no MoE layer or no expert,
or one of another model (a stale file of a previous deployment, a second server pointed at the same
directory). Those are left out and reported (`moe_monitor_segments_ignored`); which model is "the" model is
decided by the fresh segments, majority first, newest publish second, never by file-name order.

An optional section that does not fit its header (channel/layout.py) is left out of the snapshot by the reader; a
published cumulative EP-rank load or step count below the last one accepted from the same writer process is left
out here. Both are reported (`moe_monitor_segment_sections_refused`) and logged once per segment and cause; the rest
of the segment is counted. A segment whose step count is left out counts the last one used from its writer process
or its histogram's timed steps, whichever is higher, so moe_steps_total never goes down.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from moe_monitor.channel import Refusal, SegmentError, Snapshot, list_segments, read_segment

from .aggregate import Aggregator, Totals
from .once import OncePerCause

log = logging.getLogger(__name__)
TORN_ROUNDS = 5  # reads of a file the writer keeps changing, per window
TORN_PAUSE_S = 0.001  # pause before round r: r x this (10 ms in all, shared by every torn file)


@dataclass
class SegmentStatus:
    name: str
    snapshot: Snapshot | None
    error: str | None  # SegmentError.kind of the last read, None when it read fine
    counted: bool = False
    ignored: str | None = None  # why a readable segment is left out of the model's metrics

    def age_s(self, now: float) -> float | None:
        """Seconds since its last publish (None: unreadable); fresh while it is within --stale-after."""
        return None if self.snapshot is None else now - self.snapshot.header.updated_unix_ns / 1e9


def label_of(path: str) -> str:
    """The segment label: the file name without suffix, valid UTF-8 even when the name is not (U+FFFD)."""
    return os.path.basename(path).removesuffix(".moeseg").encode("utf-8", "surrogateescape").decode(
        "utf-8", "replace")


def served_model(statuses: list[SegmentStatus], now_ns: int, stale_after_ns: int) -> str | None:
    """The model most fresh segments describe (ties: the most recently published); all segments when none
    is fresh."""
    usable = [s.snapshot.header for s in statuses if s.snapshot is not None and s.ignored is None]
    fresh = [h for h in usable if now_ns - h.updated_unix_ns <= stale_after_ns] or usable
    if not fresh:
        return None
    votes = Counter(h.model for h in fresh)
    newest: dict[str, int] = {}
    for h in fresh:
        newest[h.model] = max(newest.get(h.model, 0), h.updated_unix_ns)
    return max(votes, key=lambda model: (votes[model], newest[model]))


class SegmentSource:
    def __init__(self, segment_dir: str, max_payload: int | None = None, stale_after_s: float = 30.0):
        self.segment_dir = segment_dir
        self.max_payload = max_payload
        self.stale_after_ns = int(stale_after_s * 1e9)
        self.aggregator = Aggregator()
        self.read_errors: Counter[str] = Counter()
        self._logged = OncePerCause()
        self._refusals = OncePerCause()
        self._loads: dict[str, tuple[int, np.ndarray]] = {}  # path -> (generation, last accepted EP-rank load)
        self._step_counts: dict[str, tuple[int, np.ndarray]] = {}  # path -> (generation, last step count used)

    def read(self, now: float) -> tuple[list[SegmentStatus], Totals]:
        statuses = self._read_all(list_segments(self.segment_dir))
        self._log_refusals(statuses)
        for s in statuses:
            if s.snapshot is not None and (s.snapshot.header.shape.num_experts == 0 or len(s.snapshot.layer_ids) == 0):
                s.ignored = "no_layers"
        model = served_model(statuses, int(now * 1e9), self.stale_after_ns)
        for s in statuses:
            if s.snapshot is not None and s.ignored is None and s.snapshot.header.model != model:
                s.ignored = "other_model"
        for s in statuses:
            if not s.ignored:
                self._logged.recovered(s.name)
            elif self._logged.first(s.name, s.ignored):
                log.warning("segment %s left out of the model's metrics (%s; serving %r)", s.name, s.ignored, model)
        usable = {s.name: s.snapshot for s in statuses if s.snapshot is not None and s.ignored is None}
        counted = self.aggregator.update(usable)
        for s in statuses:
            s.counted = counted.get(s.name, False)
        return statuses, self.aggregator.totals()

    def _read_all(self, paths: list[str]) -> list[SegmentStatus]:
        """One read per file, then the torn ones (a writer was publishing) again after one short pause, a few
        rounds: the pauses are shared by all files, so a directory of thousands of bad files costs a bounded
        wait per window (a per-file back-off would wait 8 s for 500 files whose writer is stuck mid-publish)."""
        kwargs = {"max_payload": self.max_payload} if self.max_payload else {}
        results: dict[str, Snapshot | SegmentError] = {}
        pending = paths
        for round_ in range(TORN_ROUNDS):
            if round_:
                time.sleep(TORN_PAUSE_S * round_)
            retry = []
            for path in pending:
                try:
                    results[path] = read_segment(path, attempts=1, **kwargs)
                except FileNotFoundError:
                    results.pop(path, None)  # removed between listing and reading
                except SegmentError as e:
                    results[path] = e
                    if e.kind == "torn":
                        retry.append(path)
            if not retry:
                break
            pending = retry
        self._loads = {path: v for path, v in self._loads.items() if path in results}
        self._step_counts = {path: v for path, v in self._step_counts.items() if path in results}
        return [self._status(path, results[path]) for path in paths if path in results]

    def _status(self, path: str, result) -> SegmentStatus:
        name = label_of(path)
        if isinstance(result, SegmentError):
            self.read_errors[result.kind] += 1
            if self._logged.first(path, result.kind):
                log.warning("cannot read segment %s (%s): %s", path, result.kind, result)
            return SegmentStatus(name, None, result.kind)
        self._logged.recovered(path)  # it reads again: a new failure is logged
        return SegmentStatus(name, self._steady_step_count(path, self._refuse_decrease(path, result)), None)

    def _refuse_decrease(self, path: str, snap: Snapshot) -> Snapshot:
        """A cumulative EP-rank load must not go down while its writer process lives (a restart, a new generation,
        starts again from zero: the aggregator carries what came before). One that does is refused until it is
        back above the last accepted one, so the exported counter never goes down."""
        load, generation = snap.ep_rank_load, snap.header.generation
        if load is None:
            return snap
        before = _same_process(self._loads, path, generation, load.shape)
        if before is not None and (load < before).any():
            rank = int(np.argwhere(load < before)[0][1])
            return _decreased(snap, "ep_rank_load", f"EP-rank load of EP rank {rank}")
        self._loads[path] = (generation, load.copy())
        return snap

    def _steady_step_count(self, path: str, snap: Snapshot) -> Snapshot:
        """The cumulative step count must not go down while its writer process lives either: one below the last
        used is refused (decreased). A snapshot without one (refused) after one was used from the same process
        counts the higher of that and its timed steps; a writer that never published one (an older plugin) counts
        its timed steps (aggregate.totals_of)."""
        count, generation, timed = snap.step_count, snap.header.generation, snap.step_hist.sum(axis=2)
        before = _same_process(self._step_counts, path, generation, timed.shape)
        if count is not None and before is not None and (count < before).any():
            p, t = (int(i) for i in np.argwhere(count < before)[0])
            snap, count = _decreased(snap, "step_count", f"step count of phase {p}, token bucket {t}"), None
        if count is None and before is not None:
            count = np.maximum(before, timed)
            snap = replace(snap, step_count=count)
        self._step_counts[path] = (generation, (timed if count is None else count).copy())
        return snap

    def _log_refusals(self, statuses: list[SegmentStatus]) -> None:
        for s in statuses:
            refused = s.snapshot.refused if s.snapshot is not None else ()
            if s.snapshot is not None and not refused:
                self._refusals.recovered(s.name)
            for r in refused:
                if self._refusals.first(s.name, f"{r.section}/{r.reason}"):
                    log.warning("segment %s: section %s refused (%s): %s; the rest of the segment is used (logged "
                                "once; moe_monitor_segment_sections_refused)", s.name, r.section, r.reason, r.message)


def _same_process(last: dict[str, tuple[int, np.ndarray]], path: str, generation: int,
                  shape: tuple[int, ...]) -> np.ndarray | None:
    """The reading kept for `path` when the same writer process (generation) published it in this shape, else None."""
    kept = last.get(path)
    return kept[1] if kept is not None and kept[0] == generation and kept[1].shape == shape else None


def _decreased(snap: Snapshot, section: str, what: str) -> Snapshot:
    """`snap` without its cumulative `section`, refused because `what` went down."""
    left_out: dict[str, Any] = {section: None}
    return replace(snap, **left_out, refused=snap.refused + (Refusal(
        section, "decreased", f"the published {what} decreased without a restart of the writer (below the last "
        "accepted reading)"),))
