"""Test-only vLLM plugin (benchmarks/eplb_health_gpu.py): makes the Nth EPLB rearrangement of every rank hang, the
way users report it, so that moe-monitor's stall signal can be checked on real vLLM. Not part of moe-monitor.

Rearrangements are counted by wrapping `EplbState.rearrange` (its profile run excluded). From the Nth on:
MOE_EPLB_HANG=sync: vLLM's `rearrange_expert_weights_inplace` (the weight transfer inside a sync rearrangement)
sleeps MOE_EPLB_HANG_SECONDS (default 90) before it runs, once: the engine waits inside the rearrangement, as with
a collective that does not return, and then goes on.
MOE_EPLB_HANG=async: the async worker's `transfer_layer` blocks forever (an event nobody sets): `rebalanced` stays
set, vLLM skips every later rearrangement and its counter climbs past step_interval, while serving goes on with the
old placement.
MOE_EPLB_HANG_AFTER=N (default 2). Without MOE_EPLB_HANG the plugin does nothing.
"""

from __future__ import annotations

import functools
import os
import threading
import time


def register() -> None:
    mode = os.environ.get("MOE_EPLB_HANG")
    if mode not in ("sync", "async"):
        return
    from vllm.distributed.eplb import eplb_state

    if getattr(eplb_state.EplbState.rearrange, "_eplb_hang", False):
        return
    after = int(os.environ.get("MOE_EPLB_HANG_AFTER", "2"))
    seconds = float(os.environ.get("MOE_EPLB_HANG_SECONDS", "90"))
    state = {"rearrangements": 0, "slept": False}
    never = threading.Event()
    rearrange = eplb_state.EplbState.rearrange

    @functools.wraps(rearrange)
    def counting(self, *args, **kwargs):
        if not kwargs.get("is_profile", args[0] if args else False):
            state["rearrangements"] += 1
        return rearrange(self, *args, **kwargs)

    counting._eplb_hang = True
    eplb_state.EplbState.rearrange = counting

    if mode == "sync":
        transfer = eplb_state.rearrange_expert_weights_inplace

        @functools.wraps(transfer)
        def hang(*args, **kwargs):
            if state["rearrangements"] >= after and not state["slept"]:
                state["slept"] = True
                print(f"moe-monitor-eplb-hang: sync rearrangement {state['rearrangements']} sleeps {seconds:.0f} s",
                      flush=True)
                time.sleep(seconds)
            return transfer(*args, **kwargs)

        eplb_state.rearrange_expert_weights_inplace = hang
    else:
        from vllm.distributed.eplb import async_worker

        transfer = async_worker.transfer_layer

        @functools.wraps(transfer)
        def hang(*args, **kwargs):
            if state["rearrangements"] >= after and not kwargs.get("is_profile", False):
                print(f"moe-monitor-eplb-hang: async rearrangement {state['rearrangements']} blocks its transfer "
                      f"for good", flush=True)
                never.wait()
            return transfer(*args, **kwargs)

        async_worker.transfer_layer = hang
