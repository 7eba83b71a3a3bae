"""One window's frozen view of everything the collectors export: the segments as read, the cumulative totals,
the closed window and its statistics, EP-rank loads, and snapshots of the detector, the captures and the
newest breakdown. Built once per window by the exporter; collectors only read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_monitor.stats.imbalance import LayerStats

from .aggregate import Totals
from .config import SidecarConfig
from .segments import SegmentStatus
from .windows import LoadHistogram, Window


@dataclass(frozen=True)
class DetectorView:
    state: str
    baselines: dict  # (signal, phase, tokens_le) -> value
    currents: dict


@dataclass(frozen=True)
class Reading:
    now: float
    config: SidecarConfig
    statuses: tuple[SegmentStatus, ...]
    totals: Totals
    read_errors: dict[str, int]
    restarts: int
    window: Window | None = None
    stats: LayerStats | None = None
    window_rank_load: np.ndarray | None = None  # [L, R] of the window under the placement
    cumulative_rank_load: np.ndarray | None = None
    load_histogram: LoadHistogram | None = None
    detector: DetectorView | None = None
    breakdown: Any = None  # LatestBreakdown | CatalogLatest: .capture, .result, .errors
    capturer: Any = None  # Capturer, when captures are configured
    catalog: Any = None  # Catalog, when captures are configured
