"""The routing flight recorder: the last minutes of closed windows (per layer × expert counts, per-EP-rank load,
engine steps by phase and tokens), kept in a bounded ring so that a capture can store what routing looked like
before its trigger, and on-call engineers can see which expert went hot, when, and in which layers.

Pure core: `FlightRecorder` keeps compact arrays (counts as uint32: a window's assignments per layer × expert
stay far below 2^32; rank load and step seconds as float32); `record_json` renders a snapshot as a JSON document
(docs/flight.md gives its schema); `parse` validates one read back from a capture; `summary` and
`render_summary` turn it into the per-window lines `moe-monitor traces show` prints.

Memory: (L·E·4 + L·R·4 + small) bytes per window; at the DeepSeek-V3 scale (61 layers × 256 experts, 16 EP
ranks) 66 KB per window, 8.0 MB for the default 10 minutes of 5 s windows, stored with a capture as 5.3 MB of
gzipped JSON; a capture's snapshot costs the window thread ~20 µs, its serialisation (0.2 s) runs on the capture's
thread (benchmarks/flight_recorder.py, results/flight_recorder.txt).
"""

from __future__ import annotations

import gzip
import io
import math
import threading
from collections import deque
from dataclasses import dataclass

import msgspec
import numpy as np

from moe_monitor.channel.layout import PHASES

FILE = "flight.json.gz"  # the name a capture stores its flight record under
FORMAT = "moe-monitor-flight/1"
MAX_JSON_BYTES = 256 << 20  # a stored record larger than this is refused when read back (decompressed)


class FlightError(ValueError):
    """A flight record that cannot be used; the message says why."""


@dataclass(frozen=True)
class FlightWindow:
    start: float
    end: float
    counts: np.ndarray  # uint32 [L, E]
    rank_load: np.ndarray | None  # float32 [L, R] under the placement, or None
    step_count: np.ndarray | None  # uint32 [phase, tokens bucket]
    step_seconds: np.ndarray | None  # float32 [phase, tokens bucket]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.counts, self.rank_load, self.step_count, self.step_seconds)
                   if a is not None)


class FlightRecorder:
    """The newest `capacity` windows of one model. A window of another model (other layers or expert count)
    starts the record afresh: a record never mixes two models."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._windows: deque[FlightWindow] = deque(maxlen=max(capacity, 1))
        self._lock = threading.Lock()
        self.layer_ids: tuple[int, ...] = ()
        self.token_bounds: tuple[float, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._windows) if self.enabled else 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(w.nbytes for w in self._windows) if self.enabled else 0

    def record(self, window, rank_load: np.ndarray | None) -> None:
        """Keep one closed window (`windows.Window`) and its per-EP-rank load [L, R]."""
        if not self.enabled:
            return
        layers = tuple(int(x) for x in window.layer_ids)
        counts = np.minimum(np.asarray(window.counts), np.iinfo(np.uint32).max).astype(np.uint32)
        entry = FlightWindow(
            float(window.start), float(window.end), counts,
            None if rank_load is None else np.asarray(rank_load, dtype=np.float32),
            None if window.step_count is None else
            np.minimum(np.asarray(window.step_count), np.iinfo(np.uint32).max).astype(np.uint32),
            None if window.step_seconds is None else np.asarray(window.step_seconds, dtype=np.float32))
        with self._lock:
            if self._windows and (layers != self.layer_ids or self._windows[-1].counts.shape != counts.shape):
                self._windows.clear()
            self.layer_ids = layers
            if window.token_bounds is not None:
                self.token_bounds = tuple(float(x) for x in window.token_bounds)
            self._windows.append(entry)

    def windows(self, last: int | None = None, since: float | None = None) -> list[FlightWindow]:
        with self._lock:
            kept = list(self._windows) if self.enabled else []
        if since is not None:
            kept = [w for w in kept if w.end > since]
        return kept[-last:] if last else kept

    def snapshot(self, model: str = "", last: int | None = None, since: float | None = None,
                 trigger: float | None = None) -> FlightSnapshot:
        """The windows as they are now, cheap to take (the arrays are never changed once recorded): a capture
        takes it when it starts and serialises it later, on its own thread."""
        kept = self.windows(last, since)
        with self._lock:
            return FlightSnapshot(model, trigger, self.layer_ids, self.token_bounds, tuple(kept))

    def record_json(self, **kw) -> dict:
        return self.snapshot(**kw).document()

    def gzipped(self, **kw) -> bytes:
        return self.snapshot(**kw).gzipped()


@dataclass(frozen=True)
class FlightSnapshot:
    model: str
    trigger: float | None
    layer_ids: tuple[int, ...]
    token_bounds: tuple[float, ...]
    windows: tuple[FlightWindow, ...]

    def document(self) -> dict:
        """The record as a JSON-ready document (docs/flight.md)."""
        kept = self.windows
        return {
            "format": FORMAT, "model": self.model, "trigger": self.trigger, "layer_ids": list(self.layer_ids),
            "experts": int(kept[-1].counts.shape[1]) if kept else 0,
            "ep_ranks": int(kept[-1].rank_load.shape[1]) if kept and kept[-1].rank_load is not None else 0,
            "phases": list(PHASES), "token_bounds": [b if math.isfinite(b) else None for b in self.token_bounds],
            "windows": [{
                "start": w.start, "end": w.end, "counts": w.counts.tolist(),
                "rank_load": None if w.rank_load is None else np.round(w.rank_load, 1).tolist(),
                "step_count": None if w.step_count is None else w.step_count.tolist(),
                "step_seconds": None if w.step_seconds is None else np.round(w.step_seconds, 6).tolist(),
            } for w in kept],
        }

    def encode(self) -> bytes:
        return msgspec.json.encode(self.document())

    def gzipped(self) -> bytes:
        """What a capture stores. gzip level 1: a third of level 3's time for 4 % more bytes on these counts."""
        return gzip.compress(self.encode(), compresslevel=1)


