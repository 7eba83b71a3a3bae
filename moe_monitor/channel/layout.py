"""Binary layout of a per-rank segment (format version 2). Pure: bytes in, records out.

A segment is one file (normally on tmpfs, e.g. /dev/shm) written by one vLLM worker rank and read by the
sidecar. Everything is little-endian. The header is fixed-size; the payload follows it:

    header (HEADER_SIZE bytes)            see HEADER below
    layer_ids        int32  [L]           model layer index of each counted row
    layer_flags      uint8  [L]           LAYER_HOOKED | LAYER_UNOBSERVABLE, padded to 8 bytes
    counts           int64  [L, E]        cumulative routed (token, expert) assignments, logical expert ids
    token_bounds     int64  [TB]          upper bounds (inclusive) of tokens-per-step buckets; last = INT64_MAX
    duration_bounds  float64[DB]          upper bounds (seconds) of step-duration buckets; last = +inf
    step_hist        int64  [P, TB, DB]   cumulative step counts (non-cumulative over buckets)
    step_seconds     float64[P, TB]       cumulative step duration
    step_tokens      int64  [P, TB]       cumulative tokens computed in those steps
    physical_to_logical int32 [L, S]      version 2, only when S > 0: the live expert placement (vLLM's EPLB):
                                          the logical expert in each of the S physical slots, slots dealt to
                                          the EP ranks contiguously (S / ep_size each)
    ep_rank_load     float64[L, R]        version 2, only when R > 0 (with the placement): cumulative assignments
                                          each EP rank served, attributed by the plugin under the placement in
                                          force at the time (R = ep_size)

The version-2 sections are optional and checked against the header before they are used (`Refusal`): ep_size in
[1, MAX_EP_SIZE]; R == ep_size; S a multiple of ep_size within [E, max_slots(E)]; every placement id in [0, E) and
every logical expert in at least one slot of each layer; every load finite and >= 0. A section that fails is left
out of the snapshot (its bytes are not kept) and named in `Snapshot.refused`; the counts never depend on it.

Extensions (still version 2): sections after the payload, announced by header fields that older writers left zero
(the header's tail is zero-filled). A version-2 reader that predates them reads `payload_size` bytes of payload and
ignores the rest of the file, so it still reads a segment that has them; this reader reads a segment without them
as before. Each extension has its own size field (a reader uses the fields it knows, the record's prefix, so later
fields can be appended) and a CRC-32: `extension_crc32` covers the eplb_health record, and each later extension
has its own checksum field, so a reader that knows only the earlier extensions still checks the bytes it reads.
They follow the payload in this order:

    eplb_health      EPLB_HEALTH [1]      when eplb_health_size > 0: vLLM's EPLB rearrangements as the plugin
                                          saw them (counts, the last one's time and duration, the configured
                                          interval, vLLM's steps-since-rearrangement counter, engine steps)
    step_count       int64  [P, TB]       when step_count_size > 0 (every writer since it was added):
                                          cumulative count of every engine step, timed or not. The plugin times
                                          a sample of the steps on CUDA (step_hist and step_seconds hold those),
                                          so step_hist.sum(axis=2) <= step_count; step_tokens are every step's.
                                          A segment without it (an older plugin) timed every step: its step
                                          count is step_hist.sum(axis=2)

An extension is checked like the version-2 sections and refused alone: a size other than the record's or the
array's (eplb_health: below its fields or above MAX_EXTENSION_BYTES; step_count: P x TB x 8 bytes) or a file that
ends inside it (shape), a checksum mismatch (checksum), a value no writer publishes (value: see `eplb_refusal`;
a step count below 0 or below the step_hist sum of its cell).

Consistency: `seq` is a seqlock (odd while the writer is inside a snapshot) and `payload_crc32` covers the
payload, so a reader that copies the file while a write is under way detects it and retries.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from moe_monitor.schema.segment import MAX_EP_SIZE, MAX_REDUNDANT_SLOTS

MAGIC = b"MOEMSEG\x00"
VERSION = 2  # 2: the header's last reserved word is num_physical (S), and the placement section follows
READABLE_VERSIONS = (1, 2)  # version 1 (moe-monitor before the placement section) reads as S = 0
HEADER_SIZE = 512
MODEL_NAME_BYTES = 192
PHASES = ("prefill", "decode", "mixed")

LAYER_HOOKED = 1  # the recorder is attached to this layer's router
LAYER_UNOBSERVABLE = 2  # the layer routes inside a fused kernel that bypasses the router: counts stay 0

HEADER_FIELDS = (  # (name, struct code), in file order
    ("magic", "8s"),
    ("version", "I"),
    ("header_size", "I"),
    ("seq", "Q"),  # seqlock
    ("generation", "Q"),  # random per writer process, tells a restart from a wrap
    ("created_unix_ns", "q"),
    ("updated_unix_ns", "q"),  # time of the last snapshot
    ("pid", "I"),
    ("num_layers", "I"),  # L
    ("num_experts", "I"),  # E
    ("top_k", "I"),
    ("ranks", "10i"),  # global_rank, world_size, dp_rank, dp_size, tp_rank, tp_size, pp_rank, pp_size, ep_rank, ep_size
    ("num_phases", "I"),  # P
    ("num_token_buckets", "I"),  # TB
    ("num_duration_buckets", "I"),  # DB
    ("num_load_ranks", "I"),  # R: columns of the ep_rank_load section; 0 = none (version 1: reserved flags, 0)
    ("payload_size", "Q"),
    ("payload_crc32", "I"),
    ("num_physical", "I"),  # S: physical expert slots of the placement section; 0 = none (version 1: reserved, 0)
    ("publish_errors", "Q"),  # snapshots the writer failed to publish since it started
    ("model", f"{MODEL_NAME_BYTES}s"),  # model name, utf-8, NUL padded
    # extensions (after the payload; older writers left these zero, older readers ignore them)
    ("eplb_health_size", "I"),  # bytes of the eplb_health record; 0 = none
    ("extension_crc32", "I"),  # CRC-32 of the eplb_health record's bytes
    ("step_count_size", "I"),  # bytes of the step_count array (P x TB x 8); 0 = none
    ("step_count_crc32", "I"),  # CRC-32 of the step_count array's bytes
)
HEADER = struct.Struct("<" + "".join(code for _, code in HEADER_FIELDS))
# Where each field starts: the writer updates seq, updated_unix_ns, payload_crc32 and publish_errors in place.
HEADER_OFFSETS = {name: struct.calcsize("<" + "".join(code for _, code in HEADER_FIELDS[:i]))
                  for i, (name, _) in enumerate(HEADER_FIELDS)}
SEQ_OFFSET = HEADER_OFFSETS["seq"]
assert HEADER.size <= HEADER_SIZE
RANK_FIELDS = ("global_rank", "world_size", "dp_rank", "dp_size", "tp_rank", "tp_size",
               "pp_rank", "pp_size", "ep_rank", "ep_size")


# The eplb_health record (little-endian). Counts are cumulative per writer process; "none yet" is 0 for times and
# NaN for the duration.
EPLB_HEALTH_FIELDS = (
    ("flags", "I"),  # EPLB_ASYNC | EPLB_HOOKED | EPLB_IN_PROGRESS
    ("reserved", "I"),
    ("rearrangements", "Q"),  # rearrangements completed: sync, vLLM's whole-model commit; async, the last layer's
    ("layer_commits", "Q"),  # per-layer commits (async EPLB commits one MoE layer at a time)
    ("started", "Q"),  # rearrangements vLLM entered (EplbState.rearrange, its profile run excluded)
    ("last_start_unix_ns", "q"),  # when vLLM entered the last rearrangement
    ("last_end_unix_ns", "q"),  # when the last rearrangement completed
    ("last_duration_s", "d"),  # the last completed one: entry to its (last) commit, host clock
    ("duration_s_total", "d"),  # all completed ones
    ("step_interval", "Q"),  # vLLM's eplb_config.step_interval (steps between rearrangements)
    ("window_size", "Q"),  # vLLM's eplb_config.window_size (steps of load it plans on)
    ("steps_since", "Q"),  # vLLM's EplbState.expert_rearrangement_step at the publish
    ("engine_steps", "Q"),  # engine steps the plugin counted (every step with tokens), at the publish
    ("engine_steps_at_last", "Q"),  # the same, when the last rearrangement completed
)
EPLB_HEALTH = struct.Struct("<" + "".join(code for _, code in EPLB_HEALTH_FIELDS))
EPLB_ASYNC = 1  # vLLM runs EPLB asynchronously (eplb_config.use_async)
EPLB_HOOKED = 2  # the plugin wraps vLLM's rearrange: starts and durations are measured
EPLB_IN_PROGRESS = 4  # a rearrangement was entered and has not completed at the publish
MAX_EXTENSION_BYTES = 4096  # an extension record larger than this is refused unread
MAX_EPLB_STEPS = 1 << 53  # steps and counts above this are no writer's (2**53: exact in a float64 metric)


@dataclass(frozen=True)
class EplbHealth:
    """vLLM's EPLB as one rank's plugin saw it (the eplb_health record)."""

    flags: int = 0
    rearrangements: int = 0
    layer_commits: int = 0
    started: int = 0
    last_start_unix_ns: int = 0
    last_end_unix_ns: int = 0
    last_duration_s: float = math.nan
    duration_s_total: float = 0.0
    step_interval: int = 0
    window_size: int = 0
    steps_since: int = 0
    engine_steps: int = 0
    engine_steps_at_last: int = 0

    def pack(self) -> bytes:
        return EPLB_HEALTH.pack(*(0 if name == "reserved" else getattr(self, name) for name, _ in EPLB_HEALTH_FIELDS))

    @classmethod
    def unpack(cls, buf: bytes) -> EplbHealth:
        values = dict(zip((name for name, _ in EPLB_HEALTH_FIELDS), EPLB_HEALTH.unpack_from(buf)))
        del values["reserved"]
        return cls(**values)


def eplb_refusal(e: EplbHealth) -> str | None:
    """Why a decoded eplb_health record cannot be right (None: usable). vLLM's step_interval is at least 1; counts
    and steps stay below 2**53; times are >= 0; a duration is NaN (none yet) or finite, >= 0 and below a day's
    worth of seconds in total per rearrangement; no more rearrangements completed than commits or steps allow."""
    counts = (e.rearrangements, e.layer_commits, e.started, e.step_interval, e.window_size, e.steps_since,
              e.engine_steps, e.engine_steps_at_last)
    if not 1 <= e.step_interval or max(counts) > MAX_EPLB_STEPS:
        return f"step_interval {e.step_interval} or a count above 2**53"
    if e.last_start_unix_ns < 0 or e.last_end_unix_ns < 0:
        return "a negative timestamp"
    d = e.last_duration_s
    if not (math.isnan(d) or (math.isfinite(d) and 0 <= d <= 86400)):
        return f"last rearrangement duration {d!r}"
    if not (math.isfinite(e.duration_s_total) and e.duration_s_total >= 0):
        return f"total rearrangement duration {e.duration_s_total!r}"
    if math.isnan(d) != (e.rearrangements == 0):
        return f"{e.rearrangements} rearrangements with last duration {d!r}"
    if e.engine_steps_at_last > e.engine_steps:
        return f"engine steps at the last rearrangement ({e.engine_steps_at_last}) above the steps ({e.engine_steps})"
    return None


def max_slots(num_experts: int) -> int:
    """Physical expert slots a placement may have: vLLM's EPLB places the logical experts plus its redundant ones
    (DeepSeek-V3: 256 + 32). Up to three replicas of every expert, or 1024 redundant slots (one per EP rank at EP
    1024) for models with few experts: far above what EPLB is run with, and small enough (61 layers x 1280 slots)
    that a hostile header cannot make the sidecar's split expensive."""
    return max(4 * num_experts, num_experts + MAX_REDUNDANT_SLOTS)


