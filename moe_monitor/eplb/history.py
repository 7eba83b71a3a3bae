"""Where `moe-monitor eplb` gets its load history: per MoE layer × logical expert, the assignments routed over a
time range. Three sources, one result (`History`):

- a flight record (docs/flight.md): a capture's (`--capture ID` through the sidecar, or a pulled
  `flight.json.gz`), or the live sidecar's `/api/flight` (`--sidecar URL`); the windows' counts are summed;
- Prometheus (`--prometheus URL --range 6h`): `increase(moe_expert_routed_tokens_total[range])` summed by layer
  and expert, which needs the sidecars' per-expert series (`--expert-series all`).

Every failure is a `HistoryError` whose message says what to do.
"""

from __future__ import annotations

import math
import re
import time
import urllib.parse
from dataclasses import dataclass

import numpy as np

from moe_monitor.client import DEFAULT_TIMEOUT_S, Client, ClientError
from moe_monitor.client.records import MAX_CELLS, MAX_EXPERTS, MAX_LAYER_ID, check_flight, flight_record
from moe_monitor.eplb.balance import FOLDS
from moe_monitor.schema.flight_record import MAX_JSON_BYTES, FlightRecord

RANGE_RE = re.compile(r"^\d+[smhdw]$")
EXPERT_METRIC = "moe_expert_routed_tokens_total"
INFO_METRIC = "moe_model_info"
PROMETHEUS_MAX_BYTES = 64 << 20  # a query answer: MAX_CELLS series are ~60 MB of JSON
ID_RE = re.compile(r"^-?[0-9]{1,12}$")


class HistoryError(ValueError):
    """No usable history; the message says why and what to do."""


@dataclass(frozen=True)
class History:
    layer_ids: tuple[int, ...]
    load: np.ndarray  # float64 [L, E]: assignments routed over the range
    source: str  # where it came from, for the report
    start: float | None = None  # unix seconds, when known
    end: float | None = None
    model: str = ""
    parts: tuple[np.ndarray, ...] = ()  # the range cut in up to FOLDS consecutive sub-ranges (advice's check)

    @property
    def assignments(self) -> int:
        return int(self.load.sum())


def from_flight(record: FlightRecord, source: str) -> History:
    """The summed windows of a parsed flight record (checked here: `records.check_flight`)."""
    try:
        record = check_flight(record, source)
    except ClientError as e:
        raise HistoryError(str(e)) from None
    windows = record.windows
    if not windows:
        raise HistoryError(f"{source}: the flight record holds no windows (the sidecar had not closed one yet)")
    shape = (len(record.layer_ids), record.experts)
    groups = np.array_split(np.arange(len(windows)), min(FOLDS, len(windows)))
    parts = tuple(np.zeros(shape, dtype=np.float64) for _ in groups)
    with np.errstate(over="ignore"):
        for part, group in zip(parts, groups):
            for i in group:
                part += windows[i].counts
        load = sum(parts, np.zeros(shape, dtype=np.float64))
        finite = np.isfinite(load.sum())
    if not finite:
        raise HistoryError(f"{source}: the flight record's counts are not finite once summed")
    if not load.any():
        raise HistoryError(f"{source}: no tokens were routed in the {len(windows)} windows of the flight record")
    return History(record.layer_ids, load, source, windows[0].start, windows[-1].end, record.model,
                   parts if len(parts) > 1 else ())


def from_flight_bytes(data: bytes, source: str) -> History:
    try:
        return from_flight(flight_record(data, source), source)
    except ClientError as e:
        raise HistoryError(str(e)) from None


