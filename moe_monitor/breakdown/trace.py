"""Streaming reader of torch.profiler Chrome traces (`.pt.trace.json.gz` or plain JSON).

The elements of `traceEvents` are decoded by msgspec, a batch of whole events (those that end in one ~1 MiB
block) per call, into a Struct of the fields the analysis uses (ph, cat, name, ts, dur, tid): msgspec skips the
other fields (`args`, ...) without building them. On a 135 MB trace (benchmarks/big_trace.py) it decodes the
events in 0.16 s where ijson took ~2 s, and memory stays bounded by the block, not the file. Everything else
(the top level, `deviceProperties`, `distributedInfo`, the commas between batches) goes to ijson's push parser
(yajl2 C backend), which checks the document as the previous reader did and says which top-level array the
events are in. A batch that msgspec cannot decode into that Struct (a field of another type, an unknown phase,
a lone surrogate, invalid JSON) is read again by ijson with the previous reader's rules, so odd events are
skipped, and invalid JSON refused, as before. A gzip file is inflated by a thread (zlib releases the GIL), so
decompressing overlaps with the rest. `read_trace(..., parser="ijson")` is the previous reader (ijson for every
byte), kept as the reference.

The sidecar reads files that another process wrote, so a trace is untrusted input, and neither yajl nor ijson
has limits: ijson keeps the path of every open array/object as a string (`a.item.item...`), so memory grows
with the square of the nesting depth (a 115-byte gzip of 20,000 `[` took 970 MB, 100,000 a MemoryError), and
yajl re-reads a string or number from its start each time another 64 KiB of it arrives, so CPU grows with the
square of its length (a 64 MiB string took 11 s, a 64 MiB number 144 s). `_Guard` scans every block before
either parser sees it, in numpy, and refuses a trace over `TraceLimits` with a TraceError that names the file
and the limit; the same scan gives the byte spans of the events that the msgspec path decodes.
"""

from __future__ import annotations

import gzip
import io
import os
import queue
import re
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Union