class SegmentError(Exception):
    """A segment that cannot be used. `kind` is a short stable label used in metrics."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Ranks:
    global_rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in RANK_FIELDS)


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_experts: int
    num_token_buckets: int
    num_duration_buckets: int
    num_phases: int = len(PHASES)
    num_physical: int = 0  # slots of the placement section (0: no section, the sidecar assumes contiguous)
    num_load_ranks: int = 0  # EP ranks of the ep_rank_load section (0: none)

    def sections(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        L, E, P = self.num_layers, self.num_experts, self.num_phases
        TB, DB = self.num_token_buckets, self.num_duration_buckets
        sections: list[tuple[str, np.dtype, tuple[int, ...]]] = [
            ("layer_ids", np.dtype("<i4"), (L,)),
            ("layer_flags", np.dtype("u1"), (_pad8(L),)),
            ("counts", np.dtype("<i8"), (L, E)),
            ("token_bounds", np.dtype("<i8"), (TB,)),
            ("duration_bounds", np.dtype("<f8"), (DB,)),
            ("step_hist", np.dtype("<i8"), (P, TB, DB)),
            ("step_seconds", np.dtype("<f8"), (P, TB)),
            ("step_tokens", np.dtype("<i8"), (P, TB)),
        ]
        if self.num_physical:
            sections.append(("physical_to_logical", np.dtype("<i4"), (L, self.num_physical)))
        if self.num_load_ranks:
            sections.append(("ep_rank_load", np.dtype("<f8"), (L, self.num_load_ranks)))
        return sections

    @property
    def payload_size(self) -> int:
        return sum(section_bytes(section) for section in self.sections())


def section_bytes(section: tuple[str, np.dtype, tuple[int, ...]]) -> int:
    """Bytes of a section (name, dtype, shape). Python ints: a crafted header must not wrap around (numpy products
    overflow silently)."""
    _, dt, shape = section
    return dt.itemsize * math.prod(shape)


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass(frozen=True)
class Header:
    seq: int
    generation: int
    created_unix_ns: int
    updated_unix_ns: int
    pid: int
    top_k: int
    ranks: Ranks
    shape: Shape
    payload_size: int
    payload_crc32: int
    publish_errors: int
    model: str
    eplb_health_size: int = 0  # extension bytes after the payload (0: none)
    extension_crc32: int = 0
    step_count_size: int = 0  # step_count bytes after the eplb_health record (0: none)
    step_count_crc32: int = 0

    @property
    def extension_size(self) -> int:
        return self.eplb_health_size + self.step_count_size


@dataclass(frozen=True)
class Refusal:
    """An optional section of a readable segment left out because it does not fit the header. `reason` is a short
    stable label used in metrics (ep_size, shape, expert_ids, value, checksum; the sidecar adds decreased)."""

    section: str
    reason: str
    message: str


@dataclass(frozen=True)
class Snapshot:
    """One consistent cumulative snapshot of a rank."""

    header: Header
    layer_ids: np.ndarray
    layer_flags: np.ndarray
    counts: np.ndarray
    token_bounds: np.ndarray
    duration_bounds: np.ndarray
    step_hist: np.ndarray
    step_seconds: np.ndarray
    step_tokens: np.ndarray
    physical_to_logical: np.ndarray | None = None  # [L, S] live placement, when the writer published one
    ep_rank_load: np.ndarray | None = None  # [L, R] cumulative EP-rank load the writer attributed itself
    eplb_health: EplbHealth | None = None  # the eplb_health extension, when the writer published one
    step_count: np.ndarray | None = None  # [P, TB] every engine step (the step_count extension); None: an older
    # writer, which timed every step (its count is step_hist.sum(axis=2)), or refused
    refused: tuple[Refusal, ...] = ()  # optional sections present in the file but left out


def pack_header(h: Header) -> bytes:
    model = truncate_utf8(h.model, MODEL_NAME_BYTES)
    s = h.shape
    raw = HEADER.pack(
        MAGIC, VERSION, HEADER_SIZE, h.seq, h.generation, h.created_unix_ns, h.updated_unix_ns, h.pid,
        s.num_layers, s.num_experts, h.top_k, *h.ranks.as_tuple(), s.num_phases, s.num_token_buckets,
        s.num_duration_buckets, s.num_load_ranks, h.payload_size, h.payload_crc32, s.num_physical,
        h.publish_errors, model, h.eplb_health_size, h.extension_crc32, h.step_count_size, h.step_count_crc32,
    )
    return raw.ljust(HEADER_SIZE, b"\x00")


def truncate_utf8(text: str, limit: int) -> bytes:
    """Encode and cut to `limit` bytes without splitting a multi-byte character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def unpack_header(buf: bytes, max_payload: int) -> Header:
    """Parse and validate a header. Raises SegmentError with kind truncated/magic/version/corrupt/oversized."""
    if len(buf) < HEADER.size:
        raise SegmentError("truncated", f"{len(buf)} bytes is shorter than the {HEADER.size}-byte header")
    f = HEADER.unpack_from(buf)
    magic, version, header_size = f[0], f[1], f[2]
    if magic != MAGIC:
        raise SegmentError("magic", f"not a moe-monitor segment (magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise SegmentError("version", f"segment format version {version}, this reader understands "
                                      f"{', '.join(map(str, READABLE_VERSIONS))}")
    if header_size != HEADER_SIZE:
        raise SegmentError("corrupt", f"header_size {header_size} != {HEADER_SIZE}")
    seq, generation, created, updated, pid, L, E, top_k = f[3:11]
    ranks = Ranks(*f[11:21])
    P, TB, DB, R, payload_size, crc, S, publish_errors, model, eplb_size, ext_crc, count_size, count_crc = f[21:34]
    if P != len(PHASES) or TB < 1 or DB < 1:
        raise SegmentError("corrupt", f"bad histogram dimensions phases={P} token_buckets={TB} duration_buckets={DB}")
    if version == 1:
        S = R = 0
    shape = Shape(L, E, TB, DB, P, S, R)
    if payload_size > max_payload:
        raise SegmentError("oversized", f"payload of {payload_size} bytes exceeds the limit of {max_payload}")
    if payload_size != shape.payload_size:
        raise SegmentError("corrupt", f"payload_size {payload_size} does not match {L} layers x {E} experts")
    try:
        name = model.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError as e:
        raise SegmentError("corrupt", f"model name is not utf-8: {e}") from None
    return Header(seq, generation, created, updated, pid, top_k, ranks, shape, payload_size, crc,
                  publish_errors, name, eplb_size, ext_crc, count_size, count_crc)


