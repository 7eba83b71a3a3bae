"""The newest capture in the catalog that has a breakdown, for the sidecar's breakdown gauges when captures are on:
the capturer analysed its traces and stored the breakdown with them, so this reads it back instead of analysing
again (breakdown/latest.py has the source used when captures are off)."""

from __future__ import annotations

import json
import logging

from moe_monitor.breakdown.latest import Capture
from moe_monitor.breakdown.record import BreakdownRecord

from .catalog import Catalog

log = logging.getLogger(__name__)


class CatalogLatest:
    """The newest catalogued capture with a breakdown (breakdown.latest.BreakdownSource): what the capturer analysed
    and stored, read back once per new capture."""

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
        meta = self.catalog.meta(capture_id)
        if meta is None:  # gone or damaged since it was indexed
            return
        self.result = None
        try:
            with open(path, "rb") as f:
                result = json.load(f)
            self.result = BreakdownRecord.from_json(result)
        except (OSError, ValueError) as e:  # a damaged capture: counted, not retried, nothing exported
            self.errors += 1
            log.warning("capture %s: cannot use its breakdown.json: %s", meta.id, e)
        self.capture = Capture(meta.id, meta.file_names, float(meta.created))
