"""The flight record's format (docs/flight.md): the file a capture stores it under, its format tag, the bound on
its size once inflated, and the checked reading of one (`parse`), shared by the sidecar that writes and serves it
and the clients that read it (`traces show`, `eplb`, `top`). `summary` and `render_summary` turn a parsed record
into the per-window lines `moe-monitor traces show` prints.
"""

from __future__ import annotations

import gzip
import io

import msgspec
import numpy as np

FILE = "flight.json.gz"  # the name a capture stores its flight record under
FORMAT = "moe-monitor-flight/1"
MAX_JSON_BYTES = 256 << 20  # a stored record larger than this is refused when read back (decompressed)


class FlightError(ValueError):
    """A flight record that cannot be used; the message says why."""


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