def decode_from(head: bytes, read, size: int, max_payload: int) -> Snapshot:
    """Decode a segment of `size` bytes from its header bytes `head` and `read(n)`, which gives the next n bytes of
    the payload (fewer at the end of the file). A section the header refuses is only checksummed, a piece at a time:
    what is held is bounded by the sizes the header allows, not by the file. Raises SegmentError; never returns a
    torn snapshot (with the reader's seqlock check)."""
    h = unpack_header(head, max_payload)
    if h.seq % 2:
        raise SegmentError("torn", "writer is inside a snapshot (odd sequence number)")
    end = HEADER_SIZE + h.payload_size
    if size < end:
        raise SegmentError("truncated", f"file has {size} bytes, header promises {end}")
    refused = {r.section: r for r in header_refusals(h)}
    arrays, crc = {}, 0
    for kept, group in itertools.groupby(h.shape.sections(), key=lambda section: section[0] not in refused):
        run = [(name, dt, shape, section_bytes((name, dt, shape))) for name, dt, shape in group]
        n = sum(nbytes for *_, nbytes in run)
        if not kept:  # only checksummed, a piece at a time
            while n:
                piece = _read_exactly(read, min(n, PIECE_BYTES))
                crc, n = zlib.crc32(piece, crc), n - len(piece)
            continue
        data = _read_exactly(read, n)  # consecutive kept sections in one read
        crc, off = zlib.crc32(data, crc), 0
        for name, dt, shape, nbytes in run:
            arrays[name] = np.frombuffer(data, dtype=dt, count=math.prod(shape), offset=off).reshape(shape)
            off += nbytes
    if crc != h.payload_crc32:
        raise SegmentError("corrupt", "payload checksum mismatch")
    arrays["layer_flags"] = arrays["layer_flags"][: h.shape.num_layers]
    for r in content_refusals(h.shape, arrays):
        refused[r.section] = r
        del arrays[r.section]
    extensions = _Extensions(read, HEADER_SIZE + h.payload_size, size)
    eplb = extensions.eplb_health(h)
    step_count = extensions.step_count(h, arrays["step_hist"])
    for r in extensions.refused:
        refused[r.section] = r
    return Snapshot(header=h, refused=tuple(refused.values()), eplb_health=eplb, step_count=step_count, **arrays)