import ijson
import msgspec
import numpy as np

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# one copy of each; keyed by str, asked also for the None of an event without cat
KEPT_CATS: dict[str | None, str] = {c: c for c in (*DEVICE_CATS, "cpu_op", "gpu_user_annotation", "user_annotation")}
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

    Worst case within the defaults: CPU, max_bytes of parsing at ijson's rate (~35 s at 60 MB/s; ~70 s for
    bracket-dense JSON: the msgspec path reads real traces at ~270 MB/s, but gives ijson every batch it cannot
    type); memory, the event being built (~35 MB) + the kept events while reading (~170 B each: ~680 MB if all of
    max_events are kept) + max_name_bytes; then the analysis, of at most max_kept_events (~300 B each at its peak,
    with the reader's: ~600 MB; measured by benchmarks/capture_bounds.py).
    """

    max_bytes: int = 2 << 30  # decompressed JSON: 3x the largest real trace
    max_depth: int = 64  # nested arrays/objects (real: <= 7); ijson's memory grows with its square
    max_token: int = 1 << 20  # bytes of one string or number, or of the blanks between two tokens
    max_event_bytes: int = 1 << 20  # one element of a top-level array (a traceEvents event), built whole by
    # ijson: up to ~30 bytes of objects per byte (`[[],[],...]`), so ~35 MB. distributedInfo's lists are not events
    max_events: int = 4_000_000  # traceEvents entries (real: ~4.2k per MB of JSON)
    max_kept_events: int = 2_000_000  # events kept for the analysis (kernels, copies, ranges; a CPU trace's ops):
    # real ~400 per MB of JSON (51k in a 135 MB trace); ~300 B each at the analysis' peak
    max_name_bytes: int = 64 << 20  # distinct event names, summed (real: 12 kB); each is kept once


LIMITS = TraceLimits()
_BLOCK = 1 << 20  # what _Guard reads and scans at a time; ijson reads 64 KiB from it (faster than 1 MiB reads)
_FEED = 1 << 16  # what the msgspec path sends ijson's push parser at a time (as ijson reads a file)
_EVENT_LEVEL = 3  # {"traceEvents": [{...}]}: an event is what opens at depth 3
QUOTE, BACKSLASH, COMMA = ord('"'), ord("\\"), ord(",")


class _Guard:
    """A file object for ijson (`read`), or a source of scanned blocks (`next_block`), that refuses JSON over
    `limits` before a parser sees it.

    Per 1 MiB block, numpy finds the quotes (less those after an odd run of backslashes) and the brackets; the
    parity of the quotes before each bracket says whether it is inside a string. The brackets outside strings
    give the depth and the spans of the elements of top-level arrays (events); the gaps between quotes give the
    tokens' lengths (a gap over the limit outside strings is split at brackets and commas before it counts).
    State carries over blocks, so the cost is linear in the bytes read (~0.8 ms per MiB: ~30 % of the msgspec
    path's read, 5-8 % of ijson's; docs/breakdown.md). After each block, `spans` holds the
    elements of top-level arrays that closed in it: their first and last byte (offsets in the JSON) and which
    array they are in (the count of top-level arrays/objects opened before theirs); the msgspec path decodes them.
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
        self.element_group = 0  # the depth-2 container it is in (see spans)
        self.parents = 0  # containers opened at depth 2 so far
        self.spans = _NO_SPANS  # (first byte, last byte, container) of the elements of arrays closed in the block
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

    def next_block(self) -> bytes:
        """The next block, scanned (b"" at the end); `spans` then says where its complete events are."""
        block = self.f.read(_BLOCK)
        if block:
            self._scan(block)
        else:
            self.spans = _NO_SPANS
        return block

    def refuse(self, what: str, limit: str) -> TraceError:
        return TraceError(f"{self.path}: refused: {what} (limit {limit}={getattr(self.limits, limit):,})")

    def _scan(self, data: bytes) -> None:
        start, size = self.read_bytes, len(data)
        self.read_bytes += size
        if self.read_bytes > self.limits.max_bytes:
            raise self.refuse("more JSON than the limit (decompressed)", "max_bytes")
        if self._buffers.shape[1] < size + 8:
            self._buffers = np.empty((4, size + 8 - size % 8), np.uint8)  # rows of whole 8-byte words
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
        where = _nonzero(self._buffers[2], size)
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
        self.spans = _NO_SPANS
        if where.size:
            step = (brackets & 2).view(np.int8) - 1  # [ and { have bit 1 (+1), ] and } not (-1)
            opener = step > 0
            depth = np.cumsum(step, dtype=np.int32)  # after each bracket
            depth += self.depth
            if int(depth.max()) > limits.max_depth:
                deep = start + int(where[np.argmax(depth > limits.max_depth)])
                raise self.refuse(f"arrays/objects nested deeper than the limit at JSON byte {deep}", "max_depth")
            self.depth = int(depth[-1])
            parents = np.flatnonzero((depth == _EVENT_LEVEL - 1) & opener)  # what the elements are in
            arrays = np.concatenate(([self.in_array], brackets[parents] == ord("[")))
            self.in_array = bool(arrays[-1])
            crossings = np.flatnonzero(((depth == _EVENT_LEVEL) & opener) | ((depth == _EVENT_LEVEL - 1) & ~opener))
            if crossings.size:  # an element opens, closes, opens...: alternately
                parent = np.searchsorted(parents, crossings)  # 0: the container open before the block
                in_array = arrays[parent]  # only a top-level array holds events
                group = parent + self.parents
                at = where[crossings] + start
                if self.element_start >= 0:  # an element still open from an earlier block
                    at = np.concatenate(([self.element_start], at))
                    in_array = np.concatenate(([self.element_is_event], in_array))
                    group = np.concatenate(([self.element_group], group))
                opens, closes, events, groups = at[0::2], at[1::2], in_array[0::2], group[0::2]
                n = closes.size
                kept = events[:n]
                first, last = opens[:n][kept], closes[kept]
                if first.size and int((last - first).max()) >= limits.max_event_bytes:
                    raise self.refuse("a trace event larger than the limit", "max_event_bytes")
                self.spans = (first, last, groups[:n][kept])
                self.element_start = int(opens[-1]) if opens.size > n else -1
                self.element_is_event = bool(events[-1])
                self.element_group = int(groups[-1])
            self.parents += parents.size
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


_NO_SPANS = (np.empty(0, np.int64),) * 3


def _nonzero(row: np.ndarray, size: int) -> np.ndarray:
    """np.flatnonzero(row[:size]) for a 0/1 row of whole 8-byte words, faster where ones are sparse (brackets:
    ~1.5 % of a trace's bytes): the words that hold a one first, then the ones in them (0.2 ms per MiB, not 0.4)."""
    padded = -(-size // 8) * 8
    row[size:padded] = 0
    words = row[:padded].view(np.uint64)
    hit = np.flatnonzero(words != 0)  # numpy's fast nonzero is the one for bools
    if hit.size > words.size >> 2:  # dense: the plain pass is faster
        return np.flatnonzero(row[:size].view(bool))
    ones = np.flatnonzero(words[hit].view(bool))
    return (hit[ones >> 3] << 3) + (ones & 7)


def _open(path: str, inflate_in_thread: bool = False):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic != b"\x1f\x8b":
        return open(path, "rb")
    return _Inflate(path) if inflate_in_thread else gzip.open(path, "rb")


class _Inflate:
    """A gzip file's decompressed bytes, up to a block at a time (read(n) ignores n), inflated by a thread:
    zlib releases the GIL while it inflates, so decompressing (a quarter of the msgspec path's time) overlaps
    with the scan and the decoding. Read as gzip.GzipFile reads: members one after another, zero padding
    between them; a stream cut short raises EOFError, bad data zlib.error, in order after the blocks before.
    At most `AHEAD` blocks wait; close() stops the thread."""

    AHEAD = 4
    INPUT = 1 << 18  # compressed bytes read at a time
    _END = object()

    def __init__(self, path: str):
        self.f = open(path, "rb")
        self.blocks: queue.Queue = queue.Queue(self.AHEAD)
        self.stop, self.done = threading.Event(), False
        self.thread = threading.Thread(target=self._inflate, args=(_BLOCK,), name="trace-inflate", daemon=True)
        self.thread.start()

    def _inflate(self, size: int) -> None:
        try:
            d, data, started, full = zlib.decompressobj(31), b"", False, False
            while not self.stop.is_set():
                if not data and not full:  # zlib holds no output back: it needs more input
                    data = self.f.read(self.INPUT)
                    if not data:
                        if started:
                            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                        break
                started = True
                out = d.decompress(data, size)
                data, full = d.unconsumed_tail, len(out) == size
                if out:
                    self.blocks.put(out)
                if d.eof:  # another member may follow, after zero padding
                    data, full = d.unused_data.lstrip(b"\0"), False
                    while not data and (more := self.f.read(self.INPUT)):
                        data = more.lstrip(b"\0")
                    d, started = zlib.decompressobj(31), False
        except BaseException as e:  # noqa: BLE001 (raised again by read(), in the reading thread)
            self.blocks.put(e)
        else:
            self.blocks.put(self._END)

    def read(self, n: int = -1) -> bytes:
        if self.done:
            return b""
        block = self.blocks.get()
        if block is self._END:
            self.done = True
            return b""
        if isinstance(block, BaseException):
            self.done = True
            raise block
        return block

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():  # a put() may wait for room
            try:
                self.blocks.get(timeout=0.05)
            except queue.Empty:
                pass
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Complete(msgspec.Struct, gc=False, tag_field="ph", tag="X"):
    """A complete event ("ph": "X"), with the fields read_trace uses typed as real traces have them: a batch
    holding another type (a list as tid, a string as ts, ...) fails to decode, and is read again with the
    previous reader's rules. As there, an event without ts, or with a null ts or dur, is skipped."""

    cat: str | None = None  # in the order torch writes them: msgspec tries the next field first
    name: str = ""
    tid: int | str | None = 0
    ts: float | None = None
    dur: float | None = 0.0


# The other phases of the Trace Event Format: decoded to an empty Struct, their fields skipped unread (a fifth of
# a GPU trace's events are flows, "s"/"f"). A phase not listed, or none, fails the batch: read again by ijson.
_PHASES = tuple(msgspec.defstruct(f"_Phase{i}", [], tag_field="ph", tag=ph, gc=False)
                for i, ph in enumerate("BEiICbnestfPNODMVvRc()STpF"))
_EVENT: Any = Union[(_Complete, *_PHASES)]  # built at run time: no static type
_DECODER = msgspec.json.Decoder(list[_EVENT])


class _Unusual(Exception):
    """The msgspec path met a layout it does not handle (never seen on valid JSON): read_trace starts again with
    the ijson path."""


class _Events:
    """What read_trace keeps of the events, in file order, within the count and name limits."""

    def __init__(self, path: str, limits: TraceLimits, refuse):
        self.path, self.limits, self.refuse = path, limits, refuse
        self.trace = Trace(path, rank_of(path))
        self.cpu_ops: list[tuple] = []  # cheap tuples while we do not know yet whether the trace has kernels
        self.comm: list[tuple] = []  # c10d communication ranges (COMM_RE)
        self.names: dict[str, str] = {}  # one copy of each name: a trace repeats a few hundred names
        self.name_bytes = self.count = 0

    def item(self, e) -> None:
        """One element of traceEvents as ijson built it (the previous reader's rules)."""
        self.count += 1
        if self.count > self.limits.max_events:
            raise self.refuse("more trace events than the limit", "max_events")
        if not isinstance(e, dict) or e.get("ph") != "X":
            return
        cat = e.get("cat")
        cat = KEPT_CATS.get(cat) if cat.__class__ is str else None  # one copy of each category
        if cat is None:  # cuda_runtime, cuda_driver, python_function, ...: not used
            return
        try:
            ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
            tid = e.get("tid", 0)
            stream = int(tid) if isinstance(tid, (int, float)) else hash(tid) & 0xFFFF
        except (KeyError, TypeError, ValueError, OverflowError):  # a list as tid, 1e999, ...
            return
        name = e.get("name", "")
        self.add(name if name.__class__ is str else str(name), ts, dur, stream, cat)

    def add(self, name: str, ts: float, dur: float, stream: int, cat: str) -> None:
        kept = self.names.get(name)
        if kept is None:
            self.name_bytes += len(name)
            if self.name_bytes > self.limits.max_name_bytes:
                raise self.refuse("more distinct event names than the limit (bytes)", "max_name_bytes")
            self.names[name] = kept = name
        if cat in DEVICE_CATS:
            self.trace.device.append(Event(kept, ts, dur, stream, cat))
        elif cat == "cpu_op":
            self.cpu_ops.append((kept, ts, dur, stream))
        elif COMM_RE.match(kept):  # gpu_user_annotation, user_annotation
            if cat == "user_annotation":
                self.comm.append((kept, ts, dur, stream))
        else:
            ev = Event(kept, ts, dur, stream, cat)
            (self.trace.steps if STEP_RE.match(kept) else self.trace.annotations).append(ev)

    def batch(self, buf: bytearray, view: memoryview, start: int, end: int, utf8: bool) -> None:
        """buf[start:end]: whole elements of traceEvents and the commas between them. Decoded by msgspec in one
        call, in place (the bytes either side become `[` and `]` for the call); read again by ijson, element by
        element, when msgspec refuses them (odd types, invalid JSON) or when yajl would refuse bytes msgspec
        skips without reading (invalid UTF-8 outside the six fields: `utf8`, the batch is not all ASCII)."""
        around, window = (buf[start - 1], buf[end]), view[start - 1 : end + 1]
        buf[start - 1], buf[end] = 0x5B, 0x5D  # [ ]
        try:
            if utf8:
                str(view[start:end], "utf-8")
            events = _DECODER.decode(window)
        except (msgspec.MsgspecError, UnicodeDecodeError):
            events, data = None, bytes(window)
        finally:
            buf[start - 1], buf[end] = around
            window.release()
        if events is None:
            for e in ijson.items(io.BytesIO(data), "item", use_float=True):
                self.item(e)
            return
        room = self.limits.max_events - self.count
        over = len(events) > room
        if over:  # keep those up to the limit, as the element-by-element count does
            del events[room:]
        self.count += len(events)
        names, device, cpu_ops, limit = self.names, self.trace.device, self.cpu_ops, self.limits.max_name_bytes
        cat_of, name_of = KEPT_CATS.get, names.get  # the loop runs for every event: no lookups it can spare
        for e in events:  # the rules of item() and add() on msgspec's types, for the kinds of nearly every event
            if e.__class__ is not _Complete:
                continue
            cat = cat_of(e.cat)
            if cat is None:
                continue
            ts, dur = e.ts, e.dur
            if ts is None or dur is None:
                continue
            name = name_of(e.name)
            if name is None:
                name = e.name
                self.name_bytes += len(name)
                if self.name_bytes > limit:
                    raise self.refuse("more distinct event names than the limit (bytes)", "max_name_bytes")
                names[name] = name
            if cat == "cpu_op":
                if not device:  # kept only while the trace has no kernels (finish() drops them otherwise)
                    tid = e.tid
                    cpu_ops.append((name, ts, dur, tid if tid.__class__ is int else hash(tid) & 0xFFFF))
            else:
                tid = e.tid
                stream = tid if tid.__class__ is int else hash(tid) & 0xFFFF
                if cat in DEVICE_CATS:
                    device.append(Event(name, ts, dur, stream, cat))
                else:
                    self.add(name, ts, dur, stream, cat)
        if device and cpu_ops:
            cpu_ops.clear()
        if over:
            raise self.refuse("more trace events than the limit", "max_events")

    def finish(self) -> Trace:
        trace, path = self.trace, self.path
        if not self.count:
            raise TraceError(f"{path}: no traceEvents: not a torch.profiler Chrome trace")
        if not trace.is_gpu:  # in place, so that each tuple goes as its Event comes
            ops: list[Any] = self.cpu_ops + self.comm  # tuples, then their Events
            for i, (name, ts, dur, stream) in enumerate(ops):
                ops[i] = Event(name, ts, dur, stream, "cpu_op")
            trace.cpu_ops = ops
        self.cpu_ops = self.comm = []
        if trace.is_gpu:  # prefer the device projection of the step ranges when the trace has one
            device_steps = [s for s in trace.steps if s.cat == "gpu_user_annotation"]
            trace.steps = device_steps or trace.steps
            trace.annotations = [a for a in trace.annotations if a.cat == "gpu_user_annotation"] or trace.annotations
        kept = len(trace.device) + len(trace.cpu_ops) + len(trace.steps) + len(trace.annotations)
        if kept > self.limits.max_kept_events:  # read, in bounded memory (max_events); not analysed
            raise self.refuse(f"more events to analyse than the limit ({kept:,} kernels, copies, ranges and CPU ops)",
                              "max_kept_events")
        if not trace.device and not trace.cpu_ops:
            raise TraceError(f"{path}: the trace holds no kernels and no CPU ops: nothing to break down")
        for events in (trace.device, trace.cpu_ops, trace.steps, trace.annotations):
            events.sort(key=lambda ev: (ev.ts, -ev.dur))
        return trace


class _Document:
    """ijson's push parser over the JSON outside the batches of events, and where in the document it is: the
    batches' bytes are replaced by `{}` where they are events, so that yajl still checks what is around them."""

    def __init__(self, out: _Events):
        self.out = out
        self.events = ijson.sendable_list()
        self.parser = ijson.basic_parse_coro(self.events, use_float=True)
        self.depth = 0
        self.top_map = self.in_events = self.stray = False
        self.key = None  # the last key of the top-level object

    @property
    def at_event(self) -> bool:
        """The parser is inside the top-level traceEvents array, between two of its elements."""
        return self.in_events and self.depth == 2

    def feed(self, data: bytes | memoryview) -> None:
        for i in range(0, len(data), _FEED):  # never b"": the parser takes it for the end of the input
            self.parser.send(bytes(data[i : i + _FEED]))
            self._follow()

    def placeholder(self) -> None:
        self.parser.send(b"{}")
        if self.events[-2:] != [("start_map", None), ("end_map", None)]:
            raise _Unusual("the events' placeholder did not parse as one object")
        del self.events[-2:]
        self._follow()

    def close(self) -> None:
        self.parser.close()  # IncompleteJSONError when the document stops short
        self._follow()
        if self.stray:
            raise _Unusual("an element of traceEvents was not cut out by the guard")

    def _follow(self) -> None:
        for kind, value in self.events:
            if kind == "map_key":
                if self.depth == 1:
                    self.key = value
            elif kind == "start_map" or kind == "start_array":
                self.stray |= self.at_event  # every whole element of a top-level array goes to a batch
                self.depth += 1
                if self.depth == 1:
                    self.top_map = kind == "start_map"
                elif self.depth == 2:
                    self.in_events = self.top_map and kind == "start_array" and self.key == "traceEvents"
            elif kind == "end_map" or kind == "end_array":
                self.depth -= 1
                self.in_events &= self.depth >= 2
            elif self.at_event:  # a number, string, ... in traceEvents: counted, then skipped
                self.out.item(value)
        del self.events[:]


def _check_size(f, guard: _Guard, limits: TraceLimits) -> None:
    if not isinstance(f, (gzip.GzipFile, _Inflate)) and os.fstat(f.fileno()).st_size > limits.max_bytes:
        raise guard.refuse("the file is larger than the limit", "max_bytes")


def _read_msgspec(path: str, limits: TraceLimits) -> _Events:
    with _open(path, inflate_in_thread=True) as f:
        guard = _Guard(f, path, limits)
        _check_size(f, guard, limits)
        out = _Events(path, limits, guard.refuse)
        doc = _Document(out)
        # buf[1:n]: JSON from byte `base` on not yet given to a parser (an event that goes on, then a block).
        # One buffer, reused: a fresh 1 MiB bytes per block costs more in page faults than the copy.
        buf = bytearray(2 * _BLOCK + 2)
        view, n, base = memoryview(buf), 1, 0
        not_ascii = 0  # JSON byte just past the last block with a byte over 127
        while block := guard.next_block():
            if n + len(block) + 1 > len(buf):  # an event longer than a block
                view.release()
                buf.extend(bytes(n + len(block) + 1 - len(buf)))
                view = memoryview(buf)
            buf[n : n + len(block)] = block
            n += len(block)
            if not block.isascii():
                not_ascii = guard.read_bytes
            first, last, group = guard.spans
            pos = 1  # in buf
            if first.size:  # one batch per run of events in the same container
                cuts = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), first.size]
                for lo, hi in zip(cuts[:-1], cuts[1:]):
                    start, end = int(first[lo]) - base + 1, int(last[hi - 1]) - base + 2
                    doc.feed(view[pos:start])
                    if doc.at_event:
                        out.batch(buf, view, start, end, int(first[lo]) < not_ascii)
                        doc.placeholder()
                    else:  # deviceProperties' elements, ...: yajl reads them as the previous reader did
                        doc.feed(view[start:end])
                    pos = end
            keep = guard.element_start - base + 1 if guard.element_start >= 0 and guard.element_is_event else n
            doc.feed(view[pos:keep])
            buf[1 : 1 + n - keep] = bytes(view[keep:n])
            n, base = 1 + n - keep, base + keep - 1
        doc.feed(view[1:n])  # an event cut short: yajl says so
        view.release()
        doc.close()
    return out


