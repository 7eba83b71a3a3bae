"""`moe-monitor top --once`: one plain-text snapshot of each sidecar on stdout, for `kubectl exec` without a
terminal and for pasting into an incident. Every view one after the other, every row (the `--filter` applies);
ANSI codes only when stdout is a colour terminal; lines cropped to the terminal's width (80 without one, or
COLUMNS), and a last line saying how many were cut. No Textual needed."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time

import aiohttp
from rich.console import Console
from rich.text import Text

from . import client, core, render
from .text import line

WAIT_MAX_S = 15.0  # for the second exposition that step percentiles and EP-rank load need (one window)


async def _snapshot_of(session: aiohttp.ClientSession, url: str, token: str | None) -> core.SidecarState:
    """One sidecar's state after one poll and, when its window is short enough, the next window's exposition
    (interval figures: step percentiles, EP-rank load)."""
    state = core.SidecarState(url)
    state.apply(await client.fetch(session, url, token, flight_windows=1, captures=True))
    window = state.window_s
    if state.error is not None or window is None or window + 1.0 > WAIT_MAX_S:
        return state
    deadline = time.monotonic() + window + 1.0
    while state.history.previous is None and time.monotonic() < deadline:
        await asyncio.sleep(min(0.5, window / 4))
        fetched = await client.fetch(session, url, token)
        if fetched.error is not None:
            return state  # the first answer stands
        state.apply(fetched)
    if state.history.previous is not None:  # the flight record and captures of the same window
        fetched = await client.fetch(session, url, token, flight_windows=1, captures=True)
        if fetched.error is None:
            state.apply(fetched)
    return state


async def _snapshots(urls: list[str], token: str | None) -> list[core.SidecarState]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:  # gzip inflated by client.py, capped
        return list(await asyncio.gather(*(_snapshot_of(session, u, token) for u in urls)))


def cropped(lines: list[Text], width: int) -> list[Text]:
    """`lines` cut to `width` columns, and a last line saying how many were cut."""
    cut = sum(1 for x in lines if x.cell_len > width)
    out = [x[:width] if x.cell_len > width else x for x in lines]
    if cut:
        out.append(line(f"({cut} line(s) cut at {width} columns; a larger COLUMNS shows them whole)"))
    return out


def run_once(urls: list[str], token: str | None = None, colour: bool = True, filter_text: str = "",
             width: int | None = None) -> int:
    """Prints the snapshot; 0 when every sidecar's /metrics was read, 1 when one could not be (its reason is in
    the snapshot)."""
    width = max(40, width or shutil.get_terminal_size((80, 24)).columns)
    colour = colour and sys.stdout.isatty()
    states = asyncio.run(_snapshots(urls, token))
    ui = render.Ui(colour=colour)
    ui.set_filter(filter_text)
    lines = cropped(render.snapshot(states, ui, width, time.time()), width)
    for x in lines:
        x.rstrip()
    if colour:
        Console(width=width, highlight=False, force_terminal=True).print(
            Text("\n", no_wrap=True, overflow="crop").join(lines), crop=True, no_wrap=True, soft_wrap=True)
    else:
        sys.stdout.write("\n".join(x.plain for x in lines) + "\n")
    sys.stdout.flush()
    return 0 if all(s.error is None for s in states) else 1
