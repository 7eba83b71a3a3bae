"""One function per view: core.py's view models -> a `Page` of screen lines, or of a `Table` that the app shows
in a DataTable and the text screen (--once, the tests) as lines, the same characters in both. The rows shown
are those of the `/` filter, in the order of the sort column, whose header carries ▲ or ▼."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text

from moe_monitor.schema.vocabulary import DETECTOR_STATES

from . import core, rows
from .text import ago, bar, clock, count, line, multiple, pack, para, ratio, seconds, severity

UNOBSERVABLE = " unobservable: a fused kernel routes internally (its counts stay zero)"


@dataclass(frozen=True)
class Column:
    label: str
    width: int
    sort: str | None = None  # the rows.SORTS column a click on this header sorts by
    left: bool = False


@dataclass
class Table:
    columns: list[Column]
    header: list[str]  # the labels, aligned to their widths, the sorted one with ▲ / ▼
    rows: list[list[Text]]  # one Text per column, each exactly as wide as its column
    keys: list[str]  # a stable key per row (the DataTable keeps its place by them)

    def header_line(self, st) -> Text:
        return line(("".join(self.header), st["head"]))

    def lines(self) -> list[Text]:
        return [Text("").join(cells) for cells in self.rows]


def table(columns: list[Column], sort: tuple[str, bool] | None) -> Table:
    header = []
    for c in columns:
        mark = ("▼" if sort[1] else "▲") if sort and c.label and c.sort == sort[0] else ""
        header.append((c.label + mark).ljust(c.width) if c.left else (c.label + mark).rjust(c.width))
    return Table(columns, header, [], [])


@dataclass
class Page:
    head: list[Text] = field(default_factory=list)  # kept on top
    rows: list[Text] = field(default_factory=list)  # scrolled when they do not fit
    tail: list[Text] = field(default_factory=list)  # kept below the rows
    what: str = "rows"
    table: Table | None = None  # shown above `rows` (then notes)

    def flat(self, st) -> Page:
        """The page as lines only: the table's header kept on top, its rows scrolled."""
        if self.table is None:
            return self
        return Page(self.head + [self.table.header_line(st)], self.table.lines() + self.rows, self.tail, self.what)


def filtered(flt: rows.RowFilter, kind: type, shown: int, total: int, what: str, st) -> list[Text]:
    """The line saying how many rows the filter left, when it addresses rows of `kind`."""
    if not flt.narrowed(kind):
        return []
    return [line((f" filter “{flt.text}”: {shown} of {total} {what}", st["warn"] or st["head"]))]


# -- views ------------------------------------------------------------------------------------------------

def layers_page(all_rows: list[core.LayerRow], st, width: int, sort=None, flt=rows.NO_FILTER) -> Page:
    shown = rows.select(all_rows, flt, sort)
    bw = max(0, min(30, width - 69))
    t = table([Column("layer", 7, "layer"), Column("routed", 9, "routed"), Column("max/mean", 10, "imbalance"),
               Column("", bw + 1, "imbalance", left=True), Column("cv", 7, "cv"), Column("entropy", 9, "entropy"),
               Column("top1", 7, "top1_share"), Column("hot", 5, "hot"), Column("dead", 6, "dead"),
               Column("EP m/m", 8, "ep_imbalance")], sort)
    scale = max([2.0] + [r.imbalance for r in all_rows if r.imbalance is not None])
    for r in shown:
        sev = severity(r.imbalance, st)
        fill = bar((r.imbalance - 1) / (scale - 1), bw) if r.imbalance is not None and bw else ""
        if not r.observable:
            fill, sev = "unobservable"[:bw], st["dim"]
        top1 = "—" if r.top1_share is None else f"{100 * r.top1_share:.1f}%"
        t.rows.append([line(f"{r.layer:>7}"), line(f"{count(r.routed):>9}"), line((f"{ratio(r.imbalance):>10}", sev)),
                       line(" ", (f"{fill:<{bw}}", sev or st["bar"])), line(f"{ratio(r.cv):>7}"),
                       line(f"{ratio(r.entropy):>9}"), line(f"{top1:>7}"), line(f"{count(r.hot):>5}"),
                       line(f"{count(r.dead):>6}"),
                       line((f"{ratio(r.ep_imbalance):>8}", severity(r.ep_imbalance, st, 1.5, 2.0)))])
        t.keys.append(f"L{r.layer}")
    notes = [] if all_rows else [line(" no MoE layer in the last window yet")]
    tail = filtered(flt, core.LayerRow, len(shown), len(all_rows), "layers", st)
    if any(not r.observable for r in shown):
        tail.append(line((UNOBSERVABLE, st["dim"])))
    tail.append(line((" max/mean: busiest expert / layer mean (1 = balanced); EP m/m: same for EP ranks",
                      st["dim"])))
    return Page([], notes, tail, "layers", t)