def step_count_section(shape: Shape) -> tuple[str, np.dtype, tuple[int, ...]]:
    """The step_count extension as a section (name, dtype, shape), for `payload_parts`."""
    return ("step_count", np.dtype("<i8"), (shape.num_phases, shape.num_token_buckets))


class _Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Extensions:
    """The extensions after the payload, in file order: each is read (or skipped) in turn by `read`, which gives
    the file's next bytes; what one refuses is collected in `refused`."""

    def __init__(self, read, start: int, size: int):
        self._read, self._pos, self._size = read, start, size
        self.refused: list[Refusal] = []

    def _take(self, n: int) -> bytes:
        """The next n bytes (fewer where the file ends: at most what is left of it is read)."""
        data = self._read(max(0, min(n, self._size - self._pos)))
        self._pos += n
        return data

    def eplb_health(self, h: Header) -> EplbHealth | None:
        return self._checked("eplb_health", self._eplb_health, h)

    def step_count(self, h: Header, step_hist: np.ndarray) -> np.ndarray | None:
        return self._checked("step_count", self._step_count, h, step_hist)

    def _checked(self, section: str, read_section, *args):
        try:
            return read_section(*args)
        except _Refused as e:
            self.refused.append(Refusal(section, e.reason, str(e)))
            return None

    def _eplb_health(self, h: Header) -> EplbHealth | None:
        n = h.eplb_health_size
        if not n:
            return None
        data = self._take(n)  # skipped when refused: the extensions after it start after its announced bytes
        if not EPLB_HEALTH.size <= n <= MAX_EXTENSION_BYTES:
            raise _Refused("shape", f"an eplb_health record of {n} bytes: {EPLB_HEALTH.size} to "
                           f"{MAX_EXTENSION_BYTES} expected")
        if len(data) < n:
            raise _Refused("shape", f"the file ends inside its {n}-byte eplb_health record")
        if zlib.crc32(data) != h.extension_crc32:
            raise _Refused("checksum", "the eplb_health record does not match its checksum")
        record = EplbHealth.unpack(data)
        why = eplb_refusal(record)
        if why is not None:
            raise _Refused("value", f"the eplb_health record cannot be right: {why}")
        return record

    def _step_count(self, h: Header, step_hist: np.ndarray) -> np.ndarray | None:
        n = h.step_count_size
        if not n:
            return None
        section = step_count_section(h.shape)
        _, dt, shape = section
        want = section_bytes(section)
        if n != want:
            raise _Refused("shape", f"a step_count of {n} bytes: {want} expected ({shape[0]} phases x {shape[1]} "
                           "token buckets x 8)")
        data = self._take(n)
        if len(data) < n:
            raise _Refused("shape", f"the file ends inside its {n}-byte step_count")
        if zlib.crc32(data) != h.step_count_crc32:
            raise _Refused("checksum", "the step_count does not match its checksum")
        count = np.frombuffer(data, dtype=dt).reshape(shape)
        why = step_count_refusal(count, step_hist)
        if why is not None:
            raise _Refused("value", f"the step_count cannot be right: {why}")
        return count