def parse(data: bytes) -> dict:
    """A flight record read back (gzipped or plain JSON), checked: FlightError names what is wrong."""
    try:
        if data[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise FlightError(f"flight record larger than {MAX_JSON_BYTES} bytes")
        doc = msgspec.json.decode(data)
    except (OSError, EOFError, ValueError, msgspec.DecodeError) as e:
        if isinstance(e, FlightError):
            raise
        raise FlightError(f"not a readable flight record: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FlightError(f"not a flight record (format {doc.get('format') if isinstance(doc, dict) else None!r}, "
                          f"expected {FORMAT!r})")
    layers, windows = doc.get("layer_ids"), doc.get("windows")
    if not isinstance(layers, list) or not isinstance(windows, list):
        raise FlightError("flight record without layer_ids or windows")
    for i, w in enumerate(windows):
        counts = w.get("counts") if isinstance(w, dict) else None
        if not isinstance(counts, list) or len(counts) != len(layers) or \
                any(not isinstance(r, list) or len(r) != doc.get("experts") for r in counts):
            raise FlightError(f"flight record window {i}: counts are not [{len(layers)} layers][{doc.get('experts')} "
                              "experts]")
    return doc


def summary(doc: dict, top: int = 1) -> list[dict]:
    """Per window: routed assignments, the most imbalanced layer (max expert load / mean), the hottest experts
    (layer, expert, share of its layer's assignments) and the busiest EP rank's load / mean."""
    layers = doc["layer_ids"]
    out = []
    for w in doc["windows"]:
        counts = np.asarray(w["counts"], dtype=np.float64)
        totals = counts.sum(axis=1)
        means = np.where(totals > 0, totals / max(counts.shape[1], 1), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = counts.max(axis=1, initial=0) / means
            share = counts / totals[:, None]
        worst = int(np.nanargmax(ratio)) if np.isfinite(ratio).any() else None
        flat = np.nan_to_num(share, nan=-1.0).ravel()
        hottest = [(layers[i // counts.shape[1]], i % counts.shape[1], float(flat[i]))
                   for i in np.argsort(-flat)[:top] if flat[i] > 0]
        rank = None
        if w.get("rank_load") is not None:
            load = np.asarray(w["rank_load"], dtype=np.float64).sum(axis=0)
            rank = float(load.max() / load.mean()) if load.size and load.mean() > 0 else None
        out.append({"start": w["start"], "end": w["end"], "routed": int(totals.sum()),
                    "worst_layer": None if worst is None else layers[worst],
                    "worst_imbalance": None if worst is None else float(ratio[worst]),
                    "hottest": hottest, "ep_rank_max_over_mean": rank})
    return out


def render_summary(doc: dict, top: int = 1) -> str:
    """The text `moe-monitor traces show` prints: one line per window, times relative to the trigger."""
    rows = summary(doc, top)
    if not rows:
        return "flight record: no windows (the sidecar had not closed a window before the trigger)"
    ref = doc.get("trigger") or rows[-1]["end"]
    lines = [f"flight record: {len(rows)} windows of {doc.get('model') or 'the model'} before the trigger "
             f"({len(doc['layer_ids'])} MoE layers x {doc['experts']} experts"
             + (f", {doc['ep_ranks']} EP ranks" if doc.get("ep_ranks") else "") + ")",
             f"{'window end':>10s} {'routed':>10s}  {'worst layer (max/mean)':24s} "
             f"{'hottest expert (layer/expert: share)':38s}" + ("  EP rank max/mean" if doc.get("ep_ranks") else "")]
    for r in rows:
        worst = f"{r['worst_layer']} ({r['worst_imbalance']:.2f})" if r["worst_layer"] is not None else "-"
        hot = ", ".join(f"{layer}/{expert}: {100 * s:.1f} %" for layer, expert, s in r["hottest"]) or "-"
        rank = f"  {r['ep_rank_max_over_mean']:.2f}" if r["ep_rank_max_over_mean"] is not None else ""
        lines.append(f"{r['end'] - ref:+9.0f}s {r['routed']:10d}  {worst:24s} {hot:38s}{rank}")
    return "\n".join(lines)
