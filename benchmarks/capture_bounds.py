"""What a capture's analysis and the trace catalog cost at the sizes issue #24 item 7 reported: peak RSS and seconds
of analysing 1/2/4 rank traces the way a capture does (`Capturer._analyse`), and the time to list a catalog of
20,000 captures and one whose metadata.json is 300 MiB (Catalog(), list(), and a window tick of the real Exporter).

    .venv/bin/python benchmarks/capture_bounds.py [--events 300000] [--compare /tmp/before]

The rank traces are built from the two real ranks of tests/fixtures/traces/vllm026_x2_tp2ep_* by repeating their
events (copy k shifted by k x the longer rank's span, so that every copy's collectives still pair): ranks 0 and 2
from rank 0, 1 and 3 from rank 1, --events trace events each (nearly all kernels: every event is one the reader
keeps, the worst case per byte). Every measurement runs in a fresh process (peak RSS from VmHWM;
"base" is its RSS after the imports). With --compare, the same children run on another checkout too (e.g.
`git archive <commit> | tar -x -C /tmp/before`), before this one, on the same files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "traces")
SOURCES = [os.path.join(FIXTURES, f"vllm026_x2_tp2ep_dp0_pp0_tp{i}_dcp0_ep{i}_rank{i}.pt.trace.json.gz")
           for i in (0, 1)]
ID = "20261123T{:06d}Z-bench-{:06x}"

CHILD = r"""
import json, os, sys, tempfile, time
def status(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":")) / 1024
task, args = sys.argv[1], sys.argv[2:]
import moe_monitor
from moe_monitor.capture.capturer import CaptureConfig, Capturer
from moe_monitor.capture.catalog import Catalog
out = {"moe_monitor": os.path.dirname(os.path.dirname(moe_monitor.__file__))}
if task == "analyse":
    with tempfile.TemporaryDirectory() as d:
        c = Capturer(CaptureConfig("http://127.0.0.1:9", d), Catalog(os.path.join(d, "store")))
        out["base_mb"] = status("VmRSS")
        t, cpu = time.perf_counter(), time.process_time()
        result = c._analyse("bench", args)
        out["seconds"], out["cpu_s"] = time.perf_counter() - t, time.process_time() - cpu
        out["ok"] = result is not None and (len(args) < 2 or result.ep_wait is not None)
