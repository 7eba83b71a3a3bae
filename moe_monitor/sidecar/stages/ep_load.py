"""Stage `ep_load`: the counts attributed to EP ranks. Each pass's new counts go to the ranks as the plugin
attributed them where every counted segment publishes its EP-rank load (exact EPLB epochs), else under the
placement in force (vLLM's EPLB as published, else --placement, else vLLM's contiguous one), into a ledger that
never goes down (stats/placement.py). A closed window's load is the ledger's growth since the previous boundary.
No placement that fits: no EP-rank figures (logged once per cause); its errors count in the `window` row."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from moe_monitor.stats.placement import Placement, PlacementError, RankLoadLedger, contiguous, load_placement

from ..reading import Reading
from ..windows import Window

log = logging.getLogger(__name__)


def placement(statuses, num_experts: int, configured: Placement | None) -> Placement | None:
    """The live placement the ranks publish (vLLM's EPLB), else `configured` (--placement), else vLLM's
    contiguous one. None when none fits, or when the placement a rank publishes was refused (it does not fit its
    header): the counts are not split under a placement known to be other than the one in force."""
    ranks = max((s.snapshot.header.ranks.ep_size for s in statuses if s.counted), default=1)
    live = next((s.snapshot for s in statuses if s.counted and s.snapshot.physical_to_logical is not None), None)
    if live is not None:  # checked against its own header's ep_size when it was read
        return Placement(live.header.ranks.ep_size, live.physical_to_logical.astype(np.int64))
    if any(r.section == "physical_to_logical" for s in statuses if s.counted for r in s.snapshot.refused):
        return None
    if configured is not None:
        return configured
    try:
        return contiguous(num_experts, ranks)
    except PlacementError:
        return None


class EpLoad:
    name, errors_as = "ep_load", "window"
    required = False

    def __init__(self, placement_file: str | None):
        self.configured = load_placement(placement_file) if placement_file else None  # PlacementError: the CLI's
        self._ledger = RankLoadLedger()  # cumulative EP-rank load, attributed under the placement of its time
        self._at_close: tuple[int, np.ndarray] | None = None  # (ledger resets, load) at the last boundary
        self._window_load: np.ndarray | None = None  # the newest closed window's
        self._warning: str | None = None

    def run(self, r: Reading) -> Reading:
        cumulative = self._cumulative(r)
        if r.closed and r.window is not None:
            self._window_load = self._of_window(r.statuses, r.window, cumulative)
        if cumulative is None:
            return replace(r, window_rank_load=None, cumulative_rank_load=None)
        return replace(r, window_rank_load=self._window_load, cumulative_rank_load=cumulative)

    def fallback(self, r: Reading) -> Reading:
        return replace(r, window_rank_load=None, cumulative_rank_load=None)

    def _cumulative(self, r: Reading) -> np.ndarray | None:
        """The ledger's load after this pass's counts, or None when there is neither a published load nor a
        placement."""
        counts = r.totals.counts
        if counts is None:
            return None
        published = r.totals.rank_load
        if published is not None and not (np.isfinite(published).all() and (published >= 0).all()):
            self._warn("a segment's published EP-rank load is negative or not finite; the sidecar splits the counts "
                       "under the published placement itself")
            published = None
        fits = placement(r.statuses, counts.shape[1], self.configured)
        if fits is None and published is None:
            return None
        try:
            return self._ledger.update(counts, fits, published)
        except PlacementError as e:
            self._warn(f"expert placement does not fit the model ({e}): no EP-rank metrics")
            return None

    def _of_window(self, statuses, window: Window, cumulative: np.ndarray | None) -> np.ndarray | None:
        """The ledger's growth since the previous boundary, or, right after the ledger started afresh, the
        window's counts under the current placement."""
        previous = self._at_close
        self._at_close = None if cumulative is None else (self._ledger.resets, cumulative)
        if cumulative is not None and previous is not None and previous[0] == self._ledger.resets \
                and previous[1].shape == cumulative.shape:
            return cumulative - previous[1]
        try:
            fits = placement(statuses, window.counts.shape[1], self.configured)
            return fits.rank_load(window.counts) if fits is not None else None
        except PlacementError:
            return None  # logged once by _cumulative

    def _warn(self, message: str) -> None:
        if self._warning != message:  # once per cause, not every window
            log.warning("%s", message)
        self._warning = message