def _read_ijson(path: str, limits: TraceLimits) -> _Events:
    with _open(path) as f:
        guard = _Guard(f, path, limits)
        _check_size(f, guard, limits)
        out = _Events(path, limits, guard.refuse)
        for e in ijson.items(guard, "traceEvents.item", use_float=True):
            out.item(e)
    return out


PARSERS = {"msgspec": _read_msgspec, "ijson": _read_ijson}


def read_trace(path: str, limits: TraceLimits = LIMITS, parser: str = "msgspec") -> Trace:
    """The events of one trace file; TraceError if it is not a usable trace or goes over `limits`.

    `parser="ijson"`: the previous reader (ijson for every byte, ~4x slower on the whole read), the reference the
    msgspec path is compared with (tests/test_breakdown.py, tests/test_trace_limits.py,
    benchmarks/breakdown_vs_hta.py): both return the same Trace, and refuse the same files, except that msgspec
    reads numbers yajl cannot hold (integers outside (-2**63, 2**63), floats past 1.8e308) where they are not
    one of the six fields.
    """
    if parser not in PARSERS:
        raise ValueError(f"parser must be one of {sorted(PARSERS)}, not {parser!r}")
    read = PARSERS[parser]
    try:
        try:
            out = read(path, limits)
        except _Unusual:
            out = _read_ijson(path, limits)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise TraceError(f"{path}: truncated or corrupt gzip ({e})") from None
    except ijson.JSONError as e:  # yajl's message spans lines (it draws an arrow) and may be bytes
        why = e.args[0] if e.args else e
        why = why.decode(errors="replace") if isinstance(why, bytes) else str(why)
        raise TraceError(f"{path}: not valid JSON or cut short ({' '.join(why.split())[:200]})") from None
    except UnicodeDecodeError as e:  # yajl lets overlong and surrogate UTF-8 through; Python's decoder does not
        raise TraceError(f"{path}: not valid JSON or cut short (invalid UTF-8: {e})") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e})") from None
    return out.finish()


def step_phase(name: str) -> tuple[str, int]:
    """(phase, tokens) from vLLM's `execute_context_<reqs>(<tokens>)_generation_<reqs>(<tokens>)`."""
    m = STEP_RE.match(name)
    if not m:
        return "unknown", 0
    prefill, decode = int(m.group(2)), int(m.group(4))
    phase = "mixed" if prefill and decode else ("prefill" if prefill else "decode")
    return phase, prefill + decode
