"""Host cost of the plugin's EPLB health recording (moe_monitor/plugin/eplb_health.py), on CPU.

    .venv/bin/python benchmarks/eplb_health_cost.py      # imports vLLM (~10 s)

1. Per engine step: vLLM 0.32's own `EplbState.step()` (sync EPLB, a 61-layer x 288-slot load window, an interval
   that is never reached) timed with the plugin's hooks installed and without, interleaved rounds. The plugin
   wraps no per-step function, so the two should be equal within noise: this checks that nothing leaked onto the
   step path (the `rearrange` wrapper is a class attribute `step` only calls at the interval).
2. Per rearrangement: the `rearrange` wrapper around a no-op (entered + returned), against the bare no-op.
3. Per commit: `eplb_health.on_commit` (called by placement's commit wrappers after vLLM's commit): per layer
   (async) and whole model (sync).
4. Per publish (the publisher thread): `EplbRecorder.record()`, and `SegmentWriter.publish` of a DeepSeek-V3-sized
   segment (61 x 256 counts, 288 slots, 32 EP ranks) with the 104-byte extension and without.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L, E, S, R = 61, 256, 288, 32


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def fmt(name: str, times: list[float], unit: float = 1e6, suffix: str = "us") -> str:
    return (f"{name:62s} median {unit * np.median(times):8.3f} {suffix}, p99 {unit * np.percentile(times, 99):8.3f} "
            f"{suffix} ({len(times)} calls)")


def vllm_state(es, torch):
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29581")
        dist.init_process_group("gloo", rank=0, world_size=1)
    group = types.SimpleNamespace(device_group=dist.group.WORLD, cpu_group=dist.group.WORLD, world_size=1)
    es.get_ep_group = lambda: group
    config = types.SimpleNamespace(eplb_config=types.SimpleNamespace(step_interval=10**12, window_size=1000,
                                                                     log_balancedness_interval=1))
    state = es.EplbState(config, torch.device("cpu"))
    p2l = torch.tensor(np.stack([np.concatenate([np.arange(E), np.arange(S - E)]) for _ in range(L)]))
    ms = types.SimpleNamespace(physical_to_logical_map=p2l, model=types.SimpleNamespace(num_moe_layers=L),
                               expert_load_pass=torch.zeros(L, S, dtype=torch.int32),
                               expert_load_window=torch.zeros(1000, L, S, dtype=torch.int32), rebalanced=False)
    state.model_states["m"] = ms
    state.expert_load_window_size, state.expert_rearrangement_step_interval = 1000, 10**12
    state.expert_rearrangement_step = 10**12 - 500  # inside the recorded window: step() copies the load pass
    return state, ms


def one_step(state) -> None:
    state.expert_rearrangement_step = 10**12 - 500  # inside the recorded window, never at the interval
    state.step()


def main(rounds: int = 6, steps: int = 2000) -> None:
    import torch
    from vllm.distributed.eplb import eplb_state as es

    from moe_monitor.channel import Ranks, SegmentWriter, Shape
    from moe_monitor.plugin import eplb_health
    from moe_monitor.plugin.steps import StepStats

    state, ms = vllm_state(es, torch)
    bare_rearrange = es.EplbState.rearrange
    print(f"vLLM EplbState.step(), sync, {L} layers x {S} slots, window 1000 (interleaved rounds of {steps} steps)")
    with_hooks, without = [], []
    for r in range(rounds):
        for hooked in (False, True) if r % 2 == 0 else (True, False):
            es.EplbState.rearrange = bare_rearrange
            eplb_health._recorders.clear()
            if hooked:
                eplb_health.follow_eplb(state, ms, L, lambda: 0)
            (with_hooks if hooked else without).extend(timed(lambda i: one_step(state), steps))
    print(fmt("  without the plugin's hooks", without))
    print(fmt("  with them (rearrange wrapped, a recorder registered)", with_hooks))
    es.EplbState.rearrange = bare_rearrange

    # 2. the rearrange wrapper around a no-op
    class Bare:
        def rearrange(self, is_profile=False, rank_mapping=None, use_last_expert_load=False):
            return None
    fake_es = types.SimpleNamespace(EplbState=Bare)
    bare = Bare()
    plain = timed(lambda i: bare.rearrange(), 20000)
    import vllm.distributed.eplb as pkg
    real_module = pkg.eplb_state
    sys.modules["vllm.distributed.eplb.eplb_state"], pkg.eplb_state = fake_es, fake_es
    try:
        eplb_health._recorders.clear()
        eplb_health.follow_eplb(bare, ms, L, lambda: 0)  # warns: the stand-in has none of vLLM's counters
        wrapped = timed(lambda i: bare.rearrange(), 20000)
    finally:
        sys.modules["vllm.distributed.eplb.eplb_state"], pkg.eplb_state = real_module, real_module
    print("per rearrangement (vLLM's main thread, every step_interval steps)")
    print(fmt("  a no-op rearrange", plain))
    print(fmt("  the same, wrapped (entered + returned)", wrapped))

    # 3. commits
    print("per commit (after vLLM's own commit, in placement's wrapper)")
    print(fmt("  on_commit, one layer (async EPLB: one a step while layers move)",
              timed(lambda i: eplb_health.on_commit(ms, i % L), 20000)))
    print(fmt("  on_commit, whole model (sync EPLB)", timed(lambda i: eplb_health.on_commit(ms, None), 20000)))

    # 4. publish
    print("per publish (the publisher thread)")
    on_vllm = eplb_health.EplbRecorder(state, ms, L, lambda: 0)  # reads vLLM's real EplbState
    print(fmt("  EplbRecorder.record() of vLLM's EplbState", timed(lambda i: on_vllm.record(), 20000)))
    st = StepStats()
    shape = Shape(L, E, len(st.token_bounds), len(st.duration_bounds), num_physical=S, num_load_ranks=R)
    arrays = st.snapshot()
    arrays.update(counts=np.ones((L, E), dtype=np.int64), layer_ids=np.arange(L, dtype=np.int32),
                  layer_flags=np.ones(L, dtype=np.uint8), physical_to_logical=ms.physical_to_logical_map.numpy(),
                  ep_rank_load=np.ones((L, R)))
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        writers = {False: SegmentWriter(os.path.join(d, "a"), "m", Ranks(ep_size=R), shape, 2),
                   True: SegmentWriter(os.path.join(d, "b"), "m", Ranks(ep_size=R), shape, 2, eplb_health=True)}
        record = on_vllm.record()
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for ext in (False, True) if r % 2 == 0 else (True, False):
                times[ext] += timed(lambda i, w=writers[ext], e=record if ext else None: w.publish(arrays, eplb=e),
                                    500)
        print(fmt(f"  SegmentWriter.publish, {L}x{E} counts, {S} slots, {R} ranks", times[False]))
        print(fmt("  the same with the eplb_health extension (+104 bytes)", times[True]))


if __name__ == "__main__":
    main()
