"""The routing flight recorder: the last minutes of closed windows (per layer × expert counts, per-EP-rank load,
engine steps by phase and tokens), kept in a bounded ring so that a capture can store what routing looked like
before its trigger, and on-call engineers can see which expert went hot, when, and in which layers.

Pure core: `FlightRecorder` keeps each window as the JSON object the record serves, encoded once when the window
is recorded (counts clipped to uint32), within a window count and a byte bound; `body` joins them into the answer
of /api/flight (the newest answers kept). The format itself, and reading a record back, are
moe_monitor/schema/flight_record.py.

At the DeepSeek-V3 scale (61 layers × 256 experts, 16 EP ranks) a window is ~90 KB of JSON, 0.5 ms to encode on the
window thread; 10 minutes of 5 s windows 10.7 MB, stored with a capture as 5.3 MB gzipped; the whole record served
in 17 ms (benchmarks/flight_recorder.py, results/flight_recorder.txt).
"""

from __future__ import annotations

import gzip
import logging
import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import msgspec
import numpy as np

from moe_monitor.channel.layout import PHASES
from moe_monitor.schema.flight_record import FORMAT

log = logging.getLogger(__name__)

INT64_MAX = np.iinfo(np.int64).max  # the segment's +Inf tokens bound (moe_monitor/channel/layout.py)
SERVED_KEPT = 4  # answers body() keeps (each at most the ring's size, gzipped ones ~10x less)
DEFAULT_MAX_BYTES = 64 << 20  # the ring's bound (--flight-max-bytes): its JSON, served and stored as it is


@dataclass(frozen=True)
class FlightWindow:
    """One closed window, kept as the JSON object the record serves (encoded once, when it is recorded, so a
    request or a capture costs a join, not a serialisation: re-encoding a 12 MB record per answer costs ~0.45
    CPU-s, docs/security.md)."""
    start: float
    end: float
    experts: int
    ep_ranks: int  # 0: no EP-rank load
    json: bytes

    @property
    def nbytes(self) -> int:
        return len(self.json)


def _window_json(window, rank_load: np.ndarray | None) -> bytes:
    counts = np.minimum(np.asarray(window.counts), np.iinfo(np.uint32).max).astype(np.uint32)
    seconds = window.step_seconds
    return msgspec.json.encode({
        "start": float(window.start), "end": float(window.end), "counts": counts.tolist(),
        "rank_load": None if rank_load is None else np.round(np.asarray(rank_load, np.float64), 1).tolist(),
        "step_count": _steps_json(window.step_count), "timed_steps": _steps_json(window.timed_steps),
        "step_seconds": None if seconds is None else np.round(np.asarray(seconds, np.float64), 6).tolist(),
    })


def _steps_json(steps: np.ndarray | None) -> list | None:
    return None if steps is None else np.minimum(np.asarray(steps), np.iinfo(np.uint32).max).astype(np.uint32).tolist()


