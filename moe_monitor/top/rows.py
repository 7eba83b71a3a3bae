"""Which rows a view shows, and in which order: the `/` filter and the sort (`s`, `S`, `o`, a click on a column
header). Pure: the rows are core.py's dataclasses, the filter is the text the user typed.

A filter is terms separated by spaces or commas. `3`, `L3`, `10-20`: layers (Layers, Heat map); `e5`: layers
whose hottest expert is 5 (Heat map); `r2`, `r0-3`: EP ranks; `>1.5`, `>=2`, `<0.8`: the view's main figure (a
layer's max/mean, a heat row's hottest expert / mean, a rank's load / mean, a signal's current / baseline); any
other word: a substring of a step row's phase or a detector signal's name (`decode`, `step_time`). A view
applies the terms that address its rows and ignores the others (a layer id does not empty the Steps view); a row
is shown when it passes every comparison and, if there are ids or words, matches one of them.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moe_monitor.channel.layout import PHASES

from . import core

QUANTILE_COLUMNS = tuple(f"p{100 * q:g}" for q in core.QUANTILES)  # p50 p90 p99
SORTS = {  # view -> the columns it sorts by, the first its default order
    "layers": ("layer", "routed", "imbalance", "cv", "entropy", "top1_share", "hot", "dead", "ep_imbalance"),
    "heat": ("layer", "max_ratio"),
    "ranks": ("rank", "load", "share", "ratio"),
    "steps": ("phase", "steps", "per_second", "mean_s", *QUANTILE_COLUMNS),
}
WORST = {"layers": "imbalance", "heat": "max_ratio", "ranks": "ratio", "steps": QUANTILE_COLUMNS[-1]}  # `o`
ASCENDING = frozenset({"layer", "rank", "phase", "entropy"})  # ids, and entropy (low is worse); figures descend
_PHASE_ORDER = {p: i for i, p in enumerate(PHASES)}


def natural_descending(column: str) -> bool:
    """The direction a column first sorts in: worst first for figures, ascending for ids."""
    return column not in ASCENDING


def sort_value(row, column: str):
    if column in QUANTILE_COLUMNS:
        return row.quantiles[QUANTILE_COLUMNS.index(column)][0]
    if column == "phase":
        tokens = -1.0 if row.tokens_le is None else core.tokens_key(row.tokens_le)
        return _PHASE_ORDER.get(row.phase, len(_PHASE_ORDER)), row.phase, tokens
    return getattr(row, column)


def sort_rows(rows: Iterable, column: str, descending: bool) -> list:
    """`rows` ordered by `column`; rows without a figure in it last (in their order), ties in their order."""
    rows = list(rows)
    known = [r for r in rows if sort_value(r, column) is not None]
    unknown = [r for r in rows if sort_value(r, column) is None]
    return sorted(known, key=lambda r: sort_value(r, column), reverse=descending) + unknown


_ID = re.compile(r"^([ler]?)(\d+)(?:-(\d+))?$")
_BOUND = re.compile(r"^(>=|<=|>|<|=)((?:\d+(?:\.\d*)?|\.\d+))x?$")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "=": operator.eq}


@dataclass(frozen=True)
class RowFilter:
    text: str = ""
    ids: tuple[tuple[str, int, int], ...] = ()  # (prefix "" / l / e / r, low, high)
    words: tuple[str, ...] = ()
    bounds: tuple[tuple[str, float], ...] = ()  # (operator, value) on the row's main figure

    @classmethod
    def parse(cls, text: str) -> RowFilter:
        ids, words, bounds = [], [], []
        for term in re.sub(r"([<>]=?|=)\s+", r"\1", text.lower().replace(",", " ")).split():
            if m := _ID.match(term):
                low = int(m.group(2))
                high = int(m.group(3)) if m.group(3) else low
                ids.append((m.group(1), min(low, high), max(low, high)))
            elif m := _BOUND.match(term):
                bounds.append((m.group(1), float(m.group(2))))
            else:
                words.append(term)
        return cls(text.strip(), tuple(ids), tuple(words), tuple(bounds))

    def __bool__(self) -> bool:
        return bool(self.ids or self.words or self.bounds)

    def narrowed(self, kind: type) -> RowFilter:
        """The terms that address rows of `kind` (a core.py row class)."""
        prefixes, figure, words = ADDRESSED[kind]
        return RowFilter(self.text, tuple(x for x in self.ids if x[0] in prefixes), self.words if words else (),
                         self.bounds if figure else ())

    def matches(self, ids: dict[str, int | None], names: Sequence[str], figure: float | None) -> bool:
        if self.bounds and (figure is None or not all(_OPS[op](figure, v) for op, v in self.bounds)):
            return False
        if not (self.ids or self.words):
            return True
        if any(ids.get(prefix) is not None and low <= ids[prefix] <= high for prefix, low, high in self.ids):
            return True
        return any(w in name.lower() for w in self.words for name in names)


NO_FILTER = RowFilter()
ADDRESSED = {  # row class -> (the id prefixes, whether comparisons, whether words apply to it)
    core.LayerRow: (("", "l"), True, False), core.HeatRow: (("", "l", "e"), True, False),
    core.RankLoad: (("r",), True, False), core.StepRow: ((), False, True), core.Signal: ((), True, True)}


def describe(row) -> tuple[dict[str, int | None], tuple[str, ...], float | None]:
    """(ids by prefix, names, main figure) of a view's row: what a filter matches."""
    if isinstance(row, core.LayerRow):
        return {"": row.layer, "l": row.layer}, (f"L{row.layer}",), row.imbalance
    if isinstance(row, core.HeatRow):
        return {"": row.layer, "l": row.layer, "e": row.hot_expert}, (f"L{row.layer}",), row.max_ratio
    if isinstance(row, core.RankLoad):
        return {"": row.rank, "r": row.rank}, (f"r{row.rank}",), row.ratio
    if isinstance(row, core.StepRow):
        return {}, (row.phase, "all" if row.tokens_le is None else f"≤{row.tokens_le}"), None
    if isinstance(row, core.Signal):
        figure = row.current / row.baseline if row.current is not None and row.baseline else None
        return {}, (row.signal, row.phase), figure
    raise TypeError(f"no filter for {type(row).__name__}")


def select(rows: Iterable, flt: RowFilter | None = None, sort: tuple[str, bool] | None = None) -> list:
    """The rows a view shows: those `flt` matches (the terms that address them), ordered by `sort` (column,
    descending)."""
    rows = list(rows)
    flt = flt.narrowed(type(rows[0])) if flt and rows else None
    shown = [r for r in rows if flt.matches(*describe(r))] if flt else rows
    return sort_rows(shown, *sort) if sort else shown