def step_count_refusal(count: np.ndarray, step_hist: np.ndarray) -> str | None:
    """Why a decoded step_count cannot be right (None: usable): a writer counts every step it times, so no cell
    is below 0 or below the timed steps of its cell (the step histogram's sum)."""
    timed = step_hist.sum(axis=2)
    for bad, what in ((count < 0, "negative"), (count < timed, "below the timed steps of its cell")):
        if bad.any():
            p, t = (int(i) for i in np.argwhere(bad)[0])
            phase = PHASES[p] if p < len(PHASES) else str(p)
            return f"{what}: {int(count[p, t])} {phase} steps in token bucket {t} ({int(timed[p, t])} timed)"
    return None


PIECE_BYTES = 1 << 20  # a refused section is checksummed this much at a time


def _read_exactly(read, n: int) -> bytes:
    data = read(n)
    if len(data) < n:
        raise SegmentError("truncated", "the file ended inside its payload")
    return data


def header_refusals(h: Header) -> list[Refusal]:
    """The optional sections whose size the header contradicts: decided from the header alone, before any of
    their bytes is used."""
    s, ep = h.shape, h.ranks.ep_size
    present = [name for name, n in (("physical_to_logical", s.num_physical), ("ep_rank_load", s.num_load_ranks)) if n]
    if present and not 1 <= ep <= MAX_EP_SIZE:
        why = f"the header's ep_size {ep} is outside [1, {MAX_EP_SIZE}]"
        return [Refusal(name, "ep_size", why) for name in present]
    out = []
    S, E = s.num_physical, s.num_experts
    if S and (S % ep or not E <= S <= max_slots(E)):
        out.append(Refusal("physical_to_logical", "shape", f"{S} physical slots for {E} experts over ep_size {ep}: "
                           f"a multiple of ep_size between {E} and {max_slots(E)} expected"))
    if s.num_load_ranks and s.num_load_ranks != ep:
        out.append(Refusal("ep_rank_load", "shape", f"{s.num_load_ranks} EP-rank load columns, the header's ep_size "
                           f"is {ep}"))
    return out


