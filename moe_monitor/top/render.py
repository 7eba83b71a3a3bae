"""Draws the view models of `core.py` as the lines of a terminal screen (rich `Text`, no terminal needed):
`screen()` returns the whole screen for a width x height, so the Textual app only shows it, and the tests read
it as plain text. Every figure is readable without colour: colour only repeats what the characters say (the
heat map's shades, the active tab in brackets, "UNREACHABLE" spelled out).
"""

from __future__ import annotations

import math
import textwrap
import time
from dataclasses import dataclass, field

from rich.text import Text

from moe_monitor.client.untrusted import printable
from moe_monitor.sidecar.vocabulary import DETECTOR_STATES

from . import core

VIEWS = (  # key, name, tab label
    ("1", "layers", "Layers"), ("2", "heat", "Heat map"), ("3", "ranks", "EP ranks"), ("4", "steps", "Steps"),
    ("5", "detector", "Detector+capture"))
VIEW_NAMES = tuple(v[1] for v in VIEWS)
SPANS = (1, 6, 30, 120)  # windows the heat map sums, cycled with `w`

COLOUR = {"title": "bold reverse", "tab": "bold reverse", "bad": "bold red", "warn": "yellow", "good": "green",
          "head": "bold", "dim": "dim", "bar": "cyan", "heat": ("", "blue", "green", "yellow", "bold red")}
MONO = {"title": "reverse", "tab": "reverse", "bad": "bold", "warn": "", "good": "", "head": "bold", "dim": "",
        "bar": "", "heat": ("", "", "", "", "")}

HELP = """\
Keys
  1 l   Layers: per-layer imbalance (max/mean expert load) of the last window
  2 h   Heat map: layer x expert load / layer mean, from the flight recorder
  3 e   EP ranks: load per EP rank over the last interval
  4 s   Steps: engine step time percentiles per phase over the last interval
  5 d   Detector state and signals, newest capture and its kernel breakdown
  ← →   previous / next view (also Tab, Shift+Tab)
  ↑ ↓   scroll a row; PgUp PgDn (or k j) a page; Home End
  o     order layers by id / worst first (Layers, Heat map)
  w     heat map: windows summed (1, 6, 30, 120)
  n p   next / previous sidecar (with several --url; also ] [)
  r     refresh now
  ?     this help (Esc closes it)
  q     quit

Heat map shades, load / layer mean:  " " <0.5  ░ 0.5-1  ▒ 1-2  ▓ 2-4  █ >=4
Per-layer figures and the detector: the sidecar's last closed window. Step
percentiles and EP-rank load: the increase between its two newest expositions
(like histogram_quantile(rate(...)) in PromQL). docs/top.md has the rest."""


@dataclass
class Ui:
    """What the user chose: the mutable state behind the keys (the app changes it, `screen` reads it)."""
    view: str = "layers"
    sidecar: int = 0
    help: bool = False
    order: str = "layer"  # or "imbalance"
    span: int = 1
    colour: bool = True
    offsets: dict[str, int] = field(default_factory=dict)
    page: int = 10  # rows the last screen had room for (what PgUp/PgDn move)

    def styles(self) -> dict:
        return COLOUR if self.colour else MONO

    def scroll(self, rows: int) -> None:
        self.offsets[self.view] = max(0, self.offsets.get(self.view, 0) + rows)

    def cycle_view(self, step: int) -> None:
        self.view = VIEW_NAMES[(VIEW_NAMES.index(self.view) + step) % len(VIEW_NAMES)]
        self.help = False


@dataclass
class Page:
    head: list[Text] = field(default_factory=list)  # kept on top
    rows: list[Text] = field(default_factory=list)  # scrolled when they do not fit
    tail: list[Text] = field(default_factory=list)  # kept below the rows
    what: str = "rows"


# -- formatting -------------------------------------------------------------------------------------------

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


# -- the screen -------------------------------------------------------------------------------------------

def screen(states: list[core.SidecarState], ui: Ui, width: int, height: int, now: float,
           interval: float | None = None) -> Text:
    """The whole screen: title, summary, tabs, the view (scrolled to ui.offsets, clamped here), key line."""
    width, height = max(20, width), max(5, height)
    ui.sidecar = min(ui.sidecar, len(states) - 1)
    state, st = states[ui.sidecar], ui.styles()
    every = state.interval_s(interval)
    lines = [_title(states, ui, state, st, width, now), _summary(state, st), _tabs(ui, st)]
    page = _help_page() if ui.help else _page(state, ui, st, width, now, every)
    if state.error is not None:
        what = "UNREACHABLE: " if state.unreachable else "ERROR: "
        shown = (f"showing the figures of {clock(state.last_ok)} ({ago(now, state.last_ok)})" if state.last_ok
                 else "no figures yet")
        page.head[:0] = para(what + state.error, width, st["bad"]) + \
            para(f"retrying every {every:g} s; {shown}", width, st["bad"])
    lines += _fit(page, height - 4, ui, st)
    lines.append(_keys(ui, len(states), st))
    out = Text("\n", no_wrap=True, overflow="crop").join(x[:width] if len(x) > width else x for x in lines)
    return out


