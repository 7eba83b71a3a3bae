"""The live expert placement under vLLM's EPLB: which logical expert each physical slot holds, per MoE layer.

Without EPLB vLLM places experts contiguously and never moves them, and the sidecar derives that itself. With
`--enable-eplb` the placement starts with redundant slots (`E + R` physical experts) and changes at run time
(each rearrangement), so the plugin publishes it with the counts: the sidecar then splits each window's logical
counts over the EP ranks with the placement that served them.

Where it comes from: `runner.eplb_state` (built by the model runner's `load_model`) holds one `EplbModelState`
per model, whose `physical_to_logical_map` is `[moe layers, physical experts]` on the device. It is read once
at attach (on the worker thread, before any CUDA-graph capture). After that, every change goes through
`vllm.distributed.eplb.eplb_state._commit_eplb_maps` (sync EPLB: all layers) or `_commit_eplb_maps_for_layer`
(async EPLB: one layer), which get the new map as a **host** tensor: the wrappers below copy it from there,
with no CUDA call, on whatever thread vLLM commits from. At each commit the plugin also closes the
placement's epoch: the counts routed under it (the recorder's host mirror, read then) are attributed to EP
ranks under it: attributing in the sidecar instead (per 1 s window, with the placement at the window's end) is
6-11 % wrong on real vLLM with a rearrangement every few seconds (benchmarks/results/vllm_ep_h200.md). The
publisher reads `LivePlacement.epoch`, swapped whole at each change (never written in place while read).
Host cost at DeepSeek-V3 scale (benchmarks/placement_cost.py): 0.6 ms per commit, whole-model or per-layer (async
EPLB: one per step while layers move, ~61 steps per rearrangement; every commit splits the whole model's counts),
0.6 ms per publish. This is the version proven on real GPU vLLM; benchmarks/results/placement_cost.txt also has
the cost of a per-layer commit that splits only its layer (0.06 ms).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from moe_monitor.stats.placement import Placement

from . import eplb_health

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Epoch:
    """One placement and what was attributed before it: swapped whole, read without a lock."""

    physical_to_logical: np.ndarray  # int32 [L, S] in force now
    base: np.ndarray  # float64 [L, R] assignments attributed under earlier placements
    counts_at_start: np.ndarray  # int64 [L, E] the counts when this placement took effect (per layer)


class LivePlacement:
    """Host copy of one model's physical→logical expert map, and the EP-rank load attributed under it.

    At each commit the counts routed since the previous one are attributed under the placement that served
    them (logical counts split evenly over an expert's replicas, as vLLM's replica choice does on average:
    benchmarks/results/vllm_ep_h200.md), so the published EP-rank load is exact up to that split and to the
    steps whose counting kernel had not reached the host mirror at the commit. `counts` reads the recorder's
    host counts (host memory only)."""

    def __init__(self, model_state, physical_to_logical: np.ndarray, num_ranks: int, counts):
        self.model_state = model_state  # the EplbModelState whose commits we follow
        self.num_ranks = num_ranks
        self._counts = counts
        p2l = np.ascontiguousarray(physical_to_logical, dtype=np.int32)
        zeros = np.zeros((p2l.shape[0], 0), dtype=np.int64)
        self.epoch = Epoch(p2l, np.zeros((p2l.shape[0], num_ranks)), zeros)  # counts_at_start: read lazily
        self.changes = 0
        self._warned = False

    @property
    def current(self) -> np.ndarray:
        return self.epoch.physical_to_logical

    @property
    def num_physical(self) -> int:
        return self.current.shape[1]

    def _split(self, counts: np.ndarray, p2l: np.ndarray) -> np.ndarray:
        return Placement(self.num_ranks, p2l.astype(np.int64)).rank_load(counts)

    def _since(self, epoch: Epoch, counts: np.ndarray) -> np.ndarray:
        start = epoch.counts_at_start
        return counts if start.shape != counts.shape else counts - start

    def rank_load(self) -> np.ndarray:
        """Cumulative load per EP rank, float64 [L, R]. The epoch is read before the counts: counts only grow,
        so the counts read are never older than the epoch's start."""
        epoch = self.epoch
        counts = np.asarray(self._counts(), dtype=np.int64)
        return epoch.base + self._split(self._since(epoch, counts), epoch.physical_to_logical)

    def commit(self, new: np.ndarray, layer: int | None = None) -> None:
        new = np.asarray(new, dtype=np.int32)
        epoch = self.epoch
        shape = epoch.physical_to_logical.shape[1:] if layer is not None else epoch.physical_to_logical.shape
        if new.shape != shape:  # the GPU count changed (elastic EP): the segment's shape cannot follow
            if not self._warned:
                log.warning("moe-monitor: vLLM's expert placement changed shape (%s -> %s); per-EP-rank load is "
                            "published with the last placement of the old shape until vLLM restarts",
                            epoch.physical_to_logical.shape, new.shape)
                self._warned = True
            return
        counts = np.asarray(self._counts(), dtype=np.int64)
        rows = slice(None) if layer is None else slice(layer, layer + 1)
        attributed = self._split(self._since(epoch, counts), epoch.physical_to_logical)
        base, p2l = epoch.base.copy(), epoch.physical_to_logical.copy()
        start = epoch.counts_at_start.copy() if epoch.counts_at_start.shape == counts.shape else np.zeros_like(counts)
        base[rows] += attributed[rows]
        start[rows] = counts[rows]
        p2l[rows] = new
        self.epoch = Epoch(p2l, base, start)
        self.changes += 1