def heat_page(state: core.SidecarState, span: int, st, width: int, sort=None, flt=rows.NO_FILTER) -> Page:
    """The heat map of the flight record held; computed, then drawn, once per record and choice (the screen is
    redrawn every second)."""
    key = (id(state.flight), state.flight_error, state.error is None, span, width, sort, flt, id(st))
    if state.heat_cache is None or state.heat_cache[0] != key:
        state.heat_cache = (key, _heat_page(state, span, st, width, sort, flt))
    return state.heat_cache[1]


def _heat_page(state: core.SidecarState, span: int, st, width: int, sort, flt) -> Page:
    if state.flight is None and state.error is not None:
        return Page()  # the error lines above say why
    if state.flight is None:
        why = state.flight_error or "waiting for /api/flight"
        return Page(rows=para(f"No heat map: {why}", width, st["warn"] if state.flight_error else ""))
    layer_ids = state.flight.layer_ids or (0,)
    label_w = len(str(max(abs(int(x)) for x in layer_ids))) + 2
    right_w = 1 + len(f"e{max(0, (state.flight.experts or 1) - 1)}") + 7
    avail = max(8, width - label_w - right_w)
    hm = core.heat_map(state.flight, avail, span)
    if hm.note:
        return Page(rows=para(hm.note, width))
    if not any(r.routed for r in hm.rows):
        windows = "window" if hm.windows == 1 else f"{hm.windows} windows"
        return Page(rows=para(f"idle: no tokens routed in the flight record's newest {windows} "
                              f"({clock(hm.start)}-{clock(hm.end)})", width, st["warn"]))
    numeric = hm.fold == 1 and avail >= 4 * hm.columns  # a number per expert: " 1.0", "+1.3", "*1.9"
    cw = 4 if numeric else 1 if hm.fold > 1 else max(1, min(3, avail // max(1, hm.columns)))
    span_text = f"{'window' if hm.windows == 1 else f'{hm.windows} windows'} {clock(hm.start)}-{clock(hm.end)}"
    folded = f", {hm.fold} per column (max)" if hm.fold > 1 else ""
    order = ""
    if sort and sort[0] == "max_ratio":
        order = f"; hottest first {'▼' if sort[1] else '▲'}"
    elif sort and sort[1]:
        order = "; by layer ▼"
    head = [line((f" load/mean, {span_text}; {hm.experts} experts{folded}{order}", st["head"])),
            line(" " * label_w + _ticks(hm, cw, numeric))]
    shown = rows.select(hm.rows, flt, sort)
    heat = st["heat"]
    out = []
    for r in shown:
        label = f"L{r.layer}".rjust(label_w - 1) + " "
        if not r.ratios:
            out.append(line(label, ("no assignments in the window", st["dim"])))
            continue
        parts: list = [label]
        for x, level in zip(r.ratios, r.cells):
            if numeric:
                parts.append(((core.MARKS[level].strip() + multiple(x)).rjust(4), heat[level]))
            else:
                parts.append((core.SHADES[level] * (cw - 1 if cw > 1 else 1) + (" " if cw > 1 else ""), heat[level]))
        hot = core.heat_level(r.max_ratio)
        parts += [" ", (f"e{r.hot_expert} {r.max_ratio:.1f}x".rjust(right_w - 1), heat[hot] if hot > 1 else "")]
        out.append(line(*parts))
    tail = filtered(flt, core.HeatRow, len(shown), len(hm.rows), "layers", st)
    legend: list = [" load/mean "]
    samples = (0.4, 1.0, 1.3, 1.9)
    for level, label in enumerate(core.HEAT_LABELS):
        cell = (core.MARKS[level].strip() + multiple(samples[level])).rjust(4) if numeric else core.SHADES[level]
        legend += [("[" + cell + "]", heat[level]), f"{label} "]
    legend.append(" right: hottest")
    return Page(head, out, tail + [line(*legend)], "layers")


def _ticks(hm: core.HeatMap, cw: int, numeric: bool) -> str:
    """Expert numbers above the columns (over a number's last digit), every `step` columns where they fit."""
    need = len(str(hm.experts)) + 1
    step = next(s for s in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if s * cw >= need or s >= hm.columns)
    out = ""
    for col in range(0, hm.columns, step):
        label = str(col * hm.fold)
        pos = (col + 1) * cw - len(label) if numeric else col * cw
        out = out.ljust(pos) + label
    return out


def ranks_page(v: core.RanksView, st, width: int, interval: float | None, sort=None,
               flt=rows.NO_FILTER) -> Page:
    head = []
    if v.source:
        span = f" ({interval:.1f} s)" if v.source == "last interval" and interval else ""
        head.append(line((f" assignments served per EP rank, {v.source}{span}", st["head"])))
    if v.balancedness_vllm is not None:
        head.append(line(f" EPLB balancedness (mean/max rank load): vLLM {ratio(v.balancedness_vllm)}  "
                         f"SGLang {ratio(v.balancedness_sglang)}"))
    notes, t = [], None
    if v.ranks:
        bw = max(0, min(40, width - 43))
        t = table([Column("EP rank", 9, "rank"), Column("assignments", 13, "load"), Column("share", 8, "share"),
                   Column("load/mean", 11, "ratio"), Column("", bw + 2, "load", left=True)], sort)
        top = max(r.load for r in v.ranks) or 1
        shown = rows.select(v.ranks, flt, sort)
        for r in shown:
            sev = severity(r.ratio, st, 1.25, 1.5)
            t.rows.append([line(f"{r.rank:>9}"), line(f"{count(r.load):>13}"), line(f"{100 * r.share:>7.1f}%"),
                           line((f"{ratio(r.ratio):>11}", sev)), line("  ", (bar(r.load / top, bw), sev or st["bar"]))])
            t.keys.append(f"r{r.rank}")
    elif v.note:
        notes += para(v.note, width)
    tail = filtered(flt, core.RankLoad, len(t.rows), len(v.ranks), "ranks", st) if t else []
    if v.layers:
        worst = sorted(v.layers, key=lambda x: -(x[1] or 0))
        tail.append(line((" EP-rank max/mean per layer, worst first (last window):", st["head"])))
        tail += [line(" " + x) for x in pack([f"L{layer} {ratio(x)}" for layer, x in worst], width - 2, 2)]
    if v.ranks and v.note:
        tail += para(v.note, width)
    return Page(head, notes, tail, "ranks", t)


def steps_page(v: core.StepsView, st, width: int = 80, sort=None, flt=rows.NO_FILTER) -> Page:
    if v.note and not v.rows:
        return Page(rows=para(v.note, width))
    head = [line((f" engine steps over the last {v.interval_s:.1f} s (steps: every step; time: the timed ones)",
                  st["head"]))]
    t = table([Column(" phase", 9, "phase", left=True), Column("tokens", 7), Column("steps", 8, "steps"),
               Column("steps/s", 9, "per_second"), Column("mean", 10, "mean_s"),
               *[Column(name, 10, name) for name in rows.QUANTILE_COLUMNS]], sort)
    shown = rows.select(v.rows, flt, sort)
    for r in shown:
        tokens = "all" if r.tokens_le is None else "≤" + r.tokens_le
        qs = [(">" if above else "") + seconds(x) for x, above in r.quantiles]
        t.rows.append([line((f" {r.phase:<8}", st["head"] if r.tokens_le is None else "")), line(f"{tokens:>7}"),
                       line(f"{count(r.steps):>8}"), line(f"{r.per_second:>9.1f}"), line(f"{seconds(r.mean_s):>10}"),
                       *[line(f"{q:>10}") for q in qs]])
        t.keys.append(f"{r.phase}/{tokens}")
    tail = filtered(flt, core.StepRow, len(shown), len(v.rows), "rows", st)
    tail.append(line((" ≤N: steps of at most N tokens; percentiles interpolated like histogram_quantile",
                      st["dim"])))
    return Page(head, [], tail, "rows", t)


def detector_page(d: core.DetectorView, c: core.CaptureView, st, now: float, flt=rows.NO_FILTER,
                  width: int = 80) -> Page:
    states: list = [" detector: "]
    for name in DETECTOR_STATES:
        states += [(f"[{name}]", st["tab"]) if name == d.state else f" {name} ", " "]
    out = []
    signals = rows.select(d.signals, flt)
    if d.signals:
        out.append(line((f" {'signal':<28}{'phase':<9}{'tokens':>7}{'baseline':>11}{'current':>11}{'cur/base':>9}",
                         st["head"])))
    for s in signals:
        fmt = seconds if s.signal == "step_time" else ratio
        x = s.current / s.baseline if s.current is not None and s.baseline else None
        out.append(line(f" {s.signal:<28}{s.phase:<9}{('≤' + s.tokens_le) if s.tokens_le else '':>7}"
                        f"{fmt(s.baseline):>11}{fmt(s.current):>11}", (f"{ratio(x):>9}", severity(x, st, 1.2, 1.5))))
    if not d.signals:
        out.append(line(" no detector signals yet (no closed window with steps or routing)"))
    out += filtered(flt, core.Signal, len(signals), len(d.signals), "signals", st)
    out.append(Text(""))
    totals = ", ".join(f"{k} {v:.0f}" for k, v in sorted(c.outcomes.items()) if v) or "none"
    out.append(line((" captures: ", st["head"]), totals, (" (one in progress)" if c.in_progress else ""),
                    ("" if c.profiler_enabled is not False else "  profiler off: vLLM runs without "
                     "--profiler-config")))
    out += _newest_capture(c, st, now, width)
    if c.shares:
        out.append(line((f" kernel breakdown of {c.analysed or 'the newest capture'}", st["head"]),
                        f" ({c.analysed_ranks or '?'} rank(s), {clock(c.analysed_end)}):"))
        top = c.shares[0][1] or 1
        for cat, share, secs in c.shares:
            if share < 0.0005:
                continue
            out.append(line(f"   {cat:<18}{100 * share:>6.1f} %{seconds(secs):>11}  ", (bar(share / top, 30),
                                                                                        st["bar"])))
        if c.idle_s is not None:
            out.append(line(f"   idle inside steps {seconds(c.idle_s):>16}"))
        if c.ep_wait:  # several ranks' traces: who waited in EP communication, and for whom
            out.append(line("   EP wait per rank (waited, share of the waiting it caused):"))
            for rank, wait_s, caused in c.ep_wait:
                out.append(line(f"     {rank:<22}{seconds(wait_s):>11}  ", (f"{100 * caused:5.1f} %",
                                st["warn"] if caused > 0.5 else "")))
    else:
        out.append(line(" kernel breakdown: none yet (no analysed capture)"))
    return Page([line(*states)], out, [], "lines")


def _newest_capture(c: core.CaptureView, st, now: float, width: int) -> list[Text]:
    n = c.newest
    if not n:
        return para(f"newest: {c.captures_note}", width) if c.captures_note else []
    outcome_style = "" if n.get("outcome") == "ok" else st["warn"]
    out = [line(" newest: ", (str(n.get("id")), st["head"])),
           line(f"   {n.get('reason', '?')}, ", (str(n.get("outcome", "?")), outcome_style),
                f", {clock(n.get('created'))} ({ago(now, n.get('created'))}), "
                f"{n.get('duration_s') or 0:.1f} s, {len(n.get('files') or [])} files")]
    ev = n.get("evidence") or {}
    if ev:
        what = ev.get("signal") or ev.get("note") or ""
        cur = ev.get("current")
        detail = f" {cur:.3g}" if isinstance(cur, (int, float)) else ""
        thr = ev.get("threshold")
        detail += f" (threshold {thr:.3g})" if isinstance(thr, (int, float)) else ""
        detail += f", layer {ev['layer']}" if ev.get("layer") is not None else ""
        out.append(line(f"   evidence: {what}{detail}"))
    return out
