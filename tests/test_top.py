"""`moe-monitor top` (issue #17, part 3): the pure core (exposition, flight record and captures -> view models
-> screen lines) on the golden exposition and hand-made scrapes, and the real thing: the command in a tmux
terminal of 80x24 against real `moe-monitor serve` processes fed by the plugin's segment writer, read back with
`tmux capture-pane` as a user would see it (docs/top.md)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import free_port
from rich.text import Text

from moe_monitor.channel import Ranks, SegmentWriter, Shape
from moe_monitor.demo import launch
from moe_monitor.plugin.steps import StepStats
from moe_monitor.schema.flight_record import FlightRecord, parse
from moe_monitor.top import core, render, rows, views
from moe_monitor.top.text import MONO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden.prom")
TOKEN = "top-token"  # the sidecars' API (flight record, captures) needs the bearer token; top sends it


def golden() -> core.Scrape:
    with open(GOLDEN) as f:
        return core.parse_metrics(f.read(), 1000.0)


# -- the pure core ---------------------------------------------------------------------------------------

def test_overview_and_layer_rows_from_the_golden_exposition():
    s = golden()
    o = core.overview(s)
    assert (o.model, o.layers, o.experts, o.top_k, o.window_s) == ("golden/tiny-moe", 4, 16, 2, 5.0)
    assert o.worst_layer == 5 and o.worst_ratio == pytest.approx(12.2211, abs=1e-4)
    assert o.detector_state == "warmup" and o.unobservable == 1 and o.segments["unreadable"] == 1
    layers = core.layer_rows(s)
    assert [r.layer for r in layers] == [1, 3, 5, 7]
    r5 = layers[2]
    assert r5.imbalance == pytest.approx(12.2211, abs=1e-4) and r5.ep_imbalance == pytest.approx(3.2072, abs=1e-4)
    assert r5.routed == 5318 and r5.hot == 1 and r5.top1_share == pytest.approx(0.7638, abs=1e-4)
    assert not layers[3].observable and layers[3].imbalance is None  # NaN in the exposition: no figure
    assert [r.layer for r in rows.select(core.layer_rows(s), sort=("imbalance", True))] == [5, 1, 3, 7]


def expo(decode: dict[str, list[int]], sums: dict[str, float], end: float, ep: list[int] | None = None) -> str:
    """A small exposition: decode step histograms per tokens_le (cumulative counts at LES), and EP counters."""
    out = ["# TYPE moe_window_end_timestamp_seconds gauge", f"moe_window_end_timestamp_seconds {end}",
           "# TYPE moe_step_duration_seconds histogram"]
    for tokens, cumulative in decode.items():
        for le, c in zip(LES, cumulative):
            out.append(f'moe_step_duration_seconds_bucket{{phase="decode",tokens_le="{tokens}",le="{le}"}} {c}')
        out.append(f'moe_step_duration_seconds_sum{{phase="decode",tokens_le="{tokens}"}} {sums[tokens]}')
        out.append(f'moe_step_duration_seconds_count{{phase="decode",tokens_le="{tokens}"}} {cumulative[-1]}')
    if ep is not None:
        out.append("# TYPE moe_ep_rank_routed_tokens_total counter")
        out += [f'moe_ep_rank_routed_tokens_total{{layer="0",ep_rank="{r}"}} {v}' for r, v in enumerate(ep)]
    return "\n".join(out) + "\n"


LES = ("0.0025", "0.005", "0.01", "0.025", "0.05", "+Inf")


def test_step_percentiles_come_from_the_difference_of_two_scrapes():
    first = expo({"8": [0, 10, 20, 20, 20, 20]}, {"8": 0.1}, end=100.0)
    # 5 s later: 50 more steps of <= 8 tokens (20 in (2.5, 5] ms, 20 in (5, 10] ms, 10 in (25, 50] ms), and 10
    # new steps of <= 32 tokens slower than the largest bound (their series was absent before: 0 then)
    second = expo({"8": [0, 30, 60, 60, 70, 70], "32": [0, 0, 0, 0, 0, 10]}, {"8": 0.6, "32": 1.0}, end=105.0)
    h = core.History()
    assert h.add(core.parse_metrics(first, 1.0))
    v = core.steps_view(h)
    assert not v.rows and v.note.startswith("collecting")
    assert h.add(core.parse_metrics(second, 3.0)) and h.interval_s() == 5.0  # the window ends, not the clock
    v = core.steps_view(h)
    total, bucket8, bucket32 = v.rows
    assert (bucket8.phase, bucket8.tokens_le, bucket8.steps, bucket8.per_second) == ("decode", "8", 50, 10.0)
    assert bucket8.mean_s == pytest.approx(0.5 / 50)
    # PromQL's interpolation: p50 = rank 25 in (5, 10] ms with 20 below; p90/p99 in (25, 50] ms with 40 below
    assert [q for q, _ in bucket8.quantiles] == pytest.approx([0.005 + 0.005 * 5 / 20, 0.025 + 0.025 * 5 / 10,
                                                                0.025 + 0.025 * 9.5 / 10])
    assert bucket32.quantiles[0] == (0.05, True)  # in the +Inf bucket: the highest finite bound, marked ">"
    assert (total.tokens_le, total.steps, total.per_second) == (None, 60, 12.0)
    assert total.quantiles[0][0] == pytest.approx(0.005 + 0.005 * 10 / 20)  # rank 30 over both buckets
    assert not h.add(core.parse_metrics(second, 4.0))  # the same exposition again is not a new interval
    assert core.steps_view(h).rows == v.rows
    h.add(core.parse_metrics(first.replace("100.0", "110.0"), 5.0))  # counters went down: a restart
    assert "reset" in core.steps_view(h).note
    text = render.screen([state_with(h)], render.Ui(view="steps", colour=False), 80, 24, 10.0).plain
    assert "collecting" in text


def test_histogram_quantile_edge_cases():
    assert core.histogram_quantile(0.5, []) == (None, False)
    assert core.histogram_quantile(0.5, [(1.0, 0), (float("inf"), 0)]) == (None, False)
    assert core.histogram_quantile(0.5, [(1.0, 4), (2.0, 8), (float("inf"), 8)]) == (1.0, False)  # on a bound
    assert core.histogram_quantile(0.5, [(1.0, 0), (2.0, 0), (float("inf"), 4)]) == (2.0, True)
    assert core.histogram_quantile(0.25, [(1.0, 4), (float("inf"), 4)]) == (0.25, False)  # from 0 up


def state_with(history: core.History, flight=None, error=None, at: float = 1.0) -> core.SidecarState:
    """A sidecar's state that last answered (with a new exposition) at `at`."""
    s = core.SidecarState("http://sidecar:9464", history=history, flight=flight, last_ok=at, changed_at=at)
    s.error, s.unreachable = error, error is not None
    return s