def read_live_placement(runner, model, num_layers: int, num_ranks: int, counts) -> LivePlacement | None:
    """The placement of `model` when vLLM runs it with EPLB; None without EPLB (or when it cannot be read: one
    warning, and the sidecar falls back to the contiguous placement)."""
    state = getattr(runner, "eplb_state", None)
    if state is None or not getattr(state, "model_states", None):
        return None
    states = list(state.model_states.values())
    mine = [s for s in states if getattr(s, "model", None) is model] or states[:1]
    try:
        p2l = mine[0].physical_to_logical_map.cpu().numpy()  # worker thread, at attach: before any capture
    except Exception as e:  # noqa: BLE001 - an unexpected EPLB layout must not stop the attach
        log.warning("moe-monitor cannot read vLLM's EPLB placement (%s); EP-rank load assumes the contiguous "
                    "placement", e)
        return None
    if p2l.ndim != 2 or p2l.shape[0] != num_layers:
        log.warning("moe-monitor: vLLM's EPLB placement has shape %s, the model has %d MoE layers; EP-rank load "
                    "assumes the contiguous placement", p2l.shape, num_layers)
        return None
    if p2l.shape[1] % num_ranks:
        log.warning("moe-monitor: vLLM's EPLB placement has %d physical experts for %d EP ranks; EP-rank load "
                    "assumes the contiguous placement", p2l.shape[1], num_ranks)
        return None
    live = LivePlacement(mine[0], p2l, num_ranks, counts)
    follow_commits(live)
    return live


_followed: list[LivePlacement] = []


def follow_commits(live: LivePlacement) -> None:
    """Wrap vLLM's two commit functions (once per process) so that every new map reaches `live` (and the
    rearrangement is counted: eplb_health.on_commit)."""
    if live not in _followed:
        _followed.append(live)
    from vllm.distributed.eplb import eplb_state as es

    def wrap(name: str, per_layer: bool) -> None:
        original = getattr(es, name, None)
        if original is None or getattr(original, "_moe_monitor", False):
            return

        @functools.wraps(original)
        def commit(model_state, new_physical_to_logical_map, *args, **kwargs):
            result = original(model_state, new_physical_to_logical_map, *args, **kwargs)
            try:
                layer = kwargs.get("layer", args[0] if args else None) if per_layer else None
                for live in _followed:
                    if live.model_state is model_state:
                        live.commit(new_physical_to_logical_map.numpy(), layer)  # a host tensor: no CUDA call
                eplb_health.on_commit(model_state, layer)  # counts and times the rearrangement (host clock)
            except Exception:  # noqa: BLE001 - never raise into vLLM's rearrangement
                log.exception("moe-monitor could not follow an EPLB rearrangement; EP-rank load may use a stale "
                              "placement")
            return result

        commit._moe_monitor = True
        setattr(es, name, commit)

    wrap("_commit_eplb_maps", per_layer=False)
    wrap("_commit_eplb_maps_for_layer", per_layer=True)
    if not callable(getattr(es, "_commit_eplb_maps", None)):
        log.warning("moe-monitor: this vLLM commits EPLB placements differently; after a rearrangement the "
                    "published placement is stale")