def content_refusals(shape: Shape, arrays: dict[str, np.ndarray]) -> list[Refusal]:
    """The optional sections (of a size the header allows) whose values cannot be right."""
    out = []
    p2l, E = arrays.get("physical_to_logical"), shape.num_experts
    if p2l is not None and p2l.size:
        if p2l.min() < 0 or p2l.max() >= E:
            out.append(Refusal("physical_to_logical", "expert_ids", f"the placement names logical expert "
                               f"{int(p2l.min() if p2l.min() < 0 else p2l.max())}; the model has {E}"))
        else:
            slots = np.bincount((p2l + E * np.arange(len(p2l))[:, None]).ravel(), minlength=len(p2l) * E)
            if (slots == 0).any():
                row, expert = divmod(int(np.flatnonzero(slots == 0)[0]), E)
                out.append(Refusal("physical_to_logical", "expert_ids", f"logical expert {expert} has no physical "
                                   f"slot in layer {int(arrays['layer_ids'][row])}: its tokens would be lost"))
    load = arrays.get("ep_rank_load")
    if load is not None and not (np.isfinite(load).all() and (load >= 0).all()):
        out.append(Refusal("ep_rank_load", "value", "the published EP-rank load is negative or not finite"))
    return out


def payload_parts(sections: list[tuple[str, np.dtype, tuple[int, ...]]], num_layers: int,
                  arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The payload's sections (`Shape.sections()`) as C-contiguous little-endian arrays, in file order: an array
    that already is one is passed through, not copied. Raises ValueError on a missing array or a shape that does not
    fit."""
    parts = []
    for name, dt, sec_shape in sections:
        if name not in arrays:
            raise ValueError(f"{name}: not among the published arrays ({', '.join(sorted(arrays))}); a writer "
                             f"publishes every section")
        a = arrays[name]
        if name == "layer_flags":
            if np.shape(a) != (num_layers,):
                raise ValueError(f"layer_flags: shape {np.shape(a)} != ({num_layers},)")
            padded = np.zeros(sec_shape, dtype=dt)
            padded[:num_layers] = a
            a = padded
        a = np.ascontiguousarray(a, dtype=dt)
        if a.shape != sec_shape:
            raise ValueError(f"{name}: shape {a.shape} != {sec_shape}")
        parts.append(a)
    return parts


def encode_payload(shape: Shape, arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise payload arrays (names as in Shape.sections) into bytes."""
    return b"".join(a.tobytes() for a in payload_parts(shape.sections(), shape.num_layers, arrays))
