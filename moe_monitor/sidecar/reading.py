"""One window's frozen view of everything the collectors export: the segments as read, the cumulative totals,
the closed window and its statistics, EP-rank loads, and plain summaries of the detector, the captures and the
newest breakdown. The window loop's stages build it one field group at a time (stages/); collectors only read
it, and nothing in it is a live object another thread writes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_monitor.stats.imbalance import LayerStats

from .aggregate import Totals
from .config import SidecarConfig
from .readiness import SegmentsSeen
from .segments import SegmentStatus
from .windows import LoadHistogram, Window

if TYPE_CHECKING:
    from moe_monitor.breakdown.latest import Capture


def frozen(mapping: Mapping) -> Mapping:
    """A read-only copy (the window thread's counters go on changing; the reading's must not)."""
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class DetectorView:
    state: str
    baselines: Mapping  # (signal, phase, tokens_le) -> value
    currents: Mapping


@dataclass(frozen=True)
class CapturesView:
    """The capturer's and the catalog's figures at the end of the window's pass (copied: the capture thread
    writes the live ones)."""
    outcomes: tuple[tuple[tuple[str, str], int], ...]  # ((reason, outcome), captures), sorted
    busy: bool
    profiler_enabled: bool | None
    last_duration_s: float | None
    last_end: float | None
    catalog_captures: int
    catalog_bytes: int
    catalog_damaged: int
    alerts: tuple[tuple[str, int], ...] = ()  # (outcome, alerts) of Alertmanager's notifications, sorted

    @classmethod
    def of(cls, capturer: Any, catalog: Any) -> CapturesView:
        return cls(tuple(sorted(dict(capturer.outcomes).items())), bool(capturer.busy), capturer.profiler_enabled,
                   capturer.last_duration_s, capturer.last_end, catalog.count, catalog.total_bytes,
                   len(catalog.damaged), tuple(sorted(dict(getattr(capturer, "alert_outcomes", {})).items())))


@dataclass(frozen=True)
class BreakdownView:
    """The newest analysed capture (both frozen records) and the analysis errors so far."""
    errors: int
    capture: Capture | None
    result: Any  # BreakdownRecord | None (frozen)

    @classmethod
    def of(cls, latest: Any) -> BreakdownView:
        return cls(latest.errors, latest.capture, latest.result)


@dataclass(frozen=True)
class Reading:
    now: float
    config: SidecarConfig
    statuses: tuple[SegmentStatus, ...]
    totals: Totals
    read_errors: Mapping[str, int]  # kind -> reads that failed so far
    restarts: int
    boundary: float | None = None  # the window boundary of this pass; None: a refresh, no window closes
    seen: SegmentsSeen | None = None
    model: str = ""  # the served model, as of the newest closed window
    window: Window | None = None  # the newest closed window (this pass's when `closed`)
    stats: LayerStats | None = None
    closed: bool = False
    window_rank_load: np.ndarray | None = None  # [L, R] of the window under the placement
    cumulative_rank_load: np.ndarray | None = None
    load_histogram: LoadHistogram | None = None
    detector: DetectorView | None = None
    breakdown: BreakdownView | None = None  # when --profile-dir is set
    captures: CapturesView | None = None  # when captures are configured
