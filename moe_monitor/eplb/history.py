"""Where `moe-monitor eplb` gets its load history: per MoE layer × logical expert, the assignments routed over a
time range. Three sources, one result (`History`):

- a flight record (docs/flight.md): a capture's (`--capture ID` through the sidecar, or a pulled
  `flight.json.gz`), or the live sidecar's `/api/flight` (`--sidecar URL`); the windows' counts are summed;
- Prometheus (`--prometheus URL --range 6h`): `increase(moe_expert_routed_tokens_total[range])` summed by layer
  and expert, which needs the sidecars' per-expert series (`--expert-series all`).

Every failure is a `HistoryError` whose message says what to do.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np

from moe_monitor.sidecar.flight import FlightError, parse

RANGE_RE = re.compile(r"^\d+[smhdw]$")
EXPERT_METRIC = "moe_expert_routed_tokens_total"


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

    @property
    def assignments(self) -> int:
        return int(self.load.sum())


def from_flight(doc: dict, source: str) -> History:
    windows = doc["windows"]
    if not windows:
        raise HistoryError(f"{source}: the flight record holds no windows (the sidecar had not closed one yet)")
    load = np.zeros((len(doc["layer_ids"]), doc["experts"]), dtype=np.float64)
    for w in windows:
        load += np.asarray(w["counts"], dtype=np.float64)
    if not load.any():
        raise HistoryError(f"{source}: no tokens were routed in the {len(windows)} windows of the flight record")
    return History(tuple(int(x) for x in doc["layer_ids"]), load, source, windows[0]["start"], windows[-1]["end"],
                   doc.get("model", ""))


def from_flight_bytes(data: bytes, source: str) -> History:
    try:
        return from_flight(parse(data), source)
    except FlightError as e:
        raise HistoryError(f"{source}: {e}") from None


def from_file(path: str) -> History:
    try:
        with open(path, "rb") as f:
            return from_flight_bytes(f.read(), path)
    except OSError as e:
        raise HistoryError(f"cannot read {path}: {e.strerror}") from None


def _get(url: str, what: str, timeout: float = 60.0, token: str | None = None) -> bytes:
    headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        raise HistoryError(f"{what}: {url} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise HistoryError(f"{what}: cannot reach {url}: {getattr(e, 'reason', e)}") from None


def from_sidecar(url: str, minutes: float | None = None, token: str | None = None) -> History:
    """The live sidecar's flight record (all of it, or the last `minutes`)."""
    query = ""
    if minutes is not None:
        import time

        query = f"?since={time.time() - 60 * minutes:.3f}"
    data = _get(url.rstrip("/") + "/api/flight" + query, "the sidecar's flight record", token=token)
    return from_flight_bytes(data, f"{url} (live flight record)")


def from_capture(url: str, capture_id: str, token: str | None = None) -> History:
    quoted = urllib.parse.quote(capture_id, safe="")
    data = _get(f"{url.rstrip('/')}/api/captures/{quoted}/flight", f"capture {capture_id}'s flight record",
                token=token)
    return from_flight_bytes(data, f"capture {capture_id}")


def from_prometheus(url: str, range_: str, selector: str = "", at: float | None = None) -> History:
    """Per layer × expert `increase()` over `range_` (e.g. 6h) ending now (or at `at`), summed over instances
    matching `selector` (PromQL label matchers, e.g. `job="moe-monitor",model="..."`)."""
    if not RANGE_RE.match(range_):
        raise HistoryError(f"range {range_!r} is not a Prometheus duration like 30m, 6h or 7d")
    query = f"sum by (layer, expert) (increase({EXPERT_METRIC}{{{selector}}}[{range_}]))"
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    body = _get(f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode(params)}", "Prometheus query")
    try:
        doc = json.loads(body)
    except ValueError:
        raise HistoryError(f"Prometheus at {url} did not answer JSON") from None
    if doc.get("status") != "success":
        raise HistoryError(f"Prometheus refused the query {query!r}: {doc.get('error', doc)}")
    result = doc["data"]["result"]
    if not result:
        raise HistoryError(f"Prometheus has no {EXPERT_METRIC} series{' for ' + selector if selector else ''} over "
                           f"the last {range_}: run the sidecars with --expert-series all (the per-expert series "
                           "are off by default), or use a capture's flight record (--capture ID)")
    try:
        cells = [(int(r["metric"]["layer"]), int(r["metric"]["expert"]), float(r["value"][1])) for r in result]
    except (KeyError, ValueError, TypeError) as e:
        raise HistoryError(f"unexpected series in Prometheus' answer ({e}): {result[0]}") from None
    layers = sorted({c[0] for c in cells})
    experts = max(c[1] for c in cells) + 1
    load = np.zeros((len(layers), experts), dtype=np.float64)
    row = {layer: i for i, layer in enumerate(layers)}
    for layer, expert, value in cells:
        if np.isfinite(value) and value > 0:
            load[row[layer], expert] += value
    if not load.any():
        raise HistoryError(f"no tokens were routed over the last {range_} ({EXPERT_METRIC} did not increase)")
    return History(tuple(layers), load, f"Prometheus {url}, increase over {range_}")
