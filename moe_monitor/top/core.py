"""The pure core of `moe-monitor top`: what one sidecar serves (/metrics text, /api/flight and /api/captures
JSON) in, plain dataclasses out. No terminal, no HTTP, no clock: `render.py` draws these, `app.py` fetches
and shows them, and the tests feed them text.

Names come from the sidecar's vocabulary (moe_monitor/schema/vocabulary.py, docs/reference/metrics.md).
Per-layer balance, the detector and the capture breakdown are gauges of the last closed window and are read
as they are. Step percentiles and EP-rank load are computed from the *difference* of two expositions'
cumulative histograms and counters, i.e. over the last interval, as `histogram_quantile(rate(...))` does in
PromQL; until a second, different exposition arrives they are "collecting".
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from moe_monitor.channel.layout import PHASES
from moe_monitor.schema.flight_record import FlightRecord
from moe_monitor.schema.vocabulary import declared

# Every metric top reads, looked up in the vocabulary when top is imported: a name it does not declare (renamed or
# dropped there) fails the import and every test of top, never an SRE's screen.
CAPTURES_TOTAL = declared("moe_captures_total")
CAPTURE_DEVICE_SECONDS = declared("moe_capture_device_seconds")
CAPTURE_END_TIMESTAMP_SECONDS = declared("moe_capture_end_timestamp_seconds")
CAPTURE_EP_WAIT_CAUSED_SHARE = declared("moe_capture_ep_wait_caused_share")
CAPTURE_EP_WAIT_SECONDS = declared("moe_capture_ep_wait_seconds")
CAPTURE_IDLE_SECONDS = declared("moe_capture_idle_seconds")
CAPTURE_INFO = declared("moe_capture_info")
CAPTURE_IN_PROGRESS = declared("moe_capture_in_progress")
CAPTURE_PROFILER_ENABLED = declared("moe_capture_profiler_enabled")
CAPTURE_SHARE = declared("moe_capture_share")
DETECTOR_STATE = declared("moe_detector_state")
EPLB_BALANCEDNESS_SGLANG = declared("moe_eplb_balancedness_sglang")
EPLB_BALANCEDNESS_VLLM = declared("moe_eplb_balancedness_vllm")
EP_RANK_ROUTED_TOKENS_TOTAL = declared("moe_ep_rank_routed_tokens_total")
LAYER_DEAD_EXPERTS = declared("moe_layer_dead_experts")
LAYER_EP_RANK_IMBALANCE_RATIO = declared("moe_layer_ep_rank_imbalance_ratio")
LAYER_HOT_EXPERTS = declared("moe_layer_hot_experts")
LAYER_IMBALANCE_RATIO = declared("moe_layer_imbalance_ratio")
LAYER_LOAD_CV = declared("moe_layer_load_cv")
LAYER_LOAD_ENTROPY = declared("moe_layer_load_entropy")
LAYER_OBSERVABLE = declared("moe_layer_observable")
LAYER_TOP1_SHARE = declared("moe_layer_top1_share")
LAYER_WINDOW_ROUTED_TOKENS = declared("moe_layer_window_routed_tokens")
MEAN_LAYER_IMBALANCE_RATIO = declared("moe_mean_layer_imbalance_ratio")
MODEL_INFO = declared("moe_model_info")
MONITOR_SEGMENTS = declared("moe_monitor_segments")
MONITOR_SERIES_TRUNCATED = declared("moe_monitor_series_truncated")
MONITOR_UNOBSERVABLE_LAYERS = declared("moe_monitor_unobservable_layers")
STEP_DURATION_SECONDS = declared("moe_step_duration_seconds")
STEPS_TOTAL = declared("moe_steps_total")
WINDOW_END_TIMESTAMP_SECONDS = declared("moe_window_end_timestamp_seconds")
WINDOW_LENGTH_SECONDS = declared("moe_window_length_seconds")
WINDOW_ROUTED_TOKENS = declared("moe_window_routed_tokens")
WORST_LAYER_IMBALANCE_RATIO = declared("moe_worst_layer_imbalance_ratio")
QUANTILES = (0.5, 0.9, 0.99)
# Heat levels of an expert's load / its layer's mean: cold (< 0.5), even (<= 1.1), warm (< 1.5), hot (>= 1.5).
# Each has a shade (a cell one character wide) and a mark (before a cell's number): readable without colour.
HEAT_LEVELS = ("cold", "even", "warm", "hot")
SHADES = " ░▒█"
MARKS = "  +*"
HEAT_LABELS = ("<0.5", "0.5-1.1", "1.1-1.5", ">=1.5")
WARM, HOT = 1.1, 1.5


# -- /metrics ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scrape:
    """One exposition: sample name (with its suffix: _bucket, _total, ...) -> [(labels, value)]."""
    at: float  # when it was received (client clock)
    key: str  # digest of the body: the sidecar serves the same bytes until its next window
    samples: dict[str, list[tuple[dict[str, str], float]]]

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.samples.get(name, [])

    def value(self, name: str, **labels: str) -> float | None:
        for got, v in self.series(name):
            if all(got.get(k) == want for k, want in labels.items()):
                return v
        return None

    def has(self, name: str) -> bool:
        return name in self.samples

    @property
    def window_end(self) -> float | None:
        return self.value(WINDOW_END_TIMESTAMP_SECONDS)

    @property
    def window_s(self) -> float | None:
        v = self.value(WINDOW_LENGTH_SECONDS)
        return v if v is not None and v > 0 else None


class MetricsError(ValueError):
    """Text that is not a Prometheus exposition."""


def parse_metrics(text: str, at: float) -> Scrape:
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[s.name].append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError) as e:
        raise MetricsError(f"/metrics is not a Prometheus exposition: {e}") from None
    return Scrape(at, hashlib.sha1(text.encode(errors="replace")).hexdigest(), dict(samples))


class History:
    """The newest exposition and the one before it that differs (the sidecar serves the same exposition until
    its next window, so polling faster than the window sees repeats; they are not new data)."""

    def __init__(self) -> None:
        self.current: Scrape | None = None
        self.previous: Scrape | None = None

    def add(self, scrape: Scrape) -> bool:
        """False when `scrape` is the exposition already held (nothing changes)."""
        if self.current is not None and scrape.key == self.current.key:
            return False
        self.previous, self.current = self.current, scrape
        return True

    def interval_s(self) -> float | None:
        """Seconds between the two expositions: their window ends when both have one (exact), else when they
        were received."""
        a, b = self.previous, self.current
        if a is None or b is None:
            return None
        if a.window_end is not None and b.window_end is not None and b.window_end > a.window_end:
            return b.window_end - a.window_end
        return max(b.at - a.at, 1e-9)


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


# -- model and per-layer balance -------------------------------------------------------------------------

@dataclass(frozen=True)
class Overview:
    model: str | None
    layers: int | None
    experts: int | None
    top_k: int | None
    window_s: float | None
    window_end: float | None
    routed: float | None  # assignments in the last closed window, all layers
    worst_layer: int | None
    worst_ratio: float | None
    mean_ratio: float | None
    detector_state: str | None
    segments: dict[str, int]  # fresh / stale / unreadable
    unobservable: int
    truncated: bool  # the series budget dropped T1/T2 families (EP-rank load may be missing)


def overview(s: Scrape) -> Overview:
    info = s.series(MODEL_INFO)
    labels = info[0][0] if info else {}
    worst = s.series(WORST_LAYER_IMBALANCE_RATIO)
    state = next((lab.get("state") for lab, v in s.series(DETECTOR_STATE) if v == 1), None)

    def as_int(x: str | None) -> int | None:
        return int(x) if x is not None and x.isdigit() else None

    return Overview(
        model=labels.get("model"), layers=as_int(labels.get("moe_layers")), experts=as_int(labels.get("experts")),
        top_k=as_int(labels.get("top_k")), window_s=s.window_s, window_end=s.window_end,
        routed=s.value(WINDOW_ROUTED_TOKENS),
        worst_layer=int(worst[0][0]["layer"]) if worst else None, worst_ratio=_num(worst[0][1]) if worst else None,
        mean_ratio=_num(s.value(MEAN_LAYER_IMBALANCE_RATIO)), detector_state=state,
        segments={lab["state"]: int(v) for lab, v in s.series(MONITOR_SEGMENTS) if "state" in lab},
        unobservable=int(s.value(MONITOR_UNOBSERVABLE_LAYERS) or 0),
        truncated=(s.value(MONITOR_SERIES_TRUNCATED) or 0) > 0)


@dataclass(frozen=True)
class LayerRow:
    layer: int
    observable: bool
    routed: float | None
    imbalance: float | None  # max / mean expert load (None: too few assignments in the window)
    cv: float | None
    entropy: float | None
    top1_share: float | None
    hot: float | None
    dead: float | None
    ep_imbalance: float | None  # max / mean EP-rank load


LAYER_FIELDS = {  # LayerRow field -> gauge
    "routed": LAYER_WINDOW_ROUTED_TOKENS, "imbalance": LAYER_IMBALANCE_RATIO, "cv": LAYER_LOAD_CV,
    "entropy": LAYER_LOAD_ENTROPY, "top1_share": LAYER_TOP1_SHARE, "hot": LAYER_HOT_EXPERTS,
    "dead": LAYER_DEAD_EXPERTS, "ep_imbalance": LAYER_EP_RANK_IMBALANCE_RATIO}


def layer_rows(s: Scrape) -> list[LayerRow]:
    """One row per MoE layer, by layer id (`sort_rows` orders them otherwise)."""
    values: dict[int, dict[str, float | None]] = defaultdict(dict)
    for fld, name in LAYER_FIELDS.items():
        for lab, v in s.series(name):
            if lab.get("layer", "").lstrip("-").isdigit():
                values[int(lab["layer"])][fld] = _num(v)
    observable = {int(lab["layer"]): v > 0 for lab, v in s.series(LAYER_OBSERVABLE) if "layer" in lab}
    for layer in observable:
        values.setdefault(layer, {})
    rows = [LayerRow(layer, observable.get(layer, True), **{f: vals.get(f) for f in LAYER_FIELDS})
            for layer, vals in values.items()]
    return sorted(rows, key=lambda r: r.layer)


# -- step time -------------------------------------------------------------------------------------------

def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> tuple[float | None, bool]:
    """PromQL's histogram_quantile over cumulative (upper bound, count) pairs sorted by bound, the last +Inf.
    Returns (value, above): `above` when the quantile lies in the +Inf bucket, where the value is the highest
    finite bound (a lower bound of the truth). (None, False) without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None, False
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower, True
            if count == below:
                return bound, False
            return lower + (bound - lower) * (rank - below) / (count - below), False
        lower, below = bound, count
    return lower, True


