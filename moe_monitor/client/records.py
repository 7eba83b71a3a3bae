"""The sidecar's answers checked before a client uses them: a capture's metadata (the id and file names a
`traces pull` makes paths of) and a flight record (the counts `traces show` and `eplb` compute with). Shapes are
bounded so that no answer, however it is built, costs minutes or gigabytes to plan with or to write out."""

from __future__ import annotations

import math
from numbers import Integral, Real

from moe_monitor.client.http import ClientError, gunzip
from moe_monitor.client.untrusted import printable
from moe_monitor.schema.capture_record import REQUIRED as METADATA_KEYS
from moe_monitor.schema.capture_record import CaptureMeta, CaptureMetaError
from moe_monitor.schema.flight_record import MAX_JSON_BYTES, FlightError, FlightRecord, parse

MAX_EXPERTS = 4096  # logical experts per MoE layer (DeepSeek-V3 256, Kimi K2 384, Qwen3-Next 512)
MAX_LAYER_ID = 1023  # a MoE layer's model layer id (placement files have a row per id up to it)
MAX_CELLS = 1 << 19  # MoE layers x experts: the planner's time grows with it (~15 s at this bound)
METADATA = "metadata.json"  # what `traces pull` writes itself: never a name the sidecar may send


def is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def shown(x: object) -> str:
    """A value in an error message: numbers as they are, anything else quoted, printable, short."""
    return str(x) if is_int(x) else printable(repr(x), 60)


def capture_metadata(meta: object, what: str, asked: str | None = None) -> CaptureMeta:
    """A capture's metadata (the sidecar's /api/captures/{id} or an entry of its list) read and checked
    (`CaptureMeta.from_json`: the id's format, plain file names, whole sizes), and what a client adds: the capture
    asked for (`asked`, when given), and no file named metadata.json (what `traces pull` writes itself).
    ClientError naming `what` and what is wrong."""
    if not isinstance(meta, dict) or any(k not in meta for k in METADATA_KEYS):
        raise ClientError(f"{what}: not a moe-monitor sidecar's capture (no {', '.join(METADATA_KEYS)})")
    try:
        record = CaptureMeta.from_json(meta)
    except CaptureMetaError as e:
        raise ClientError(f"{what}: {printable(str(e))}") from None
    if asked is not None and record.id != asked:
        raise ClientError(f"{what}: the answer is capture {record.id}, not the capture asked for")
    if METADATA in record.file_names:
        raise ClientError(f"{what}: {METADATA} is not a plain file name the sidecar stores (it is what traces pull "
                          "writes)")
    return record


def flight_record(data: bytes | bytearray, what: str) -> FlightRecord:
    """A flight record (gzipped or plain, at most flight_record.MAX_JSON_BYTES once inflated) parsed and checked
    (`flight_record.parse`, then `check_flight`). ClientError naming `what` and what is wrong."""
    if data[:2] == b"\x1f\x8b":
        data = gunzip(data, MAX_JSON_BYTES, what)
    try:
        record = parse(data)
    except FlightError as e:
        raise ClientError(f"{what}: {e}") from None
    return check_flight(record, what)


def layer_ids(ids: object, what: str) -> tuple[int, ...]:
    if not isinstance(ids, list | tuple):
        raise ClientError(f"{what}: layer_ids is not a list")
    for i in ids:
        if not is_int(i) or not 0 <= i <= MAX_LAYER_ID:
            raise ClientError(f"{what}: layer id {shown(i)} is not a layer id (0-{MAX_LAYER_ID})")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ClientError(f"{what}: layer_ids are not strictly increasing")
    return tuple(int(i) for i in ids)


def check_flight(record: FlightRecord, what: str) -> FlightRecord:
    """A parsed flight record (`flight_record.parse` checks its types, shapes and numbers) within the bounds a plan
    is made for: layer ids, the expert count, layers x experts and the EP ranks. Returns the record."""
    layer_ids(record.layer_ids, what)
    experts = record.experts
    if not (1 if record.windows else 0) <= experts <= MAX_EXPERTS:
        raise ClientError(f"{what}: experts {experts} is not an expert count (1-{MAX_EXPERTS})")
    if len(record.layer_ids) * experts > MAX_CELLS:
        raise ClientError(f"{what}: {len(record.layer_ids)} layers x {experts} experts is more than the {MAX_CELLS} "
                          "a plan is made for")
    if record.ep_ranks > MAX_EXPERTS:
        raise ClientError(f"{what}: ep_ranks {record.ep_ranks} is more than {MAX_EXPERTS}")
    return record
