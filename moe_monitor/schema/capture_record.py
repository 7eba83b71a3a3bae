"""A capture's metadata (the capture store's metadata.json, the sidecar's /api/captures answers): the id and file
name formats, and the checked reading of one (`CaptureMeta.from_json`), shared by the catalog that writes and
reads it, the sidecar that serves it, and the clients that read it back (`traces list/show/pull/trigger`).

`to_json` gives back the JSON the record was read from, every key in its place (the capture's context, the
window's statistics, keys a later version adds): a record read and written again is the same metadata.json.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from .json_values import is_int, is_number

ID_RE = re.compile(r"^\d{8}T\d{6}Z-[a-z_]{1,32}-[0-9a-f]{6}$")  # <UTC time>-<reason>-<6 hex digits>
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")  # a plain file name: no separator, no leading dot
REQUIRED = ("id", "created", "files", "total_bytes")


class CaptureMetaError(ValueError):
    """Capture metadata that cannot be used; the message names the field and why."""


@dataclass(frozen=True)
class CaptureFile:
    """One file a capture stored: its plain name and its size in bytes."""
    name: str
    bytes: int


@dataclass(frozen=True)
class CaptureMeta:
    """A capture's metadata as `from_json` reads it. `files` is empty for a record (a capture that stored no
    trace, kept for its outcome). The optional fields read as their defaults where metadata.json leaves them out
    (metadata written by earlier versions, a running capture)."""
    id: str
    created: float
    total_bytes: int
    files: tuple[CaptureFile, ...]
    reason: str = ""
    outcome: str = ""
    error: str | None = None  # why a capture ended without traces
    evidence: Mapping[str, Any] = field(default_factory=dict)  # what triggered it (free-form, JSON)
    duration_s: float | None = None
    breakdown: Mapping[str, float] | None = None  # kernel category -> share of GPU time
    alert_keys: tuple[tuple[str, str], ...] = ()  # (fingerprint, startsAt) of the alerts an alert capture is for
    doc: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the JSON as read

    @property
    def stored_traces(self) -> bool:
        return bool(self.files)

    @property
    def file_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """The metadata as JSON, key for key and in order what `from_json` read (a new dict)."""
        return dict(self.doc)

    @classmethod
    def from_json(cls, doc: object) -> CaptureMeta:
        """Read and check a capture's metadata: the id's format, created and total_bytes finite numbers, files a
        list of {name, bytes} with plain names listed once and whole sizes >= 0, and the optional fields of their
        types where present. CaptureMetaError names the field that is wrong."""
        if not isinstance(doc, dict):
            raise CaptureMetaError(f"a {type(doc).__name__}, not an object")
        missing = [k for k in REQUIRED if k not in doc]
        if missing:
            raise CaptureMetaError(f"no {', '.join(missing)} (not a moe-monitor capture's metadata)")
        capture_id = doc["id"]
        if not isinstance(capture_id, str) or not ID_RE.fullmatch(capture_id):
            raise CaptureMetaError(f"id {_shown(capture_id)} is not a capture id")
        for key in ("created", "total_bytes"):
            if not is_number(doc[key]):
                raise CaptureMetaError(f"{key} {_shown(doc[key])} is not a number")
        return cls(capture_id, doc["created"], doc["total_bytes"], _files(doc["files"]),
                   reason=_optional(doc, "reason", str, "a string", ""),
                   outcome=_optional(doc, "outcome", str, "a string", ""),
                   error=_optional(doc, "error", str, "a string", None),
                   evidence=_optional(doc, "evidence", dict, "an object", {}),
                   duration_s=_optional(doc, "duration_s", Real, "a number", None),
                   breakdown=_breakdown(doc.get("breakdown")),
                   alert_keys=_alert_keys(doc.get("alert_keys")),
                   doc=doc)


def _files(files: object) -> tuple[CaptureFile, ...]:
    if not isinstance(files, list):
        raise CaptureMetaError("files is not a list of {name, bytes}")
    out: dict[str, CaptureFile] = {}
    for f in files:
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise CaptureMetaError(f"files: {_shown(name)} is not a plain file name (letters, digits, . _ -; no "
                                   "leading dot)")
        assert isinstance(f, dict)
        size = f.get("bytes")
        if not is_int(size) or size < 0:
            raise CaptureMetaError(f"files: file {name}: size {_shown(size)} is not a number of bytes")
        if name in out:
            raise CaptureMetaError(f"files: file {name} is listed twice")
        out[name] = CaptureFile(name, int(size))
    return tuple(out.values())


def _optional(doc: dict, key: str, kind: type | Any, what: str, default: Any) -> Any:
    """doc[key] when present and not null, of type `kind` (bool is no number), else `default`."""
    value = doc.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is Real and not is_number(value)):
        raise CaptureMetaError(f"{key} {_shown(value)} is not {what}")
    return value


def _breakdown(shares: object) -> Mapping[str, float] | None:
    if shares is None:
        return None
    if not isinstance(shares, dict) or any(not isinstance(v, Real) or isinstance(v, bool) for v in shares.values()):
        raise CaptureMetaError("breakdown is not an object of shares (numbers)")
    return shares


def _alert_keys(keys: object) -> tuple[tuple[str, str], ...]:
    if keys is None:
        return ()
    if not isinstance(keys, list) or not all(
            isinstance(k, list) and len(k) == 2 and all(isinstance(x, str) for x in k) for k in keys):
        raise CaptureMetaError("alert_keys is not a list of [fingerprint, startsAt]")
    return tuple((k[0], k[1]) for k in keys)



def _shown(x: object) -> str:
    text = str(x) if is_int(x) else repr(x)
    return text if len(text) <= 60 else text[:59] + "…"