def flight_doc(windows: list[list[list[int]]], rank_load=None, layers=None) -> FlightRecord:
    """A flight record as top reads it from /api/flight (its JSON, parsed)."""
    experts = len(windows[0][0])
    return parse(json.dumps({
        "format": "moe-monitor-flight/1", "model": "m", "layer_ids": layers or list(range(len(windows[0]))),
        "experts": experts, "ep_ranks": 0 if rank_load is None else len(rank_load[0]),
        "windows": [{"start": 100.0 + 5 * i, "end": 105.0 + 5 * i, "counts": c, "rank_load": rank_load}
                    for i, c in enumerate(windows)]}).encode())


def test_ep_rank_load_over_the_last_interval_then_its_fallbacks():
    h = core.History()
    flight = flight_doc([[[1, 1]]], rank_load=[[30.0, 10.0]])
    h.add(core.parse_metrics(expo({}, {}, 100.0, ep=[100, 100, 100, 100]), 1.0))
    v = core.ranks_view(h, flight)  # one exposition: the flight recorder's newest window stands in
    assert v.source.startswith("flight") and [r.share for r in v.ranks] == [0.75, 0.25]
    h.add(core.parse_metrics(expo({}, {}, 105.0, ep=[160, 120, 120, 100]), 2.0))
    v = core.ranks_view(h, flight)
    assert v.source == "last interval" and [r.load for r in v.ranks] == [60, 20, 20, 0]
    assert [r.ratio for r in v.ranks] == pytest.approx([2.4, 0.8, 0.8, 0.0])
    h2 = core.History()
    h2.add(golden())
    v = core.ranks_view(h2)
    assert not v.ranks and v.note.startswith("collecting") and v.layers[2] == (5, pytest.approx(3.2072, abs=1e-4))
    assert v.balancedness_vllm == pytest.approx(0.3942, abs=1e-4)
    h3 = core.History()
    h3.add(core.parse_metrics("moe_layer_ep_rank_imbalance_ratio{layer=\"0\"} 1.5\n", 0))
    assert "--no-rank-series" in core.ranks_view(h3).note


def test_detector_and_capture_views():
    s = golden()
    d = core.detector_view(s)
    assert d.state == "warmup"
    assert [(x.signal, x.phase, x.tokens_le) for x in d.signals] == [("worst_layer_imbalance_ratio", "", ""),
                                                                     ("step_time", "decode", "8")]
    assert d.signals[1].current == pytest.approx(0.0095) and d.signals[1].baseline is None
    text = ("moe_capture_info{capture=\"c1\",ranks=\"2\"} 1\nmoe_capture_share{category=\"gate\"} 0.2\n"
            "moe_capture_share{category=\"experts\"} 0.7\nmoe_capture_device_seconds{category=\"experts\"} 0.007\n"
            "moe_captures_total{reason=\"imbalance\",outcome=\"ok\"} 2\n"
            "moe_captures_total{reason=\"manual\",outcome=\"ok\"} 1\nmoe_capture_in_progress 0\n"
            "moe_capture_ep_wait_seconds{rank=\"dp0-pp0-tp0-ep0\"} 0\n"
            "moe_capture_ep_wait_seconds{rank=\"dp0-pp0-tp1-ep1\"} 0.00616\n"
            "moe_capture_ep_wait_caused_share{rank=\"dp0-pp0-tp0-ep0\"} 1\n"
            "moe_capture_ep_wait_caused_share{rank=\"dp0-pp0-tp1-ep1\"} 0\n")
    newest = {"id": "20261130T053301Z-imbalance-cca5f8", "reason": "imbalance", "outcome": "ok", "created": 5.0,
              "files": [{}], "evidence": {"signal": "worst_layer_imbalance_ratio", "current": 6.1, "layer": 30}}
    c = core.capture_view(core.parse_metrics(text, 0), [newest, {"id": "older"}])
    assert c.newest["id"] == newest["id"] and c.outcomes == {"ok": 3} and c.analysed == "c1"
    assert [x[0] for x in c.shares] == ["experts", "gate"] and c.shares[0][2] == 0.007
    screen = views.detector_page(d, c, MONO, 10.0)
    lines = [t.plain for t in screen.head + screen.rows]
    assert "[warmup]" in lines[0] and any("evidence: worst_layer_imbalance_ratio 6.1, layer 30" in x for x in lines)
    assert c.ep_wait[0] == ("dp0-pp0-tp0-ep0", 0.0, 1.0)  # the rank the others waited for comes first
    waits = [x for x in lines if "dp0-pp0-tp" in x]
    assert len(waits) == 2 and "100.0 %" in waits[0] and "6.16 ms" in waits[1], waits
    assert core.capture_view(s, None, "captures are not configured").captures_note == "captures are not configured"
    assert core.capture_view(s, []).captures_note == "no captures yet"


def test_heat_map_levels_folding_and_sums():
    levels = [core.heat_level(x) for x in (0, 0.49, 0.5, 1.0, 1.1, 1.11, 1.49, 1.5, 1.9, 50)]
    assert [core.HEAT_LEVELS[x] for x in levels] == ["cold", "cold", "even", "even", "even", "warm", "warm", "hot",
                                                     "hot", "hot"]
    # layer 0 over both windows: mean 10 -> ratios 0, 0.5, 1, 2, 4, 0.5, 0, 0; layer 1 routed nothing
    doc = flight_doc([[[0, 5, 10, 20, 30, 5, 0, 0], [0] * 8], [[0, 0, 0, 0, 10, 0, 0, 0], [0] * 8]])
    hm = core.heat_map(doc, columns=80, windows=2)
    assert (hm.fold, hm.columns, hm.windows, hm.start, hm.end) == (1, 8, 2, 100.0, 110.0)
    assert hm.rows[0].ratios == pytest.approx((0, 0.5, 1, 2, 4, 0.5, 0, 0)) and hm.rows[0].hot_expert == 4
    assert hm.rows[0].cells == (0, 1, 1, 3, 3, 1, 0, 0)
    assert hm.rows[0].max_ratio == pytest.approx(4.0) and hm.rows[1].cells == () and hm.rows[1].routed == 0
    newest = core.heat_map(doc, columns=80, windows=1)
    assert newest.windows == 1 and newest.rows[0].cells == (0, 0, 0, 0, 3, 0, 0, 0)
    folded = core.heat_map(doc, columns=3, windows=2)  # 8 experts in 3 columns: 3 per column, the max of them
    assert (folded.fold, folded.columns) == (3, 3) and folded.rows[0].ratios == pytest.approx((1, 4, 0))
    assert core.heat_map(FlightRecord((0,), 8, ()), 10).note.startswith("no closed window")


