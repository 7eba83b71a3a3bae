"""`moe-monitor top`: a live terminal view of one or more sidecars for on-call engineers without Grafana
(docs/top.md): per-layer imbalance, a layer x expert heat map, EP-rank load, step-time percentiles per phase,
the detector and the newest capture's kernel breakdown.

`core` (sidecar data -> dataclasses), `rows` (the filter and the sort), `views` and `render` (dataclasses ->
screen lines) are pure; `app` is the Textual app that polls and shows them, `once` prints one snapshot (--once).
Textual and Rich (the 'top' extra) are imported only when `run` starts, so importing this package, `core` or
`--help` never needs them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["run"]


def run(urls: Sequence[str], interval: float | None = None, token: str | None = None,
        no_color: bool = False, once: bool = False, filter_text: str = "") -> int:
    """Show the sidecars at `urls` until the user presses q (with `once`: print one snapshot); returns the exit
    status.

    interval: seconds between polls (default: each sidecar's window, 2 s until it is known); token: sent as a
    Bearer token (top itself needs none: it never downloads traces); no_color: also when NO_COLOR is set;
    filter_text: the `/` filter to start with."""
    from .client import normalise_url

    if not urls:
        print("moe-monitor top: give at least one --url", file=sys.stderr)
        return 2
    colour = not (no_color or "NO_COLOR" in os.environ)
    try:  # the 'top' extra (Textual, and the Rich it brings): the sidecar's image need not carry it
        if once:
            from .once import run_once
        else:
            from .app import TopApp
    except ImportError as e:
        print(f"moe-monitor top needs the 'top' extra: pip install 'moe-monitor[top]' ({e})", file=sys.stderr)
        return 1
    if once:
        return run_once([normalise_url(u) for u in urls], token or None, colour, filter_text)
    if not (sys.stdin.isatty() and sys.stdout.isatty() and sys.stderr.isatty()):  # Textual draws on stderr
        print("moe-monitor top: needs an interactive terminal (for a one-off look: moe-monitor top --once)",
              file=sys.stderr if sys.stderr.isatty() or not sys.stdout.isatty() else sys.stdout)
        return 2
    if not colour:
        os.environ["NO_COLOR"] = "1"  # Textual's own switch (its app reads and removes it)

    app = TopApp([normalise_url(u) for u in urls], interval, token or None, colour, filter_text)
    with _logs_held():
        app.run()
    return app.return_code or 0


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=100)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _logs_held():
    """Log records would be written over the full-screen view (the root handlers hold the real stderr): they are
    held while it runs and written out, the newest 100, once it has ended."""
    root, held = logging.getLogger(), _Held()
    saved, root.handlers = root.handlers, [held]
    try:
        yield
    finally:
        root.handlers = saved
        for record in held.records:
            root.handle(record)
