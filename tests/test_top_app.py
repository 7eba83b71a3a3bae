"""`moe-monitor top`'s Textual app driven by Textual's pilot (`App.run_test`, no terminal): the `/` filter in
its Input, sorting by a column (keys and a click on the header) with the ▲/▼ indicator in the DataTable's
header, pause, and the Footer listing the keys. The sidecar is a stand-in `fetch` whose every poll brings a new
window, so a test sees whether the figures move (tests/test_top.py runs the whole against real sidecars)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("textual")

from textual.widgets import Input, Static  # noqa: E402

from moe_monitor.top import core  # noqa: E402
from moe_monitor.top.app import RowTable, TopApp  # noqa: E402

IMBALANCE = {0: 1.5, 1: 3.0, 2: 1.1, 3: 2.2}  # layer -> max/mean


class FakeSidecar:
    """A sidecar of 4 layers x 8 experts with 1 s windows; each poll is the next window, in which layer 0 routed
    1000 + the poll's number of assignments."""

    def __init__(self) -> None:
        self.polls = 0

    def exposition(self) -> str:
        out = ['moe_model_info{model="fake/moe",moe_layers="4",experts="8",top_k="2"} 1',
               "moe_window_length_seconds 1", f"moe_window_end_timestamp_seconds {1000 + self.polls}",
               "moe_window_routed_tokens 4000"]
        for layer, ratio in IMBALANCE.items():
            routed = 1000 + self.polls if layer == 0 else 1000
            out += [f'moe_layer_window_routed_tokens{{layer="{layer}"}} {routed}',
                    f'moe_layer_imbalance_ratio{{layer="{layer}"}} {ratio}']
        return "\n".join(out) + "\n"

    async def fetch(self, session, url, token=None, flight_windows=None, captures=False, timeout=5.0):
        self.polls += 1
        at, text = time.time(), self.exposition()
        return core.Fetched(at, metrics=text, scrape=core.parse_metrics(text, at))


def drive(test, interval: float = 0.1):
    """Runs `test(app, pilot, sidecar)` in an 80x24 app polling the stand-in every `interval` seconds."""
    sidecar = FakeSidecar()
    app = TopApp(["http://sidecar:9464"], interval, colour=False, fetch=sidecar.fetch)

    async def main():
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(100):
                if app.states[0].last_ok:
                    break
                await pilot.pause(0.05)
            await pilot.pause(0.1)
            await test(app, pilot, sidecar)

    asyncio.run(main())


async def until(pilot, condition, timeout: float = 5.0) -> None:
    """Waits for `condition()` (a 2-core machine shared with other tests may be slow), then asserts it."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await pilot.pause(0.05)
    assert condition()


def shown(app) -> list[str]:
    """The layers in the DataTable, top to bottom."""
    return [row.key.value for row in app.query_one(RowTable).ordered_rows]


def header(app) -> list[str]:
    return [str(c.label).strip() for c in app.query_one(RowTable).ordered_columns if str(c.label).strip()]


def text(app, name: str) -> str:
    widget = app.query_one(f"#{name}", Static)
    return widget.content.plain if widget.display else ""


@pytest.mark.slow
def test_slash_filters_the_rows_and_esc_clears_it():
    async def test(app, pilot, _):
        assert shown(app) == ["L0", "L1", "L2", "L3"] and not app.query_one("#filterbar").display
        await pilot.press("slash")
        box = app.query_one("#filter", Input)
        assert app.query_one("#filterbar").display and app.focused is box
        await pilot.press(">", "2")  # layers whose max/mean exceeds 2
        await until(pilot, lambda: shown(app) == ["L1", "L3"])
        assert " filter “>2”: 2 of 4 layers" in text(app, "tail")
        await pilot.press("enter")  # the filter stays, shown; the keys are the app's again
        assert app.focused is None and app.query_one("#filterbar").display and box.value == ">2"
        await pilot.press("2")  # a view key works again: the heat map (no flight record here)
        assert app.ui.view == "heat"
        await pilot.press("1", "slash", "backspace", "backspace", "0", ",", "3")
        await until(pilot, lambda: shown(app) == ["L0", "L3"])
        await pilot.press("escape")
        await until(pilot, lambda: shown(app) == ["L0", "L1", "L2", "L3"])
        assert not app.query_one("#filterbar").display
        assert not app.ui.filter and "filter" not in text(app, "tail")

    drive(test)


def test_sort_by_column_with_keys_and_a_click_on_its_header():
    async def test(app, pilot, _):
        assert header(app)[0] == "layer▲"  # the default: by layer id, ascending
        await pilot.press("s")  # the next column, worst first
        assert header(app)[:2] == ["layer", "routed▼"] and shown(app)[0] == "L0"  # layer 0 routed the most
        await pilot.press("s")
        assert "max/mean▼" in header(app) and shown(app) == ["L1", "L3", "L0", "L2"]
        await pilot.press("S")  # the other way round
        assert "max/mean▲" in header(app) and shown(app) == ["L2", "L0", "L3", "L1"]
        await pilot.press("o")  # worst first
        assert shown(app) == ["L1", "L3", "L0", "L2"]
        await pilot.press("o")  # back to layer order
        assert header(app)[0] == "layer▲" and shown(app) == ["L0", "L1", "L2", "L3"]
        await pilot.click(RowTable, offset=(20, 0))  # the header of max/mean (columns 7 + 9 + 10 wide)
        assert "max/mean▼" in header(app) and shown(app) == ["L1", "L3", "L0", "L2"]
        await pilot.click(RowTable, offset=(20, 0))  # again: ascending
        assert "max/mean▲" in header(app) and shown(app) == ["L2", "L0", "L3", "L1"]
        await pilot.click(RowTable, offset=(3, 0))
        assert header(app)[0] == "layer▲" and shown(app) == ["L0", "L1", "L2", "L3"]

    drive(test)


def test_pause_keeps_the_figures_and_says_so():
    async def test(app, pilot, sidecar):
        table = app.query_one(RowTable)

        def routed_l0() -> str:
            return table.get_row("L0")[1].plain.strip()

        assert "PAUSED" not in text(app, "frame")
        await pilot.press("p")
        polls, routed = sidecar.polls, routed_l0()
        frame = text(app, "frame").split("\n")
        assert frame[0].rstrip().endswith("PAUSED  as of " + time.strftime("%H:%M:%S",
                                                                           time.localtime(app.states[0].last_ok)))
        assert frame[3].startswith(" PAUSED: the figures of ") and "p or Space resumes" in frame[3]
        await pilot.pause(0.6)  # six intervals
        assert sidecar.polls <= polls + 1 and routed_l0() == routed  # (one poll may have been in flight)
        await pilot.press("space")  # resumes, and polls at once
        await until(pilot, lambda: sidecar.polls > polls + 1 and routed_l0() != routed)
        assert "PAUSED" not in text(app, "frame")

    drive(test)


def test_the_footer_lists_the_keys_of_the_view():
    async def test(app, pilot, _):
        def keys() -> list[str]:
            return [f"{k.key_display} {k.description}" for k in app.screen.query("FooterKey")]

        assert keys() == ["q quit", "? help", "/ filter", "s sort", "p pause"]
        await pilot.press("2")
        await until(pilot, lambda: keys() == ["q quit", "? help", "/ filter", "s sort", "p pause", "w windows"])
        await pilot.press("5")  # the detector: nothing to sort
        await until(pilot, lambda: keys() == ["q quit", "? help", "/ filter", "p pause"])

    drive(test)
