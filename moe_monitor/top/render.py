"""Puts the screen together (rich `Text`, no terminal needed): the frame (title with the sidecar's state,
summary, view tabs, what is wrong: unreachable, stale, idle, paused) above the view of `views.py`. `screen()`
is the whole screen as text for a width x height (the tests read it), `snapshot()` every view one after the
other for `--once`; the Textual app shows `frame()` and `view_page()` in its widgets. Every figure is readable
without colour: colour only repeats what the characters say (the heat map's marks, the active tab in brackets,
"UNREACHABLE" spelled out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text

from . import core, rows, views
from .text import COLOUR, MONO, ago, clock, line, para, ratio, severity
from .views import Page

VIEWS = (  # key, name, tab label
    ("1", "layers", "Layers"), ("2", "heat", "Heat map"), ("3", "ranks", "EP ranks"), ("4", "steps", "Steps"),
    ("5", "detector", "Detector+capture"))
VIEW_NAMES = tuple(v[1] for v in VIEWS)
SPANS = (1, 6, 30, 120)  # windows the heat map sums, cycled with `w`
QUIET = ("idle", "no data")  # nothing routed: Layers and EP ranks show no table of zeros

HELP = """\
Keys
  1 l   Layers: per-layer imbalance (max/mean expert load) of the last window
  2 h   Heat map: layer x expert load / layer mean, from the flight recorder
  3 e   EP ranks: load per EP rank over the last interval
  4     Steps: engine step time percentiles per phase over the last interval
  5 d   Detector state and signals, newest capture and its kernel breakdown
  ← →   previous / next view (also Tab, Shift+Tab)
  ↑ ↓   scroll a row; PgUp PgDn (or k j) a page; Home End
  /     filter: 3  10-20  (layers)  e5  r2  >1.5  decode; Enter keeps it,
        Esc clears it
  s S   sort by the next column / reverse (or click a header); o worst first
  p     pause (also Space): the figures stay until p again
  w     heat map: windows summed (1, 6, 30, 120)
  n N   next / previous sidecar (with several --url; also ] [)
  r     refresh now
  ?     this help (Esc closes it)
  q     quit

Heat map, load / layer mean: " 0.4" <0.5, " 1.0" <=1.1, "+1.3" 1.1-1.5,
"*1.9" >=1.5; one character a cell where numbers do not fit: " ░▒█".
Per-layer figures and the detector: the sidecar's last closed window. Step
percentiles and EP-rank load: the increase between its two newest expositions
(like histogram_quantile(rate(...)) in PromQL). docs/top.md has the rest."""


@dataclass
class Ui:
    """What the user chose: the mutable state behind the keys (the app changes it, `screen` reads it)."""
    view: str = "layers"
    sidecar: int = 0
    help: bool = False
    span: int = 1
    colour: bool = True
    offsets: dict[str, int] = field(default_factory=dict)
    page: int = 10  # rows the last screen had room for (what PgUp/PgDn move)
    sorts: dict[str, tuple[str, bool]] = field(default_factory=dict)  # view -> (column, descending)
    filter: rows.RowFilter = field(default_factory=rows.RowFilter)
    paused_at: float | None = None  # when `p` paused the view (None: live)

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def styles(self) -> dict:
        return COLOUR if self.colour else MONO

    def scroll(self, rows: int) -> None:
        self.offsets[self.view] = max(0, self.offsets.get(self.view, 0) + rows)

    def cycle_view(self, step: int) -> None:
        self.view = VIEW_NAMES[(VIEW_NAMES.index(self.view) + step) % len(VIEW_NAMES)]
        self.help = False

    def sort(self, view: str | None = None) -> tuple[str, bool] | None:
        """(column, descending) of a view that sorts; None for one that does not."""
        view = view or self.view
        if view not in rows.SORTS:
            return None
        return self.sorts.get(view, (rows.SORTS[view][0], False))

    def sort_by(self, column: str) -> None:
        """Sort by `column` in its natural direction; by the column already sorted by: the other way round."""
        now = self.sort()
        if now is None or column not in rows.SORTS[self.view]:
            return
        self.sorts[self.view] = (column, not now[1]) if now[0] == column else (column,
                                                                               rows.natural_descending(column))

    def cycle_sort(self) -> None:
        if (now := self.sort()) is not None:
            columns = rows.SORTS[self.view]
            nxt = columns[(columns.index(now[0]) + 1) % len(columns)]
            self.sorts[self.view] = (nxt, rows.natural_descending(nxt))

    def reverse_sort(self) -> None:
        if (now := self.sort()) is not None:
            self.sorts[self.view] = (now[0], not now[1])

    def toggle_worst(self) -> None:
        """`o`: worst first, or back to the view's own order."""
        if (now := self.sort()) is not None:
            worst = (rows.WORST[self.view], rows.natural_descending(rows.WORST[self.view]))
            self.sorts[self.view] = (rows.SORTS[self.view][0], False) if now == worst else worst

    def set_filter(self, text: str) -> None:
        self.filter = rows.RowFilter.parse(text)
        self.offsets.clear()