class FlightRecorder:
    """The newest `capacity` windows of one model, at most `max_bytes` of them (the oldest go first: a model of
    many layers x experts in short windows keeps fewer minutes, never more memory). A window of another model
    (other layers or expert count) starts the record afresh: a record never mixes two models."""

    def __init__(self, capacity: int, max_bytes: int = DEFAULT_MAX_BYTES):
        if capacity < 0 or max_bytes < 1:
            raise ValueError("capacity must be >= 0 and max_bytes >= 1")
        self.capacity, self.max_bytes = capacity, max_bytes
        self._windows: deque[FlightWindow] = deque(maxlen=max(capacity, 1))
        self._bytes = 0
        self._lock = threading.Lock()
        self.layer_ids: tuple[int, ...] = ()
        self.token_bounds: tuple[float, ...] = ()
        self._served: OrderedDict[tuple, bytes] = OrderedDict()  # body()'s newest answers
        self.trimmed = False  # the byte bound has cut the record short of `capacity` windows (logged once)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._windows) if self.enabled else 0

    @property
    def nbytes(self) -> int:
        return self._bytes if self.enabled else 0

    def record(self, window, rank_load: np.ndarray | None) -> None:
        """Keep one closed window (`windows.Window`) and its per-EP-rank load [L, R]."""
        if not self.enabled:
            return
        layers = tuple(int(x) for x in window.layer_ids)
        shape = np.shape(window.counts)
        entry = FlightWindow(float(window.start), float(window.end), int(shape[1]) if len(shape) == 2 else 0,
                             0 if rank_load is None else int(np.shape(rank_load)[-1]), _window_json(window, rank_load))
        with self._lock:
            if self._windows and (layers != self.layer_ids or self._windows[-1].experts != entry.experts):
                self._windows.clear()
                self._bytes = 0
            self.layer_ids = layers
            if window.token_bounds is not None:
                # The last bound is the segment's INT64_MAX (+Inf), served as null like any infinite bound.
                self.token_bounds = tuple(math.inf if float(x) >= INT64_MAX else float(x) for x in window.token_bounds)
            if len(self._windows) == self._windows.maxlen:
                self._bytes -= self._windows[0].nbytes
            self._windows.append(entry)
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and len(self._windows) > 1:
                self._bytes -= self._windows.popleft().nbytes
                if not self.trimmed:
                    self.trimmed = True
                    log.warning("flight recorder: %d windows reach its byte bound (--flight-max-bytes %d): it "
                                "keeps fewer than --flight-minutes asks (%d windows)", len(self._windows),
                                self.max_bytes, self.capacity)

    def windows(self, last: int | None = None, since: float | None = None) -> list[FlightWindow]:
        with self._lock:
            kept = list(self._windows) if self.enabled else []
        if since is not None:
            kept = [w for w in kept if w.end > since]
        return kept[-last:] if last else kept

    def snapshot(self, model: str = "", last: int | None = None, since: float | None = None,
                 trigger: float | None = None) -> FlightSnapshot:
        """The windows as they are now, cheap to take (windows are never changed once recorded): a capture
        takes it when it starts and serialises it later, on its own thread."""
        kept = self.windows(last, since)
        with self._lock:
            return FlightSnapshot(model, trigger, self.layer_ids, self.token_bounds, tuple(kept))

    def record_json(self, **kw) -> dict:
        return self.snapshot(**kw).document()

    def body(self, model: str, last: int | None, since: float | None, gzipped: bool) -> bytes:
        """The JSON (or gzipped JSON) /api/flight serves. The newest answers are kept until the windows change,
        so clients polling the same view cost one join and one compression per window between them."""
        snap = self.snapshot(model=model, last=last, since=since)
        w = snap.windows
        key = (model, len(w), w[0].start if w else None, w[-1].end if w else None, gzipped)
        with self._lock:
            if key in self._served:
                self._served.move_to_end(key)
                return self._served[key]
        data = snap.encode()
        if gzipped:
            data = gzip.compress(data, compresslevel=3)
        with self._lock:
            self._served[key] = data
            while len(self._served) > SERVED_KEPT:
                self._served.popitem(last=False)
        return data

    def gzipped(self, **kw) -> bytes:
        return self.snapshot(**kw).gzipped()


@dataclass(frozen=True)
class FlightSnapshot:
    model: str
    trigger: float | None
    layer_ids: tuple[int, ...]
    token_bounds: tuple[float, ...]
    windows: tuple[FlightWindow, ...]

    def encode(self) -> bytes:
        """The record as JSON (docs/flight.md): its header, then the windows as they were encoded."""
        kept = self.windows
        header = msgspec.json.encode({
            "format": FORMAT, "model": self.model, "trigger": self.trigger, "layer_ids": list(self.layer_ids),
            "experts": kept[-1].experts if kept else 0, "ep_ranks": kept[-1].ep_ranks if kept else 0,
            "phases": list(PHASES), "token_bounds": [b if math.isfinite(b) else None for b in self.token_bounds],
        })
        return b"".join((header[:-1], b',"windows":[', b",".join(w.json for w in kept), b"]}"))

    def document(self) -> dict:
        return msgspec.json.decode(self.encode())

    def gzipped(self) -> bytes:
        """What a capture stores. gzip level 1: a third of level 3's time for 4 % more bytes on these counts."""
        return gzip.compress(self.encode(), compresslevel=1)