@dataclass(frozen=True)
class StepRow:
    phase: str
    tokens_le: str | None  # None: all tokens-per-step buckets of the phase
    steps: float  # every step (moe_steps_total; a sidecar without it: the histogram's)
    per_second: float
    mean_s: float | None  # mean and quantiles: over the timed steps (the histogram: a sample on CUDA)
    quantiles: tuple[tuple[float | None, bool], ...]  # for QUANTILES: (seconds, above the highest bound)


@dataclass(frozen=True)
class StepsView:
    interval_s: float | None
    rows: list[StepRow]
    note: str | None = None  # "collecting ...", "idle", a reset


def _le(label: str) -> float:
    return math.inf if label in ("+Inf", "Inf") else float(label)


def tokens_key(label: str) -> float:
    try:
        return _le(label)
    except ValueError:
        return math.inf


def steps_view(history: History) -> StepsView:
    cur, prev = history.current, history.previous
    if cur is None or prev is None:
        return StepsView(None, [], "collecting: step percentiles need two expositions (one more window)")
    name = STEP_DURATION_SECONDS

    def table(s: Scrape, suffix: str, with_le: bool) -> dict[tuple, float]:
        out = {}
        for lab, v in s.series(name + suffix):
            key = (lab.get("phase", ""), lab.get("tokens_le", "")) + ((_le(lab["le"]),) if with_le else ())
            out[key] = v
        return out

    buckets_now, buckets_then = table(cur, "_bucket", True), table(prev, "_bucket", True)
    delta = {k: v - buckets_then.get(k, 0.0) for k, v in buckets_now.items()}
    sums_then, counts_then = table(prev, "_sum", False), table(prev, "_count", False)
    sums = {k: v - sums_then.get(k, 0.0) for k, v in table(cur, "_sum", False).items()}
    counts = {k: v - counts_then.get(k, 0.0) for k, v in table(cur, "_count", False).items()}
    every_now, every_then = _step_totals(cur), _step_totals(prev)
    if not every_now and not every_then:  # a sidecar before moe_steps_total: its plugin timed every step
        every_now, every_then = table(cur, "_count", False), counts_then
    every = {k: v - every_then.get(k, 0.0) for k, v in every_now.items()}
    interval = history.interval_s()
    if any(v < 0 for v in (*delta.values(), *counts.values(), *every.values())) or \
            any(k not in buckets_now for k in buckets_then) or any(k not in every_now for k in every_then):
        return StepsView(interval, [], "collecting: the step counters were reset (a sidecar restart or another "
                                       "model); percentiles resume with the next window")
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for (phase, tokens, le), v in delta.items():
        groups[(phase, tokens)].append((le, v))
    for k in every:
        groups.setdefault(k, [])  # steps, none of them timed
    rows = []
    order = {p: i for i, p in enumerate(PHASES)}
    for phase in sorted({p for p, _ in groups}, key=lambda p: (order.get(p, len(order)), p)):
        keys = sorted((k for k in groups if k[0] == phase), key=lambda k: tokens_key(k[1]))
        merged: dict[float, float] = defaultdict(float)
        for k in keys:
            for le, v in groups[k]:
                merged[le] += v
        phase_rows = [_step_row(phase, None, sorted(merged.items()), sum(sums.get(k, 0.0) for k in keys),
                                sum(counts.get(k, 0.0) for k in keys), sum(every.get(k, 0.0) for k in keys),
                                interval)]
        if len(keys) > 1:
            phase_rows += [_step_row(phase, k[1], sorted(groups[k]), sums.get(k, 0.0), counts.get(k, 0.0),
                                     every.get(k, 0.0), interval) for k in keys]
        rows += [r for r in phase_rows if r.steps > 0]
    note = None if rows else "no engine steps in the last interval (idle)"
    return StepsView(interval, rows, note)