def no_colour_in(text: Text) -> bool:
    from rich.style import Style

    return all(Style.parse(str(s.style)).color is None and Style.parse(str(s.style)).bgcolor is None
               for s in text.spans if s.style)


def test_the_whole_screen_at_80x24_with_and_without_colour():
    h = core.History()
    h.add(golden())
    counts = [[10] * 16, [10] * 16, [10] * 15 + [200], [0] * 16]
    state = state_with(h, flight_doc([counts], layers=[1, 3, 5, 7]), at=1999.0)
    for colour in (True, False):
        ui = render.Ui(colour=colour)
        for view in render.VIEW_NAMES:
            ui.view = view
            text = render.screen([state], ui, 80, 24, 2000.0)
            lines = text.plain.split("\n")
            assert len(lines) == 24 and max(map(len, lines)) <= 80, view
            assert no_colour_in(text) != colour, (view, colour)
    ui = render.Ui(view="heat", colour=False)
    lines = render.screen([state], ui, 80, 24, 2000.0).plain.split("\n")
    row = next(x for x in lines if x.startswith("L5 "))
    assert row == "L5 " + " 0.5" * 15 + "*9.1" + "   e15 9.1x"  # a number per expert at 80 columns, hot marked
    assert "L7 no assignments" in "\n".join(lines) and any("[*1.9]>=1.5" in x for x in lines)
    wide = state_with(h, flight_doc([[[1] * 200, [1] * 199 + [400]]], layers=[0, 1]), at=1999.0)
    lines = render.screen([wide], ui, 80, 24, 2000.0).plain.split("\n")
    assert "200 experts, 4 per column (max)" in lines[3]
    assert lines[5].split()[1] == "░" * 50  # one character a column: 0.5-1.1 of the mean
    assert lines[6].startswith("L1 ") and lines[6][3:53].strip() == "█"  # only expert 199 (hot), in the last
    assert lines[6][52] == "█"  # column; its layer's others are cold (< 0.5 of the mean): blank
    gone = state_with(h, error="cannot reach http://sidecar:9464: connection refused")
    gone.last_ok = 1990.0
    text = render.screen([gone, state], render.Ui(colour=False), 80, 24, 2000.0).plain
    lines = text.split("\n")
    assert "UNREACHABLE" in lines[0] and "[1/2]" in lines[0] and "updated" not in lines[0]
    assert lines[3].startswith(" UNREACHABLE: cannot reach") and len(lines) == 24
    assert "UNREACHABLE: cannot reach http://sidecar:9464: connection refused retrying every 5 s; " \
           "showing the figures of " in flat(text) and "(10 s ago)" in text
    nofr = state_with(h, at=1999.0)
    nofr.flight_error = "this sidecar has no flight recorder: /api/flight answered 404 (off)"
    text = render.screen([nofr], render.Ui(view="heat", colour=False), 80, 24, 2000.0).plain
    assert "No heat map: this sidecar has no flight recorder" in text


def test_layers_scroll_by_page_and_clamp():
    lines = ["moe_window_end_timestamp_seconds 10", "# TYPE moe_layer_imbalance_ratio gauge"] + [
        f'moe_layer_imbalance_ratio{{layer="{i}"}} 1.5' for i in range(61)]
    h = core.History()
    h.add(core.parse_metrics("\n".join(lines) + "\n", 0))
    ui = render.Ui(colour=False)
    first = render.screen([state_with(h)], ui, 80, 24, 0).plain
    assert "layers 1-18 of 61" in first and ui.page == 18
    ui.scroll(10 * ui.page)
    last = render.screen([state_with(h)], ui, 80, 24, 0).plain
    assert "layers 44-61 of 61" in last and ui.offsets["layers"] == 43


def test_the_filter_picks_layers_experts_ranks_figures_and_words():
    f = rows.RowFilter.parse
    layers = core.layer_rows(golden())  # layers 1, 3, 5, 7 with max/mean 1.59, 1.25, 12.2, — (unobservable)

    def shown(text, of=layers):
        return [rows.describe(r)[0][""] for r in rows.select(of, f(text))]

    assert shown("") == [1, 3, 5, 7] and not f("  ")
    assert shown("5") == [5] and shown("L5") == [5] and shown("l3, 7") == [3, 7] and shown("2-5") == [3, 5]
    assert shown(">1.5") == [1, 5] and shown("> 2x") == [5] and shown("<=1.3") == [3] and shown(">=0") == [1, 3, 5]
    assert shown("1-5 >1.5") == [1, 5] and shown("13") == [] and shown("decode") == shown("e5") == [1, 3, 5, 7]
    heat = core.heat_map(flight_doc([[[1, 9], [5, 5], [9, 1]]], layers=[0, 1, 2]), 80).rows
    assert [r.layer for r in rows.select(heat, f("e1"))] == [0] and [r.layer for r in rows.select(heat, f("e0 1"))] == [
        1, 2]
    ranks = [core.RankLoad(r, 10.0 * (r + 1), 0.1, 0.5 * (r + 1)) for r in range(4)]
    assert [r.rank for r in rows.select(ranks, f("r2"))] == [2] and [r.rank for r in rows.select(ranks, f(">1"))] == [
        2, 3]
    steps = [core.StepRow("decode", None, 1, 1, 0.1, ()), core.StepRow("prefill", "8", 1, 1, 0.1, ())]
    assert [r.phase for r in rows.select(steps, f("pre"))] == ["prefill"] and rows.select(steps, f("≤8")) == steps[1:]
    assert rows.select(steps, f("3 >2")) == steps and rows.select(ranks, f("3 decode")) == ranks  # not theirs


def test_sort_columns_with_an_indicator_in_the_header():
    layers = core.layer_rows(golden())
    assert [r.layer for r in rows.sort_rows(layers, "imbalance", True)] == [5, 1, 3, 7]  # no figure: last
    assert [r.layer for r in rows.sort_rows(layers, "imbalance", False)] == [3, 1, 5, 7]
    ui = render.Ui(colour=False)
    assert ui.sort() == ("layer", False)
    ui.cycle_sort()
    assert ui.sort() == ("routed", True)  # figures sort worst first, ids ascending
    ui.reverse_sort()
    assert ui.sort() == ("routed", False)
    ui.sort_by("imbalance")
    assert ui.sort() == ("imbalance", True)
    ui.sort_by("imbalance")  # a second click on the same header: the other way round
    assert ui.sort() == ("imbalance", False)
    ui.toggle_worst()
    assert ui.sort() == ("imbalance", True)
    ui.toggle_worst()
    assert ui.sort() == ("layer", False)
    h = core.History()
    h.add(golden())
    ui.sort_by("imbalance")
    lines = render.screen([state_with(h, at=1999.0)], ui, 80, 24, 2000.0).plain.split("\n")
    assert re.match(r"^\s+layer\s+routed\s+max/mean▼\s+cv", lines[3]), lines[3]
    assert [int(x.split()[0]) for x in lines[4:8]] == [5, 1, 3, 7]
    ui.set_filter(">1.5")
    lines = render.screen([state_with(h, at=1999.0)], ui, 80, 24, 2000.0).plain.split("\n")
    assert [int(x.split()[0]) for x in lines[4:6]] == [5, 1] and " filter “>1.5”: 2 of 4 layers" in lines
    ui.view = "heat"  # the heat map sorts by layer or hottest expert, and says which in its head line
    ui.sort_by("max_ratio")
    state = state_with(h, flight_doc([[[10] * 16, [10] * 15 + [19], [10] * 15 + [200], [0] * 16]],
                                     layers=[1, 3, 5, 7]), at=1999.0)
    text = render.screen([state], ui, 80, 24, 2000.0).plain
    assert "; hottest first ▼" in text and [x[:3] for x in text.split("\n") if x[:1] == "L"] == ["L5 ", "L3 "]