def _title(states, ui, state, st, width, now) -> Text:
    left = f" moe-monitor top  {state.url}" + (f"  [{ui.sidecar + 1}/{len(states)}]" if len(states) > 1 else "")
    if state.error is not None:
        right = "UNREACHABLE " if state.unreachable else "ERROR "
    elif state.last_ok is None:
        right = "connecting… "
    else:
        right = f"updated {clock(state.last_ok)} "
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


def _keys(ui: Ui, sidecars: int, st) -> Text:
    keys = " q quit  ? help  1-5 views  ↑↓ PgUp/PgDn scroll"
    if ui.view in ("layers", "heat"):
        keys += "  o order"
    if ui.view == "heat":
        keys += "  w windows"
    if sidecars > 1:
        keys += "  n/p sidecar"
    return line((keys, st["dim"]))


def _fit(page: Page, height: int, ui: Ui, st) -> list[Text]:
    room = height - len(page.head) - len(page.tail)
    rows = page.rows
    offset = ui.offsets.get(ui.view, 0) if not ui.help else 0
    marker: list[Text] = []
    if len(rows) > max(room, 0):
        room = max(room - 1, 1)
        offset = min(offset, len(rows) - room)
        shown = rows[offset:offset + room]
        marker = [line((f" {page.what} {offset + 1}-{offset + len(shown)} of {len(rows)}  (↑↓ PgUp/PgDn)",
                        st["dim"]))]
    else:
        offset, shown = 0, rows
    if not ui.help:
        ui.offsets[ui.view], ui.page = offset, max(1, room)
    out = (page.head + shown + marker + page.tail)[:height]
    return out + [Text("")] * (height - len(out))


def _help_page() -> Page:
    return Page(rows=[line(" " + x if x else x) for x in HELP.splitlines()], what="lines")


def _page(state: core.SidecarState, ui: Ui, st, width: int, now: float, every: float) -> Page:
    cur = state.history.current
    if cur is None and ui.view != "heat":
        return Page()
    if ui.view == "layers":
        return layers_page(core.layer_rows(cur, ui.order), st, width)
    if ui.view == "heat":
        return heat_page(state, ui, st, width)
    if ui.view == "ranks":
        return ranks_page(core.ranks_view(state.history, state.flight), st, width,
                          state.history.interval_s())
    if ui.view == "steps":
        return steps_page(core.steps_view(state.history), st, width)
    return detector_page(core.detector_view(cur), core.capture_view(cur, state.captures, state.captures_error),
                         st, now)


# -- views ------------------------------------------------------------------------------------------------

def layers_page(rows: list[core.LayerRow], st, width: int) -> Page:
    fixed = 6 + 9 + 9 + 7 + 8 + 7 + 4 + 5 + 8 + 2
    bw = max(0, min(30, width - fixed))
    head = [line((f"{'layer':>6}{'routed':>9}{'max/mean':>9} {'':{bw}}{'cv':>7}{'entropy':>8}{'top1':>7}"
                  f"{'hot':>4}{'dead':>5}{'EP m/m':>8}", st["head"]))]
    scale = max([2.0] + [r.imbalance for r in rows if r.imbalance is not None])
    out = []
    for r in rows:
        if not r.observable:
            out.append(line(f"{r.layer:>6}  unobservable: a fused kernel routes internally (counts stay zero)"))
            continue
        sev = severity(r.imbalance, st)
        fill = bar((r.imbalance - 1) / (scale - 1), bw) if r.imbalance is not None and bw else ""
        top1 = "—" if r.top1_share is None else f"{100 * r.top1_share:.1f}%"
        out.append(line(f"{r.layer:>6}{count(r.routed):>9}", (f"{ratio(r.imbalance):>9}", sev), " ",
                        (f"{fill:<{bw}}", sev or st["bar"]),
                        f"{ratio(r.cv):>7}{ratio(r.entropy):>8}{top1:>7}{count(r.hot):>4}{count(r.dead):>5}",
                        (f"{ratio(r.ep_imbalance):>8}", severity(r.ep_imbalance, st, 1.5, 2.0))))
    if not out:
        out = [line(" no MoE layer in the last window yet")]
    tail = [line((" max/mean: busiest expert / layer mean (1 = balanced); EP m/m: same for EP ranks",
                  st["dim"]))]
    return Page(head, out, tail, "layers")