def _step_totals(s: Scrape) -> dict[tuple, float]:
    return {(lab.get("phase", ""), lab.get("tokens_le", "")): v for lab, v in s.series(STEPS_TOTAL)}


def _step_row(phase, tokens, buckets, total_s, timed, steps, interval) -> StepRow:
    """steps: every step of the row; the mean and quantiles are the `timed` ones' (the histogram)."""
    return StepRow(phase, tokens, steps, steps / interval if interval else 0.0,
                   total_s / timed if timed > 0 else None, tuple(histogram_quantile(q, buckets) for q in QUANTILES))


# -- EP ranks --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankLoad:
    rank: int
    load: float  # assignments served in the interval, all layers
    share: float
    ratio: float | None  # load / mean rank load


@dataclass(frozen=True)
class RanksView:
    ranks: list[RankLoad]
    source: str | None  # where the loads come from, for the view's head line
    layers: list[tuple[int, float | None]]  # (layer, max / mean EP-rank load in the last window)
    balancedness_vllm: float | None
    balancedness_sglang: float | None
    note: str | None = None


def _rank_loads(per_rank: dict[int, float]) -> list[RankLoad]:
    total = sum(per_rank.values())
    mean = total / len(per_rank) if per_rank else 0.0
    return [RankLoad(r, v, v / total if total > 0 else 0.0, v / mean if mean > 0 else None)
            for r, v in sorted(per_rank.items())]