def test_hot_cells_stand_out_and_read_without_colour():
    """Defect (issue #26, 9): 1.0x and 1.9x of the mean looked the same. Now each cell is its multiple of the
    layer mean, marked + (1.1-1.5) or * (>= 1.5), and coloured by level: dim, yellow, bold red."""
    h = core.History()
    h.add(golden())
    counts = [[10] * 16, [91] * 12 + [94, 94, 130, 190], [2] * 15 + [200], [0] * 16]  # L3: mean 100, 1.3x, 1.9x
    state = state_with(h, flight_doc([counts], layers=[1, 3, 5, 7]), at=1999.0)
    for colour in (True, False):
        ui = render.Ui(view="heat", colour=colour)
        text = render.screen([state], ui, 80, 24, 2000.0)
        row = next(i for i, x in enumerate(text.plain.split("\n")) if x.startswith("L3 "))
        line_ = text.split("\n")[row]
        assert line_.plain.startswith("L3  0.9") and line_.plain.endswith(" 0.9+1.3*1.9   e15 1.9x")
        styles = {line_.plain[s.start:s.end]: str(s.style) for s in line_.spans}
        assert (styles.get(" 0.9"), styles.get("+1.3"), styles["*1.9"]) == (
            ("dim", "yellow", "bold red") if colour else (None, None, "bold"))


def test_idle_stale_and_no_data_are_not_shown_as_healthy():
    """An idle sidecar says so instead of tables of zeros; a stale or unreachable one never says 'updated'."""
    def expo_at(end: float, routed: int) -> str:
        return (f"moe_window_length_seconds 5\nmoe_window_end_timestamp_seconds {end}\n"
                f"moe_window_routed_tokens {routed}\nmoe_layer_window_routed_tokens{{layer=\"0\"}} {routed}\n"
                'moe_monitor_segments{state="fresh"} 1\n')

    state = core.SidecarState("http://sidecar")
    assert core.health(state, 0, 5).state == "connecting"
    state.apply(core.Fetched(100.0, metrics=expo_at(100.0, 640)))
    assert core.health(state, 101.0, 5) == core.Health("ok")
    for end in (105.0, 110.0, 115.0):  # three windows that routed nothing
        state.apply(core.Fetched(end, metrics=expo_at(end, 0)))
    assert core.health(state, 116.0, 5) == core.Health("idle", "idle: no tokens routed in the last 15 s")
    ui = render.Ui(colour=False)
    text = render.screen([state], ui, 80, 24, 116.0).plain
    lines = text.split("\n")
    assert "IDLE  updated" in lines[0] and lines[3] == " idle: no tokens routed in the last 15 s"
    assert "routed" not in "\n".join(lines[4:]) and "max/mean" not in text  # no table of zeros
    state.apply(core.Fetched(120.0, metrics=expo_at(120.0, 5)))
    assert core.health(state, 121.0, 5).state == "ok" and state.idle_since is None
    state.apply(core.Fetched(126.0, metrics=expo_at(120.0, 5)))  # the same window again, and again ...
    assert core.health(state, 134.0, 5).state == "ok"
    stale = core.health(state, 136.0, 5)  # 16 s > 3 windows of 5 s: the sidecar's window loop is stuck
    assert stale.state == "stale" and stale.message.startswith("STALE: the sidecar has served the same window for "
                                                               "16 s")
    text = render.screen([state], ui, 80, 24, 136.0).plain
    assert text.split("\n")[0].endswith("STALE ") and "updated" not in text.split("\n")[0]
    state.apply(core.Fetched(137.0, error="cannot reach http://sidecar: connection refused", unreachable=True))
    assert core.health(state, 137.0, 5).state == "unreachable"
    assert "updated" not in render.screen([state], ui, 80, 24, 137.0).plain.split("\n")[0]
    empty = core.SidecarState("http://sidecar")
    empty.apply(core.Fetched(1.0, metrics="moe_window_length_seconds 5\n"))  # no window closed yet
    assert core.health(empty, 2.0, 5).state == "no data"
    assert "NO DATA" in render.screen([empty], ui, 80, 24, 2.0).plain.split("\n")[0]


def test_paused_says_so_and_ages_nothing():
    h = core.History()
    h.add(golden())
    state = state_with(h, at=1000.0)
    ui = render.Ui(colour=False, paused_at=1001.0)
    lines = render.screen([state], ui, 80, 24, 2000.0).plain.split("\n")  # long after: not stale while paused
    assert lines[0].endswith("PAUSED  as of " + render.clock(1000.0) + " ")
    assert lines[3].startswith(" PAUSED: the figures of ") and "p or Space resumes" in lines[3]
    assert "STALE" not in "\n".join(lines)


