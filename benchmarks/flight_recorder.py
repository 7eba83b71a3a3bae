"""Memory and disk of the routing flight recorder at scale, and what a capture's snapshot costs the window thread.

For each configuration: the ring's bytes (FlightRecorder.nbytes) and the process's RSS growth while filling it,
the stored record's size (the gzipped JSON a capture keeps: disk) and its JSON size (what /api/flight sends
uncompressed), the time the window thread spends taking a capture's snapshot, and the time the capture's thread
spends serialising it. Loads are skewed
like real routing (per-layer Zipf over experts, a few hundred thousand assignments per window).

    .venv/bin/python benchmarks/flight_recorder.py
"""

from __future__ import annotations

import gc
import gzip
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_monitor.schema.flight_record import parse  # noqa: E402
from moe_monitor.sidecar.config import SidecarConfig  # noqa: E402
from moe_monitor.sidecar.flight import FlightRecorder  # noqa: E402
from moe_monitor.sidecar.windows import Window  # noqa: E402

CONFIGS = [  # name, layers, experts, EP ranks, window seconds, minutes
    ("DeepSeek-V3 scale, 5 s windows (default)", 61, 256, 16, 5.0, 10.0),
    ("DeepSeek-V3 scale, 1 s windows", 61, 256, 16, 1.0, 10.0),
    ("Qwen3-30B-A3B, 5 s windows", 48, 128, 8, 5.0, 10.0),
    ("Mixtral-8x7B, 5 s windows", 32, 8, 1, 5.0, 10.0),
]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))


def run(name: str, layers: int, experts: int, ranks: int, window_s: float, minutes: float) -> str:
    rng = np.random.default_rng(0)
    capacity = SidecarConfig(window_s=window_s, flight_minutes=minutes).flight_windows
    weights = 1.0 / np.arange(1, experts + 1) ** 0.8
    gc.collect()
    before = rss_kib()
    rec = FlightRecorder(capacity)
    recording = []
    for i in range(capacity):
        counts = np.stack([rng.multinomial(int(400_000 * window_s), rng.permutation(weights / weights.sum()))
                           for _ in range(layers)])
        load = counts.reshape(layers, ranks, -1).sum(axis=2) if experts % ranks == 0 else None
        window = Window(1000.0 + i * window_s, 1000.0 + (i + 1) * window_s, np.arange(layers), counts,
                        np.ones((3, 10), np.int64), np.ones((3, 10)), np.arange(10.0))
        t = time.perf_counter()
        rec.record(window, load)  # on the window thread: the window is encoded once, here
        recording.append(time.perf_counter() - t)
    grown = (rss_kib() - before) / 1024
    t = time.perf_counter()
    snap = rec.snapshot(model=name, trigger=0.0)  # on the window thread, when a capture starts
    taken = time.perf_counter() - t
    t = time.perf_counter()
    data = snap.gzipped()  # on the capture's thread
    took = time.perf_counter() - t
    t = time.perf_counter()
    rec.body(name, None, None, gzipped=False)  # an /api/flight request for the whole record (off the event loop)
    served = time.perf_counter() - t
    t = time.perf_counter()
    parse(data)
    parse_s = time.perf_counter() - t
    json_bytes = len(gzip.decompress(data))
    return (f"{name}: {capacity} windows of {layers} x {experts}" + (f", {ranks} EP ranks" if ranks > 1 else "")
            + f"\n  ring {rec.nbytes / 1e6:.1f} MB (RSS grew {grown:.1f} MiB while filling it)"
            + f"\n  stored with a capture: {len(data) / 1e6:.1f} MB gzipped ({json_bytes / 1e6:.1f} MB of JSON);"
            + f"\n  recording a window (encoding it) {1e3 * np.median(recording):.2f} ms median on the window thread;"
            + f" snapshot {1e6 * taken:.0f} us; gzipped on the capture's thread in {took:.2f} s; /api/flight answer"
            + f" {1e3 * served:.0f} ms; parsed back in {parse_s:.2f} s")


def main() -> None:
    print(f"{os.cpu_count()} CPUs, numpy {np.__version__}, Python {sys.version.split()[0]}")
    for cfg in CONFIGS:
        print(run(*cfg), flush=True)


if __name__ == "__main__":
    main()