def ranks_view(history: History, flight: FlightRecord | None = None) -> RanksView:
    """EP-rank load over the last interval: the increase of moe_ep_rank_routed_tokens_total between the two
    newest expositions; before there are two, the flight recorder's newest window."""
    cur, prev = history.current, history.previous
    name = EP_RANK_ROUTED_TOKENS_TOTAL
    layers = sorted(((int(lab["layer"]), _num(v)) for lab, v in cur.series(LAYER_EP_RANK_IMBALANCE_RATIO)),
                    key=lambda x: x[0]) if cur else []
    vllm = _num(cur.value(EPLB_BALANCEDNESS_VLLM)) if cur else None
    sglang = _num(cur.value(EPLB_BALANCEDNESS_SGLANG)) if cur else None
    ranks, source, note = [], None, None
    if cur is not None and cur.has(name) and prev is not None and prev.has(name):
        then = {(lab.get("layer"), lab.get("ep_rank")): v for lab, v in prev.series(name)}
        per_rank: dict[int, float] = defaultdict(float)
        reset = False
        for lab, v in cur.series(name):
            d = v - then.get((lab.get("layer"), lab.get("ep_rank")), 0.0)
            reset |= d < 0
            per_rank[int(lab["ep_rank"])] += d
        if reset:
            note = "the EP-rank counters were reset (a sidecar restart or another model); collecting"
        else:
            ranks, source = _rank_loads(per_rank), "last interval"
    if not ranks and flight and flight.windows and flight.windows[-1].rank_load is not None:
        load = flight.windows[-1].rank_load
        if load.shape[1]:
            ranks, source = _rank_loads(dict(enumerate(load.sum(axis=0).tolist()))), "flight recorder, newest window"
    if not ranks and note is None:
        if cur is not None and not cur.has(name) and not layers:
            note = "no EP-rank figures: the expert placement does not fit the model (see the sidecar's log)"
        elif cur is not None and not cur.has(name) and (cur.value(MONITOR_SERIES_TRUNCATED) or 0) > 0:
            note = "no EP-rank load: the series budget (--max-series) dropped it; per-layer figures below"
        elif cur is not None and not cur.has(name):
            note = "no EP-rank load: the sidecar runs with --no-rank-series; per-layer figures below"
        else:
            note = "collecting: EP-rank load needs two expositions (one more window)"
    return RanksView(ranks, source, layers, vllm, sglang, note)


