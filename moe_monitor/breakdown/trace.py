"""Streaming reader of torch.profiler Chrome traces (`.pt.trace.json.gz` or plain JSON).

ijson (yajl2 C backend) rather than json/orjson: it yields one event at a time, so memory stays bounded on
traces of hundreds of MB (the stdlib needs ~800 MB for a 138 MB trace; ijson streams it in ~15 MB), and only
the fields the analysis needs are kept, as small tuples.

The sidecar reads files that another process wrote, so a trace is untrusted input, and neither yajl nor ijson
has limits: ijson keeps the path of every open array/object as a string (`a.item.item...`), so memory grows
with the square of the nesting depth (a 115-byte gzip of 20,000 `[` took 970 MB, 100,000 a MemoryError), and
yajl re-reads a string or number from its start each time another 64 KiB of it arrives, so CPU grows with the
square of its length (a 64 MiB string took 11 s, a 64 MiB number 144 s). `_Guard` scans every block before
yajl sees it, in numpy at 5-8 % of the parse's cost, and refuses a trace over `TraceLimits` with a TraceError
that names the file and the limit.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass, field

import ijson
import numpy as np

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
KEPT_CATS = {c: c for c in (*DEVICE_CATS, "cpu_op", "gpu_user_annotation", "user_annotation")}  # one copy each
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


@dataclass(frozen=True)
class TraceLimits:
    """What read_trace accepts. Real traces (vLLM 0.26 on an H200, the fixtures): 1-50 MB gzipped at ~13:1, so
    up to ~650 MB of JSON; 5-7 levels deep; longest string 1,270 bytes (a CUTLASS kernel name); events ~0.3-2 kB.

    Worst case within the defaults: CPU, max_bytes of parsing (~35 s at 60 MB/s; ~70 s for bracket-dense JSON);
    memory, the event being built (~35 MB) + the kept events (~600 MB at max_events) + max_name_bytes.
    """

    max_bytes: int = 2 << 30  # decompressed JSON: 3x the largest real trace
    max_depth: int = 64  # nested arrays/objects (real: <= 7); ijson's memory grows with its square
    max_token: int = 1 << 20  # bytes of one string or number, or of the blanks between two tokens
    max_event_bytes: int = 1 << 20  # one element of a top-level array (a traceEvents event), built whole by
    # ijson: up to ~30 bytes of objects per byte (`[[],[],...]`), so ~35 MB. distributedInfo's lists are not events
    max_events: int = 4_000_000  # traceEvents entries (real: ~4.2k per MB of JSON); kept ones cost ~130 B each
    max_name_bytes: int = 64 << 20  # distinct event names, summed (real: 12 kB); each is kept once


LIMITS = TraceLimits()
_BLOCK = 1 << 20  # what _Guard reads and scans at a time; ijson reads 64 KiB from it (faster than 1 MiB reads)
_EVENT_LEVEL = 3  # {"traceEvents": [{...}]}: an event is what opens at depth 3
QUOTE, BACKSLASH, COMMA = ord('"'), ord("\\"), ord(",")


class _Guard:
    """A file object for ijson that refuses JSON over `limits` before the parser sees it.

    Per 1 MiB block, numpy finds the quotes (less those after an odd run of backslashes) and the brackets; the
    parity of the quotes before each bracket says whether it is inside a string. The brackets outside strings
    give the depth and the spans of the elements of top-level arrays (events); the gaps between quotes give the
    tokens' lengths (a gap over the limit outside strings is split at brackets and commas before it counts).
    State carries over blocks, so the cost is linear in the bytes read (~1 ms per MiB, 5-8 % of the parse).
    """

    def __init__(self, f, path: str, limits: TraceLimits):
        self.f, self.path, self.limits = f, path, limits
        self.block, self.cursor = b"", 0
        self.read_bytes = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False  # the block ended inside a string on an odd run of backslashes
        self.last_boundary = -1  # offset of the last quote, or bracket or comma outside a string
        self.in_array = False  # the container open at depth 2 is an array (`traceEvents`): its elements are events
        self.element_start = -1  # offset where the open element at depth 3 began, -1 when none is open
        self.element_is_event = False  # it is in an array
        self._buffers = np.empty((4, 0), np.uint8)  # reused per block: fresh arrays cost more in page faults

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes of the current block (ijson reads 64 KiB at a time); a block is scanned whole first."""
        if n == 0:
            return b""
        if self.cursor >= len(self.block):
            self.block, self.cursor = self.f.read(_BLOCK), 0
            if self.block:
                self._scan(self.block)
        end = len(self.block) if n < 0 else self.cursor + n
        data = self.block[self.cursor : end]
        self.cursor += len(data)
        return data

    def refuse(self, what: str, limit: str) -> TraceError:
        return TraceError(f"{self.path}: refused: {what} (limit {limit}={getattr(self.limits, limit):,})")

    def _scan(self, data: bytes) -> None:
        start, size = self.read_bytes, len(data)
        self.read_bytes += size
        if self.read_bytes > self.limits.max_bytes:
            raise self.refuse("more JSON than the limit (decompressed)", "max_bytes")
        if self._buffers.shape[1] < size:
            self._buffers = np.empty((4, size), np.uint8)
        raw = np.frombuffer(data, np.uint8)
        quotes_, folded, opens, closes = (b[:size] for b in self._buffers)
        quotes = np.equal(raw, QUOTE, out=quotes_.view(bool))
        escapes = self.escaped or b"\\" in data
        if escapes:
            where = np.flatnonzero(quotes)
            quotes[where[self._escaped_quotes(raw, where)]] = False  # quotes left: string delimiters
        np.bitwise_or(raw, 0x20, out=folded)  # [ ] -> { }
        brackets = np.equal(folded, ord("{"), out=opens.view(bool))
        np.logical_or(brackets, np.equal(folded, ord("}"), out=closes.view(bool)), out=brackets)
        where = np.flatnonzero(brackets)
        in_string, n_quotes = self.in_string, np.count_nonzero(quotes)
        self.in_string ^= bool(n_quotes & 1)
        if where.size > size >> 3 and n_quotes:  # dense brackets: one pass beats a reduceat per bracket
            parity = np.bitwise_xor.accumulate(quotes.view(np.uint8), out=folded)
            where = where[(parity[where] ^ in_string) == 0]
        elif where.size and n_quotes:  # the quotes' parity before the first bracket, then between brackets
            lead = in_string ^ bool(np.count_nonzero(quotes[: where[0]]) & 1)
            parity = np.bitwise_xor.accumulate(np.bitwise_xor.reduceat(quotes.view(np.uint8), where)) ^ lead
            inside = np.empty(where.size, bool)
            inside[0] = lead
            inside[1:] = parity[:-1].view(bool)
            where = where[~inside]
        elif in_string:  # no quote: the block is all inside the string
            where = where[:0]
        if escapes or size > self.limits.max_token or not self._tokens_fit(data, start, where):
            self._check_tokens(data, start, quotes, in_string, where)
        self._check_depth(start, where, raw[where])

    def _tokens_fit(self, data: bytes, start: int, brackets: np.ndarray) -> bool:
        """The fast check: with blocks no longer than a token, only the gap across blocks can be too long."""
        first = data.find(b'"')
        if brackets.size and not 0 <= first < brackets[0]:
            first = int(brackets[0])
        if first < 0 or start + first - self.last_boundary - 1 > self.limits.max_token:
            return False  # no quote or bracket in the block (all one string, or numbers), or a long gap
        last = data.rfind(b'"')
        if brackets.size:
            last = max(last, int(brackets[-1]))
        if not self.in_string:
            last = max(last, data.rfind(b",", last + 1))
        self.last_boundary = start + last
        return True

    def _check_tokens(self, data: bytes, start: int, quotes: np.ndarray, in_string: bool, brackets: np.ndarray):
        """Gaps between boundaries (quotes; brackets and commas outside strings) no longer than max_token."""
        limit = self.limits.max_token
        where = np.flatnonzero(quotes)
        strings = (np.arange(where.size) & 1).astype(bool) ^ in_string  # the gap before the quote is a string
        bounds = np.concatenate((where, brackets))
        order = np.argsort(bounds, kind="stable")
        bounds, strings = bounds[order] + start, np.concatenate((strings, np.zeros(brackets.size, bool)))[order]
        if bounds.size:
            gaps = np.diff(bounds, prepend=self.last_boundary) - 1
            for i in np.flatnonzero(gaps > limit):  # a long string, or a long run of numbers (rare)
                if strings[i]:
                    raise self.refuse(f"a string longer than the limit at JSON byte {bounds[i] - gaps[i]}", "max_token")
                self._check_commas(data, start, int(bounds[i] - gaps[i] - 1), int(bounds[i]))
            self.last_boundary = int(bounds[-1])
        if not self.in_string:  # commas after the last quote or bracket
            self._check_commas(data, start, self.last_boundary, start + len(data))
        if self.read_bytes - 1 - self.last_boundary > limit:
            what = "string" if self.in_string else "number"
            raise self.refuse(f"a {what} longer than the limit at JSON byte {self.last_boundary + 1}", "max_token")

    def _check_commas(self, data: bytes, start: int, before: int, after: int) -> None:
        lo = max(before + 1, start) - start
        commas = np.flatnonzero(np.frombuffer(data, np.uint8, after - start - lo, lo) == COMMA) + (start + lo)
        if commas.size:
            gaps = np.diff(commas, prepend=before) - 1
            if int(gaps.max()) > self.limits.max_token:
                raise self.refuse(f"a number longer than the limit at JSON byte {int(commas[np.argmax(gaps)])}",
                                  "max_token")
            self.last_boundary = before = int(commas[-1])
        if after - before - 1 > self.limits.max_token and after < start + len(data):
            raise self.refuse(f"a number longer than the limit at JSON byte {before + 1}", "max_token")

    def _check_depth(self, start: int, where: np.ndarray, brackets: np.ndarray) -> None:
        """Depth within max_depth; elements of a top-level array (the events) within max_event_bytes."""
        limits = self.limits
        if where.size:
            step = (brackets & 2).view(np.int8) - 1  # [ and { have bit 1 (+1), ] and } not (-1)
            opener = step > 0
            depth = np.cumsum(step, dtype=np.int32)  # after each bracket
            depth += self.depth
            if int(depth.max()) > limits.max_depth:
                at = start + int(where[np.argmax(depth > limits.max_depth)])
                raise self.refuse(f"arrays/objects nested deeper than the limit at JSON byte {at}", "max_depth")
            self.depth = int(depth[-1])
            parents = np.flatnonzero((depth == _EVENT_LEVEL - 1) & opener)  # what the elements are in
            arrays = np.concatenate(([self.in_array], brackets[parents] == ord("[")))
            self.in_array = bool(arrays[-1])
            crossings = np.flatnonzero(((depth == _EVENT_LEVEL) & opener) | ((depth == _EVENT_LEVEL - 1) & ~opener))
            if crossings.size:  # an element opens, closes, opens...: alternately
                in_array = arrays[np.searchsorted(parents, crossings)]  # only a top-level array holds events
                at = where[crossings] + start
                if self.element_start >= 0:  # an element still open from an earlier block
                    at = np.concatenate(([self.element_start], at))
                    in_array = np.concatenate(([self.element_is_event], in_array))
                opens, closes, events = at[0::2], at[1::2], in_array[0::2]
                spans = (closes - opens[: closes.size])[events[: closes.size]]
                if spans.size and int(spans.max()) >= limits.max_event_bytes:
                    raise self.refuse("a trace event larger than the limit", "max_event_bytes")
                self.element_start = int(opens[-1]) if opens.size > closes.size else -1
                self.element_is_event = bool(events[-1])
        if self.element_start >= 0 and self.element_is_event and \
                self.read_bytes - self.element_start > limits.max_event_bytes:
            raise self.refuse(f"a trace event larger than the limit at JSON byte {self.element_start}",
                              "max_event_bytes")

    def _escaped_quotes(self, raw: np.ndarray, quotes: np.ndarray) -> np.ndarray:
        """Which quotes follow an odd run of backslashes (a run may go on from the previous block)."""
        slashes = np.flatnonzero(raw == BACKSLASH)
        carry, self.escaped = self.escaped, False
        escaped = (quotes == 0) & carry  # first in the block, after an odd run that ended the previous one
        if slashes.size:
            first = np.ones(slashes.size, bool)  # the first backslash of each run
            first[1:] = np.diff(slashes) != 1
            first = np.maximum.accumulate(np.where(first, np.arange(slashes.size), 0))
            runs = np.arange(slashes.size) - first + 1 + ((slashes[first] == 0) & carry)  # run up to each one
            before = np.maximum(np.searchsorted(slashes, quotes) - 1, 0)  # the last backslash before each quote
            escaped |= (slashes[before] == quotes - 1) & (runs[before] & 1).astype(bool)
            self.escaped = bool(slashes[-1] == raw.size - 1 and runs[-1] & 1)
        return escaped


