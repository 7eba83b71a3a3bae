"""Formatting for `moe-monitor top`: figures as short strings, and screen lines as rich `Text` whose strings from
a sidecar have their control characters escaped. Styles come in two sets, with colour and without: colour only
repeats what the characters say."""

from __future__ import annotations

import math
import textwrap
import time

from rich.text import Text

from moe_monitor.client.untrusted import printable

COLOUR = {"title": "bold reverse", "tab": "bold reverse", "bad": "bold red", "warn": "yellow", "good": "green",
          "head": "bold", "dim": "dim", "bar": "cyan", "paused": "bold reverse",
          "heat": ("blue", "dim", "yellow", "bold red")}  # core.HEAT_LEVELS: cold, even, warm, hot
MONO = {"title": "reverse", "tab": "reverse", "bad": "bold", "warn": "", "good": "", "head": "bold", "dim": "",
        "bar": "", "paused": "reverse", "heat": ("", "", "", "bold")}


def ratio(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def count(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "—"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= 10 * div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def seconds(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "—"
    if x < 1e-3:
        return f"{x * 1e6:.3g} µs"
    if x < 1:
        return f"{x * 1e3:.3g} ms"
    return f"{x:.3g} s"


def multiple(x: float) -> str:
    """A load / mean in at most 3 characters: 0.4, 1.9, 12, 256."""
    return f"{x:.1f}" if x < 9.95 else f"{x:.0f}" if x < 999.5 else "999"


def clock(t: float | None) -> str:
    return "—" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def ago(now: float, t: float | None) -> str:
    if t is None:
        return "never"
    d = max(0.0, now - t)
    return f"{d:.0f} s ago" if d < 120 else f"{d / 60:.0f} min ago" if d < 7200 else f"{d / 3600:.1f} h ago"


def severity(x: float | None, st: dict, warn: float = 2.0, bad: float = 4.0) -> str:
    if x is None or math.isnan(x):
        return ""
    return st["bad"] if x >= bad else st["warn"] if x >= warn else ""


def line(*parts: tuple[str, str] | str) -> Text:
    """One screen line of parts (text, or (text, style)). Every screen line is made here, so this is where the
    sidecar's strings (ids, reasons, label values, error messages) get their control characters escaped:
    an escape sequence shows up as `\\x1b[2J` instead of acting on the terminal."""
    t = Text(no_wrap=True, overflow="crop")
    for p in parts:
        if isinstance(p, str):
            t.append(printable(p))
        else:
            t.append(printable(p[0]), p[1] or None)
    return t


def para(text: str, width: int, style: str = "") -> list[Text]:
    """`text` wrapped to `width` (a note or an error that must be read whole), each line indented by one."""
    return [line((" " + x, style)) for x in textwrap.wrap(printable(text), max(10, width - 1),
                                                          break_on_hyphens=False)]


def pack(items: list[str], width: int, max_lines: int, sep: str = "  ") -> list[str]:
    """`items` joined by `sep` into at most `max_lines` lines of `width`, never splitting an item; "…" ends
    the last line when some were left out."""
    lines, cur = [], ""
    for item in items:
        if cur and len(cur) + len(sep) + len(item) > width:
            if len(lines) == max_lines - 1:
                lines.append(cur + sep + "…" if len(cur) + len(sep) + 1 <= width else cur[:width - 1] + "…")
                return lines
            lines.append(cur)
            cur = ""
        cur = cur + sep + item if cur else item
    return lines + ([cur] if cur else [])


def bar(fraction: float, width: int) -> str:
    n = max(0, min(width, round(fraction * width)))
    return "█" * n