def test_the_client_sends_the_token_and_turns_every_failure_into_a_reason():
    """fetch() against a stand-in HTTP server: the Bearer token, a 404 flight recorder, captures not configured,
    a 503 /metrics and a port nobody listens on all come back as one-line reasons, never exceptions."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from moe_monitor.top.client import fetch, normalise_url

    seen = []

    async def metrics(request):
        seen.append(request.headers.get("Authorization"))
        if len(seen) > 1:
            return web.Response(status=503, text="no exposition yet: the first window failed\n")
        return web.Response(text="moe_window_length_seconds 5.0\n")

    async def flight(request):
        return web.json_response({"error": "the flight recorder is off"}, status=404)

    async def captures(request):
        return web.json_response({"error": "captures are not configured"}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/flight", flight)
    app.router.add_get("/api/captures", captures)

    async def run():
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                url = normalise_url(f"127.0.0.1:{port}/")
                ok = await fetch(session, url, "secret", flight_windows=3, captures=True)
                down = await fetch(session, url, None, flight_windows=3)
                wrong = await fetch(session, url + "/moe", None)
                gone = await fetch(session, f"http://127.0.0.1:{free_port()}", None, flight_windows=1)
                return url, ok, down, wrong, gone
        finally:
            await runner.cleanup()

    url, ok, down, wrong, gone = asyncio.run(run())
    assert url.startswith("http://127.0.0.1:") and not url.endswith("/") and seen == ["Bearer secret", None]
    assert ok.error is None and ok.metrics.startswith("moe_window_length_seconds") and ok.flight is None
    assert ok.flight_error.startswith("this sidecar has no flight recorder: /api/flight answered 404 (the flight "
                                      "recorder is off)")
    assert ok.captures_error.startswith("captures are not configured on this sidecar")
    state = core.SidecarState(url)
    state.apply(ok)
    assert state.interval_s(None) == 5.0 and state.interval_s(0.5) == 0.5 and state.last_ok == ok.at
    assert "/metrics answered 503: no exposition yet" in down.error and not down.asked_flight
    assert "/moe/metrics answered 404: 404: Not Found (is --url the sidecar's base URL" in wrong.error
    assert not wrong.unreachable
    assert gone.unreachable and gone.error.endswith(": connection refused") and not gone.asked_flight
    state.apply(gone)
    assert state.error == gone.error and state.last_ok == ok.at and state.history.current is not None


ESCAPES = "\x1b[2J\x1b]0;pwned\x07"


def exposition(series: int) -> str:
    """A valid exposition of `series` per-expert samples (~70 bytes each)."""
    rows = [f'moe_expert_routed_tokens_total{{model="m",layer="{i // 256}",expert="{i % 256}"}} {i}'
            for i in range(series)]
    return "# TYPE moe_expert_routed_tokens_total counter\n" + "\n".join(rows) + "\n"


def test_a_500_mib_exposition_is_refused_in_bounded_memory_and_time():
    """Defect (issue #24, 8): top read a 500 MiB /metrics whole and parsed it (3.1 GB). Now every body has a cap
    (/metrics 16 MiB), and the fetch error says so; the poll as app.py runs it (fetch, then apply)."""
    from hostile_server import HostileServer, huge, run_measured

    server = HostileServer().on("/metrics", huge(500 << 20, head=b"# HELP x y\n", fill=b"\n"))
    poll = ("import asyncio, sys, aiohttp\n"
            "from moe_monitor.top import client, core\n"
            "async def main():\n"
            "    async with aiohttp.ClientSession() as session:\n"
            "        state = core.SidecarState(sys.argv[1])\n"
            "        state.apply(await client.fetch(session, sys.argv[1], timeout=60))\n"
            "        print(state.error)\n"
            "asyncio.run(main())\n")
    try:
        code, out, err, rss, _ = run_measured([sys.executable, "-c", poll, server.url], kill_after=120)
    finally:
        server.close()
    assert code == 0 and "the answer exceeds 16 MiB" in out, (code, out, err[-2000:])
    assert rss < 400, f"peak RSS {rss:.0f} MB"


@pytest.mark.slow
def test_the_deadline_covers_the_body_of_a_sidecar_that_drips():
    """Headers at once, then a byte every 2 s: the 2 s deadline ends the poll (it covers the body's read)."""
    import asyncio

    import aiohttp
    from hostile_server import HostileServer, drip

    from moe_monitor.top.client import fetch

    server = HostileServer().on("/metrics", drip(b"# HELP x y\n"))

    async def poll():
        async with aiohttp.ClientSession() as session:
            return await fetch(session, server.url, timeout=2)

    start = time.monotonic()
    try:
        fetched = asyncio.run(poll())
    finally:
        server.close()
    assert fetched.error.endswith("no answer within 2 s") and time.monotonic() - start < 30


POLL_WITH_TICKER = """
import asyncio, sys, time, aiohttp
from moe_monitor.top import client, core

async def main():
    stall, done = [0.0], asyncio.Event()

    async def ticker():
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            stall[0], last = max(stall[0], now - last), now

    tick = asyncio.create_task(ticker())
    async with aiohttp.ClientSession() as session:
        state, start = core.SidecarState(sys.argv[1]), time.monotonic()
        state.apply(await client.fetch(session, sys.argv[1], timeout=60))  # one poll, as app.py runs it
        took = time.monotonic() - start
    done.set()
    await tick
    print(state.error, len(state.history.current.series("moe_expert_routed_tokens_total")), stall[0], took)

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_big_exposition_is_parsed_off_the_event_loop():
    """Defect (issue #24, 8): the keys were dead while a big exposition loaded: it was parsed on the event loop
    that also handles the keyboard. A ticker on the loop (in a process of its own, like top) measures the
    loop's longest stall during one poll: before, the whole parse; now a fraction of it."""
    from hostile_server import HostileServer, raw_answer

    body = exposition(160_000).encode()  # ~11 MiB, seconds of parsing
    server = HostileServer().on("/metrics", raw_answer(body, headers={"Content-Type": "text/plain"}))
    try:
        done = subprocess.run([sys.executable, "-c", POLL_WITH_TICKER, server.url], capture_output=True, text=True,
                              timeout=300)
    finally:
        server.close()
    error, series, stall, took = done.stdout.split()
    stall, took = float(stall), float(took)
    print(f"longest stall of the event loop {stall:.3f} s during a {took:.2f} s poll")
    assert error == "None" and series == "160000", done.stderr[-2000:]
    assert took > 1.5 and stall < 0.5 * took, f"the loop stalled {stall:.2f} s of a {took:.2f} s poll"


def test_server_strings_are_shown_with_their_escape_sequences_visible():
    """Defect (issue #24, 9): a capture's reason, id, outcome and evidence, and label values of the exposition,
    reached the terminal raw (an escape sequence clears the screen or retitles the window)."""
    state = core.SidecarState("http://sidecar")
    text = (f'moe_model_info{{model="{ESCAPES}",moe_layers="1",experts="2",top_k="1"}} 1\n'
            "moe_window_length_seconds 5\n")
    state.apply(core.Fetched(1.0, metrics=text, asked_captures=True, captures=[
        {"id": "c\x1b[1m", "reason": ESCAPES, "outcome": "ok\x9b31m", "created": 1.0, "files": [],
         "evidence": {"signal": "s\x07", "current": 2.0}}]))
    state.error = "cannot reach: \x1b]0;pwned\x07"
    ui = render.Ui(colour=False)
    for view in ("layers", "detector"):
        ui.view = view
        shown = render.screen([state], ui, 200, 40, 2.0).plain
        assert not any(c in shown for c in "\x1b\x07\x9b"), repr(shown)
        assert "\\x1b]0;pwned\\x07" in shown
    assert "\\x1b[2J\\x1b]0;pwned\\x07" in shown and "ok\\x9b31m" in shown


def test_log_records_are_held_while_the_view_runs_and_written_after():
    import logging

    from moe_monitor.top import _logs_held

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with _logs_held():
            logging.getLogger("moe_monitor.somewhere").warning("over the screen")
            assert seen == [] and handler not in root.handlers
        assert [r.getMessage() for r in seen] == ["over the screen"] and handler in root.handlers
    finally:
        root.removeHandler(handler)


@pytest.mark.slow
def test_top_needs_a_terminal_and_names_its_extra_when_textual_is_missing():
    r = subprocess.run([sys.executable, "-m", "moe_monitor.top", "--url", "127.0.0.1:1"], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 2 and "needs an interactive terminal" in r.stderr and "Traceback" not in r.stderr
    blocked = ("import importlib.abc, sys\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'textual':\n"
               "            raise ImportError('No module named textual')\n"
               "sys.meta_path.insert(0, Block())\n"
               "from moe_monitor.top import core\n"  # the pure core does not need it
               "from moe_monitor.top.__main__ import top\n"
               "top(['--url', '127.0.0.1:1'])\n")
    r = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "pip install 'moe-monitor[top]'" in r.stderr and "Traceback" not in r.stderr


# -- a real terminal against real sidecars ---------------------------------------------------------------

L, E, HOT = 24, 16, ((3, 5, 600), (20, 11, 300))  # layers, experts, (layer, expert, extra per tick)


class Feeder:
    """The plugin's segment writer publishing every 0.25 s: every expert +20, the hot experts more, and the
    same mix of engine steps each tick (decode: 10 x 4 ms, 8 x 8 ms, 2 x 40 ms; prefill: 2 x 200 ms), so every
    interval's step percentiles are known: decode p50 5 ms, p90 10 ms, p99 47.5 ms; prefill p50 175 ms."""

    def __init__(self, directory: str):
        self.steps = StepStats()
        self.writer = SegmentWriter(directory, "top/test", Ranks(world_size=4, ep_size=4),
                                    Shape(L, E, len(self.steps.token_bounds), len(self.steps.duration_bounds)), top_k=2)
        self.counts = np.zeros((L, E), dtype=np.int64)
        self.stop = threading.Event()
        self.publish()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def publish(self) -> None:
        arrays = self.steps.snapshot()
        arrays.update(counts=self.counts, layer_ids=np.arange(L, dtype=np.int32), layer_flags=np.ones(L, np.uint8))
        self.writer.publish(arrays)

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.counts += 20
            for layer, expert, extra in HOT:
                self.counts[layer, expert] += extra
            for seconds, n in ((0.004, 10), (0.008, 8), (0.04, 2)):
                for _ in range(n):
                    self.steps.record_step("decode", 4, seconds)
            for _ in range(2):
                self.steps.record_step("prefill", 300, 0.2)
            self.publish()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.writer.close()


@contextlib.contextmanager
def fed_sidecar(tmp, *args: str, ready: str = "/healthz"):
    """A real `moe-monitor serve` with 1 s windows fed by the plugin's segment writer (Feeder), captures through a
    stand-in for vLLM's profiler, the API behind TOKEN; `args` add to its flags."""
    from test_capture import FakeProfiler

    os.makedirs(tmp / "profiles")
    feeder = Feeder(str(tmp / "seg"))
    with FakeProfiler(str(tmp / "profiles")) as vllm:
        proc = launch.start_sidecar(str(tmp / "seg"), free_port(), str(tmp / "sidecar.log"), [
            "--window", "1", "--vllm-url", vllm.url, "--profile-dir", str(tmp / "profiles"),
            "--capture-dir", str(tmp / "store"), "--api-token", TOKEN, *args])
        try:
            proc.wait_ready(ready, 30)
            yield proc
        finally:
            proc.stop()
            feeder.close()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    """The detector fires on the hot expert after 2 + 2 windows and stores a real trace with its breakdown."""
    tmp = tmp_path_factory.mktemp("top")
    with fed_sidecar(tmp, "--warmup-windows", "2", "--consecutive-windows", "2") as proc:
        yield proc, tmp


def top_command() -> list[str]:
    """`moe-monitor top` once the CLI has it, else `python -m moe_monitor.top`."""
    from moe_monitor.cli import main

    if "top" in main.commands:
        script = os.path.join(os.path.dirname(sys.executable), "moe-monitor")
        return [script, "top"] if os.path.exists(script) else [sys.executable, "-m", "moe_monitor.cli", "top"]
    return [sys.executable, "-m", "moe_monitor.top"]


EXITED = "TOP-EXITED rc="
# an SGR escape that sets a colour (8/16, 256 or true colour; 39/49, the terminal's default colours, are none)
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9]+;)*(?:3[0-7]|4[0-7]|9[0-7]|10[0-7]|38|48)[;m]")


class Tmux:
    """One program in a private tmux server (its own socket) with an 80x24 window."""
    count = 0

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        if not shutil.which("tmux"):
            pytest.skip("tmux is not installed")
        Tmux.count += 1
        self.socket = f"moe-top-test-{os.getpid()}-{Tmux.count}"
        environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "MOE_MONITOR_URL", "TMUX")}
        environ.update({"MOE_MONITOR_API_TOKEN": TOKEN, **(env or {})})
        shell = f"{shlex.join(args)}; echo {EXITED}$?; sleep 120"
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-c", ROOT, shell, env=environ)
        self.path = self.tmux("display-message", "-p", "#{socket_path}").strip()

    def tmux(self, *args: str, env=None) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=10, env=env).stdout

    def screen(self, escapes: bool = False) -> str:
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []))

    def keys(self, *keys: str) -> None:
        for k in keys:
            self.tmux("send-keys", k)

    def wait(self, *texts: str, timeout: float = 15, pattern: str | None = None) -> str:
        """The screen once it shows every one of `texts` (and matches `pattern`); fails with the screen."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            matched = pattern is None or re.search(pattern, shown, re.M)
            if matched and all(t in shown or t in flat(shown) for t in texts):
                return shown
            assert "Traceback" not in shown, shown
            if time.monotonic() > deadline:
                raise AssertionError(f"waited {timeout} s for {texts} {pattern or ''}; the screen:\n{shown}")
            time.sleep(0.2)

    def quit(self) -> str:
        self.keys("q")
        shown = self.wait(EXITED)
        assert f"{EXITED}0" in shown and "Traceback" not in shown, shown
        return shown

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
        if self.path.endswith(self.socket) and os.path.exists(self.path):  # tmux leaves its socket file behind
            os.unlink(self.path)


def lines_of(screen: str) -> list[str]:
    return screen.split("\n")


def flat(screen: str) -> str:
    """The screen's text with its lines joined: a wrapped message reads as one."""
    return " ".join(x.strip() for x in screen.split("\n") if x.strip())