# -- the frame --------------------------------------------------------------------------------------------

def health(state: core.SidecarState, ui: Ui, now: float, every: float) -> core.Health:
    """The sidecar's state as of now, or as of the moment the view was paused (no poll ages it meanwhile)."""
    return core.health(state, ui.paused_at if ui.paused else now, every)


def frame(states: list[core.SidecarState], ui: Ui, width: int, now: float, interval: float | None = None,
          live: bool = True) -> list[Text]:
    """Title, summary, the view tabs, and what is wrong with the figures (unreachable, stale, idle, paused);
    not `live` (--once): no tabs, no retries."""
    ui.sidecar = min(ui.sidecar, len(states) - 1)
    state, st = states[ui.sidecar], ui.styles()
    every = state.interval_s(interval)
    h = health(state, ui, now, every)
    out = [_title(states, ui, state, h, st, width), _summary(state, st)] + ([_tabs(ui, st)] if live else [])
    if h.state in ("unreachable", "error"):
        what = "UNREACHABLE: " if state.unreachable else "ERROR: "
        shown = (f"showing the figures of {clock(state.last_ok)} ({ago(now, state.last_ok)})" if state.last_ok
                 else "no figures yet")
        retry = "" if not live else "not polled while paused; " if ui.paused else f"retrying every {every:g} s; "
        out += para(what + state.error, width, st["bad"]) + para(retry + shown, width, st["bad"])
    elif h.message:
        out += para(h.message, width, st["bad"] if h.state == "stale" else st["warn"])
    if ui.paused:
        out += para(f"PAUSED: the figures of {clock(state.last_ok)} ({ago(now, state.last_ok)}) are kept; "
                    "p or Space resumes", width, st["paused"])
    return out


def _title(states, ui: Ui, state: core.SidecarState, h: core.Health, st, width: int) -> Text:
    left = f" moe-monitor top  {state.url}" + (f"  [{ui.sidecar + 1}/{len(states)}]" if len(states) > 1 else "")
    updated = f"updated {clock(state.last_ok)}"
    right = {"connecting": "connecting…", "unreachable": "UNREACHABLE", "error": "ERROR", "stale": "STALE",
             "idle": f"IDLE  {updated}", "no data": f"NO DATA  {updated}"}.get(h.state, updated)
    if ui.paused:
        right = "PAUSED  " + right.replace("updated", "as of")
    right += " "
    pad = max(1, width - len(left) - len(right))
    return line((left + " " * pad + right, st["title"]))


def _summary(state: core.SidecarState, st) -> Text:
    cur = state.history.current
    if cur is None:
        return line(" waiting for the sidecar's first exposition")
    o = core.overview(cur)
    parts: list = [f" {o.model or '(no model yet)'}"]
    if o.layers is not None:
        parts.append(f"  {o.layers}x{o.experts} top-{o.top_k}")
    if o.window_s:
        parts.append(f"  window {o.window_s:g}s")
    if o.worst_layer is not None:
        parts += ["  worst ", (f"L{o.worst_layer} {ratio(o.worst_ratio)}", severity(o.worst_ratio, st)),
                  f" mean {ratio(o.mean_ratio)}"]
    if o.detector_state:
        parts += ["  detector ", (o.detector_state, st["warn"] if o.detector_state == "cooldown" else "")]
    stale = o.segments.get("stale", 0) + o.segments.get("unreadable", 0)
    if stale:
        parts += ["  ", (f"{stale} segment(s) stale/unreadable", st["bad"])]
    return line(*parts)


