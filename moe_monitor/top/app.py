"""The Textual app: the frame of `render.frame()` on top, the view below it (a DataTable for Layers, EP ranks and
Steps, lines for the heat map, the detector and the help), an Input for the `/` filter, the Footer listing the
keys, and one polling task per sidecar. Everything it shows is computed by core.py, rows.py and views.py."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Input, Static

from . import client, core, render
from .views import Page, Table

log = logging.getLogger(__name__)


class RowTable(DataTable, inherit_bindings=False, can_focus=False):
    """A DataTable without keys of its own: the app's keys scroll it, ← → switch views; a click on a column's
    header sorts by it."""


class TopApp(App):
    CSS = """
    Screen { overflow: hidden; }
    #frame, #tail { height: auto; }
    #table { height: 1fr; scrollbar-size: 0 0; }
    #body { height: 1fr; }
    #filterbar { height: 1; display: none; }
    #slash { width: 3; }
    #filter { height: 1; width: 1fr; border: none; padding: 0; }
    """
    ENABLE_COMMAND_PALETTE = False
    AUTO_FOCUS = None  # the keys are the app's; only `/` focuses the filter
    BINDINGS = [
        Binding("q", "quit", "quit"), Binding("ctrl+c", "quit", show=False, priority=True),
        Binding("question_mark", "toggle_help", "help"), Binding("slash", "filter", "filter"),
        Binding("s", "sort", "sort"), Binding("S", "reverse_sort", show=False), Binding("o", "order", show=False),
        Binding("p,space", "pause", "pause"), Binding("escape", "escape", show=False),
        Binding("w", "span", "windows"),
        Binding("n,right_square_bracket", "sidecar(1)", "sidecar"),
        Binding("N,left_square_bracket", "sidecar(-1)", show=False),
        *[Binding(key, f"view('{name}')", label, show=False) for key, name, label in render.VIEWS],
        *[Binding(key, f"view('{name}')", show=False) for key, name in
          (("l", "layers"), ("h", "heat"), ("e", "ranks"), ("d", "detector"))],
        Binding("right", "cycle_view(1)", show=False), Binding("left", "cycle_view(-1)", show=False),
        Binding("tab", "cycle_view(1)", show=False, priority=True),
        Binding("shift+tab", "cycle_view(-1)", show=False, priority=True),
        Binding("down", "scroll(1)", show=False), Binding("up", "scroll(-1)", show=False),
        Binding("pagedown,j", "page(1)", show=False), Binding("pageup,k,b", "page(-1)", show=False),
        Binding("home,g", "scroll(-1000000)", show=False), Binding("end,G", "scroll(1000000)", show=False),
        Binding("r", "refresh_now", show=False),
    ]

    def __init__(self, urls: list[str], interval: float | None = None, token: str | None = None,
                 colour: bool = True, filter_text: str = "", fetch=client.fetch):
        # ansi_color=True without colour: Textual's NO_COLOR filter then drops colours instead of greying them
        super().__init__(**({} if colour else {"ansi_color": True}))
        self.states = [core.SidecarState(u) for u in urls]
        self.interval, self.token, self.fetch = interval, token, fetch
        self.ui = render.Ui(colour=colour)
        self.ui.set_filter(filter_text)
        self._wake = [asyncio.Event() for _ in urls]
        self._live = asyncio.Event()  # set unless paused
        self._live.set()
        self._session: aiohttp.ClientSession | None = None
        self._shown: dict[str, Text] = {}  # what each Static shows: an unchanged redraw sends nothing
        self._table: Table | None = None  # what the DataTable holds

    def compose(self) -> ComposeResult:
        yield Static(id="frame")
        yield RowTable(id="table", show_cursor=False, cell_padding=0)
        yield Static(id="body")
        yield Static(id="tail")
        with Horizontal(id="filterbar"):
            yield Static(" /", id="slash")
            yield Input(self.ui.filter.text, placeholder="3  10-20  e5  r2  >1.5  decode   (Enter keeps, Esc clears)",
                        id="filter")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#filterbar").display = bool(self.ui.filter)
        self.watch(self.query_one(RowTable), "scroll_y", self._scrolled, init=False)
        self._session = aiohttp.ClientSession(auto_decompress=False)  # gzip is inflated by client.py, capped
        for i in range(len(self.states)):
            self.run_worker(self._poll(i), name=f"poll-{i}", group="poll", exit_on_error=False)
        self.set_interval(1.0, self.redraw)  # the "ago" figures age between polls
        self.redraw()

    async def on_unmount(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _poll(self, i: int) -> None:
        state = self.states[i]
        while True:
            await self._live.wait()
            every = state.interval_s(self.interval)
            shown = i == self.ui.sidecar
            try:
                fetched = await self.fetch(self._session, state.url, self.token,
                                           flight_windows=self.ui.span if shown else None, captures=shown,
                                           timeout=max(client.DEFAULT_TIMEOUT_S, min(every, 30.0)))
                if not self.ui.paused:  # paused meanwhile: the figures stay as they are
                    state.apply(fetched)
            except Exception as e:  # noqa: BLE001 - a bug in one poll must not end the view: shown, retried
                log.debug("polling %s failed", state.url, exc_info=True)
                state.error, state.unreachable, state.last_try = f"unexpected error: {e!r}", False, time.time()
            if i == self.ui.sidecar:  # (also when the user switched to it during the poll)
                self.redraw()
            try:
                await asyncio.wait_for(self._wake[i].wait(), state.interval_s(self.interval))
            except TimeoutError:
                pass
            self._wake[i].clear()

    # -- drawing -----------------------------------------------------------------------------------------
    def redraw(self) -> None:
        try:
            table = self.query_one(RowTable)
        except Exception:  # noqa: BLE001 - not mounted yet, or already gone
            return
        width, height, now, st = self.size.width, self.size.height, time.time(), self.ui.styles()
        try:
            top = render.frame(self.states, self.ui, width, now, self.interval)
            page = render.view_page(self.states, self.ui, width, now, self.interval)
        except Exception as e:  # noqa: BLE001 - odd data must not end the view: say what failed
            log.debug("render failed", exc_info=True)
            top, page = [Text(f"moe-monitor top: cannot draw this view: {e!r}")], Page(
                rows=[Text("(press another view's key, or q)")])
        top += page.head
        # under the frame: the footer, the filter when shown, the page's tail
        room = height - len(top) - 1 - (1 if self.query_one("#filterbar").display else 0) - len(page.tail)
        table.display = page.table is not None
        self.query_one("#body").display = page.table is None
        if page.table is not None:
            self._fill(table, page.table)
            room -= 1 + len(page.rows)  # the header, the notes under the rows
            n = len(page.table.rows)
            marker = []
            if n > room:
                first = int(table.scroll_y) + 1
                last = min(n, first + room - 2)  # room less the marker's own line
                marker = [Text(f" {page.what} {first}-{last} of {n}  (↑↓ PgUp/PgDn)", st["dim"] or "")]
            tail = page.rows + marker + page.tail
        else:
            self._show("body", render.fit(Page(rows=page.rows, what=page.what), room, self.ui, st))
            tail = page.tail
        self._show("frame", top)
        self._show("tail", tail)

    def _show(self, name: str, lines: list[Text]) -> None:
        content = Text("\n", no_wrap=True, overflow="crop").join(lines)
        if self._shown.get(name) != content:
            self._shown[name] = content
            widget = self.query_one(f"#{name}", Static)
            widget.update(content)
            widget.display = bool(lines)  # an empty Static would still take a line

    def _fill(self, widget: RowTable, t: Table) -> None:
        """Shows `t` in the DataTable: cells updated in place while the rows stay the same, else rebuilt."""
        old = self._table
        self._table = t
        if old is not None and old.header == t.header and [c.width for c in old.columns] == \
                [c.width for c in t.columns] and old.keys == t.keys:
            for key, before, after in zip(t.keys, old.rows, t.rows):
                for i, (a, b) in enumerate(zip(before, after)):
                    if a != b:
                        widget.update_cell(key, f"c{i}", b)
            return
        if old is None or old.header != t.header or [c.width for c in old.columns] != [c.width for c in t.columns]:
            widget.clear(columns=True)
            for i, (c, label) in enumerate(zip(t.columns, t.header)):
                widget.add_column(label, width=c.width, key=f"c{i}")
        else:
            y = widget.scroll_y
            widget.clear()
            self.call_after_refresh(widget.scroll_to, y=y, animate=False)
        for key, cells in zip(t.keys, t.rows):
            widget.add_row(*cells, key=key)

    def _scrolled(self, _y: float) -> None:
        self.redraw()  # the "rows a-b of n" line

    def on_resize(self) -> None:
        self.redraw()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Keys that do nothing here are left out of the footer."""
        if action == "span":
            return self.ui.view == "heat" and not self.ui.help
        if action == "sidecar":
            return len(self.states) > 1
        if action in ("sort", "reverse_sort", "order"):
            return self.ui.sort() is not None and not self.ui.help
        return True

    def _changed(self) -> None:
        self.refresh_bindings()
        self.redraw()

    def _refresh_shown(self) -> None:
        self._wake[self.ui.sidecar].set()

    # -- actions (the keys) ------------------------------------------------------------------------------
    def action_view(self, name: str) -> None:
        self.ui.view, self.ui.help = name, False
        self._changed()

    def action_cycle_view(self, step: int) -> None:
        self.ui.cycle_view(step)
        self._changed()

    def action_toggle_help(self) -> None:
        self.ui.help = not self.ui.help
        self._changed()

    def action_escape(self) -> None:
        """Esc: closes the help, else clears the filter."""
        if self.ui.help:
            self.ui.help = False
        else:
            self.ui.set_filter("")
            self.query_one("#filter", Input).value = ""
            self.query_one("#filterbar").display = False
            self.set_focus(None)
        self._changed()

    def action_filter(self) -> None:
        self.query_one("#filterbar").display = True
        self.query_one("#filter", Input).focus()
        self.redraw()

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.ui.filter.text != event.value.strip():
            self.ui.set_filter(event.value)
            self.redraw()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter: the filter stays (shown in its line), the keys work again."""
        self.query_one("#filterbar").display = bool(self.ui.filter)
        self.set_focus(None)
        self.redraw()

    def action_sort(self) -> None:
        self.ui.cycle_sort()
        self.redraw()

    def action_reverse_sort(self) -> None:
        self.ui.reverse_sort()
        self.redraw()

    def action_order(self) -> None:
        self.ui.toggle_worst()
        self.redraw()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        if self._table is not None and (column := self._table.columns[event.column_index].sort):
            self.ui.sort_by(column)
            self.redraw()

    def action_pause(self) -> None:
        if self.ui.paused:
            self.ui.paused_at = None
            self._live.set()
            for wake in self._wake:  # fresh figures at once
                wake.set()
        else:
            self.ui.paused_at = time.time()
            self._live.clear()
        self.redraw()

    def action_scroll(self, rows: int) -> None:
        table = self.query_one(RowTable)
        if table.display:
            table.scroll_to(y=max(0, table.scroll_y + rows), animate=False)
        else:
            self.ui.scroll(rows)
        self.redraw()

    def action_page(self, pages: int) -> None:
        table = self.query_one(RowTable)
        self.action_scroll(pages * (max(1, table.size.height - 1) if table.display else self.ui.page))

    def action_sidecar(self, step: int) -> None:
        self.ui.sidecar = (self.ui.sidecar + step) % len(self.states)
        self._table = None  # another sidecar's rows: rebuilt, from the top
        self._refresh_shown()  # its flight record and captures are fetched for the sidecar on screen only
        self.redraw()

    def action_span(self) -> None:
        spans = render.SPANS
        self.ui.span = spans[(spans.index(self.ui.span) + 1) % len(spans)] if self.ui.span in spans else spans[0]
        self._refresh_shown()
        self.redraw()

    def action_refresh_now(self) -> None:
        self._refresh_shown()
