"""Cost of one sidecar tick over segments whose format-2 sections do not match their header (issue #24 item 6).

Each case is written with the real SegmentWriter (2 DP ranks, 2 layers x 8 experts, ep_size 2) and read by the real
Exporter in a fresh process that only reads: three ticks (a window baseline, two closed windows, the segments
republished in between, written beforehand by another process). Printed per case: the slowest tick's wall time, the
reading process's peak RSS (and its growth over the ticks), the EP ranks exported, whether windows closed and
reached the flight recorder.

    .venv/bin/python benchmarks/segment_sections.py            # every case
    .venv/bin/python benchmarks/segment_sections.py --case 1M_columns

Cases: `good` (a placement of 10 slots, the EP-rank load of 2 columns), `1M_columns` (an EP-rank load section of
1,048,576 columns), `2M_slots` (a placement of 2,097,152 slots for 8 experts, no EP-rank load: the sidecar splits
the counts under it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_monitor.channel import LAYER_HOOKED, Ranks, SegmentWriter, Shape  # noqa: E402
from moe_monitor.plugin.steps import StepStats  # noqa: E402

L, E, EP = 2, 8, 2
CASES = {"good": (10, EP), "1M_columns": (10, 1 << 20), "2M_slots": (1 << 21, 0)}  # (slots, load columns)


def writers(directory: str, case: str) -> list[SegmentWriter]:
    slots, columns = CASES[case]
    steps = StepStats()
    shape = Shape(L, E, len(steps.token_bounds), len(steps.duration_bounds), num_physical=slots,
                  num_load_ranks=columns)
    return [SegmentWriter(directory, "tiny-moe", Ranks(global_rank=dp, world_size=EP, dp_rank=dp, dp_size=EP,
                                                       ep_rank=dp, ep_size=EP), shape, top_k=2) for dp in range(EP)]


def publish(ws: list[SegmentWriter], case: str, step: int) -> None:
    slots, columns = CASES[case]
    steps = StepStats()
    steps.record_step("decode", 64, 0.03)
    for w in ws:
        counts = np.full((L, E), 1000 * step, dtype=np.int64)
        counts[:, 3] *= 4
        arrays = steps.snapshot()
        arrays.update(counts=counts, layer_ids=np.arange(L, dtype=np.int32),
                      layer_flags=np.full(L, LAYER_HOOKED, dtype=np.uint8),
                      physical_to_logical=np.tile(np.arange(slots, dtype=np.int32) % E, (L, 1)),
                      ep_rank_load=np.full((L, columns), 10.0 * step) if columns else None)
        w.publish(arrays)


def prepare(root: str, case: str, ticks: int) -> None:
    """The segments of every tick, written beforehand (by one writer per rank, so one generation): the process
    measured only reads."""
    ws = writers(os.path.join(root, "live"), case)
    for i in range(ticks):
        publish(ws, case, i + 1)
        os.makedirs(os.path.join(root, str(i)))
        for w in ws:
            shutil.copy(w.path, os.path.join(root, str(i)))
    for w in ws:
        w.close(remove=True)


def peak_rss_kb() -> int:
    """This process's peak RSS (VmHWM: its own address space; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def one_case(root: str, case: str, ticks: int) -> dict:
    from moe_monitor.sidecar.config import SidecarConfig
    from moe_monitor.sidecar.wiring import build

    live = os.path.join(root, "live")
    exporter = build(SidecarConfig(segment_dir=live, window_s=1.0), process_metrics=False)
    before = peak_rss_kb()
    seconds = []
    for i in range(ticks):
        for name in os.listdir(os.path.join(root, str(i))):
            shutil.copy(os.path.join(root, str(i), name), os.path.join(live, name + ".tmp"))
            os.replace(os.path.join(live, name + ".tmp"), os.path.join(live, name))
        t = time.perf_counter()
        body = exporter.tick(1000.0 + i).body
        seconds.append(time.perf_counter() - t)
    peak = peak_rss_kb()
    ranks = {line.split('ep_rank="')[1].split('"')[0] for line in body.decode().splitlines()
             if line.startswith("moe_ep_rank_routed_tokens_total{")}
    return {"case": case, "tick_s": max(seconds), "peak_rss_mb": peak / 1024,
            "peak_rss_growth_mb": (peak - before) / 1024,
            "ep_ranks": len(ranks), "window_closed": exporter.window is not None,
            "flight_windows": len(exporter.flight)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--ticks", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_case(args.child, args.case, args.ticks)))
        return
    for case in [args.case] if args.case else list(CASES):
        with tempfile.TemporaryDirectory() as root:
            prepare(root, case, args.ticks)
            out = subprocess.run([sys.executable, __file__, "--child", root, "--case", case, "--ticks",
                                  str(args.ticks)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['case']:11s} slowest tick {r['tick_s']:7.3f} s  peak RSS {r['peak_rss_mb']:7.1f} MB "
              f"(+{r['peak_rss_growth_mb']:.1f} over the ticks)  "
              f"EP ranks exported {r['ep_ranks']:7d}  window closed {r['window_closed']}  "
              f"flight windows {r['flight_windows']}")


if __name__ == "__main__":
    main()