def _tabs(ui: Ui, st) -> Text:
    parts: list = [" "]
    for key, name, label in VIEWS:
        if name == ui.view and not ui.help:
            parts += [(f"[{key} {label}]", st["tab"]), " "]
        else:
            parts.append(f" {key} {label}  ")
    return line(*parts)


# -- the view ---------------------------------------------------------------------------------------------

def view_page(states: list[core.SidecarState], ui: Ui, width: int, now: float,
              interval: float | None = None) -> Page:
    """The view under the frame: a table (layers, EP ranks, steps) or lines (heat map, detector, help)."""
    if ui.help:
        return Page(rows=[line(" " + x if x else x) for x in HELP.splitlines()], what="lines")
    state, st = states[min(ui.sidecar, len(states) - 1)], ui.styles()
    cur = state.history.current
    if cur is None and ui.view != "heat":
        return Page()
    idle = health(state, ui, now, state.interval_s(interval)).state in QUIET  # said above: no table of zeros
    if ui.view == "layers":
        return Page() if idle else views.layers_page(core.layer_rows(cur), st, width, ui.sort(), ui.filter)
    if ui.view == "heat":
        return views.heat_page(state, ui.span, st, width, ui.sort(), ui.filter)
    if ui.view == "ranks":
        return Page() if idle else views.ranks_page(core.ranks_view(state.history, state.flight), st, width,
                                                    state.history.interval_s(), ui.sort(), ui.filter)
    if ui.view == "steps":
        return views.steps_page(core.steps_view(state.history), st, width, ui.sort(), ui.filter)
    return views.detector_page(core.detector_view(cur), core.capture_view(cur, state.captures, state.captures_error),
                               st, now, ui.filter, width)


def fit(page: Page, height: int, ui: Ui, st) -> list[Text]:
    """The page in `height` lines: its rows scrolled to ui.offsets (clamped here), with "rows a-b of n"."""
    room = height - len(page.head) - len(page.tail)
    rows_ = page.rows
    offset = ui.offsets.get(ui.view, 0) if not ui.help else 0
    marker: list[Text] = []
    if len(rows_) > max(room, 0):
        room = max(room - 1, 1)
        offset = min(offset, len(rows_) - room)
        shown = rows_[offset:offset + room]
        marker = [line((f" {page.what} {offset + 1}-{offset + len(shown)} of {len(rows_)}  (↑↓ PgUp/PgDn)",
                        st["dim"]))]
    else:
        offset, shown = 0, rows_
    if not ui.help:
        ui.offsets[ui.view], ui.page = offset, max(1, room)
    out = (page.head + shown + marker + page.tail)[:height]
    return out + [Text("")] * (height - len(out))


def screen(states: list[core.SidecarState], ui: Ui, width: int, height: int, now: float,
           interval: float | None = None) -> Text:
    """The whole screen as text (the app shows the same pieces, with a footer of keys below)."""
    width, height = max(20, width), max(5, height)
    top = frame(states, ui, width, now, interval)
    page = view_page(states, ui, width, now, interval).flat(ui.styles())
    lines = top + fit(page, height - len(top), ui, ui.styles())
    return Text("\n", no_wrap=True, overflow="crop").join(x[:width] if len(x) > width else x for x in lines)


def snapshot(states: list[core.SidecarState], ui: Ui, width: int, now: float) -> list[Text]:
    """`--once`: for each sidecar its frame and every view one after the other, every row (the filter and the
    sort apply), nothing scrolled. Lines may be wider than `width`; the caller crops them and says so."""
    st, out = ui.styles(), []
    for i, state in enumerate(states):
        ui.sidecar, ui.help = i, False
        out += ([Text("")] if i else []) + frame(states, ui, width, now, live=False)
        h = health(state, ui, now, state.interval_s(None))
        if state.history.current is None:
            continue
        for _, name, label in VIEWS:
            ui.view = name
            page = view_page(states, ui, width, now).flat(st)
            if name in ("layers", "ranks") and h.state in QUIET:
                continue  # the line above says why there is nothing
            out += [Text(""), line((f"── {label} " + "─" * max(3, width - 5 - len(label)), st["head"]))]
            out += page.head + page.rows + page.tail
    return out