def _open(path: str):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_trace(path: str, limits: TraceLimits = LIMITS) -> Trace:
    """The events of one trace file; TraceError if it is not a usable trace or goes over `limits`."""
    trace = Trace(path, rank_of(path))
    cpu_ops: list[tuple] = []  # cheap tuples while we do not know yet whether the trace has kernels
    comm: list[tuple] = []  # c10d communication ranges (COMM_RE)
    names: dict[str, str] = {}  # one copy of each name: a trace repeats a few hundred names
    name_bytes = count = 0
    try:
        with _open(path) as f:
            guard = _Guard(f, path, limits)
            if not isinstance(f, gzip.GzipFile) and os.fstat(f.fileno()).st_size > limits.max_bytes:
                raise guard.refuse("the file is larger than the limit", "max_bytes")
            events = ijson.items(guard, "traceEvents.item", use_float=True)
            for count, e in enumerate(events, 1):
                if count > limits.max_events:
                    raise guard.refuse("more trace events than the limit", "max_events")
                if not isinstance(e, dict) or e.get("ph") != "X":
                    continue
                cat = e.get("cat")
                cat = KEPT_CATS.get(cat) if cat.__class__ is str else None  # one copy of each category
                if cat is None:  # cuda_runtime, cuda_driver, python_function, ...: not used
                    continue
                try:
                    ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
                    tid = e.get("tid", 0)
                    stream = int(tid) if isinstance(tid, (int, float)) else hash(tid) & 0xFFFF
                except (KeyError, TypeError, ValueError, OverflowError):  # a list as tid, 1e999, ...
                    continue
                name = e.get("name", "")
                if name.__class__ is not str:
                    name = str(name)
                kept = names.get(name)
                if kept is None:
                    name_bytes += len(name)
                    if name_bytes > limits.max_name_bytes:
                        raise guard.refuse("more distinct event names than the limit (bytes)", "max_name_bytes")
                    names[name] = kept = name
                name = kept
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
    except ijson.JSONError as e:  # yajl's message spans lines (it draws an arrow) and may be bytes
        why = e.args[0] if e.args else e
        why = why.decode(errors="replace") if isinstance(why, bytes) else str(why)
        raise TraceError(f"{path}: not valid JSON or cut short ({' '.join(why.split())[:200]})") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e})") from None
    if not count:
        raise TraceError(f"{path}: no traceEvents: not a torch.profiler Chrome trace")
    if not trace.is_gpu:  # in place, so that each tuple goes as its Event comes
        trace.cpu_ops = ops = cpu_ops + comm
        for i, (name, ts, dur, stream) in enumerate(ops):
            ops[i] = Event(name, ts, dur, stream, "cpu_op")
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