def heat_cell(screen: str, layer: int, expert: int) -> str:
    """The heat map's cell of expert `expert` in layer `layer`'s row: the 4 characters ending under its tick
    (its mark and load / mean, e.g. "*11", "+1.3", "1.0")."""
    lines = lines_of(screen)
    ticks = next(x for x in lines if re.match(r"^\s+0\s+1\s+2", x))
    end = {int(m.group()): m.end() for m in re.finditer(r"\d+", ticks)}[expert]
    row = next(x for x in lines if x.startswith(f"L{layer} ".rjust(4)))
    return row[end - 4:end].strip()


# the feeder's assignments per tick on each EP rank (4 experts of 16 each): 24 layers x 4 experts x 20, plus the hot
# expert of layer 3 (expert 5, rank 1: +600) and of layer 20 (expert 11, rank 2: +300)
PER_TICK = {0: 1920, 1: 2520, 2: 2220, 3: 1920}


def shown_count(text: str) -> tuple[float, float]:
    """A count as top prints it ("8880", "10.1k") and how far the print may be from the count."""
    return (float(text[:-1]) * 1000, 50.0) if text.endswith("k") else (float(text), 0.5)


def assert_rank_rows(shown: str) -> None:
    """The EP-rank rows of one interval: every rank's load is the same whole number of feeder ticks, and the shares
    and load/mean are exact. How many ticks one interval holds is the one thing not fixed: 4 in a 1 s window, but a
    window the loaded machine closed late (1.1 s) or whose read found the writer mid-publish holds 3, 5 or 8 (the
    clean-clone run once saw 20.2k = 8 ticks over "last interval (1.1 s)")."""
    row = re.compile(r"^\s+(\d)\s+(\d+(?:\.\d)?k?)\s+([\d.]+)%\s+([\d.]+)\s+█+$", re.M)
    rows = {int(m[1]): (m[2], m[3], m[4]) for m in row.finditer(shown)}
    assert sorted(rows) == [0, 1, 2, 3], shown
    value, slack = shown_count(rows[1][0])
    ticks = round(value / PER_TICK[1])
    assert ticks >= 1, shown
    for rank, (load, _, _) in rows.items():
        value, slack = shown_count(load)
        assert abs(value - ticks * PER_TICK[rank]) <= slack, (rank, ticks, shown)
    total = sum(PER_TICK.values())
    assert [rows[r][1] for r in range(4)] == [f"{100 * PER_TICK[r] / total:.1f}" for r in range(4)], shown
    assert [rows[r][2] for r in range(4)] == [f"{4 * PER_TICK[r] / total:.2f}" for r in range(4)], shown