# -- detector and captures -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Signal:
    signal: str
    phase: str
    tokens_le: str
    baseline: float | None
    current: float | None


@dataclass(frozen=True)
class DetectorView:
    state: str | None
    signals: list[Signal]


def detector_view(s: Scrape) -> DetectorView:
    state = next((lab.get("state") for lab, v in s.series(DETECTOR_STATE) if v == 1), None)
    table: dict[tuple[str, str, str], dict[str, float | None]] = defaultdict(dict)
    for which in ("baseline", "current"):
        for lab, v in s.series(f"moe_detector_{which}"):
            table[(lab.get("signal", ""), lab.get("phase", ""), lab.get("tokens_le", ""))][which] = _num(v)
    phase_order = {p: i for i, p in enumerate(PHASES)}
    keys = sorted(table, key=lambda k: (k[0] != "worst_layer_imbalance_ratio", k[0], phase_order.get(k[1], -1),
                                        tokens_key(k[2]) if k[2] else -1))
    return DetectorView(state, [Signal(*k, table[k].get("baseline"), table[k].get("current")) for k in keys])


@dataclass(frozen=True)
class CaptureView:
    newest: dict | None  # /api/captures' first entry (id, created, reason, outcome, duration_s, evidence, ...)
    captures_note: str | None  # why there is no list (captures not configured, an error)
    outcomes: dict[str, float]  # moe_captures_total summed over reasons
    in_progress: bool
    profiler_enabled: bool | None
    analysed: str | None  # moe_capture_info{capture}: the newest analysed capture
    analysed_ranks: str | None
    analysed_end: float | None
    shares: list[tuple[str, float, float | None]]  # (category, share, device seconds), largest first
    idle_s: float | None
    ep_wait: list[tuple[str, float, float]] = ()  # (rank, EP wait seconds, share of the waiting it caused)


