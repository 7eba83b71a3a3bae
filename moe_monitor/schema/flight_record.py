"""The flight record's format (docs/flight.md): the file a capture stores it under, its format tag, the bound on
its size once inflated, and the checked reading of one (`parse`, into a frozen `FlightRecord`), shared by the
sidecar that writes and serves it and the clients that read it (`traces show`, `eplb`, `top`). `summary` and
`render_summary` turn a parsed record into the per-window lines `moe-monitor traces show` prints.
"""
from __future__ import annotations

import gzip
import io
import math
from dataclasses import dataclass

import msgspec
import numpy as np

from .json_values import is_int, is_number

FILE = "flight.json.gz"  # the name a capture stores its flight record under
FORMAT = "moe-monitor-flight/1"
MAX_JSON_BYTES = 256 << 20  # a stored record larger than this is refused when read back (decompressed)


class FlightError(ValueError):
    """A flight record that cannot be used; the message says why."""


@dataclass(frozen=True)
class RecordedWindow:
    """One closed window of a flight record: its span (unix seconds), the assignments each layer routed to each
    expert [layers, experts], and, when the sidecar had them, the EP-rank load [layers, EP ranks] and the engine
    steps [phases, tokens buckets]: every step (step_count), and the timed ones (timed_steps; a sample on CUDA) and
    their summed duration (step_seconds). A record without timed_steps (a sidecar before them) timed every step:
    its timed_steps read as its step_count. Arrays are float64 and read-only."""
    start: float
    end: float
    counts: np.ndarray
    rank_load: np.ndarray | None = None
    step_count: np.ndarray | None = None
    step_seconds: np.ndarray | None = None
    timed_steps: np.ndarray | None = None


@dataclass(frozen=True)
class FlightRecord:
    """A flight record as `parse` reads it (docs/flight.md has the JSON): the MoE layer ids (strictly increasing),
    the logical experts per layer, the windows oldest first, and what the sidecar knew of the model and the steps.
    `token_bounds` are the tokens buckets' upper bounds (math.inf: the last, unbounded one)."""
    layer_ids: tuple[int, ...]
    experts: int
    windows: tuple[RecordedWindow, ...]
    model: str = ""
    trigger: float | None = None  # the capture's trigger time (a capture's record), else None
    ep_ranks: int = 0  # 0: no EP-rank load recorded
    phases: tuple[str, ...] = ()
    token_bounds: tuple[float, ...] = ()


def _shown(x: object) -> str:
    return str(x) if is_int(x) else repr(x)[:60]


def _matrix(x: object, rows: int, cols: int | None, what: str) -> np.ndarray:
    """x as read-only float64 [rows, cols] (cols: any when None), finite, >= 0, with a finite sum."""
    try:
        m = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise FlightError(f"{what} are not numbers") from None
    if m.ndim != 2 or m.shape[0] != rows or (cols is not None and m.shape[1] != cols):
        raise FlightError(f"{what} are not numbers [{rows} layers][{cols if cols is not None else 'N'}]")
    if not np.isfinite(m).all():
        raise FlightError(f"{what} hold null, NaN or infinity")
    with np.errstate(over="ignore"):
        if not np.isfinite(m.sum()):
            raise FlightError(f"{what} are too large: their sum is not finite")
    if (m < 0).any():
        layer, col = (int(i) for i in np.argwhere(m < 0)[0])
        raise FlightError(f"{what} are negative (row {layer}, column {col})")
    m.setflags(write=False)
    return m


def _steps(x: object, what: str) -> np.ndarray | None:
    """Step counts or seconds [phases, tokens buckets] (null: none recorded); a null inside reads as NaN."""
    if x is None:
        return None
    try:
        m = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        m = np.zeros(0)
    if m.ndim != 2:
        raise FlightError(f"{what} are not numbers [phases][tokens buckets]")
    m.setflags(write=False)
    return m


def _window(i: int, w: object, layers: int, experts: int) -> RecordedWindow:
    what = f"flight record window {i}"
    counts = w.get("counts") if isinstance(w, dict) else None
    if not isinstance(counts, list) or len(counts) != layers or \
            any(not isinstance(r, list) or len(r) != experts for r in counts):
        raise FlightError(f"{what}: counts are not [{layers} layers][{experts} experts]")
    assert isinstance(w, dict)
    start, end = w.get("start"), w.get("end")
    if not is_number(start) or not is_number(end):
        raise FlightError(f"{what} has no start and end times")
    rank_load = w.get("rank_load")
    step_count = _steps(w.get("step_count"), f"{what}: step_count")
    timed = _steps(w.get("timed_steps"), f"{what}: timed_steps") if "timed_steps" in w else step_count
    return RecordedWindow(float(start), float(end), _matrix(counts, layers, experts, f"{what}: counts"),
                          None if rank_load is None else _matrix(rank_load, layers, None, f"{what}: rank_load"),
                          step_count, _steps(w.get("step_seconds"), f"{what}: step_seconds"), timed)


