"""A perf_counter_ns wrapper for the benchmarks that time a function where it is called from (plugin_host_cost.py,
publisher_cost_breakdown.py): `add(name, ns)` receives each call's time."""

from __future__ import annotations

import time


def timed(name: str, fn, add):
    def wrapper(*args, **kwargs):
        t = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            add(name, time.perf_counter_ns() - t)
    wrapper.__wrapped__ = fn
    return wrapper
