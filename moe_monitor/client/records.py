"""The sidecar's answers checked before a client uses them: a capture's metadata (the id and file names a
`traces pull` makes paths of) and a flight record (the counts `traces show` and `eplb` compute with). Shapes are
bounded so that no answer, however it is built, costs minutes or gigabytes to plan with or to write out."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from moe_monitor.client.http import ClientError, gunzip
from moe_monitor.client.untrusted import capture_id, file_name, printable
from moe_monitor.schema.flight_record import MAX_JSON_BYTES, FlightError, parse

MAX_EXPERTS = 4096  # logical experts per MoE layer (DeepSeek-V3 256, Kimi K2 384, Qwen3-Next 512)
MAX_LAYER_ID = 1023  # a MoE layer's model layer id (placement files have a row per id up to it)
MAX_CELLS = 1 << 19  # MoE layers x experts: the planner's time grows with it (~15 s at this bound)
METADATA = "metadata.json"  # what `traces pull` writes itself: never a name the sidecar may send
METADATA_KEYS = ("id", "created", "files", "total_bytes")


def is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def shown(x: object) -> str:
    """A value in an error message: numbers as they are, anything else quoted, printable, short."""
    return str(x) if is_int(x) else printable(repr(x), 60)


def capture_metadata(meta: object, what: str, asked: str | None = None) -> list[tuple[str, int]]:
    """Check a capture's metadata (the sidecar's /api/captures/{id} or an entry of its list); returns its files
    as (name, bytes). The id must be of the sidecar's format (and `asked`, when given), every file name a plain
    name of its format, every size a whole number of bytes."""
    if not isinstance(meta, dict) or any(k not in meta for k in METADATA_KEYS):
        raise ClientError(f"{what}: not a moe-monitor sidecar's capture (no {', '.join(METADATA_KEYS)})")
    if capture_id(meta["id"]) is None:
        raise ClientError(f"{what}: {shown(meta['id'])} is not a capture id")
    if asked is not None and meta["id"] != asked:
        raise ClientError(f"{what}: the answer is capture {meta['id']}, not the capture asked for")
    if not is_number(meta["created"]) or not is_number(meta["total_bytes"]) or not isinstance(meta["files"], list):
        raise ClientError(f"{what}: created, total_bytes or files of the wrong type")
    files = []
    for f in meta["files"]:
        name = f.get("name") if isinstance(f, dict) else None
        if file_name(name) is None or name == METADATA:
            raise ClientError(f"{what}: {shown(name)} is not a plain file name the sidecar stores (letters, "
                              "digits, . _ -; no leading dot; not metadata.json)")
        size = f.get("bytes")
        if not is_int(size) or size < 0:
            raise ClientError(f"{what}: file {name}: size {shown(size)} is not a number of bytes")
        if name in (n for n, _ in files):
            raise ClientError(f"{what}: file {name} is listed twice")
        files.append((name, int(size)))
    return files


def flight_record(data: bytes | bytearray, what: str) -> dict:
    """A flight record (gzipped or plain, at most flight_record.MAX_JSON_BYTES once inflated) parsed and checked
    (`check_flight`). ClientError naming `what` and what is wrong."""
    if data[:2] == b"\x1f\x8b":
        data = gunzip(data, MAX_JSON_BYTES, what)
    try:
        doc = parse(data)
    except FlightError as e:
        raise ClientError(f"{what}: {e}") from None
    return check_flight(doc, what)


def layer_ids(ids: object, what: str) -> tuple[int, ...]:
    if not isinstance(ids, list | tuple):
        raise ClientError(f"{what}: layer_ids is not a list")
    for i in ids:
        if not is_int(i) or not 0 <= i <= MAX_LAYER_ID:
            raise ClientError(f"{what}: layer id {shown(i)} is not a layer id (0-{MAX_LAYER_ID})")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ClientError(f"{what}: layer_ids are not strictly increasing")
    return tuple(int(i) for i in ids)


def _matrix(x: object, rows: int, cols: int | None, what: str) -> np.ndarray:
    """x as float64 [rows, cols] (cols: any when None), finite, >= 0, with a finite sum."""
    try:
        m = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ClientError(f"{what} are not numbers") from None
    if m.ndim != 2 or m.shape[0] != rows or (cols is not None and m.shape[1] != cols):
        raise ClientError(f"{what} are not numbers [{rows} layers][{cols if cols is not None else 'N'}]")
    if not np.isfinite(m).all():
        raise ClientError(f"{what} hold null, NaN or infinity")
    with np.errstate(over="ignore"):
        if not np.isfinite(m.sum()):
            raise ClientError(f"{what} are too large: their sum is not finite")
    if (m < 0).any():
        layer, col = (int(i) for i in np.argwhere(m < 0)[0])
        raise ClientError(f"{what} are negative (row {layer}, column {col})")
    return m


def check_flight(doc: dict, what: str) -> dict:
    """A parsed flight record checked beyond `flight_record.parse` (which checks the format and the counts' lengths):
    layer ids and the expert count bounded, every window's start, end and counts numbers, counts finite and
    >= 0. Returns a copy whose windows hold counts (and rank_load) as float64 arrays."""
    layers = layer_ids(doc["layer_ids"], what)
    experts, windows = doc.get("experts"), doc["windows"]
    if not is_int(experts) or not (1 if windows else 0) <= experts <= MAX_EXPERTS:
        raise ClientError(f"{what}: experts {shown(experts)} is not an expert count (1-{MAX_EXPERTS})")
    if len(layers) * experts > MAX_CELLS:
        raise ClientError(f"{what}: {len(layers)} layers x {experts} experts is more than the {MAX_CELLS} "
                          "a plan is made for")
    if doc.get("trigger") is not None and not is_number(doc["trigger"]):
        raise ClientError(f"{what}: trigger {shown(doc['trigger'])} is not a time")
    ranks = doc.get("ep_ranks", 0)
    if not is_int(ranks) or not 0 <= ranks <= MAX_EXPERTS or not isinstance(doc.get("model", ""), str):
        raise ClientError(f"{what}: ep_ranks or model of the wrong type")
    checked = []
    for i, w in enumerate(windows):
        if not isinstance(w, dict) or not is_number(w.get("start")) or not is_number(w.get("end")):
            raise ClientError(f"{what}: window {i} has no start and end times")
        rank_load = w.get("rank_load")
        checked.append({**w, "counts": _matrix(w["counts"], len(layers), experts, f"{what}: window {i}: counts"),
                        "rank_load": None if rank_load is None else
                        _matrix(rank_load, len(layers), None, f"{what}: window {i}: rank_load")})
    return {**doc, "layer_ids": list(layers), "windows": checked}