def parse(data: bytes | bytearray) -> FlightRecord:
    """A flight record read back (gzipped or plain JSON), checked: its format, layer ids (whole, strictly
    increasing), expert count, and every window's times and counts (numbers, finite, >= 0, [layers][experts]).
    FlightError names what is wrong. How large a record a client accepts is the client's bound
    (client/records.py)."""
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
    layers, windows, experts = doc.get("layer_ids"), doc.get("windows"), doc.get("experts")
    if not isinstance(layers, list) or not isinstance(windows, list):
        raise FlightError("flight record without layer_ids or windows")
    for x in layers:
        if not is_int(x):
            raise FlightError(f"flight record: layer id {_shown(x)} is not a whole number")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise FlightError("flight record: layer_ids are not strictly increasing")
    if not is_int(experts) or experts < 0:
        raise FlightError(f"flight record: experts {_shown(experts)} is not a number of experts")
    model, trigger, ranks = doc.get("model", ""), doc.get("trigger"), doc.get("ep_ranks", 0)
    if trigger is not None and not is_number(trigger):
        raise FlightError(f"flight record: trigger {_shown(trigger)} is not a time")
    if not is_int(ranks) or ranks < 0 or not isinstance(model, str):
        raise FlightError("flight record: ep_ranks or model of the wrong type")
    phases, bounds = doc.get("phases") or [], doc.get("token_bounds") or []
    if not isinstance(phases, list) or not all(isinstance(p, str) for p in phases) or not isinstance(bounds, list) \
            or not all(b is None or is_number(b) for b in bounds):
        raise FlightError("flight record: phases or token_bounds of the wrong type")
    return FlightRecord(tuple(int(x) for x in layers), int(experts),
                        tuple(_window(i, w, len(layers), int(experts)) for i, w in enumerate(windows)),
                        model, None if trigger is None else float(trigger), int(ranks), tuple(phases),
                        tuple(math.inf if b is None else float(b) for b in bounds))


def summary(record: FlightRecord, top: int = 1) -> list[dict]:
    """Per window: routed assignments, the most imbalanced layer (max expert load / mean), the hottest experts
    (layer, expert, share of its layer's assignments) and the busiest EP rank's load / mean."""
    layers = record.layer_ids
    out = []
    for w in record.windows:
        counts = w.counts
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
        if w.rank_load is not None:
            load = w.rank_load.sum(axis=0)
            rank = float(load.max() / load.mean()) if load.size and load.mean() > 0 else None
        out.append({"start": w.start, "end": w.end, "routed": int(totals.sum()),
                    "worst_layer": None if worst is None else layers[worst],
                    "worst_imbalance": None if worst is None else float(ratio[worst]),
                    "hottest": hottest, "ep_rank_max_over_mean": rank})
    return out


def render_summary(record: FlightRecord, top: int = 1) -> str:
    """The text `moe-monitor traces show` prints: one line per window, times relative to the trigger."""
    rows = summary(record, top)
    if not rows:
        return "flight record: no windows (the sidecar had not closed a window before the trigger)"
    ref = record.trigger or rows[-1]["end"]
    lines = [f"flight record: {len(rows)} windows of {record.model or 'the model'} before the trigger "
             f"({len(record.layer_ids)} MoE layers x {record.experts} experts"
             + (f", {record.ep_ranks} EP ranks" if record.ep_ranks else "") + ")",
             f"{'window end':>10s} {'routed':>10s}  {'worst layer (max/mean)':24s} "
             f"{'hottest expert (layer/expert: share)':38s}" + ("  EP rank max/mean" if record.ep_ranks else "")]
    idle: list[dict] = []  # a run of windows with nothing routed: one line, not one each
    for r in rows + [None]:
        if r is not None and r["routed"] == 0:
            idle.append(r)
            continue
        if len(idle) > 2:
            lines.append(f"{idle[0]['end'] - ref:+9.0f}s {0:10d}  ... to {idle[-1]['end'] - ref:+.0f}s: "
                         f"{len(idle)} windows, nothing routed")
        else:
            lines += [f"{x['end'] - ref:+9.0f}s {0:10d}  {'-':24s} -" for x in idle]
        idle = []
        if r is None:
            break
        worst = f"{r['worst_layer']} ({r['worst_imbalance']:.2f})" if r["worst_layer"] is not None else "-"
        hot = ", ".join(f"{layer}/{expert}: {100 * s:.1f} %" for layer, expert, s in r["hottest"]) or "-"
        rank = f"  {r['ep_rank_max_over_mean']:.2f}" if r["ep_rank_max_over_mean"] is not None else ""
        lines.append(f"{r['end'] - ref:+9.0f}s {r['routed']:10d}  {worst:24s} {hot:38s}{rank}")
    return "\n".join(line.rstrip() for line in lines)
