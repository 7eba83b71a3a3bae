"""What clients polling /api/flight cost the sidecar, and whether its scrapes notice (issue #24 item 3).

The real `moe-monitor serve` of each tree given (a checkout of this repository: the code before and after a
change, side by side in one run; the same tree twice is the A/A control), fed a segment of 400 layers x 1024
experts until its flight record is ~12 MB of JSON; then CLIENTS threads fetch the whole record (gzipped, as
`top` and browsers ask) for SECONDS while a scraper reads /metrics every 0.2 s. Printed per tree: the sidecar's
CPU seconds over the run, its peak RSS, answers served, and /metrics latency p50 / max.

    .venv/bin/python benchmarks/flight_clients.py /tmp/before . .     # before, after, after again (A/A)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sidecar_scale import cpu_seconds  # noqa: E402

from moe_monitor.channel.layout import Ranks, Shape  # noqa: E402
from moe_monitor.channel.writer import SegmentWriter  # noqa: E402
from moe_monitor.demo.launch import free_port  # noqa: E402
from moe_monitor.plugin.steps import StepStats  # noqa: E402

CLIENTS, SECONDS, LAYERS, EXPERTS, WINDOWS = 16, 20, 400, 1024, 5
TOKEN = "bench"


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def get(url: str, gzip: bool = False, timeout: float = 60) -> bytes:
    headers = {"Authorization": f"Bearer {TOKEN}", **({"Accept-Encoding": "gzip"} if gzip else {})}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return r.read()


def run(tree: str) -> str:
    work = tempfile.mkdtemp(prefix="flight-clients-")
    seg = os.path.join(work, "seg")
    steps = StepStats()
    writer = SegmentWriter(seg, "bench/big", Ranks(0, 1, 0, 1, 0, 1, 0, 1, 0, 1),
                           Shape(LAYERS, EXPERTS, len(steps.token_bounds), len(steps.duration_bounds)), top_k=8)
    counts = np.zeros((LAYERS, EXPERTS), dtype=np.int64)
    rng = np.random.default_rng(0)

    def publish():
        arrays = steps.snapshot()
        arrays.update(counts=counts, layer_ids=np.arange(LAYERS, dtype=np.int32),
                      layer_flags=np.ones(LAYERS, dtype=np.uint8))
        writer.publish(arrays)

    publish()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}  # and cwd: `-m` puts the cwd first on sys.path
    proc = subprocess.Popen([sys.executable, "-m", "moe_monitor.cli", "serve", "--segment-dir", seg, "--listen",
                             f"127.0.0.1:{port}", "--window", "1", "--flight-minutes", str(WINDOWS / 60),
                             "--stale-after", "1000000", "--api-token", TOKEN],
                            env=env, cwd=os.path.abspath(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                get(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        for _ in range(WINDOWS + 1):
            counts[:] += rng.integers(1000, 99999, size=counts.shape)
            publish()
            time.sleep(1.0)
        size = len(get(base + "/api/flight"))
        stop = threading.Event()
        served, refused, sent, latencies = [0], [0], [0], []

        def client():
            while not stop.is_set():
                try:
                    sent[0] += len(get(base + "/api/flight", gzip=True))
                    served[0] += 1
                except urllib.error.HTTPError as e:  # 503 busy: a client retries (sooner than Retry-After asks)
                    refused[0] += e.code == 503
                    time.sleep(0.1)

        def scraper():
            while not stop.is_set():
                t = time.perf_counter()
                get(base + "/metrics")
                latencies.append(time.perf_counter() - t)
                time.sleep(0.2)

        def feeder():  # routing goes on: every window of the record stays ~2.5 MB of JSON that does not shrink
            while not stop.is_set():
                counts[:] += rng.integers(1000, 99999, size=counts.shape)
                publish()
                time.sleep(0.5)

        threads = [threading.Thread(target=f) for f in [client] * CLIENTS + [scraper, feeder]]
        cpu0 = cpu_seconds(proc.pid)
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(120)
        cpu = cpu_seconds(proc.pid) - cpu0
        return (f"{tree}: record {size / 1e6:.1f} MB; {CLIENTS} clients for {SECONDS} s: {served[0]} answers "
                f"({sent[0] / 1e9:.1f} GB gzipped), {refused[0]} busy (503), "
                f"sidecar CPU {cpu:.1f} s, peak RSS {peak_rss_mb(proc.pid):.0f} MB; /metrics p50 "
                f"{1e3 * statistics.median(latencies):.1f} ms, max {1e3 * max(latencies):.0f} ms "
                f"({len(latencies)} scrapes)")
    finally:
        proc.terminate()
        proc.wait(30)
        writer.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    trees = sys.argv[1:] or ["."]
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {LAYERS} x {EXPERTS}, {WINDOWS} windows")
    for tree in trees:
        print(run(tree), flush=True)


if __name__ == "__main__":
    main()
