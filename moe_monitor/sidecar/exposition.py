"""A small writer of the Prometheus text format (0.0.4), fast for dense label sets.

The sidecar renders its whole exposition once per window and serves the cached bytes, so a scrape costs a
memory copy. prometheus_client's families are built per sample in Python and take ~200 ms for 16k series
(benchmarks/sidecar_scale.py measures both); here the label part of every line of a dense family is
rendered once per shape and cached, and only values are formatted per window. promtool check metrics and
prometheus_client's parser read the output in tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moe_monitor.schema.vocabulary import BY_NAME


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(pairs: Iterable[tuple[str, object]]) -> str:
    inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def fmt(value: float) -> str:
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v) if not v.is_integer() or abs(v) >= 1e15 else str(int(v)) + ".0"


def fmt_array(values: np.ndarray) -> list[str]:
    if values.dtype.kind in "iub":
        return list(map(str, values.astype(np.int64).tolist()))
    out = list(map(repr, values.astype(np.float64).tolist()))  # repr is the shortest exact float form
    for i in np.flatnonzero(~np.isfinite(values)).tolist():
        out[i] = fmt(values[i])
    return out


def _allowed_labels() -> dict[str, frozenset[str]]:
    """Series name -> the label names its series may carry: the metric's declared labels, plus `le` on a
    histogram's series (its _bucket, _sum and _count series included)."""
    out = {}
    for m in BY_NAME.values():
        allowed = frozenset(m.labels) | ({"le"} if m.type == "histogram" else frozenset())
        for suffix in ("", "_bucket", "_sum", "_count") if m.type == "histogram" else ("",):
            out[m.name + suffix] = allowed
    return out


ALLOWED_LABELS = _allowed_labels()


def check_labels(name: str, keys: Iterable[str], allowed: frozenset[str] | None = None) -> None:
    """ValueError unless every label name in `keys` is one the vocabulary declares for the series `name`."""
    allowed = ALLOWED_LABELS.get(name) if allowed is None else allowed
    if allowed is None:
        raise ValueError(f"{name} is not a series of a metric schema/vocabulary.py declares")
    undeclared = sorted(set(keys) - allowed)
    if undeclared:
        raise ValueError(f"{name}: label {', '.join(undeclared)} is not declared for it in schema/vocabulary.py "
                         f"(declared: {', '.join(sorted(allowed)) or 'none'})")


@dataclass
class Family:
    name: str  # as it appears on the TYPE line (counters include _total)
    kind: str  # counter | gauge | histogram
    help: str
    lines: list[str] = field(default_factory=list)
    tier: str = "t0"
    allowed: frozenset[str] | None = None  # label names its series may carry (None: not checked)
    _checked: set[tuple[str, ...]] = field(default_factory=set, init=False, repr=False, compare=False)

    def add(self, value: float, label_pairs: Sequence[tuple[str, object]] = (), suffix: str = "") -> None:
        """One sample. Its label names are checked against `allowed` once per distinct tuple of names."""
        if label_pairs and self.allowed is not None:
            keys = tuple([k for k, _ in label_pairs])
            if keys not in self._checked:
                check_labels(self.name + suffix, keys, self.allowed)
                self._checked.add(keys)
        self.lines.append(f"{self.name}{suffix}{labels(label_pairs)} {fmt(value)}\n")

    def add_dense(self, prefixes: Sequence[str], values: np.ndarray) -> None:
        """prefixes[i] is a full 'name{labels} ' string (see DenseLabels); values the same length."""
        self.lines.extend(map("".join, zip(prefixes, fmt_array(np.asarray(values).reshape(-1)),
                                           _newlines(len(prefixes)))))

    @property
    def series(self) -> int:
        return len(self.lines)


def family(name: str) -> Family:
    """An empty family of the declared metric `name` (KeyError for an undeclared one: declare it in
    schema/vocabulary.py)."""
    m = BY_NAME[name]
    return Family(m.name, m.type, m.help, tier=m.tier, allowed=ALLOWED_LABELS[m.name])


_NL: list[str] = []


def _newlines(n: int) -> list[str]:
    global _NL
    if len(_NL) < n:
        _NL = ["\n"] * max(n, 2 * len(_NL))
    return _NL[:n]


class DenseLabels:
    """Caches 'name{a="x",b="y"} ' prefixes for the cartesian product of label values; the label names are
    checked against the vocabulary when a shape is first rendered (ValueError for one the series does not
    declare)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, list[str]] = {}

    def get(self, name: str, keys: tuple[str, ...], values: tuple[tuple[str, ...], ...],
            const: tuple[tuple[str, str], ...] = ()) -> list[str]:
        key = (name, keys, values, const)
        if key not in self._cache:
            check_labels(name, keys + tuple(k for k, _ in const))
            grids = np.meshgrid(*[np.arange(len(v)) for v in values], indexing="ij")
            idx = np.stack([g.reshape(-1) for g in grids], axis=1) if values else np.zeros((1, 0), int)
            self._cache[key] = [
                f"{name}{labels(list(zip(keys, (values[d][i] for d, i in enumerate(row)))) + list(const))} "
                for row in idx.tolist()]
        return self._cache[key]


def render(families: Iterable[Family]) -> bytes:
    parts: list[str] = []
    for f in families:
        help_text = f.help.replace("\\", "\\\\").replace("\n", "\\n")
        parts.append(f"# HELP {f.name} {help_text}\n# TYPE {f.name} {f.kind}\n")
        parts.extend(f.lines)
    return "".join(parts).encode()