def heat_page(state: core.SidecarState, ui: Ui, st, width: int) -> Page:
    if state.flight is None and state.error is not None:
        return Page()  # the error lines above say why
    if state.flight is None:
        why = state.flight_error or "waiting for /api/flight"
        return Page(rows=para(f"No heat map: {why}", width, st["warn"] if state.flight_error else ""))
    layer_ids = state.flight.get("layer_ids") or [0]
    label_w = len(str(max(abs(int(x)) for x in layer_ids))) + 2
    right_w = 1 + len(f"e{max(0, int(state.flight.get('experts') or 1) - 1)}") + 7
    avail = max(8, width - label_w - right_w)
    key = (id(state.flight), avail, ui.span, ui.order)  # redrawn every second; the record changes per poll
    if state.heat_cache is None or state.heat_cache[0] != key:
        state.heat_cache = (key, core.heat_map(state.flight, avail, ui.span, ui.order))
    hm = state.heat_cache[1]
    if hm.note:
        return Page(rows=para(hm.note, width))
    cw = 1 if hm.fold > 1 else max(1, min(4, avail // max(1, hm.columns)))
    span = f"{'window' if hm.windows == 1 else f'{hm.windows} windows'} {clock(hm.start)}-{clock(hm.end)}"
    folded = f", {hm.fold} per column (max)" if hm.fold > 1 else ""
    head = [line((f" load/mean, {span}; {hm.experts} experts{folded}", st["head"]))]
    head.append(line(" " * label_w + _ticks(hm, cw)))
    shades = st["heat"]
    rows = []
    for r in hm.rows:
        label = f"L{r.layer}".rjust(label_w - 1) + " "
        if not r.cells:
            rows.append(line(label, ("no assignments in the window", st["dim"])))
            continue
        parts: list = [label]
        for b in r.cells:
            cell = core.SHADES[b] * (cw - 1 if cw > 1 else 1) + (" " if cw > 1 else "")
            parts.append((cell, shades[b]))
        parts += [" ", (f"e{r.hot_expert} {r.max_ratio:.1f}x".rjust(right_w - 1), severity(r.max_ratio, st))]
        rows.append(line(*parts))
    legend: list = [" load/mean "]
    for b, label in enumerate(core.SHADE_LABELS):
        legend += [("[" + core.SHADES[b] + "]", shades[b]), f"{label} "]
    legend.append(" right: hottest expert")
    return Page(head, rows, [line(*legend)], "layers")


def _ticks(hm: core.HeatMap, cw: int) -> str:
    """Expert numbers above the columns, every `step` columns where they fit."""
    need = len(str(hm.experts)) + 1
    step = next(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if s * cw >= need or s >= hm.columns)
    out = ""
    for col in range(0, hm.columns, step):
        pos = col * cw
        out = out.ljust(pos) + str(col * hm.fold)
    return out


def ranks_page(v: core.RanksView, st, width: int, interval: float | None) -> Page:
    head = []
    if v.source:
        span = f" ({interval:.1f} s)" if v.source == "last interval" and interval else ""
        head.append(line((f" assignments served per EP rank, {v.source}{span}", st["head"])))
    if v.balancedness_vllm is not None:
        head.append(line(f" EPLB balancedness (mean/max rank load): vLLM {ratio(v.balancedness_vllm)}  "
                         f"SGLang {ratio(v.balancedness_sglang)}"))
    rows = []
    if v.ranks:
        bw = max(0, min(40, width - 40))
        head.append(line((f"{'EP rank':>8}{'assignments':>13}{'share':>8}{'load/mean':>11}  ", st["head"])))
        top = max(r.load for r in v.ranks) or 1
        for r in v.ranks:
            sev = severity(r.ratio, st, 1.25, 1.5)
            rows.append(line(f"{r.rank:>8}{count(r.load):>13}{100 * r.share:>7.1f}%", (f"{ratio(r.ratio):>11}", sev),
                             "  ", (bar(r.load / top, bw), sev or st["bar"])))
    elif v.note:
        rows += para(v.note, width)
    tail = []
    if v.layers:
        worst = sorted(v.layers, key=lambda x: -(x[1] or 0))
        tail.append(line((" EP-rank max/mean per layer, worst first (last window):", st["head"])))
        tail += [line(" " + x) for x in pack([f"L{layer} {ratio(x)}" for layer, x in worst], width - 2, 2)]
    if v.ranks and v.note:
        tail += para(v.note, width)
    return Page(head, rows, tail, "ranks")


def steps_page(v: core.StepsView, st, width: int = 80) -> Page:
    if v.note and not v.rows:
        return Page(rows=para(v.note, width))
    head = [line((f" engine step time over the last {v.interval_s:.1f} s (increase of the step histograms)",
                  st["head"])),
            line((f" {'phase':<8}{'tokens':>7}{'steps':>8}{'steps/s':>9}{'mean':>10}"
                  + "".join(f"{'p' + format(100 * q, 'g'):>10}" for q in core.QUANTILES), st["head"]))]
    rows = []
    for r in v.rows:
        label = (f" {r.phase:<8}{'all':>7}" if r.tokens_le is None else f"{'':<9}{'≤' + r.tokens_le:>7}")
        qs = [(">" if above else "") + seconds(x) for x, above in r.quantiles]
        rows.append(line((label, st["head"] if r.tokens_le is None else ""),
                         f"{count(r.steps):>8}{r.per_second:>9.1f}{seconds(r.mean_s):>10}"
                         + "".join(f"{q:>10}" for q in qs)))
    tail = [line((" ≤N: steps of at most N tokens; percentiles interpolated like histogram_quantile",
                  st["dim"]))]
    return Page(head, rows, tail, "rows")


def detector_page(d: core.DetectorView, c: core.CaptureView, st, now: float) -> Page:
    states: list = [" detector: "]
    for name in DETECTOR_STATES:
        states += [(f"[{name}]", st["tab"]) if name == d.state else f" {name} ", " "]
    rows = []
    if d.signals:
        rows.append(line((f" {'signal':<28}{'phase':<9}{'tokens':>7}{'baseline':>11}{'current':>11}{'cur/base':>9}",
                          st["head"])))
    for s in d.signals:
        fmt = seconds if s.signal == "step_time" else ratio
        x = s.current / s.baseline if s.current is not None and s.baseline else None
        rows.append(line(f" {s.signal:<28}{s.phase:<9}{('≤' + s.tokens_le) if s.tokens_le else '':>7}"
                         f"{fmt(s.baseline):>11}{fmt(s.current):>11}", (f"{ratio(x):>9}", severity(x, st, 1.2, 1.5))))
    if not d.signals:
        rows.append(line(" no detector signals yet (no closed window with steps or routing)"))
    rows.append(Text(""))
    totals = ", ".join(f"{k} {v:.0f}" for k, v in sorted(c.outcomes.items()) if v) or "none"
    rows.append(line((" captures: ", st["head"]), totals, (" (one in progress)" if c.in_progress else ""),
                     ("" if c.profiler_enabled is not False else "  profiler off: vLLM runs without "
                      "--profiler-config")))
    n = c.newest
    if n:
        outcome_style = "" if n.get("outcome") == "ok" else st["warn"]
        ev = n.get("evidence") or {}
        rows.append(line(" newest: ", (str(n.get("id")), st["head"])))
        rows.append(line(f"   {n.get('reason', '?')}, ", (str(n.get("outcome", "?")), outcome_style),
                         f", {clock(n.get('created'))} ({ago(now, n.get('created'))}), "
                         f"{n.get('duration_s') or 0:.1f} s, {len(n.get('files') or [])} files"))
        if ev:
            what = ev.get("signal") or ev.get("note") or ""
            cur = ev.get("current")
            detail = f" {cur:.3g}" if isinstance(cur, (int, float)) else ""
            thr = ev.get("threshold")
            detail += f" (threshold {thr:.3g})" if isinstance(thr, (int, float)) else ""
            detail += f", layer {ev['layer']}" if ev.get("layer") is not None else ""
            rows.append(line(f"   evidence: {what}{detail}"))
    elif c.captures_note:
        rows.append(line(f" newest: {c.captures_note}"))
    if c.shares:
        rows.append(line((f" kernel breakdown of {c.analysed or 'the newest capture'}", st["head"]),
                         f" ({c.analysed_ranks or '?'} rank(s), {clock(c.analysed_end)}):"))
        top = c.shares[0][1] or 1
        for cat, share, secs in c.shares:
            if share < 0.0005:
                continue
            rows.append(line(f"   {cat:<18}{100 * share:>6.1f} %{seconds(secs):>11}  ",
                             (bar(share / top, 30), st["bar"])))
        if c.idle_s is not None:
            rows.append(line(f"   idle inside steps {seconds(c.idle_s):>16}"))
        if c.ep_wait:  # several ranks' traces: who waited in EP communication, and for whom
            rows.append(line("   EP wait per rank (waited, share of the waiting it caused):"))
            for rank, wait_s, caused in c.ep_wait:
                rows.append(line(f"     {rank:<22}{seconds(wait_s):>11}  ", (f"{100 * caused:5.1f} %",
                                 st["warn"] if caused > 0.5 else "")))
    else:
        rows.append(line(" kernel breakdown: none yet (no analysed capture)"))
    return Page([line(*states)], rows, [], "lines")
