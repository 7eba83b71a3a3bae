"""Stage `window`: at a boundary, the window that ends there closed (windows.py) with its statistics
(stats/imbalance.py) and its load histogram observation; the newest closed window and the served model are
carried to every pass until the next one closes."""

from __future__ import annotations

from dataclasses import replace

from moe_monitor.stats.imbalance import LayerStats, layer_stats

from ..config import SidecarConfig
from ..reading import Reading
from ..windows import LoadHistogram, Window, Windower


class CloseWindow:
    name = errors_as = "window"
    required = False

    def __init__(self, config: SidecarConfig):
        self.config = config
        self.windower = Windower(config.window_s)
        self.load_histogram = LoadHistogram()
        self.window: Window | None = None
        self.stats: LayerStats | None = None
        self.model = ""

    def run(self, r: Reading) -> Reading:
        window = self.windower.close(r.boundary, r.totals) if r.boundary is not None else None
        if window is not None:
            counted = [s.snapshot for s in r.statuses if s.counted and s.snapshot is not None]  # counted ones are read
            stats = layer_stats(window.counts, top_k=counted[0].header.top_k if counted else 1,
                                hot_multiple=self.config.hot_multiple,
                                min_assignments=self.config.min_window_assignments)
            self.window, self.stats = window, stats
            if self.config.load_histogram:
                self.load_histogram.observe(window, stats.imbalance_ratio)
            self.model = counted[0].header.model if counted else self.model
        return self._carried(r, closed=window is not None)

    def fallback(self, r: Reading) -> Reading:
        return self._carried(r, closed=False)

    def _carried(self, r: Reading, closed: bool) -> Reading:
        return replace(r, window=self.window, stats=self.stats, closed=closed, model=self.model,
                       load_histogram=self.load_histogram.copy())
