"""A collector turns one `Reading` into metric families, and nothing else: no state changes, no I/O beyond
what it exports. `run` calls every enabled collector; one that fails drops its own families from this
exposition and reports `moe_monitor_collector_success{collector} 0`, never the scrape (node_exporter's rule).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import SidecarConfig
from ..exposition import DenseLabels, Family, family
from ..once import OncePerCause
from ..reading import Reading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collector:
    name: str
    tier: str  # the tier of its families (t0 always on; t1/t2 switched by flags)
    collect: Callable[[Reading], list[Family]]
    enabled: Callable[[SidecarConfig], bool] = lambda config: True


class Runner:
    """Runs the collectors over a reading, times them and reports their success. Logs a collector's failure
    once per kind of error (with its traceback), not every window."""

    def __init__(self, collectors: tuple[Collector, ...]):
        self.collectors = collectors
        self._logged = OncePerCause()

    def run(self, reading: Reading) -> tuple[list[Family], list[Family]]:
        """(families of the collectors that succeeded, the success/duration families)."""
        out: list[Family] = []
        success, duration = family("moe_monitor_collector_success"), family("moe_monitor_collector_duration_seconds")
        for c in self.collectors:
            if not c.enabled(reading.config):
                continue
            start = time.perf_counter()
            try:
                families = c.collect(reading)
                ok = 1
                self._logged.recovered(c.name)
            except Exception as e:  # noqa: BLE001 - a failing collector must not fail the scrape
                families, ok = [], 0
                if self._logged.first(c.name, type(e).__name__):
                    log.exception("collector %s failed; its metrics are left out until it recovers", c.name)
            out += families
            success.add(ok, [("collector", c.name)])
            duration.add(time.perf_counter() - start, [("collector", c.name)])
        return out, [success, duration]


DENSE = DenseLabels()  # label strings of dense families: rendered once per shape, reused every window


@functools.lru_cache(maxsize=64)
def _layer_strings(layer_ids: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(map(str, layer_ids))


def layer_labels(layer_ids) -> tuple[str, ...]:
    return _layer_strings(tuple(int(x) for x in layer_ids))


def layer_family(name: str, layer_ids, values) -> Family:
    f = family(name)
    f.add_dense(DENSE.get(name, ("layer",), (layer_labels(layer_ids),)), np.asarray(values))
    return f