@pytest.mark.slow
def test_top_in_an_80x24_terminal_against_a_real_sidecar(sidecar):
    proc, tmp = sidecar
    term = Tmux(top_command() + ["--url", proc.url])
    try:
        shown = term.wait("[1 Layers]", "layers 1-17 of 24", pattern=r"^\s+3\s+\d+\s+10\.78 █")
        assert "top/test  24x16 top-2  window 1s" in shown and "worst L3 10.78" in shown
        term.keys("PageDown")
        term.wait("layers 8-24 of 24", pattern=r"^\s+20\s+\d+\s+8\.26 ")
        term.keys("2")  # the heat map: expert 5 of layer 3 hot (marked *), the rest of its layer cold
        shown = term.wait("[2 Heat map]", "[*1.9]>=1.5", " L3 ")
        assert heat_cell(shown, 3, 5) == "*11" and heat_cell(shown, 3, 4) == "0.3" and heat_cell(shown, 0, 5) == "1.0"
        assert re.search(r"^ L3 .* e5 10\.8x$", shown, re.M) and "layers 1-16 of 24" in shown
        term.keys("PageDown")
        shown = term.wait("layers 9-24 of 24")
        assert heat_cell(shown, 20, 11) == "*8.3" and re.search(r"^L20 .* e11 8\.3x$", shown, re.M)
        term.keys("3")  # EP ranks: 4 x 4 experts; layer 3's hot expert 5 on rank 1, layer 20's expert 11 on rank 2
        shown = term.wait("[3 EP ranks]", "assignments served per EP rank, last interval")
        assert_rank_rows(shown)
        assert " L3 2.96  L20 2.45 " in shown
        term.keys("4")  # steps: the known mix of every tick, so every interval's percentiles are exact
        shown = term.wait("[4 Steps]", pattern=r"^ decode\s+all\s+\d+\s+[\d.]+\s+9\.2 ms\s+5 ms\s+10 ms\s+47\.5 ms$")
        assert re.search(r"^ prefill\s+all\s+\d+\s+[\d.]+\s+200 ms\s+175 ms\s+235 ms\s+248 ms$", shown, re.M), shown
        term.keys("5")  # the detector fired on layer 3 and a capture (a real trace) was stored and analysed
        shown = term.wait("[5 Detector+capture]", "kernel breakdown of ", "evidence: worst_layer_imbalance_ratio",
                          pattern=r"^   imbalance, ok, ", timeout=30)
        assert re.search(r"^ detector: .*\[(armed|cooldown)\]", shown, re.M) and re.search(r"^   experts\s+", shown,
                                                                                            re.M)
        with open(tmp / "screen-detector.txt", "w") as f:
            f.write(shown)
        term.keys("?")
        assert "n N   next / previous sidecar" in term.wait("Keys")
        term.keys("Escape")  # alone: Escape and a key at once read as Alt+key
        term.wait("[5 Detector+capture]")
        term.keys("2")
        shown = term.wait("[2 Heat map]", " L3 ")
        assert COLOUR_SGR.search(term.screen(escapes=True)), "no colour at all"
        with open(tmp / "screen-heat.txt", "w") as f:
            f.write(shown)
        term.quit()
    finally:
        term.close()


@pytest.mark.slow
def test_without_colour_the_heat_map_still_reads(sidecar):
    proc, _ = sidecar
    term = Tmux(top_command() + ["--url", proc.url], env={"NO_COLOR": "1"})
    try:
        term.keys("h")
        shown = term.wait("[2 Heat map]", " L3 ", "[ 0.4]<0.5 [ 1.0]0.5-1.1 [+1.3]1.1-1.5 [*1.9]>=1.5")
        assert heat_cell(shown, 3, 5) == "*11" and heat_cell(shown, 3, 6) == "0.3"  # hot by its mark, not colour
        raw = term.screen(escapes=True)
        assert "\x1b[7m" in raw  # the title and the active tab: reverse video, not colour
        assert not COLOUR_SGR.search(raw), raw
        term.quit()
    finally:
        term.close()