else:
    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.wiring import build
    root = args[0]
    t = time.perf_counter()
    catalog = Catalog(root)
    out["open_s"] = time.perf_counter() - t
    for i in (1, 2):
        t = time.perf_counter()
        out[f"listed_{i}"] = len(catalog.list())
        out[f"list_{i}_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        cfg = SidecarConfig(segment_dir=d, vllm_url="http://127.0.0.1:9", profile_dir=d, capture_dir=root)
        t = time.perf_counter()
        exporter = build(cfg, process_metrics=False)
        out["exporter_s"] = time.perf_counter() - t
        for i in (1, 2):
            t = time.perf_counter()
            exporter.tick(time.time())
            out[f"tick_{i}_s"] = time.perf_counter() - t
out["peak_mb"] = status("VmHWM")
print(json.dumps(out))
"""


def rank_traces(directory: str, ranks: int, events: int) -> list[str]:
    """`ranks` rank files of about `events` trace events each, in vLLM's names, from the two real tp2ep ranks: their
    events repeated, copy k shifted by k x the longer rank's span (so the ranks' collectives of a copy still
    pair), the rest of each document kept once."""
    docs = [json.loads(gzip.decompress(open(p, "rb").read())) for p in SOURCES]
    timed = [[e for e in d["traceEvents"] if "ts" in e] for d in docs]
    span = math.ceil(max(max(e["ts"] + e.get("dur", 0) for e in t) - min(e["ts"] for e in t) for t in timed))
    built = []
    for doc in docs:
        source = doc.pop("traceEvents")
        copies = [msgspec.json.encode([dict(e, ts=e["ts"] + k * span) if "ts" in e else e for e in source])[1:-1]
                  for k in range(math.ceil(events / len(source)))]
        rest = msgspec.json.encode(doc)[1:]  # the document's other keys, and its closing brace
        built.append(b'{"traceEvents": [' + b",".join(copies) + (b"], " if doc else b"]") + rest)
    paths = []
    for k in range(ranks):
        path = os.path.join(directory, f"bench_dp0_pp0_tp{k}_dcp0_ep{k}_rank{k}.pt.trace.json.gz")
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                    compresslevel=1) as f:
            f.write(built[k % 2])
        paths.append(path)
    return paths


def catalog_of(directory: str, captures: int, pad_bytes: int = 0) -> str:
    """A catalog of `captures` stored captures (metadata as Catalog.store writes it, ~2 kB); with `pad_bytes`, one
    of them (the newest) holds a window of that many bytes of statistics in its metadata.json."""
    os.makedirs(directory)
    shares = {c: 0.1 for c in ("experts", "attention", "gate", "align_permute", "all_to_all", "norm_elementwise")}
    for i in range(captures):
        capture_id = ID.format(i // 60 * 100 + i % 60, i)
        meta = {"created": 1.7e9 + i, "reason": "bench", "outcome": "ok", "evidence": {"signal": "imbalance"},
                "window": {"layers": list(range(48)), "imbalance_ratio": [1.25] * 48}, "breakdown": shares,
                "id": capture_id, "total_bytes": 1000, "files": [{"name": "rank0.pt.trace.json.gz", "bytes": 1000}]}
        os.mkdir(os.path.join(directory, capture_id))
        with open(os.path.join(directory, capture_id, "metadata.json"), "w") as f:
            json.dump(meta, f, indent=1)
            if pad_bytes and i == captures - 1:  # the same object with a longer window statistic (valid JSON)
                f.seek(0)
                f.write(json.dumps({k: v for k, v in meta.items() if k != "window"})[:-1])
                f.write(', "window": {"imbalance_ratio": [' + "0.1234567891, " * (pad_bytes // 14) + "0.5]}}")
    return directory


def child(task: str, args: list[str], checkout: str) -> dict:
    env = dict(os.environ, PYTHONPATH=checkout, OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, task, *args], capture_output=True, text=True, env=env,
                         timeout=600, cwd=checkout)  # -c puts the working directory first on sys.path
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    result = json.loads(out.stdout)
    assert os.path.realpath(result["moe_monitor"]) == os.path.realpath(checkout), (result, checkout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000, help="trace events per rank file")
    ap.add_argument("--captures", type=int, default=20_000)
    ap.add_argument("--metadata-mib", type=int, default=300)
    ap.add_argument("--compare", help="another checkout, measured first (the code before)")
    args = ap.parse_args()
    checkouts = ([("before", args.compare)] if args.compare else []) + [("this", ROOT)]
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        paths = rank_traces(d, 4, args.events)
        with gzip.open(paths[0]) as f:
            size = sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))
        print(f"{len(paths)} rank traces of ~{args.events:,} events, {size / 1e6:.0f} MB of JSON "
              f"({os.path.getsize(paths[0]) / 1e6:.1f} MB gzipped) each, built in {time.perf_counter() - t:.1f} s; "
              f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
        print(f"{'code':7s} {'ranks':>5s} {'seconds':>8s} {'CPU s':>6s} {'peak RSS MB':>12s} {'base MB':>8s} "
              f"{'peak - base MB':>15s}")
        for label, checkout in checkouts:
            for n in (1, 2, 4):
                r = child("analyse", paths[:n], checkout)
                assert r["ok"], r
                print(f"{label:7s} {n:5d} {r['seconds']:8.2f} {r['cpu_s']:6.2f} {r['peak_mb']:12.0f} "
                      f"{r['base_mb']:8.0f} {r['peak_mb'] - r['base_mb']:15.0f}", flush=True)
        for path in paths:
            os.unlink(path)
        t = time.perf_counter()
        catalogs = {f"{args.captures:,} captures": catalog_of(os.path.join(d, "many"), args.captures),
                    f"metadata.json of {args.metadata_mib} MiB": catalog_of(os.path.join(d, "big"), 3,
                                                                           args.metadata_mib << 20)}
        print(f"catalogs built in {time.perf_counter() - t:.1f} s")
        print(f"{'code':7s} {'catalog':28s} {'open s':>7s} {'list s':>7s} {'again s':>8s} {'listed':>7s} "
              f"{'Exporter() s':>12s} {'tick s':>7s} {'tick again s':>12s} {'peak RSS MB':>11s}")
        for label, checkout in checkouts:
            for name, root in catalogs.items():
                r = child("list", [root], checkout)
                print(f"{label:7s} {name:28s} {r['open_s']:7.2f} {r['list_1_s']:7.3f} {r['list_2_s']:8.3f} "
                      f"{r['listed_2']:7d} {r['exporter_s']:12.2f} {r['tick_1_s']:7.3f} {r['tick_2_s']:12.3f} "
                      f"{r['peak_mb']:11.0f}", flush=True)
        shutil.rmtree(os.path.join(d, "many"))


if __name__ == "__main__":
    main()
