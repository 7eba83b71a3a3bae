"""Fold every rank's cumulative snapshot into one set of monotonic totals.

Rules (docs/architecture.md explains them):
- TP ranks of one (dp, pp) group route identically: only the lowest TP rank present is counted.
- Layers are keyed by model layer index, so PP stages (disjoint layers) and DP ranks (same layers,
  different tokens) add up naturally.
- A vLLM restart shows as a new `generation`; the old generation's last snapshot is retired into a
  carried total, so exported counters never go backwards while the sidecar runs. A group whose segments
  all disappear keeps its last values for the same reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from moe_monitor.channel import Snapshot

log = logging.getLogger(__name__)
GroupKey = tuple[int, int]  # (dp_rank, pp_rank)


@dataclass
class Totals:
    """Cumulative figures of one group or of the whole instance."""

    layer_ids: tuple[int, ...] = ()  # ascending model layer indices, one per row of counts
    counts: np.ndarray | None = None  # int64 [L, E]
    step_hist: np.ndarray | None = None  # [P, TB, DB] timed steps (a sample of them on CUDA)
    step_seconds: np.ndarray | None = None  # [P, TB] timed steps' duration
    step_tokens: np.ndarray | None = None  # [P, TB] every step's tokens
    step_count: np.ndarray | None = None  # [P, TB] every step (set with step_hist)
    token_bounds: np.ndarray | None = None
    duration_bounds: np.ndarray | None = None
    rank_load: np.ndarray | None = None  # float64 [L, R] EP-rank load the plugin attributed (EPLB); None when
    # any counted part lacks it

    def _add_rank_load(self, other: Totals, union: tuple[int, ...] | None) -> None:
        """Called before the counts are merged (self.layer_ids still the old rows)."""
        mine, theirs = self.rank_load, other.rank_load
        if self.counts is None:
            self.rank_load = None if theirs is None else theirs.copy()
        elif mine is None or theirs is None or mine.shape[1] != theirs.shape[1]:
            self.rank_load = None
        elif union is None:
            self.rank_load = mine + theirs
        else:
            merged = np.zeros((len(union), mine.shape[1]))
            merged[[union.index(x) for x in self.layer_ids]] += mine
            merged[[union.index(x) for x in other.layer_ids]] += theirs
            self.rank_load = merged

    def compatible(self, other: Totals) -> bool:
        if self.counts is not None and other.counts is not None and self.counts.shape[1] != other.counts.shape[1]:
            return False
        if self.step_hist is not None and other.step_hist is not None and (
                self.step_hist.shape != other.step_hist.shape
                or not _same(self.token_bounds, other.token_bounds)
                or not _same(self.duration_bounds, other.duration_bounds)):
            return False
        return True

    def add(self, other: Totals) -> bool:
        """Add `other` in place. Returns False (and adds nothing) when the shapes are incompatible."""
        if not self.compatible(other):
            return False
        if other.counts is not None:
            same_rows = self.counts is None or self.layer_ids == other.layer_ids
            self._add_rank_load(other, None if same_rows else
                                tuple(sorted(set(self.layer_ids) | set(other.layer_ids))))
            if self.counts is None:
                self.layer_ids, self.counts = other.layer_ids, other.counts.copy()
            elif self.layer_ids == other.layer_ids:
                self.counts = self.counts + other.counts
            else:  # other layers (another PP stage): merge rows by layer id
                union = tuple(sorted(set(self.layer_ids) | set(other.layer_ids)))
                merged = np.zeros((len(union), self.counts.shape[1]), dtype=np.int64)
                merged[[union.index(x) for x in self.layer_ids]] += self.counts
                merged[[union.index(x) for x in other.layer_ids]] += other.counts
                self.layer_ids, self.counts = union, merged
        if other.step_hist is not None:
            assert (other.step_seconds is not None and other.step_tokens is not None
                    and other.step_count is not None)  # set with step_hist
            if self.step_hist is None:
                self.step_hist, self.step_seconds, self.step_tokens, self.step_count = (
                    other.step_hist.copy(), other.step_seconds.copy(), other.step_tokens.copy(),
                    other.step_count.copy())
                self.token_bounds, self.duration_bounds = other.token_bounds, other.duration_bounds
            else:
                assert self.step_seconds is not None and self.step_tokens is not None and self.step_count is not None
                self.step_hist = self.step_hist + other.step_hist
                self.step_seconds = self.step_seconds + other.step_seconds
                self.step_tokens = self.step_tokens + other.step_tokens
                self.step_count = self.step_count + other.step_count
        return True


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def totals_of(snap: Snapshot) -> Totals:
    """A segment's totals. Its step count is the step_count extension; a segment without it (an older plugin, which
    timed every step) counts the steps of its histogram."""
    order = np.argsort(snap.layer_ids, kind="stable")
    counts = snap.counts[order, : snap.header.shape.num_experts].astype(np.int64)
    load = None if snap.ep_rank_load is None else snap.ep_rank_load[order].astype(np.float64)
    step_count = snap.step_hist.sum(axis=2) if snap.step_count is None else snap.step_count
    return Totals(tuple(int(x) for x in snap.layer_ids[order]), counts, snap.step_hist, snap.step_seconds,
                  snap.step_tokens, step_count, snap.token_bounds, snap.duration_bounds, load)


@dataclass
class Group:
    counted_path: str
    generation: int
    last: Totals
    last_updated_ns: int
    carried: Totals = field(default_factory=Totals)
    restarts: int = 0


class Aggregator:
    """Keeps per-group state between reads. Not thread-safe: the exporter loop is its only caller."""

    def __init__(self) -> None:
        self.groups: dict[GroupKey, Group] = {}

    def update(self, snapshots: dict[str, Snapshot]) -> dict[str, bool]:
        """Fold in the latest good snapshot of every segment path. Returns path -> counted?"""
        chosen: dict[GroupKey, tuple[str, Snapshot]] = {}
        for path, snap in sorted(snapshots.items()):
            r = snap.header.ranks
            key = (r.dp_rank, r.pp_rank)
            if key not in chosen or r.tp_rank < chosen[key][1].header.ranks.tp_rank:
                chosen[key] = (path, snap)
        for key, (path, snap) in chosen.items():
            group = self.groups.get(key)
            current = totals_of(snap)
            if group is None:
                self.groups[key] = Group(path, snap.header.generation, current, snap.header.updated_unix_ns)
                continue
            if snap.header.generation != group.generation and (
                    path == group.counted_path or snap.header.created_unix_ns > group.last_updated_ns):
                # The counted rank restarted (a sibling TP rank taking over was created with the old one and
                # carries the same cumulative counts): carry what the old process had counted.
                if not group.carried.add(group.last):  # another model now: counters restart from zero
                    log.warning("ranks dp=%d pp=%d restarted with another model shape: counters restart", *key)
                    group.carried = Totals()
                group.restarts += 1
            group.counted_path, group.generation, group.last = path, snap.header.generation, current
            group.last_updated_ns = snap.header.updated_unix_ns
        counted_paths = {path for path, _ in chosen.values()}
        return {path: path in counted_paths for path in snapshots}

    def totals(self) -> Totals:
        out = Totals()
        for group in self.groups.values():
            for part in (group.carried, group.last):
                out.add(part)  # an incompatible part (another model in the same directory) is left out
        return out

    @property
    def restarts(self) -> int:
        return sum(g.restarts for g in self.groups.values())

