"""The Textual app: one full-screen widget showing `render.screen()`, keys that change `render.Ui`, and one
polling task per sidecar. Everything it shows is computed by core.py and render.py."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from . import client, core, render

log = logging.getLogger(__name__)


class TopApp(App):
    CSS = "Screen { overflow: hidden; } #screen { width: 100%; height: 100%; }"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "quit"), Binding("ctrl+c", "quit", show=False, priority=True),
        Binding("question_mark", "toggle_help", "help"), Binding("escape", "close_help", show=False),
        *[Binding(key, f"view('{name}')", label, show=False) for key, name, label in render.VIEWS],
        *[Binding(key, f"view('{name}')", show=False) for key, name in
          (("l", "layers"), ("h", "heat"), ("e", "ranks"), ("s", "steps"), ("d", "detector"))],
        Binding("right", "cycle_view(1)", show=False), Binding("left", "cycle_view(-1)", show=False),
        Binding("tab", "cycle_view(1)", show=False, priority=True),
        Binding("shift+tab", "cycle_view(-1)", show=False, priority=True),
        Binding("down", "scroll(1)", show=False), Binding("up", "scroll(-1)", show=False),
        Binding("pagedown,j,space", "page(1)", show=False), Binding("pageup,k,b", "page(-1)", show=False),
        Binding("home,g", "scroll(-1000000)", show=False), Binding("end,G", "scroll(1000000)", show=False),
        Binding("n,right_square_bracket", "sidecar(1)", show=False),
        Binding("p,left_square_bracket", "sidecar(-1)", show=False),
        Binding("o", "order", show=False), Binding("w", "span", show=False), Binding("r", "refresh_now", show=False),
    ]

    def __init__(self, urls: list[str], interval: float | None = None, token: str | None = None,
                 colour: bool = True):
        # ansi_color=True without colour: Textual's NO_COLOR filter then drops colours instead of greying them
        super().__init__(**({} if colour else {"ansi_color": True}))
        self.states = [core.SidecarState(u) for u in urls]
        self.interval, self.token = interval, token
        self.ui = render.Ui(colour=colour)
        self._wake = [asyncio.Event() for _ in urls]
        self._session: aiohttp.ClientSession | None = None
        self._shown: Text | None = None  # what the screen shows: an unchanged redraw sends nothing to the terminal

    def compose(self) -> ComposeResult:
        yield Static(id="screen", expand=True)

    async def on_mount(self) -> None:
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
            every = state.interval_s(self.interval)
            shown = i == self.ui.sidecar
            try:
                fetched = await client.fetch(self._session, state.url, self.token,
                                             flight_windows=self.ui.span if shown else None, captures=shown,
                                             timeout=max(client.DEFAULT_TIMEOUT_S, min(every, 30.0)))
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

    def redraw(self) -> None:
        try:
            widget = self.query_one("#screen", Static)
        except Exception:  # noqa: BLE001 - not mounted yet, or already gone
            return
        size = self.size
        try:
            content = render.screen(self.states, self.ui, size.width, size.height, time.time(), self.interval)
        except Exception as e:  # noqa: BLE001 - odd data must not end the view: say what failed
            log.debug("render failed", exc_info=True)
            content = Text(f"moe-monitor top: cannot draw this view: {e!r}\n(press another view's key, or q)")
        if content != self._shown:
            self._shown = content
            widget.update(content)

    def on_resize(self) -> None:
        self.redraw()

    def _refresh_shown(self) -> None:
        self._wake[self.ui.sidecar].set()

    # -- actions (the keys) ----------------------------------------------------------------------------
    def action_view(self, name: str) -> None:
        self.ui.view, self.ui.help = name, False
        self.redraw()

    def action_cycle_view(self, step: int) -> None:
        self.ui.cycle_view(step)
        self.redraw()

    def action_toggle_help(self) -> None:
        self.ui.help = not self.ui.help
        self.redraw()

    def action_close_help(self) -> None:
        self.ui.help = False
        self.redraw()

    def action_scroll(self, rows: int) -> None:
        self.ui.scroll(rows)
        self.redraw()

    def action_page(self, pages: int) -> None:
        self.ui.scroll(pages * self.ui.page)
        self.redraw()

    def action_sidecar(self, step: int) -> None:
        self.ui.sidecar = (self.ui.sidecar + step) % len(self.states)
        self._refresh_shown()  # its flight record and captures are fetched for the sidecar on screen only
        self.redraw()

    def action_order(self) -> None:
        self.ui.order = "imbalance" if self.ui.order == "layer" else "layer"
        self.redraw()

    def action_span(self) -> None:
        spans = render.SPANS
        self.ui.span = spans[(spans.index(self.ui.span) + 1) % len(spans)] if self.ui.span in spans else spans[0]
        self._refresh_shown()
        self.redraw()

    def action_refresh_now(self) -> None:
        self._refresh_shown()