@pytest.mark.slow
def test_several_sidecars_one_without_flight_recorder_one_stopped_one_never_there(sidecar, tmp_path):
    """--url A --url B --url C: n switches; B runs without the flight recorder (404), then stops; C never ran.
    Neither ends the view or prints a traceback; both are retried."""
    proc, tmp = sidecar
    plain = launch.start_sidecar(str(tmp / "seg"), free_port(), str(tmp_path / "plain.log"),
                                 ["--window", "1", "--flight-minutes", "0", "--api-token", TOKEN])
    nobody = f"127.0.0.1:{free_port()}"
    term = None
    try:
        plain.wait_ready("/healthz", 20)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(plain.url + "/api/flight", timeout=5)
        term = Tmux(top_command() + ["--url", proc.url, "--url", plain.url, "--url", nobody, "--no-color",
                                     "--interval", "0.5"])
        term.wait("[1/3]", " L3 10.78")
        assert not COLOUR_SGR.search(term.screen(escapes=True))  # --no-color
        term.keys("2", "n")
        term.wait("[2/3]", "No heat map: this sidecar has no flight recorder: /api/flight answered 404",
                  "(--flight-minutes 0)")
        term.keys("1")
        term.wait("[1 Layers]", pattern=r"^\s+3\s+\d+\s+10\.78 ")
        plain.stop()  # the sidecar goes away under the view: its last figures stay, marked, and it is retried
        shown = term.wait(" UNREACHABLE: cannot reach " + plain.url + ": connection refused",
                          " retrying every 0.5 s; showing the figures of ")
        assert re.search(r"^\s+3\s+\d+\s+10\.78 ", shown, re.M) and "UNREACHABLE" in lines_of(shown)[0]
        term.keys("n")
        shown = term.wait("[3/3]", f" UNREACHABLE: cannot reach http://{nobody}: connection refused",
                          " retrying every 0.5 s; no figures yet")
        term.keys("n")
        term.wait("[1/3]", "updated ")
        term.quit()
    finally:
        if term is not None:
            term.close()
        plain.stop()


# -- --once: a plain snapshot, no terminal ---------------------------------------------------------------

def once(*args: str) -> subprocess.CompletedProcess:
    """`moe-monitor top --once ...` as `kubectl exec` without -t runs it: stdin and stdout not a terminal."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "MOE_MONITOR_URL", "COLUMNS")}
    environ["MOE_MONITOR_API_TOKEN"] = TOKEN
    return subprocess.run(top_command() + ["--once", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, env=environ)


def routing_seen(url: str, timeout: float = 20) -> None:
    """Returns once the sidecar at `url` has closed a window with the feeder's routing."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            if b'moe_worst_layer_imbalance_ratio{layer="3"}' in r.read():
                return
        assert time.monotonic() < deadline, "no window with routing"
        time.sleep(0.2)


@pytest.mark.slow
def test_once_prints_a_plain_snapshot_of_every_view(sidecar):
    proc, _ = sidecar
    routing_seen(proc.url)
    start = time.monotonic()
    r = once("--url", proc.url)
    took, out = time.monotonic() - start, r.stdout
    lines = out.rstrip("\n").split("\n")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "\x1b" not in out and max(map(len, lines)) <= 80 and "cut at 80 columns" not in out
    assert lines[0].startswith(f" moe-monitor top  {proc.url}") and re.search(r"updated \d\d:\d\d:\d\d$", lines[0])
    assert lines[1].startswith(" top/test  24x16 top-2  window 1s  worst L3 10.78")
    assert [x for x in lines if x.startswith("── ")] == [
        f"── {label} " + "─" * (75 - len(label)) for label in ("Layers", "Heat map", "EP ranks", "Steps",
                                                               "Detector+capture")]
    # every layer, nothing scrolled; the hot expert marked in the heat map
    assert len(re.findall(r"^\s+\d+\s+\d+\s+\d+\.\d\d ", out, re.M)) == 24 and "of 24" not in out
    assert re.search(r"^\s+3\s+\d+\s+10\.78 █+", out, re.M) and re.search(r"^\s+20\s+\d+\s+8\.26 ", out, re.M)
    assert heat_cell(out, 3, 5) == "*11" and heat_cell(out, 20, 11) == "*8.3" and heat_cell(out, 0, 5) == "1.0"
    # the interval figures: it waited for the next window's exposition (one window: 1 s here)
    assert "assignments served per EP rank, last interval (1.0 s)" in out
    assert re.search(r"^ decode\s+all\s+\d+\s+[\d.]+\s+9\.2 ms\s+5 ms\s+10 ms\s+47\.5 ms$", out, re.M), out
    assert re.search(r"^ detector: .*\[(warmup|armed|cooldown)\]", out, re.M) and took < 20
    r = once("--url", proc.url.removeprefix("http://"), "--filter", ">2")
    assert r.returncode == 0 and " filter “>2”: 2 of 24 layers" in r.stdout
    layers = re.findall(r"^\s+(\d+)\s+\d+\s+\d+\.\d\d ", r.stdout.split("── Heat map")[0], re.M)
    heat = re.findall(r"^\s*L(\d+) ", r.stdout.split("── Heat map")[1].split("── EP ranks")[0], re.M)
    assert layers == heat == ["3", "20"]


class StillFeeder(Feeder):
    """vLLM up but serving nothing: the segment is published, its counts never move."""

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.publish()


@pytest.mark.slow
def test_once_says_idle_and_unreachable_instead_of_tables_of_zeros(tmp_path):
    feeder = StillFeeder(str(tmp_path / "seg"))
    proc = launch.start_sidecar(str(tmp_path / "seg"), free_port(), str(tmp_path / "sidecar.log"),
                                ["--window", "1", "--api-token", TOKEN])
    nobody = f"127.0.0.1:{free_port()}"
    try:
        proc.wait_ready("/healthz", 20)
        deadline = time.monotonic() + 20
        while True:  # the first window closes a second after the start
            r = once("--url", proc.url, "--url", nobody)
            if "IDLE" in r.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        proc.stop()
        feeder.close()
    out = r.stdout
    assert r.returncode == 1 and "\x1b" not in out, (r.returncode, out, r.stderr)  # one sidecar not read: 1
    idle, gone = out.split(f"\n\n moe-monitor top  http://{nobody}")
    assert re.search(r"IDLE  updated \d\d:\d\d:\d\d$", idle.split("\n")[0])
    assert re.search(r"^ idle: no tokens routed in the last \d+ s$", idle, re.M), idle
    assert "── Layers" not in idle and "── EP ranks" not in idle and "max/mean" not in idle  # no zeros
    assert "idle: no tokens routed in the flight record's newest window" in idle
    assert "no engine steps in the last interval (idle)" in idle
    assert gone.split("\n")[0].endswith("UNREACHABLE") and "updated" not in gone
    assert f" UNREACHABLE: cannot reach http://{nobody}: connection refused\n no figures yet" in gone
