"""Benchmark-only vLLM plugin (benchmarks/vllm_ep.py): vLLM's own EPLB load, the reference moe-monitor's EP-rank
load is checked against. Not part of moe-monitor: it syncs with the device every step.

`EplbState.step` is wrapped: before vLLM folds a real (not dummy, not profile) step's `expert_load_pass` (this
rank's tokens per physical expert slot, [moe layers, physical experts], padding excluded by vLLM) into its
window, it is added to a cumulative host array, saved with the placement in force to
`$MOE_EPLB_REFERENCE_DIR/ep<rank>.npz` (`load`: cumulative [L, S]; `steps`; `physical_to_logical`: [L, S] now;
`placements`: how many different placements this rank saw, at any step; `even_split_rank_load`: [L, R] this
rank's tokens split evenly over the replicas of each step's placement, moe-monitor's method with exact timing).
Set vLLM's `--eplb-config` window_size >= step_interval, or vLLM records (and zeroes) the pass only near a
rearrangement.
"""

from __future__ import annotations

import os


def register() -> None:
    out = os.environ.get("MOE_EPLB_REFERENCE_DIR")
    if not out:
        return
    from vllm.distributed.eplb.eplb_state import EplbState

    original = EplbState.step
    if getattr(original, "_eplb_reference", False):
        return
    totals: dict = {}

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False):
        result = original(self, is_dummy, is_profile, log_stats) if is_profile else None
        if not is_profile and self.model_states:
            import numpy as np
            from vllm.distributed.parallel_state import get_ep_group

            state = next(iter(self.model_states.values()))
            load = state.expert_load_pass.cpu().numpy().astype(np.int64)
            p2l = state.physical_to_logical_map.cpu().numpy()
            t = totals.setdefault("t", {"load": np.zeros_like(load), "steps": 0, "placements": set()})
            ranks = get_ep_group().world_size
            if not is_dummy:  # dummy steps (an idle DP rank) route padding: vLLM discards their load too
                t["load"] += load
                t["steps"] += 1
                # what moe-monitor computes, with perfect timing: this step's logical counts split evenly over
                # the replicas of the placement in force (isolates the replica-split assumption)
                L, S = load.shape
                logical = np.zeros((L, int(p2l.max()) + 1))
                replicas = np.zeros_like(logical)
                for layer in range(L):
                    np.add.at(logical[layer], p2l[layer], load[layer])
                    np.add.at(replicas[layer], p2l[layer], 1)
                per_slot = np.take_along_axis(logical / replicas, p2l, axis=1)
                even = per_slot.reshape(L, ranks, S // ranks).sum(axis=2)
                t["even"] = t.get("even", 0) + even
            t["placements"].add(p2l.tobytes())
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, f"ep{get_ep_group().rank_in_group}.npz")
            np.savez(path + ".tmp.npz", load=t["load"], steps=t["steps"], physical_to_logical=p2l,
                     placements=len(t["placements"]), even_split_rank_load=t.get("even", 0))
            os.replace(path + ".tmp.npz", path)
        return result if is_profile else original(self, is_dummy, is_profile, log_stats)

    step._eplb_reference = True
    EplbState.step = step
