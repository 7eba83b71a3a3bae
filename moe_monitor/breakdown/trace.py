"""Streaming reader of torch.profiler Chrome traces (`.pt.trace.json.gz` or plain JSON).

ijson (yajl2 C backend) rather than json/orjson: it yields one event at a time, so memory stays bounded on
traces of hundreds of MB (the stdlib needs ~800 MB for a 138 MB trace; ijson streams it in ~15 MB), and only
the fields the analysis needs are kept, as small tuples.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass, field

import ijson

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
STEP_RE = re.compile(r"^execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)")
RANK_RE = re.compile(r"dp(\d+)_pp(\d+)_tp(\d+)(?:_dcp\d+)?_ep(\d+)_rank(\d+)")
# torch.distributed's own range around each collective's work (`gloo:all_to_all`, `nccl:all_reduce`, ...).
# Not used as an annotation: the annotation pass matches by time on every thread and stream, and gloo's range
# runs on the process group's own thread while the caller's ops go on (they are not inside it); NCCL's kernels
# are named. On CPU traces gloo's range IS the communication (no op runs inside it): it is kept as an op of
# its thread.
COMM_RE = re.compile(r"^(gloo|nccl|mpi|ucc|xccl):")


class TraceError(ValueError):
    """A file that is not a usable torch.profiler trace; the message says why."""


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    ts: float  # microseconds (the trace's unit; ns resolution as decimals)
    dur: float
    stream: int  # tid: CUDA stream for device events, thread for CPU ops
    cat: str


@dataclass
class Trace:
    path: str
    rank: str
    device: list[Event] = field(default_factory=list)  # kernels, memcpy, memset (GPU traces)
    cpu_ops: list[Event] = field(default_factory=list)  # only kept for CPU traces (vLLM CPU runs ops, not kernels),
    # with the c10d communication ranges of CPU backends (gloo) as ops of their thread
    steps: list[Event] = field(default_factory=list)  # execute_context_* ranges (device projection on GPU)
    annotations: list[Event] = field(default_factory=list)  # other record_function ranges

    @property
    def is_gpu(self) -> bool:
        return bool(self.device)


def rank_of(path: str) -> str:
    m = RANK_RE.search(os.path.basename(path))
    return f"dp{m.group(1)}-pp{m.group(2)}-tp{m.group(3)}-ep{m.group(4)}" if m else os.path.basename(path).split(".")[0]


def _open(path: str):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_trace(path: str) -> Trace:
    trace = Trace(path, rank_of(path))
    cpu_ops: list[tuple] = []  # cheap tuples while we do not know yet whether the trace has kernels
    comm: list[tuple] = []  # c10d communication ranges (COMM_RE)
    seen_events = False
    try:
        with _open(path) as f:
            for e in ijson.items(f, "traceEvents.item", use_float=True):
                seen_events = True
                if not isinstance(e, dict) or e.get("ph") != "X":
                    continue
                cat = e.get("cat", "")
                try:
                    ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
                except (KeyError, TypeError, ValueError):
                    continue
                name = str(e.get("name", ""))
                tid = e.get("tid", 0)
                stream = int(tid) if isinstance(tid, (int, float)) else hash(tid) & 0xFFFF
                if cat in DEVICE_CATS:
                    trace.device.append(Event(name, ts, dur, stream, cat))
                elif cat == "cpu_op":
                    cpu_ops.append((name, ts, dur, stream))
                elif cat in ("gpu_user_annotation", "user_annotation"):
                    if COMM_RE.match(name):
                        if cat == "user_annotation":
                            comm.append((name, ts, dur, stream))
                        continue
                    ev = Event(name, ts, dur, stream, cat)
                    (trace.steps if STEP_RE.match(name) else trace.annotations).append(ev)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise TraceError(f"{path}: truncated or corrupt gzip ({e})") from None
    except ijson.JSONError as e:
        raise TraceError(f"{path}: not valid JSON or cut short ({e})") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e})") from None
    if not seen_events:
        raise TraceError(f"{path}: no traceEvents: not a torch.profiler Chrome trace")
    if not trace.is_gpu:
        trace.cpu_ops = [Event(name, ts, dur, stream, "cpu_op") for name, ts, dur, stream in cpu_ops + comm]
    del cpu_ops, comm
    if trace.is_gpu:  # prefer the device projection of the step ranges when the trace has one
        device_steps = [s for s in trace.steps if s.cat == "gpu_user_annotation"]
        trace.steps = device_steps or trace.steps
        trace.annotations = [a for a in trace.annotations if a.cat == "gpu_user_annotation"] or trace.annotations
    if not trace.device and not trace.cpu_ops:
        raise TraceError(f"{path}: the trace holds no kernels and no CPU ops: nothing to break down")
    for events in (trace.device, trace.cpu_ops, trace.steps, trace.annotations):
        events.sort(key=lambda ev: (ev.ts, -ev.dur))
    return trace


def step_phase(name: str) -> tuple[str, int]:
    """(phase, tokens) from vLLM's `execute_context_<reqs>(<tokens>)_generation_<reqs>(<tokens>)`."""
    m = STEP_RE.match(name)
    if not m:
        return "unknown", 0
    prefill, decode = int(m.group(2)), int(m.group(4))
    phase = "mixed" if prefill and decode else ("prefill" if prefill else "decode")
    return phase, prefill + decode