def capture_view(s: Scrape | None, captures: list | None, captures_note: str | None = None) -> CaptureView:
    newest = captures[0] if captures else None
    if captures is not None and not captures and captures_note is None:
        captures_note = "no captures yet"
    outcomes: dict[str, float] = defaultdict(float)
    shares: list[tuple[str, float, float | None]] = []
    ep_wait: list[tuple[str, float, float]] = []
    info: dict[str, str] = {}
    if s is not None:
        for lab, v in s.series(CAPTURES_TOTAL):
            outcomes[lab.get("outcome", "?")] += v
        seconds = {lab.get("category"): v for lab, v in s.series(CAPTURE_DEVICE_SECONDS)}
        shares = sorted(((lab.get("category", "?"), v, seconds.get(lab.get("category")))
                         for lab, v in s.series(CAPTURE_SHARE)), key=lambda x: -x[1])
        info = s.series(CAPTURE_INFO)[0][0] if s.series(CAPTURE_INFO) else {}
        caused = {lab.get("rank"): v for lab, v in s.series(CAPTURE_EP_WAIT_CAUSED_SHARE)}
        ep_wait = sorted(((lab.get("rank", "?"), v, caused.get(lab.get("rank"), 0.0))
                          for lab, v in s.series(CAPTURE_EP_WAIT_SECONDS)), key=lambda x: -x[2])
    enabled = s.value(CAPTURE_PROFILER_ENABLED) if s else None
    return CaptureView(newest, captures_note, dict(outcomes), bool(s and (s.value(CAPTURE_IN_PROGRESS) or 0)),
                       None if enabled is None else enabled > 0, info.get("capture"), info.get("ranks"),
                       s.value(CAPTURE_END_TIMESTAMP_SECONDS) if s else None, shares,
                       s.value(CAPTURE_IDLE_SECONDS) if s else None, ep_wait)


# -- heat map (/api/flight) ------------------------------------------------------------------------------

def heat_level(ratio: float) -> int:
    """0..3, the index in HEAT_LEVELS of a load / layer-mean ratio (1.1 is still even, 1.5 already hot)."""
    return 0 if ratio < 0.5 else 1 if ratio <= WARM else 2 if ratio < HOT else 3


@dataclass(frozen=True)
class HeatRow:
    layer: int
    routed: int
    ratios: tuple[float, ...]  # load / layer mean per column (empty when the layer routed nothing)
    max_ratio: float | None
    hot_expert: int | None  # the most loaded expert

    @property
    def cells(self) -> tuple[int, ...]:
        """The heat level of each column."""
        return tuple(heat_level(x) for x in self.ratios)


@dataclass(frozen=True)
class HeatMap:
    rows: list[HeatRow]
    experts: int
    fold: int  # experts per column (1: one column per expert); a folded column shows the max of its experts
    columns: int
    windows: int  # windows summed
    start: float | None
    end: float | None
    model: str = ""
    note: str | None = None


def heat_map(record: FlightRecord, columns: int, windows: int = 1) -> HeatMap:
    """Rows = layers (by id), columns = experts (folded `fold` to a column, the max of them, when there are more
    experts than `columns`), cell = load / layer mean over the newest `windows` windows summed."""
    experts = record.experts
    kept = record.windows[-max(1, windows):]
    layer_ids = record.layer_ids
    fold = max(1, math.ceil(experts / max(1, columns)))
    ncols = math.ceil(experts / fold) if experts else 0
    if not kept or not experts or not layer_ids:
        return HeatMap([], experts, fold, ncols, 0, None, None, record.model,
                       "no closed window in the flight record yet")
    counts = np.zeros((len(layer_ids), experts), dtype=np.float64)
    for w in kept:
        counts += w.counts
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = counts / (totals[:, None] / experts)
    padded = np.full((len(layer_ids), ncols * fold), -np.inf)
    padded[:, :experts] = ratio
    folded = padded.reshape(len(layer_ids), ncols, fold).max(axis=2)
    rows = []
    for i, layer in enumerate(layer_ids):
        if totals[i] <= 0:
            rows.append(HeatRow(int(layer), 0, (), None, None))
            continue
        hot = int(np.argmax(counts[i]))
        rows.append(HeatRow(int(layer), int(totals[i]), tuple(folded[i].tolist()), float(ratio[i, hot]), hot))
    return HeatMap(rows, experts, fold, ncols, len(kept), kept[0].start, kept[-1].end, record.model)


# -- one sidecar -----------------------------------------------------------------------------------------

@dataclass
class Fetched:
    """What one poll of a sidecar brought (app.py fetches; `SidecarState.apply` takes it in)."""
    at: float
    metrics: str | None = None
    error: str | None = None  # the sidecar could not be reached, or /metrics failed: nothing else was asked
    unreachable: bool = False  # the error is a connection that failed or timed out (not an HTTP answer)
    flight: FlightRecord | None = None
    flight_error: str | None = None
    captures: list | None = None
    captures_error: str | None = None
    asked_flight: bool = False
    asked_captures: bool = False
    scrape: Scrape | None = None  # `metrics` already parsed (client.fetch parses off the event loop)