def from_file(path: str) -> History:
    """A flight record file (a pulled capture's flight.json.gz); read at most flight_record.MAX_JSON_BYTES of it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise HistoryError(f"cannot read {path}: {e.strerror}") from None
    return from_flight_bytes(data, path)


def _fetch(call, *args, **kw):
    try:
        return call(*args, **kw)
    except ClientError as e:
        raise HistoryError(str(e)) from None


def from_sidecar(url: str, minutes: float | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> History:
    """The live sidecar's flight record (all of it, or the last `minutes`)."""
    query = "" if minutes is None else f"?since={time.time() - 60 * minutes:.3f}"
    data = _fetch(Client(url, token, timeout).get_bytes, "/api/flight" + query, "the sidecar's flight record",
                  MAX_JSON_BYTES)
    return from_flight_bytes(data, f"{url} (live flight record)")


def from_capture(url: str, capture_id: str, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> History:
    quoted = urllib.parse.quote(capture_id, safe="")
    data = _fetch(Client(url, token, timeout).get_bytes, f"/api/captures/{quoted}/flight",
                  f"capture {capture_id}'s flight record", MAX_JSON_BYTES)
    return from_flight_bytes(data, f"capture {capture_id}")


def _query(prom: Client, query: str, at: float | None) -> list:
    """An instant query's result vector (checked to be one: a list of {metric: {...}, value: [t, "v"]})."""
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    doc = _fetch(prom.get_json, f"/api/v1/query?{urllib.parse.urlencode(params)}", "Prometheus query",
                 limit=PROMETHEUS_MAX_BYTES)
    if not isinstance(doc, dict):
        raise HistoryError(f"Prometheus at {prom.base_url} did not answer a query result")
    if doc.get("status") != "success":
        raise HistoryError(f"Prometheus refused the query {query!r}: {doc.get('error', doc)}")
    result = doc.get("data", {}).get("result") if isinstance(doc.get("data"), dict) else None
    if not isinstance(result, list) or not all(
            isinstance(r, dict) and isinstance(r.get("metric"), dict) and isinstance(r.get("value"), list)
            and len(r["value"]) == 2 for r in result):
        raise HistoryError(f"Prometheus at {prom.base_url} answered without a vector of series: "
                           f"{str(doc)[:200]}")
    return result


def _label_id(series: dict, label: str, limit: int, why: str) -> int:
    """The `label` of a series as an id in 0..limit-1; HistoryError naming the series otherwise."""
    text = series["metric"].get(label)
    if isinstance(text, str) and ID_RE.match(text) and 0 <= int(text) < limit:
        return int(text)
    shown = text if isinstance(text, str) and ID_RE.match(text) else repr(text)
    where = ", ".join(f"{k}={v!r}" for k, v in series["metric"].items() if k in ("layer", "expert", "model"))
    raise HistoryError(f"Prometheus series {{{where}}}: {label} id {shown} is not in 0-{limit - 1} ({why})")


def _declared_experts(prom: Client, selector: str, range_: str, at: float | None) -> int | None:
    """The expert count the sidecars declare (moe_model_info) over the range, None when none does."""
    declared = _query(prom, f"count by (experts) (last_over_time({INFO_METRIC}{{{selector}}}[{range_}]))", at)
    counts = {r["metric"]["experts"] for r in declared if "experts" in r["metric"]}
    if len(counts) > 1:
        raise HistoryError(f"the series{' for ' + selector if selector else ''} are of models with different "
                           f"expert counts ({', '.join(sorted(map(str, counts)))}): narrow them with --selector")
    if not counts:
        return None
    text = counts.pop()
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_EXPERTS:
        raise HistoryError(f"{INFO_METRIC} declares experts={text!r}: not an expert count (1-{MAX_EXPERTS})")
    return int(text)


def from_prometheus(url: str, range_: str, selector: str = "", at: float | None = None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> History:
    """Per layer × expert `increase()` over `range_` (e.g. 6h) ending now (or at `at`), summed over instances
    matching `selector` (PromQL label matchers, e.g. `job="moe-monitor",model="..."`), and the same over FOLDS
    consecutive sub-ranges (the advice's check). Expert ids are checked against the expert count the sidecars
    declare (moe_model_info), layer ids against MAX_LAYER_ID."""
    if not RANGE_RE.match(range_):
        raise HistoryError(f"range {range_!r} is not a Prometheus duration like 30m, 6h or 7d")
    prom = Client(url, timeout=timeout, name="Prometheus", sidecar=False)
    result = _query(prom, _increase(selector, range_), at)
    if not result:
        raise HistoryError(f"Prometheus has no {EXPERT_METRIC} series{' for ' + selector if selector else ''} over "
                           f"the last {range_}: run the sidecars with --expert-series all (the per-expert series "
                           "are off by default), or use a capture's flight record (--capture ID)")
    experts = _declared_experts(prom, selector, range_, at)
    cells = _cells(result, experts)
    layers = sorted({c[0] for c in cells})
    width = experts or max(c[1] for c in cells) + 1
    if len(layers) * width > MAX_CELLS:
        raise HistoryError(f"{len(layers)} layers x {width} experts is more than the {MAX_CELLS} cells a plan is "
                           "made for")
    load = _load(cells, layers, width)
    with np.errstate(over="ignore"):
        finite = np.isfinite(load.sum())
    if not finite:
        raise HistoryError(f"the increases over the last {range_} are not finite once summed")
    if not load.any():
        raise HistoryError(f"no tokens were routed over the last {range_} ({EXPERT_METRIC} did not increase)")
    seconds = _seconds(range_) / FOLDS
    end = time.time() if at is None else at
    parts = []
    if seconds >= 1:
        for k in range(FOLDS - 1, -1, -1):  # oldest first
            sub = _cells(_query(prom, _increase(selector, f"{int(seconds)}s"), end - k * seconds), experts,
                         known=set(layers), width=width)
            parts.append(_load(sub, layers, width))
    return History(tuple(layers), load, f"Prometheus {url}, increase over {range_}",
                   parts=tuple(parts) if all(np.isfinite(p.sum()) for p in parts) else ())


def _increase(selector: str, range_: str) -> str:
    return f"sum by (layer, expert) (increase({EXPERT_METRIC}{{{selector}}}[{range_}]))"


def _seconds(range_: str) -> float:
    return int(range_[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[range_[-1]]


def _cells(result: list, experts: int | None, known: set[int] | None = None,
           width: int | None = None) -> list[tuple[int, int, float]]:
    """(layer, expert, increase) of each series, checked; with `known`, series of other layers (or experts past
    `width`) are dropped: a sub-range's answer is read into the whole range's layout."""
    if len(result) > MAX_CELLS:
        raise HistoryError(f"Prometheus answered {len(result)} series: more than the {MAX_CELLS} layer x expert "
                           "cells a plan is made for")
    why = f"the model's {experts} experts ({INFO_METRIC})" if experts else f"at most {MAX_EXPERTS} experts"
    cells = []
    for r in result:
        layer = _label_id(r, "layer", MAX_LAYER_ID + 1, "a model layer id")
        expert = _label_id(r, "expert", experts or MAX_EXPERTS, why)
        try:
            value = float(r["value"][1])
        except (TypeError, ValueError):
            raise HistoryError(f"Prometheus series layer={layer}, expert={expert}: value {r['value'][1]!r} is "
                               "not a number") from None
        if value < 0 or math.isinf(value):
            raise HistoryError(f"Prometheus series layer={layer}, expert={expert}: increase {value} is negative "
                               "or infinite")
        if known is None or (layer in known and expert < (width or 0)):
            cells.append((layer, expert, value))
    return cells


def _load(cells: list[tuple[int, int, float]], layers: list[int], width: int) -> np.ndarray:
    load = np.zeros((len(layers), width), dtype=np.float64)
    row = {layer: i for i, layer in enumerate(layers)}
    for layer, expert, value in cells:
        if value > 0:  # NaN (no samples) adds nothing
            load[row[layer], expert] += value
    return load
