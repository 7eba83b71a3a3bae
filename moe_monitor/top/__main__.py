"""`moe-monitor top`'s command (the CLI registers this one), also runnable as `python -m moe_monitor.top`."""

from __future__ import annotations

import sys

import click

from moe_monitor import env

from . import run


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--url", "urls", multiple=True, envvar=env.SIDECAR_URL, show_envvar=True,
              default=["http://127.0.0.1:9464"],
              help="A sidecar's base URL, or HOST:PORT; repeat for several (n/N switch between them).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between refreshes [default: the sidecar's --window, 2 s until it is known].")
@click.option("--token", envvar=env.API_TOKEN, show_envvar=True, default=None,
              help="Bearer token sent to the sidecar (top downloads no traces, so it needs none itself).")
@click.option("--no-color", is_flag=True,
              help="No colours (also when NO_COLOR is set); the heat map keeps its marks and shades.")
@click.option("--once", is_flag=True,
              help="Print one plain-text snapshot of every view to stdout and exit (no terminal needed; waits "
                   "up to one window for the step percentiles).")
@click.option("--filter", "filter_text", default="", metavar="TERMS",
              help="Start with this row filter (the `/` key): layers 3 10-20, hottest expert e5, EP rank r2, "
                   "figures >1.5, words.")
def top(urls: tuple[str, ...], interval: float | None, token: str | None, no_color: bool, once: bool,
        filter_text: str) -> None:
    """Live terminal view of sidecars: per-layer imbalance, heat map, EP ranks, step time, detector, captures
    (docs/top.md; needs `pip install 'moe-monitor[top]'`, except --once)."""
    sys.exit(run(urls, interval, token, no_color, once, filter_text))


if __name__ == "__main__":
    top()