@dataclass
class SidecarState:
    url: str
    history: History = field(default_factory=History)
    flight: FlightRecord | None = None
    flight_error: str | None = None
    captures: list | None = None
    captures_error: str | None = None
    error: str | None = None  # set while the sidecar cannot be reached (the last figures stay shown)
    unreachable: bool = False
    last_ok: float | None = None
    last_try: float | None = None
    changed_at: float | None = None  # when the newest exposition arrived (the same one again changes nothing)
    idle_since: float | None = None  # start of the first of the consecutive windows that routed nothing
    heat_cache: tuple | None = None  # (key, Page) of the flight record held (views.heat_page)

    def apply(self, f: Fetched) -> None:
        self.last_try = f.at
        if f.error is not None:
            self.error, self.unreachable = f.error, f.unreachable
            return
        scrape = f.scrape
        if scrape is None and f.metrics is not None:
            try:
                scrape = parse_metrics(f.metrics, f.at)
            except MetricsError as e:
                self.error, self.unreachable = str(e), False
                return
        if scrape is not None and self.history.add(scrape):
            self.changed_at = f.at
            self._track_idle(scrape)
        self.error, self.unreachable, self.last_ok = None, False, f.at
        if f.asked_flight:
            self.flight, self.flight_error = f.flight, f.flight_error
        if f.asked_captures:
            self.captures, self.captures_error = f.captures, f.captures_error

    @property
    def window_s(self) -> float | None:
        return self.history.current.window_s if self.history.current else None

    def interval_s(self, forced: float | None, fallback: float = 2.0) -> float:
        """--interval when given, else the sidecar's window, else `fallback`."""
        return forced or self.window_s or fallback

    def _track_idle(self, s: Scrape) -> None:
        routed = s.value(WINDOW_ROUTED_TOKENS)
        if routed is None or routed > 0:
            self.idle_since = None
        elif self.idle_since is None:
            end = s.window_end if s.window_end is not None else s.at
            self.idle_since = end - (s.window_s or 0.0)


# -- how a sidecar is doing ------------------------------------------------------------------------------

STALE_WINDOWS = 3  # the same exposition (or no answer) for this many windows or polls, 10 s at least, is stale
HEALTHS = ("connecting", "ok", "idle", "no data", "stale", "unreachable", "error")


@dataclass(frozen=True)
class Health:
    state: str  # one of HEALTHS
    message: str | None = None  # what the view says about it (None: healthy)


def health(st: SidecarState, now: float, every: float) -> Health:
    """Whether the figures shown are live: the last poll failed (unreachable / error), the sidecar answers but
    serves the same window for long (stale: its window loop is stuck, /readyz says why), it has no window of
    routing data yet (no data), or its newest windows routed no token (idle)."""
    if st.error is not None:
        return Health("unreachable" if st.unreachable else "error", st.error)
    if st.last_ok is None:
        return Health("connecting")
    cur = st.history.current
    window = st.window_s or every
    limit = max(STALE_WINDOWS * window, STALE_WINDOWS * every, 10.0)
    if now - st.last_ok > limit:
        return Health("stale", f"STALE: no answer for {now - st.last_ok:.0f} s (polled every {every:g} s)")
    if st.changed_at is not None and now - st.changed_at > limit:
        return Health("stale", f"STALE: the sidecar has served the same window for {now - st.changed_at:.0f} s "
                               f"(its windows are {window:g} s): its window loop is stuck or stopped (its /readyz "
                               "and log say why)")
    if cur is None or cur.window_end is None:
        return Health("no data", "no data yet: the sidecar has closed no window of routing (no segment from "
                                 "vLLM yet: is it running with the moe-monitor plugin?)")
    if st.idle_since is not None:
        idle_s = max(cur.window_end - st.idle_since, cur.window_s or 0.0)
        segments = {lab.get("state"): v for lab, v in cur.series(MONITOR_SEGMENTS)}
        why = "" if segments.get("fresh", 1) else "; no fresh segment: is vLLM still running?"
        return Health("idle", f"idle: no tokens routed in the last {idle_s:.0f} s{why}" if idle_s >= 1 else
                      f"idle: no tokens routed in the last {idle_s:g} s{why}")
    return Health("ok")
