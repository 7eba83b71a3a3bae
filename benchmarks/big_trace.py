"""A large torch.profiler trace built from a real one, for benchmarks/breakdown_vs_hta.py --big.

    .venv/bin/python benchmarks/big_trace.py OUT.pt.trace.json.gz \
        --from benchmarks/results/vllm026_h200_eager_rank0.pt.trace.json.gz --min-mb 130

Every event of the source's `traceEvents` (all categories and phases, metadata included) is repeated, copy k
shifted by k x the source's span (first ts to last end, rounded up to whole microseconds) and with its
correlation, flow and External ids offset by k x (the source's largest + 1), until the decompressed JSON is at
least --min-mb MB (10^6 bytes). The rest of the document (deviceProperties, distributedInfo, ...) is kept once.
The rewriting is textual: the source's layout and its ns-resolution timestamps are kept digit for digit (an
integer number of microseconds is added to the integer part), so every copy is as the profiler wrote it.
Deterministic: the same source gives the same bytes (gzip with mtime 0 and no file name).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
from decimal import Decimal

TS = re.compile(rb'(?<!\\)("ts": )(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)')
IDS = re.compile(rb'(?<!\\)("(?:correlation|id|External id)": )(\d+)(?=[,\s}])')


def build(source: bytes, min_bytes: int) -> tuple[bytes, int, int]:
    """(the big trace's JSON, copies, events)"""
    doc = json.loads(source)
    events = doc["traceEvents"]
    starts = [float(e["ts"]) for e in events if isinstance(e.get("ts"), (int, float))]
    ends = [float(e["ts"]) + float(e.get("dur", 0)) for e in events if isinstance(e.get("ts"), (int, float))]
    span = math.ceil(max(ends) - min(starts))
    ids = [int(v) for e in events for k, v in (*e.items(), *(e.get("args") or {}).items())
           if k in ("correlation", "id", "External id") and isinstance(v, int)]
    id_step = max(ids, default=0) + 1
    text = source.decode()
    begin = text.index("[", text.index('"traceEvents"'))
    _, end = json.JSONDecoder().raw_decode(text, begin)  # just after the array's closing bracket
    begin, end = len(text[: begin + 1].encode()), len(text[: end - 1].encode())  # as byte offsets
    head, body, tail = source[:begin], source[begin:end].rstrip(), source[end:]
    assert len(json.loads(b"[" + body + b"]")) == len(events)

    def copy(k: int) -> bytes:
        if not k:
            return body
        shifted = TS.sub(lambda m: m[1] + str(Decimal(m[2].decode()) + k * span).encode(), body)  # exact
        return IDS.sub(lambda m: m[1] + str(int(m[2]) + k * id_step).encode(), shifted)

    parts, size, k = [], len(head) + len(tail), 0
    while size < min_bytes or not parts:
        part = copy(k)
        parts.append(part)
        size += len(part) + (2 if k else 0)
        k += 1
    return head + b",\n".join(parts) + tail, k, k * len(events)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--from", dest="source", required=True)
    ap.add_argument("--min-mb", type=float, default=130)
    args = ap.parse_args()
    with open(args.source, "rb") as f:
        source = f.read()
    if source[:2] == b"\x1f\x8b":
        source = gzip.decompress(source)
    data, copies, events = build(source, int(args.min_mb * 1e6))
    with open(args.out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(data)
    print(f"{args.out}: {copies} copies of {args.source}, {events:,} events, {len(data) / 1e6:.1f} MB of JSON")


if __name__ == "__main__":
    main()
