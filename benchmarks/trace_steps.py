"""Step times from a vLLM GPU profiler trace, defined as moe-monitor's step timer defines them.

Used by tests/test_vllm_gpu.py (the plugin's moe_step_duration_seconds against the trace of the same steps)
and runnable on committed traces:  python benchmarks/trace_steps.py TRACE [TRACE...]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trace_step_times(path: str) -> list[dict]:
    """Per vLLM step of a GPU trace, what the plugin's timer measures (docs/recorder.md, "Step time"): from
    the first device work on vLLM's stream at or after the previous step's end (the plugin's begin event is
    recorded with that work) to the end of the step's last work on that stream before its sampled tokens are
    copied out (the D2H copy on vLLM's output stream follows sampling; the end event is recorded there).
    Also `forward_s`, the device projection of vLLM's step annotation (it wraps the forward only), and
    `idle_before_s`, the device's idle time on vLLM's stream between the previous step's end and this step's first
    work (0 for the first step): the plugin's step starts when the device could start it (the previous end, or
    the host's entry into the step if later), so it lies between `step_s` and `step_s + idle_before_s`. The last
    step of the trace is left out (its end is not bounded by a next step)."""
    import gzip

    from moe_monitor.breakdown.trace import STEP_RE, step_phase

    with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
        events = json.load(f)["traceEvents"]
    steps = sorted((e for e in events if e.get("cat") == "gpu_user_annotation" and STEP_RE.match(e.get("name", ""))),
                   key=lambda e: e["ts"])
    work = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    out, prev_end = [], None
    for step, nxt in zip(steps, steps[1:]):
        inside = [w["tid"] for w in work if step["ts"] <= w["ts"] < step["ts"] + step["dur"]]
        if not inside:
            continue
        main = max(set(inside), key=inside.count)  # vLLM's compute stream
        copies = [w["ts"] for w in work if step["ts"] + step["dur"] <= w["ts"] < nxt["ts"] and w["tid"] != main
                  and w["cat"] == "gpu_memcpy" and "DtoH" in w["name"]]
        cut = copies[0] if copies else nxt["ts"]
        end = max(w["ts"] + w.get("dur", 0) for w in work if w["tid"] == main and step["ts"] <= w["ts"] < cut)
        first = [w["ts"] for w in work if w["tid"] == main and (prev_end or 0) <= w["ts"] <= step["ts"]]
        phase, tokens = step_phase(step["name"])
        start = min(first) if first else step["ts"]
        out.append({"phase": phase, "tokens": tokens, "forward_s": step["dur"] / 1e6,
                    "step_s": (end - start) / 1e6,
                    "idle_before_s": (start - prev_end) / 1e6 if prev_end is not None else 0.0})
        prev_end = end
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        steps = trace_step_times(path)
        print(os.path.basename(path))
        for phase in ("prefill", "mixed", "decode"):
            mine = [s for s in steps if s["phase"] == phase]
            if mine:
                step = sum(s["step_s"] for s in mine) / len(mine)
                fwd = sum(s["forward_s"] for s in mine) / len(mine)
                print(f"  {phase:8s} {len(mine):3d} steps  step {step * 1e3:8.3f} ms  forward {fwd * 1e3:8.3f} ms")
