"""Cut a test fixture from a torch.profiler GPU trace: the device events (kernels, memcpy, memset) and the
step annotations (`gpu_user_annotation`), with only the fields the breakdown reads; CPU ops, runtime calls,
flow events and args are dropped. `--steps N` keeps the first N vLLM steps (from the first step's start to the
(N+1)-th step's start).

    python benchmarks/trim_trace.py IN.pt.trace.json.gz OUT.pt.trace.json.gz [--steps N]
"""

from __future__ import annotations

import argparse
import gzip
import json

KEEP = ("kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation")
FIELDS = ("ph", "cat", "name", "pid", "tid", "ts", "dur")


def trim(src: str, dest: str, steps: int | None = None) -> dict:
    with gzip.open(src) as f:
        doc = json.load(f)
    events = [{k: e[k] for k in FIELDS if k in e} for e in doc["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in KEEP]
    if steps:
        starts = sorted(e["ts"] for e in events
                        if e["cat"] == "gpu_user_annotation" and e["name"].startswith("execute_"))
        lo, hi = starts[0], starts[steps] if len(starts) > steps else float("inf")
        events = [e for e in events if lo <= e["ts"] < hi]
    events.sort(key=lambda e: e["ts"])
    with gzip.open(dest, "wt", compresslevel=9) as f:
        json.dump({"traceEvents": events}, f, separators=(",", ":"))
    return {"events": len(events)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--steps", type=int)
    args = ap.parse_args()
    print(trim(args.src, args.dest, args.steps))


if __name__ == "__main__":
    main()
