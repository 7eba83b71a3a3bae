"""Sidecar cost at DeepSeek-V3 scale: 61 MoE layers x 256 experts x 16 ranks (DP=EP=16), 1 s windows.

A writer process plays the 16 plugins (publishes every rank's cumulative snapshot every second); a real
`moe-monitor serve` process reads them and is scraped with gzip every 15 s. Printed: the sidecar's CPU % of
one core and RSS over the run, and /metrics scrape time (median of repeated GETs, plain and gzip), for T0+T1
(default tiers) and full T2 (--expert-series all). Baseline in the same run: a straightforward
prometheus-client custom collector that reads the segments and renders the same series at every scrape.

    .venv/bin/python benchmarks/sidecar_scale.py [--seconds 30]
    .venv/bin/python benchmarks/sidecar_scale.py --compare /tmp/old   # another checkout, side by side

With --compare, each tier is measured four times, interleaved: this checkout, the other, this, the other;
the two runs of the same code are the A/A control (how much two identical runs differ on this machine).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from moe_monitor.channel import LAYER_HOOKED, Ranks, SegmentWriter, Shape
from moe_monitor.plugin.steps import StepStats

L, E, RANKS, TOP_K = 61, 256, 16, 8
SCRAPE_INTERVAL_S = 15.0  # a common Prometheus scrape interval


def writer(directory: str, stop) -> None:
    rng = np.random.default_rng(0)
    steps = StepStats()
    shape = Shape(L, E, len(steps.token_bounds), len(steps.duration_bounds))
    writers = [SegmentWriter(directory, "deepseek-v3", Ranks(global_rank=r, world_size=RANKS, dp_rank=r, dp_size=RANKS,
                                                              ep_rank=r, ep_size=RANKS), shape, TOP_K)
               for r in range(RANKS)]
    counts = [np.zeros((L, E), dtype=np.int64) for _ in range(RANKS)]
    while not stop.is_set():
        for r, w in enumerate(writers):
            counts[r] += rng.poisson(40, size=(L, E))
            steps.record_step("decode", 64, 0.03)
            arrays = steps.snapshot()
            arrays.update(counts=counts[r], layer_ids=np.arange(L, dtype=np.int32) + 3,
                          layer_flags=np.full(L, LAYER_HOOKED, dtype=np.uint8))
            w.publish(arrays)
        stop.wait(1.0)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def scrape_ms(url: str, n: int, gzip: bool) -> tuple[float, int]:
    times, size = [], 0
    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    for _ in range(n):
        t = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            size = len(r.read())
        times.append((time.perf_counter() - t) * 1000)
        time.sleep(0.05)
    return statistics.median(times), size


def measure_sidecar(directory: str, args: list[str], seconds: float, port: int, code: str | None = None) -> dict:
    """`code`: the root of another checkout to run instead of this one."""
    env = dict(os.environ, PYTHONPATH=code) if code else None
    proc = subprocess.Popen([sys.executable, "-m", "moe_monitor.cli", "--log-level", "warning", "serve",
                             "--segment-dir", directory, "--listen", f"127.0.0.1:{port}", "--window", "1", *args],
                            env=env, cwd=code or None)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(3)  # a few windows in
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        while time.monotonic() - t0 < seconds:  # scraped like Prometheus does (gzip, every SCRAPE_INTERVAL_S)
            urllib.request.urlopen(urllib.request.Request(url, headers={"Accept-Encoding": "gzip"}), timeout=10).read()
            time.sleep(min(SCRAPE_INTERVAL_S, max(0.0, seconds - (time.monotonic() - t0))))
        cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100
        plain, size = scrape_ms(url, 40, gzip=False)
        zipped, zsize = scrape_ms(url, 40, gzip=True)
        body = urllib.request.urlopen(url).read().decode()
        series = sum(1 for line in body.splitlines() if line and not line.startswith("#"))
        return {"cpu_pct": cpu, "rss_mb": rss_mb(proc.pid), "scrape_ms": plain, "scrape_gzip_ms": zipped,
                "bytes": size, "gzip_bytes": zsize, "series": series}
    finally:
        proc.terminate()
        proc.wait()


def naive_baseline(directory: str, full: bool, n: int = 10) -> tuple[float, int]:
    """A straightforward custom collector: read every segment and build families sample by sample at scrape."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from moe_monitor.channel import list_segments, read_segment
    from moe_monitor.stats.imbalance import layer_stats
    from moe_monitor.stats.placement import contiguous

    class Naive:
        def collect(self):
            snaps = [read_segment(p) for p in list_segments(directory)]
            counts = sum(s.counts.astype(np.int64) for s in snaps)
            st = layer_stats(counts, top_k=TOP_K)
            for name in ("imbalance_ratio", "balancedness", "cv", "entropy", "top1_share", "topk_share",
                         "dead_experts", "hot_experts"):
                g = GaugeMetricFamily(f"moe_layer_{name}", name, labels=["layer"])
                for layer, v in enumerate(getattr(st, name)):
                    g.add_metric([str(layer)], float(v))
                yield g
            rank = contiguous(E, RANKS).rank_load(counts)
            c = CounterMetricFamily("moe_ep_rank_routed_tokens", "x", labels=["layer", "ep_rank"])
            for layer in range(L):
                for r in range(RANKS):
                    c.add_metric([str(layer), str(r)], float(rank[layer, r]))
            yield c
            h = GaugeMetricFamily("moe_expert_load_ratio_bucket", "x", labels=["layer", "le"])
            for layer in range(L):
                for b in range(13):
                    h.add_metric([str(layer), str(b)], float(b))
            yield h
            if full:
                e = CounterMetricFamily("moe_expert_routed_tokens", "x", labels=["layer", "expert"])
                for layer in range(L):
                    for expert in range(E):
                        e.add_metric([str(layer), str(expert)], float(counts[layer, expert]))
                yield e

    registry = CollectorRegistry()
    registry.register(Naive())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        body = generate_latest(registry)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), body.count(b"\n") - body.count(b"# ")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--compare", default=None, help="root of another checkout to measure side by side")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        stop = mp.Event()
        w = mp.Process(target=writer, args=(d, stop), daemon=True)
        w.start()
        time.sleep(3)
        results = {}
        tiers = (("T0+T1", []), ("T0+T1+T2 (all experts)", ["--expert-series", "all"]))
        if args.compare:
            for name, flags in tiers:
                for run, code in enumerate((None, args.compare, None, args.compare)):
                    r = measure_sidecar(d, flags, args.seconds, 9599, code)
                    label = "this" if code is None else "other"
                    print(f"{name:24s} run {run + 1} {label:5s}: {r['series']:6d} series, CPU {r['cpu_pct']:.2f} % "
                          f"of one core, RSS {r['rss_mb']:.0f} MB, scrape {r['scrape_ms']:.2f} ms plain, "
                          f"{r['scrape_gzip_ms']:.2f} ms gzip", flush=True)
            stop.set()
            w.join(5)
            return
        for name, flags in (("T0+T1", []), ("T0+T1+T2 (all experts)", ["--expert-series", "all"])):
            results[name] = measure_sidecar(d, flags, args.seconds, 9599)
            r = results[name]
            print(f"sidecar {name:24s}: {r['series']:6d} series, CPU {r['cpu_pct']:.2f} % of one core, "
                  f"RSS {r['rss_mb']:.0f} MB, scrape {r['scrape_ms']:.2f} ms plain ({r['bytes'] / 1024:.0f} KiB), "
                  f"{r['scrape_gzip_ms']:.2f} ms gzip ({r['gzip_bytes'] / 1024:.0f} KiB)", flush=True)
        for name, full in (("T0+T1", False), ("T0+T1+T2 (all experts)", True)):
            ms, series = naive_baseline(d, full)
            print(f"naive prometheus-client collector {name:24s}: {series:6d} series, {ms:.1f} ms per scrape "
                  f"(reads and renders at every scrape)", flush=True)
        stop.set()
        w.join(5)


if __name__ == "__main__":
    main()
