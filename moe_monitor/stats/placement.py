"""Expert placement: which EP rank serves each logical expert, and the physical (per-rank) load it implies.

Physical slots are dealt to EP ranks contiguously (slots_per_rank each), as vLLM does. A logical expert with
several replicas (EPLB's redundant experts) has its tokens split evenly over them, which is what vLLM's
replica selection does on average.

Map file (JSON), the shape of vLLM EPLB's `physical_to_logical_map`:

    {"num_ranks": 16, "physical_to_logical": [[0, 1, ..., 255, 17, 42, ...], ...]}

one list per MoE layer (in layer order), or one list used for every layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    """Which logical expert each physical slot holds, per MoE layer, with the slots dealt to `num_ranks` EP ranks
    contiguously (`slots_per_rank` each, as vLLM and SGLang lay them out). The one placement type: the sidecar
    splits counts with it, the plugin attributes load under vLLM's live placement with it, and the EPLB advisor's
    plans hold one."""

    num_ranks: int
    physical_to_logical: np.ndarray  # int64 [layers, physical slots] (or [1, slots] for every layer)

    @property
    def num_layers(self) -> int:
        return int(self.physical_to_logical.shape[0])

    @property
    def num_physical(self) -> int:
        return int(self.physical_to_logical.shape[1])

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    def replicas(self, num_experts: int) -> np.ndarray:
        """int64 [layers, num_experts]: how many physical slots hold each logical expert (0: none)."""
        return np.stack([np.bincount(row, minlength=num_experts) for row in self.physical_to_logical])

    def rank_load(self, counts: np.ndarray) -> np.ndarray:
        """Load per EP rank, float64 [layers, ranks], from logical counts [layers, experts]: each slot carries its
        expert's count divided by the expert's replica count (tokens split evenly over the replicas, which is
        what vLLM's replica choice gives on average), summed over each rank's slots."""
        c = np.asarray(counts, dtype=np.float64)
        L, E = c.shape
        if self.num_ranks < 1:
            raise PlacementError(f"{self.num_ranks} EP ranks: at least 1 expected")
        if self.num_layers not in (1, L):
            raise PlacementError(f"placement has {self.num_layers} layers, the model has {L} MoE layers")
        p2l = np.broadcast_to(self.physical_to_logical, (L, self.num_physical))
        if p2l.max(initial=-1) >= E:
            raise PlacementError(f"placement names logical expert {int(p2l.max())}, the model has {E}")
        if p2l.min(initial=0) < 0:
            raise PlacementError(f"placement names logical expert {int(p2l.min())}: ids start at 0")
        if p2l.shape[1] % self.num_ranks:
            raise PlacementError(f"{p2l.shape[1]} physical slots do not split evenly over {self.num_ranks} EP ranks")
        replicas = np.broadcast_to(self.replicas(E).astype(np.float64), (L, E))
        if (replicas == 0).any():
            missing = int(np.argwhere(replicas == 0)[0][1])
            raise PlacementError(f"logical expert {missing} has no physical slot: its tokens would be lost")
        rows = np.arange(L)[:, None]
        per_slot = c[rows, p2l] / replicas[rows, p2l]
        return per_slot.reshape(L, self.num_ranks, self.slots_per_rank).sum(axis=2)


def contiguous(num_experts: int, num_ranks: int) -> Placement:
    """vLLM's default: rank r serves experts [r * E/R, (r+1) * E/R)."""
    if num_ranks < 1 or num_experts % num_ranks:
        raise PlacementError(f"{num_experts} experts do not split evenly over {num_ranks} EP ranks")
    return Placement(num_ranks, np.arange(num_experts, dtype=np.int64)[None, :])


def parse_placement(doc: object, num_layers: int | None = None) -> Placement:
    """Validate a placement document; num_layers None accepts any layer count (checked against the model
    when loads are computed)."""
    if not isinstance(doc, dict) or "num_ranks" not in doc or "physical_to_logical" not in doc:
        raise PlacementError('expected {"num_ranks": R, "physical_to_logical": [...]}')
    ranks = doc["num_ranks"]
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise PlacementError(f"num_ranks must be a positive integer, got {ranks!r}")
    raw = doc["physical_to_logical"]
    try:
        p2l = np.asarray(raw, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise PlacementError("physical_to_logical must be a list of integers, or one such list per layer") from None
    if p2l.ndim == 1:
        p2l = p2l[None, :]
    if p2l.ndim != 2 or p2l.shape[1] == 0:
        raise PlacementError("physical_to_logical must be a list of integers, or one such list per layer")
    if num_layers is not None and p2l.shape[0] not in (1, num_layers):
        raise PlacementError(f"physical_to_logical has {p2l.shape[0]} layers, the model has {num_layers} MoE layers")
    if p2l.shape[1] % ranks:
        raise PlacementError(f"{p2l.shape[1]} physical slots do not split evenly over {ranks} ranks")
    if p2l.min() < 0:
        raise PlacementError("logical expert ids must be >= 0")
    return Placement(ranks, p2l)


def load_placement(path: str, num_layers: int | None = None) -> Placement:
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as e:
        raise PlacementError(f"cannot read placement file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise PlacementError(f"placement file {path} is not JSON: {e}") from None
    return parse_placement(doc, num_layers)


class RankLoadLedger:
    """Cumulative per-EP-rank load when the placement changes at run time (vLLM's EPLB): each assignment is
    attributed once, under the placement in force when it was first seen, so the cumulative load never
    decreases and a rearrangement does not re-attribute history. Under a fixed placement it equals
    `placement.rank_load(counts)`.

    `update` takes the cumulative logical counts [L, E] and, where the ranks publish it, the cumulative EP-rank load
    the plugin attributed itself at every rearrangement (exact epochs). While that goes on (same shape, no rank
    lower), the ledger follows it; a tick without it, or where it does not go on, splits that tick's new assignments
    under the placement, and the published figures are followed again from there: switching sources never makes
    the load go down. When the counts are not a continuation of the previous ones (another shape, a counter that
    went down, another EP size) everything is attributed afresh and `resets` grows, so a caller taking differences
    between two readings can tell."""

    def __init__(self, resets: int = 0):
        self.counts: np.ndarray | None = None
        self.load: np.ndarray | None = None
        self.published: np.ndarray | None = None  # the plugin's figures of the last update, when it had them
        self.offset: np.ndarray | float = 0.0  # load - published while the published figures go on
        self.resets = resets

    def update(self, counts: np.ndarray, placement: Placement | None,
               published: np.ndarray | None = None) -> np.ndarray:
        """Raises PlacementError (state unchanged) when the counts must be split and the placement does not fit."""
        counts = np.asarray(counts, dtype=np.int64)
        ranks = published.shape[1] if published is not None else placement.num_ranks if placement else None
        prev = self._continued(counts, ranks)
        offset: np.ndarray | float = 0.0
        if prev is None:
            load = published.copy() if published is not None else _split(placement, counts)
        elif published is not None and self.published is not None and published.shape == self.published.shape \
                and bool((published >= self.published).all()):
            load, offset = published + self.offset, self.offset
        else:
            prev_counts, prev_load = prev
            load = prev_load + self._growth(placement, counts - prev_counts, prev_load, published is not None)
            offset = 0.0 if published is None else load - published
        if prev is None:
            self.resets += 1
        self.counts, self.load, self.published, self.offset = counts.copy(), load, published, offset
        return load

    def _continued(self, counts: np.ndarray, ranks: int | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The previous (counts, load) when `counts` continue them (same shape, same EP size, no counter lower);
        None when everything must be attributed afresh."""
        if self.counts is None or self.load is None or counts.shape != self.counts.shape \
                or self.load.shape[1] != ranks or bool((counts < self.counts).any()):
            return None
        return self.counts, self.load

    def _growth(self, placement: Placement | None, new: np.ndarray, load: np.ndarray, published: bool) -> np.ndarray:
        """New assignments under the placement; none, where the plugin's figures are there but no placement fits
        (the counter pauses for that tick rather than guess)."""
        try:
            growth = _split(placement, new)
            if growth.shape != load.shape:
                raise PlacementError(f"the placement has {growth.shape[1]} EP ranks, the load {load.shape[1]}")
            return growth
        except PlacementError:
            if not published:
                raise
            return np.zeros_like(load)


def _split(placement: Placement | None, counts: np.ndarray) -> np.ndarray:
    if placement is None:
        raise PlacementError("no expert placement fits the model")
    return placement.rank_load(counts)
