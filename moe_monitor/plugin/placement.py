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
with no CUDA call, on whatever thread vLLM commits from. The publisher reads `LivePlacement.current`, a
reference swapped whole at each change (never an array written in place while it is read).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)


class LivePlacement:
    """Host copy of one model's physical→logical expert map, int32 [moe layers, physical experts]."""

    def __init__(self, model_state, physical_to_logical: np.ndarray):
        self.model_state = model_state  # the EplbModelState whose commits we follow
        self.current = np.ascontiguousarray(physical_to_logical, dtype=np.int32)
        self.changes = 0
        self._warned = False

    @property
    def num_physical(self) -> int:
        return self.current.shape[1]

    def commit(self, new: np.ndarray, layer: int | None = None) -> None:
        new = np.asarray(new, dtype=np.int32)
        shape = self.current.shape[1:] if layer is not None else self.current.shape
        if new.shape != shape:  # the GPU count changed (elastic EP): the segment's shape cannot follow
            if not self._warned:
                log.warning("moe-monitor: vLLM's expert placement changed shape (%s -> %s); per-EP-rank load is "
                            "published with the last placement of the old shape until vLLM restarts",
                            self.current.shape, new.shape)
                self._warned = True
            return
        if layer is None:
            updated = new.copy()
        else:
            updated = self.current.copy()
            updated[layer] = new
        self.current = updated
        self.changes += 1


def read_live_placement(runner, model, num_layers: int) -> LivePlacement | None:
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
    live = LivePlacement(mine[0], p2l)
    follow_commits(live)
    return live


_followed: list[LivePlacement] = []


def follow_commits(live: LivePlacement) -> None:
    """Wrap vLLM's two commit functions (once per process) so that every new map reaches `live`."""
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
