"""What a client does with strings a server sent before it prints them or makes paths of them: control
characters become visible escapes, capture ids and file names are checked against the sidecar's own formats."""

from __future__ import annotations

import re

from moe_monitor.schema.capture_record import ID_RE as CAPTURE_ID_RE  # the formats the sidecar and clients share
from moe_monitor.schema.capture_record import NAME_RE as FILE_NAME_RE

# C0 (newline and tab too: a one-line field must not forge lines), DEL, C1, and the Unicode controls that
# reorder or break lines on screen (bidi overrides and isolates, line and paragraph separators).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(value: object, limit: int | None = None) -> str:
    """`value` as text safe to print on a terminal: every control character (ESC, BEL, CR, ...) as a visible
    escape such as `\\x1b`, so an escape sequence in a server's answer shows up as text instead of acting.
    With `limit`, at most that many characters (then "…")."""
    text = _CONTROL.sub(_escape, value if isinstance(value, str) else str(value))
    return text if limit is None or len(text) <= limit else text[:limit] + "…"


def capture_id(value: object) -> str | None:
    """`value` when it is a capture id of the sidecar's format (no separators, never `.` or `..`), else None."""
    return value if isinstance(value, str) and CAPTURE_ID_RE.fullmatch(value) else None


def file_name(value: object) -> str | None:
    """`value` when it is a plain file name of the sidecar's format (no separators, no leading dot), else None."""
    return value if isinstance(value, str) and FILE_NAME_RE.fullmatch(value) else None
